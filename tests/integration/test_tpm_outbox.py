"""A stolen outbox is unreadable without the node's TPM: the outbox key is sealed to it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import swtpm
from edgewise.outbox import Outbox, PendingChunk
from edgewise.security.payload import PayloadCipher, PayloadUnreadable, tpm_key
from edgewise.security.tpm import Tpm, TpmError

swtpm_factory = swtpm.swtpm_factory  # fixture


def test_stolen_outbox_and_key_file_unreadable_without_the_tpm(
    swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    node, thief = tmp_path / "node", tmp_path / "thief"
    node.mkdir()
    cols = {"sensor": np.array(["s1", "s2"], dtype=object), "ts": np.array([1.0, 2.0]),
            "value": np.array([42.17, 99.5])}
    with Tpm(swtpm_factory("node")) as tpm:
        key = tpm_key(tpm, node / "outbox.key.tpm")
        with Outbox(node / "outbox.db", cipher=PayloadCipher(key)) as ob:
            ob.register_stream("alarms", 9)
            ob.commit([PendingChunk("alarms", cols, 2)])
        assert tpm_key(tpm, node / "outbox.key.tpm") == key  # unsealed again after a restart
    shutil.copytree(node, thief)
    sealed = (thief / "outbox.key.tpm").read_bytes()
    assert key not in sealed
    # the thief has the files and a TPM of its own
    with Tpm(swtpm_factory("thief")) as other, pytest.raises(TpmError):
        tpm_key(other, thief / "outbox.key.tpm")
    # without the key, what the file holds does not decrypt (a guessed key stands for any)
    with Outbox(thief / "outbox.db", cipher=PayloadCipher(bytes(32))) as ob, \
            pytest.raises(PayloadUnreadable):
        ob.read_stream("alarms")


def test_dead_letters_and_checkpoint_sealed_too(
    swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    import sqlite3

    from edgewise.errors import StorageError
    from edgewise.outbox import DeadLetter

    secret, state = b'{"password": "dl-Secret-77"}', b"window state: sum=1234.5"
    with Tpm(swtpm_factory("node")) as tpm:
        cipher = PayloadCipher(tpm_key(tpm, tmp_path / "outbox.key.tpm"))
        with Outbox(tmp_path / "outbox.db", cipher=cipher) as ob:
            ob.register_stream("alarms", 9)
            ob.commit([], dead=[DeadLetter("mqtt", "not JSON", secret, len(secret))],
                      checkpoint={"engine": state})
        with sqlite3.connect(tmp_path / "outbox.db") as db:  # what a thief's copy holds
            stored = [bytes(v) for (v,) in db.execute(
                "SELECT payload FROM dead_letters UNION ALL SELECT value FROM checkpoint")]
        assert len(stored) == 2 and all(secret not in v and state not in v for v in stored)
        with Outbox(tmp_path / "outbox.db", cipher=cipher) as ob:  # the node, restarted
            assert [d["payload"] for d in ob.dead_letters()] == [secret]
            assert ob.load_checkpoint() == {"engine": state}
    with Outbox(tmp_path / "outbox.db") as ob:  # without the key (`edgewise dead-letters`)
        [row] = ob.dead_letters()
        assert (row["payload"], row["encrypted"], row["reason"]) == (None, True, "not JSON")
        with pytest.raises(StorageError, match="checkpoint is encrypted"):
            ob.load_checkpoint()
    with Outbox(tmp_path / "outbox.db", cipher=PayloadCipher(bytes(32))) as ob, \
            pytest.raises(PayloadUnreadable):
        ob.load_checkpoint()  # any other key
