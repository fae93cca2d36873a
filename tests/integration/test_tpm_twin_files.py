"""The twin's files encrypted at rest under the TPM-sealed key (issue 16: "and the twin's
secrets"): a stolen ``desired.msgpack`` (pipelines, config: credentials) and
``reported.msgpack`` (setpoints) are unreadable without the node's TPM, even with the sealed key
file; the node itself reads them back after a restart; ``agent status`` does not call them
damaged; a plain file from before ``--tpm`` is read and then written encrypted."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import swtpm
from edgewise.edge import twin_files
from edgewise.edge.twin import Twin
from edgewise.security.payload import PayloadCipher, PayloadUnreadable, tpm_key
from edgewise.security.tpm import Tpm, TpmError
from edgewise.sync.twin_state import DesiredState, save_desired

swtpm_factory = swtpm.swtpm_factory  # fixture
SECRET = "mqtt-password-Zq81x"
STATE = DesiredState(3, {"line": f"# broker password: {SECRET}\n"},
                     {"broker_password": SECRET}, {"site": "p1"}, None, None)


def twin(data: Path, cipher: PayloadCipher | None) -> Twin:
    return Twin(data / "twin", "n1", base_dir=data / "pipelines", cipher=cipher)


def test_stolen_twin_files_unreadable_without_the_tpm(
    swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    node, thief = tmp_path / "node", tmp_path / "thief"
    node.mkdir()
    with Tpm(swtpm_factory("node")) as tpm:
        cipher = PayloadCipher(tpm_key(tpm, node / "outbox.key.tpm"))
        t = twin(node, cipher)
        t.load()
        twin_files.save_desired(t.desired_path, STATE, cipher)
        t.set_setpoint("limit", SECRET)
        for name in (twin_files.DESIRED_FILE, twin_files.REPORTED_FILE):
            raw = (node / "twin" / name).read_bytes()
            assert raw.startswith(twin_files.MAGIC) and SECRET.encode() not in raw, name
        assert twin_files.damaged_files(node / "twin") == []  # agent status: not damaged
        again = twin(node, PayloadCipher(tpm_key(tpm, node / "outbox.key.tpm")))
        again.load()  # the node after a restart: same TPM, same key
        assert again.desired == STATE
        assert again.setpoints.get("limit") == SECRET
    shutil.copytree(node, thief)
    with Tpm(swtpm_factory("thief")) as other, pytest.raises(TpmError):
        tpm_key(other, thief / "outbox.key.tpm")  # the sealed key opens in no other TPM
    with pytest.raises(PayloadUnreadable, match="encrypted"):
        twin_files.read(thief / "twin" / twin_files.REPORTED_FILE, None)
    with pytest.raises(PayloadUnreadable, match="does not decrypt"):  # any other key
        twin(thief, PayloadCipher(bytes(32))).load()
    # swapping the two files does not work either (the name is the associated data)
    d, r = thief / "twin" / twin_files.DESIRED_FILE, thief / "twin" / twin_files.REPORTED_FILE
    d.write_bytes(r.read_bytes())
    with pytest.raises(PayloadUnreadable):
        twin_files.read(d, cipher)


def test_plain_files_from_before_are_read_then_written_encrypted(tmp_path: Path) -> None:
    cipher = PayloadCipher(bytes(range(32)))
    (tmp_path / "twin").mkdir()
    save_desired(tmp_path / "twin" / twin_files.DESIRED_FILE, STATE)  # plain, as before
    t = twin(tmp_path, cipher)
    t.load()
    assert t.desired == STATE
    t.set_setpoint("limit", 5)
    assert (tmp_path / "twin" / twin_files.REPORTED_FILE).read_bytes().startswith(
        twin_files.MAGIC)
