"""Where the operator CLI finds its server and token, and how it reads --since."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgewise.cli.operator import parse_since
from edgewise.cloud.client import find_config, load_config
from edgewise.errors import ConfigError
from edgewise.security.pki import CertificateAuthority


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "pki", "edgewise.local")


def write(path: Path, **doc: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_order_config_env_home_data(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "data"
    explicit = write(tmp_path / "x.json", url="https://a:1", token="t", ca="c")
    env = write(tmp_path / "env.json", url="https://a:1", token="t", ca="c")
    in_data = write(data / "cli.json", url="https://a:1", token="t", ca="c")
    assert find_config(explicit, str(env), home, data) == explicit
    assert find_config(None, str(env), home, data) == env
    assert find_config(None, None, home, data) == in_data
    user = write(home / ".config/edgewise/cli.json", url="https://a:1", token="t", ca="c")
    assert find_config(None, None, home, data) == user
    with pytest.raises(ConfigError, match=r"--config .*nope\.json: no such file"):
        find_config(tmp_path / "nope.json", str(env), home, data)
    with pytest.raises(ConfigError, match=r"\$EDGEWISE_CONFIG=.*: no such file"):
        find_config(None, str(tmp_path / "nope.json"), home, data)
    with pytest.raises(ConfigError) as e:
        find_config(None, None, tmp_path / "h2", tmp_path / "d2")
    msg = str(e.value)
    assert "h2/.config/edgewise/cli.json and " in msg and "d2/cli.json" in msg
    assert "edgewise cloud serve --data DIR" in msg


def test_load_config(tmp_path: Path, ca: CertificateAuthority) -> None:
    by_path = load_config(write(tmp_path / "pki/cli.json", url="https://127.0.0.1:8443/",
                                token=" ewo_x ", ca="ca.pem"))  # relative to the file
    assert by_path.url == "https://127.0.0.1:8443"
    assert by_path.token.get_secret_value() == "ewo_x"
    assert by_path.ca == ca.cert_pem.decode()
    assert "ewo_x" not in repr(by_path)
    inline = load_config(write(tmp_path / "c.json", url="https://h:1", token="t",
                               ca=ca.cert_pem.decode()))
    assert inline.ca == ca.cert_pem.decode() and "(inline)" in inline.ca_source
    cases = [
        ("not json", "not JSON"),
        (json.dumps([1]), "expected a JSON object"),
        (json.dumps({"url": "https://h:1", "ca": "c"}), "field 'token' is missing"),
        (json.dumps({"url": "http://h:1", "token": "t", "ca": "c"}), "must start with https://"),
        (json.dumps({"url": "https://h:1", "token": "t", "ca": "missing.pem"}),
         "cannot read the CA certificate"),
    ]
    for text, words in cases:
        p = tmp_path / "bad.json"
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert words in str(e.value), text


def test_parse_since() -> None:
    assert parse_since("1764547200") == 1764547200.0
    assert parse_since("1764547200.25") == 1764547200.25
    assert parse_since("2025-12-01T00:00:00Z") == 1764547200.0
    assert parse_since("2025-12-01T01:00:00+01:00") == 1764547200.0
    assert parse_since("2025-12-01T00:00:00") == 1764547200.0  # no zone: UTC
    assert parse_since("10m", now=1000.0) == 400.0
    assert parse_since("2h", now=10_000.0) == 2800.0
    for bad in ("yesterday", "10 parsecs", ""):
        with pytest.raises(ConfigError, match="give Unix seconds, an ISO time"):
            parse_since(bad)
