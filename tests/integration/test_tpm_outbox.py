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
