"""The release format (`edgewise.sync.release`): reproducible manifests, the layout, path rules,
bounded and strict parsing of a peer's manifest; and the repository side of TUF as pure
functions (`edgewise.security.tuf.repository`): versions, re-signing when due, rotation rules."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from tuf.api.metadata import Metadata

from edgewise.errors import ConfigError, PeerError
from edgewise.security.tuf import keys as tk
from edgewise.security.tuf import repository as repo
from edgewise.security.tuf.repository import Expiry, TopMetadata
from edgewise.sync import release as rel
from edgewise.sync.release import Manifest, ReleaseFile, build_manifest

SHA = "a" * 64


def make(root: Path) -> Path:
    for d in ("pipelines", "plugins", "agent", "config/site", "models"):
        (root / d).mkdir(parents=True)
    (root / "pipelines" / "line.yaml").write_text("name: line\n")
    (root / "pipelines" / "spare.yaml").write_text("name: spare\n")
    (root / "plugins" / "ops-1.0-py3-none-any.whl").write_bytes(b"PK wheel")
    (root / "agent" / "edgewise-0.2.0-py3-none-any.whl").write_bytes(b"PK agent")
    (root / "config" / "site" / "a.toml").write_text("x = 1\n")
    (root / "models" / "m.bin").write_bytes(bytes(range(256)) * 40)
    (root / "readme.txt").write_text("anything else is a model file\n")
    (root / "setpoints.yaml").write_text("temp_max: 95.5\nmode: auto\nenabled: true\nn: 3\n")
    return root


def test_build_gives_kinds_hashes_and_setpoints(tmp_path: Path) -> None:
    m = build_manifest(make(tmp_path / "r"), "2026.12.1")
    assert [(f.path, f.kind, f.length) for f in m.files] == [
        ("agent/edgewise-0.2.0-py3-none-any.whl", "agent", 8),
        ("config/site/a.toml", "config", 6),
        ("models/m.bin", "model", 10240),
        ("pipelines/line.yaml", "pipeline", 11),
        ("pipelines/spare.yaml", "pipeline", 12),
        ("plugins/ops-1.0-py3-none-any.whl", "plugin", 8),
        ("readme.txt", "model", 30),
    ]
    assert m.files[3].sha256 == hashlib.sha256(b"name: line\n").hexdigest()
    assert m.setpoints == {"temp_max": 95.5, "mode": "auto", "enabled": True, "n": 3}
    assert [f.path for f in m.pipelines()] == ["pipelines/line.yaml", "pipelines/spare.yaml"]
    assert [f.path for f in m.by_kind("plugin")] == ["plugins/ops-1.0-py3-none-any.whl"]
    assert m.total_bytes() == 8 + 6 + 10240 + 11 + 12 + 8 + 30
    with pytest.raises(ValueError, match="unknown kind"):
        m.by_kind("firmware")


def test_build_is_reproducible_whatever_mtimes_and_order(tmp_path: Path) -> None:
    a = build_manifest(make(tmp_path / "a"), "1.0.0")
    b_dir = tmp_path / "b"
    # the same files, made in another order, with other mtimes
    for src in sorted((tmp_path / "a").rglob("*"), reverse=True):
        dst = b_dir / src.relative_to(tmp_path / "a")
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            os.utime(dst, (time.time() - 86400 * 30, time.time() - 86400 * 30))
    b = build_manifest(b_dir, "1.0.0")
    assert a.to_bytes() == b.to_bytes()
    assert a.digest() == b.digest()
    assert build_manifest(b_dir, "1.0.1").digest() != a.digest()


def test_to_bytes_is_canonical_json(tmp_path: Path) -> None:
    m = Manifest("1.0", (ReleaseFile("models/b", SHA, 1, "model"),
                         ReleaseFile("models/a", "b" * 64, 2, "model")), {"z": 1, "a": 2})
    data = m.to_bytes()
    assert data == (b'{"files":[{"kind":"model","length":2,"path":"models/a","sha256":"'
                    + b"b" * 64 + b'"},{"kind":"model","length":1,"path":"models/b","sha256":"'
                    + b"a" * 64 + b'"}],"format":1,"setpoints":{"a":2,"z":1},"version":"1.0"}')
    assert Manifest.from_bytes(data).files[0].path == "models/a"
    assert m.blobs() == {SHA: 1, "b" * 64: 2}


@pytest.mark.parametrize(("path", "fragment"), [
    ("../etc/passwd", "'..' component"),
    ("models/../../x", "'..' component"),
    ("/etc/passwd", "absolute path"),
    ("models\\x.bin", "backslash"),
    ("models//x", "empty"),
    ("models/./x", "'.' or '..'"),
    ("models/.hidden", "not starting with '.'"),
    ("models/-rf", "not starting with '.' or '-'"),
    ("models/a b", "letters, digits"),
    ("models/" + "x" * 129, "at most 128"),
    ("m/" * 128 + "x", "longer than 255"),
    ("", "non-empty"),
])
def test_bad_paths_are_refused(path: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace(".", "\\.").replace("(", "\\(")):
        rel.check_path(path)


@pytest.mark.parametrize(("layout", "fragment"), [
    ({"pipelines/a.txt": b"x"}, "pipelines/ holds <name>.yaml files only"),
    ({"pipelines/sub/a.yaml": b"x"}, "pipelines/ holds <name>.yaml files only"),
    ({"plugins/a.tar.gz": b"x"}, "plugins/ holds <name>.whl wheels only"),
    ({"agent/other-1.0-py3-none-any.whl": b"x"}, "agent/ holds one edgewise-"),
    ({"agent/edgewise-1-py3-none-any.whl": b"x", "agent/edgewise-2-py3-none-any.whl": b"y"},
     "more than one agent wheel"),
    ({"models/a b.bin": b"x"}, "letters, digits"),
    ({"setpoints.yaml": b"a: 1\n"}, "an empty release"),
    ({}, "an empty release"),
    ({"models/m": b"x", "setpoints.yaml": b"a: &x 1\nb: *x\n"}, "aliases are not allowed"),
    ({"models/m": b"x", "setpoints.yaml": b"a: [1, 2]\n"}, "a: list is not a number"),
    ({"models/m": b"x", "setpoints.yaml": b"- 1\n"}, "not a map of name to value"),
    ({"models/m": b"x", "setpoints.yaml": b"a: .nan\n"}, "a: not a finite number"),
    ({"models/m": b"x", "setpoints.yaml": b"a: [\n"}, "not valid YAML"),
])
def test_build_refuses_bad_layouts_naming_the_file(tmp_path: Path, layout: dict[str, bytes],
                                                   fragment: str) -> None:
    root = tmp_path / "r"
    root.mkdir()
    for name, data in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    with pytest.raises(ConfigError, match=fragment.replace("(", "\\(")) as info:
        build_manifest(root, "1.0")
    assert str(root) in str(info.value)


def test_build_refuses_a_symlink_leaving_the_folder_and_bad_versions(tmp_path: Path) -> None:
    root = make(tmp_path / "r")
    (tmp_path / "secret").write_text("key")
    (root / "models" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(ConfigError, match=r"models/link: symbolic link to .*secret, outside"):
        build_manifest(root, "1.0")
    (root / "models" / "link").unlink()
    (root / "models" / "inside").symlink_to(root / "models" / "m.bin")  # stays inside: a file
    m = build_manifest(root, "1.0")
    assert {f.path for f in m.files} >= {"models/inside", "models/m.bin"}
    for bad in ("", "../1", "1.0/2", "-1", "v" * 65, "1 0"):
        with pytest.raises(ConfigError, match="bad release version"):
            build_manifest(root, bad)
    with pytest.raises(ConfigError, match="not a folder"):
        build_manifest(tmp_path / "nope", "1.0")


GOOD = Manifest("1.0", (ReleaseFile("pipelines/a.yaml", SHA, 3, "pipeline"),), {"t": 1.5})


def doc(**changes: object) -> bytes:
    d = orjson.loads(GOOD.to_bytes())
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    return orjson.dumps(d, option=orjson.OPT_SORT_KEYS)


def file(**changes: object) -> dict:
    f = {"path": "pipelines/a.yaml", "sha256": SHA, "length": 3, "kind": "pipeline"}
    f.update(changes)
    return f


@pytest.mark.parametrize(("data", "fragment"), [
    (b"x" * (rel.MAX_MANIFEST_BYTES + 1), "more than 4194304 bytes"),
    (b"{", "not JSON"),
    (b"[]", "not a JSON object"),
    (doc(extra=1), "unknown field 'extra'"),
    (doc(format=2), "format: 2, expected 1"),
    (doc(version="../x"), "version: bad release version"),
    (doc(files={}), "files: not a list"),
    (doc(files=[file()] * (rel.MAX_FILES + 1)), "files: more than 10000"),
    (doc(files=[file(path="../a.yaml")]), r"files\[0\].path: path '../a.yaml'"),
    (doc(files=[file(sha256="A" * 64)]), r"files\[0\].sha256: not a sha256"),
    (doc(files=[file(length=-1)]), r"files\[0\].length: not an integer"),
    (doc(files=[file(length=1.5)]), r"files\[0\].length: not an integer"),
    (doc(files=[file(length=rel.MAX_FILE_BYTES + 1)]), r"files\[0\].length"),
    (doc(files=[file(kind="model")]), r"files\[0\].kind: 'model', but pipelines/a.yaml is a"),
    (doc(files=[file(mode=1)]), r"files\[0\]: needs exactly path, sha256, length and kind"),
    (doc(files=[file(path="pipelines/b.yaml"), file()]), "not sorted by path"),
    (doc(files=[file(), file()]), "a path is listed twice"),
    (doc(files=[file(path="models/a", kind="model"), file(path="models/a/b", kind="model")]),
     "models/a is a file and a folder"),
    (doc(setpoints=[1]), "setpoints: not a map"),
    (doc(setpoints={"x": {"y": 1}}), "setpoints: x: dict is not a number"),
    (doc(setpoints=None), "setpoints: not a map"),  # absent: None is allowed but not canonical
    (GOOD.to_bytes().replace(b'"format":1', b'"format": 1'), "not in canonical form"),
])
def test_from_bytes_refuses_naming_the_field(data: bytes, fragment: str) -> None:
    if fragment == "setpoints: not a map" and b"setpoints" not in data:
        with pytest.raises(PeerError, match="not in canonical form"):
            Manifest.from_bytes(data)
        return
    with pytest.raises(PeerError, match=fragment):
        Manifest.from_bytes(data)


def test_from_bytes_round_trip() -> None:
    assert Manifest.from_bytes(GOOD.to_bytes()) == GOOD
    assert rel.manifest_target("1.0") == "releases/1.0/manifest.json"
    assert rel.blob_target(SHA) == f"blobs/{SHA}"
    assert GOOD.files[0].target() == f"blobs/{SHA}"


# -- the repository side of TUF ------------------------------------------------------------------

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def keys() -> tuple[list, dict]:
    return [tk.generate()], {r: tk.generate() for r in repo.ONLINE_ROLES}


def signed(data: bytes | None) -> object:
    assert data is not None
    return Metadata.from_bytes(data).signed


def test_publish_bumps_every_version_and_lists_exactly_the_targets() -> None:
    roots, online = keys()
    top = TopMetadata(repo.new_root(roots, {r: s.public_key for r, s in online.items()},
                                    now=NOW))
    top = repo.publish(top, {"blobs/" + SHA: (3, SHA)}, online, now=NOW)
    top = repo.publish(top, {"blobs/" + SHA: (3, SHA), "blobs/" + "b" * 64: (4, "b" * 64)},
                       online, now=NOW)
    assert [top.version(r) for r in ("root", "targets", "snapshot", "timestamp")] == [1, 2, 2, 2]
    assert repo.current_targets(top) == {"blobs/" + SHA: (3, SHA),
                                         "blobs/" + "b" * 64: (4, "b" * 64)}
    ts = signed(top.timestamp)
    assert ts.snapshot_meta.version == 2 and ts.snapshot_meta.length == len(top.snapshot)
    assert ts.expires == NOW + timedelta(days=1)
    snap = signed(top.snapshot)
    assert snap.meta["targets.json"].version == 2
    assert snap.meta["targets.json"].length == len(top.targets)
    assert signed(top.root).consistent_snapshot is True


def test_refresh_re_signs_what_is_due() -> None:
    roots, online = keys()
    top = TopMetadata(repo.new_root(roots, {r: s.public_key for r, s in online.items()},
                                    now=NOW))
    top = repo.publish(top, {}, online, now=NOW)
    assert repo.refresh(top, online, now=NOW + timedelta(hours=11)) is None
    ts_only = repo.refresh(top, online, now=NOW + timedelta(hours=13))  # half of 1 day gone
    assert ts_only is not None
    assert [ts_only.version(r) for r in ("targets", "snapshot", "timestamp")] == [1, 1, 2]
    all_three = repo.refresh(top, online, now=NOW + timedelta(days=4))  # half of snapshot's 7
    assert all_three is not None
    assert [all_three.version(r) for r in ("targets", "snapshot", "timestamp")] == [2, 2, 2]
    forced = repo.refresh(top, online, now=NOW, force=True)
    assert forced is not None and forced.version("targets") == 2
    assert Expiry().due("timestamp", NOW + timedelta(hours=11), NOW) is True


def test_online_keys_must_be_the_roots_and_rotation_needs_the_root_keys() -> None:
    roots, online = keys()
    root = repo.new_root(roots, {r: s.public_key for r, s in online.items()}, now=NOW)
    other = {r: tk.generate() for r in repo.ONLINE_ROLES}
    with pytest.raises(ConfigError, match="online targets key is not the one root version 1"):
        repo.publish(TopMetadata(root), {}, other, now=NOW)
    with pytest.raises(ConfigError, match="sign 0 of the 1 signatures root version 1 needs"):
        repo.rotate_root(root, [tk.generate()], now=NOW)
    root2 = repo.rotate_root(root, roots, now=NOW,
                             online={r: s.public_key for r, s in other.items()})
    md = Metadata.from_bytes(root2)
    assert md.signed.version == 2
    signed(root).verify_delegate("root", md.signed_bytes, md.signatures)  # old root signs it
    top = repo.publish(TopMetadata(root2), {}, other, now=NOW)
    assert top.version("targets") == 1
    new_root = [tk.generate()]
    root3 = repo.rotate_root(root2, roots, now=NOW, new_root_signers=new_root)
    md3 = Metadata.from_bytes(root3)
    assert set(md3.signatures) == {roots[0].public_key.keyid, new_root[0].public_key.keyid}
    md3.signed.verify_delegate("root", md3.signed_bytes, md3.signatures)  # and the new one
    with pytest.raises(ConfigError, match="root threshold 2"):
        repo.new_root(roots, {r: s.public_key for r, s in online.items()}, now=NOW,
                      threshold=2)


def test_keys_on_disk(tmp_path: Path) -> None:
    signer = tk.generate()
    path = tmp_path / "k" / "targets.key"
    tk.save_signer(path, signer)
    assert path.stat().st_mode & 0o777 == 0o600
    assert tk.load_signer(path).public_key == signer.public_key
    with pytest.raises(ConfigError, match="exists already"):
        tk.save_signer(path, tk.generate())
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        tk.load_signer(tmp_path / "bad.key")
    with pytest.raises(ConfigError, match="no signing key"):
        tk.load_signer(tmp_path / "none.key")
    with pytest.raises(ConfigError, match="no root key"):
        tk.RootKeys(tmp_path).load_all()
