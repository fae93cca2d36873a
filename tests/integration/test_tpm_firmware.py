"""Firmware measured-boot PCRs in the attestation policy, against swtpm and an in-process control
plane: the firmware's PCRs 0-7 are extended before the agent starts (as a platform's measured
boot would); a quote whose firmware PCRs are one of the golden sets attests, another firmware is
quarantined with a reason that names no expected value, and a node that lies about its values is
caught by the quote. Also the options' parsing (`attestation.settings`)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
from test_tpm_cloud_api import Cloud, _cloud, enrol

import swtpm
from edgewise.cloud.attestation import settings
from edgewise.cloud.config import AttestationSettings
from edgewise.edge.tpm_node import TpmNode
from edgewise.errors import ConfigError
from edgewise.security.tpm.measure import agent_code_digest

swtpm_factory = swtpm.swtpm_factory  # fixture
AGENT = agent_code_digest()
FIRMWARE = tuple(range(8))
BUILD = [hashlib.sha256(f"firmware component {p}".encode()).digest() for p in FIRMWARE]
GOLDEN = tuple((p, hashlib.sha256(bytes(32) + BUILD[p]).hexdigest()) for p in FIRMWARE)


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    async for c in _cloud(tmp_path, AttestationSettings(
            agents=(AGENT,), firmware_pcrs=FIRMWARE, golden_firmware=(GOLDEN,))):
        yield c


def boot(node: TpmNode, tampered: int | None = None) -> None:
    """Simulated measured boot: each firmware PCR extended once, then the agent's launch."""
    for p in FIRMWARE:
        digest = BUILD[p] if p != tampered else hashlib.sha256(b"evil bootloader").digest()
        node.tpm.extend(p, digest)
    node.measure(AGENT, None)


async def attest_with(cloud: Cloud, node: TpmNode, key: Path, cert: Path,
                      lie: bool = False) -> dict[str, object]:
    status, challenge = await cloud.post("/v1/device/attest/challenge", {}, key, cert)
    assert status == 200, challenge
    assert challenge["pcrs"] == [*FIRMWARE, 16]
    evidence = node.evidence(challenge)
    if lie:  # claim the golden values for what the TPM holds
        evidence["pcr_values"] = {str(p): v for p, v in GOLDEN}
    status, verdict = await cloud.post("/v1/device/attest", evidence, key, cert)
    assert status == 200, verdict
    return verdict


async def test_golden_firmware_attests_other_firmware_is_quarantined(
    cloud: Cloud, swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    with TpmNode(swtpm_factory("good"), tmp_path / "good") as good, \
            TpmNode(swtpm_factory("bad"), tmp_path / "bad") as bad:
        boot(good)
        boot(bad, tampered=3)
        good_id, good_cert = await enrol(cloud, good, tmp_path / "good" / "node.key")
        bad_id, bad_cert = await enrol(cloud, bad, tmp_path / "bad" / "node.key")
        verdict = await attest_with(cloud, good, tmp_path / "good" / "node.key", good_cert)
        assert (verdict["quarantined"], verdict["measurements"]) == (False, {
            "agent": AGENT, **{f"pcr{p}": v for p, v in GOLDEN}})
        verdict = await attest_with(cloud, bad, tmp_path / "bad" / "node.key", bad_cert)
        reason = "firmware: measured-boot PCR values not in the golden set"
        assert (verdict["quarantined"], verdict["reason"]) == (True, reason)
        assert dict(GOLDEN)[3] not in orjson.dumps(verdict).decode()  # no expected value
        # claiming the golden values does not help: the quote proves what the TPM holds
        verdict = await attest_with(cloud, bad, tmp_path / "bad" / "node.key", bad_cert,
                                    lie=True)
        assert (verdict["quarantined"], verdict["reason"]) == (
            True, "quote: PCR values do not match the event log")
    assert (await cloud.store.quarantines([good_id, bad_id])) == {
        bad_id: "quote: PCR values do not match the event log"}


def test_firmware_options_are_checked(tmp_path: Path) -> None:
    assert settings.pcr_list("0-3,7") == (0, 1, 2, 3, 7)
    with pytest.raises(ConfigError, match="firmware PCRs are 0 to 7"):
        settings.pcr_list("0-8")
    golden = tmp_path / "golden.json"
    golden.write_text(orjson.dumps([{str(p): v for p, v in GOLDEN}]).decode())
    assert settings.golden_sets(golden, FIRMWARE) == (GOLDEN,)
    with pytest.raises(ConfigError, match="set 0 must map exactly PCRs 0,1"):
        settings.golden_sets(golden, (0, 1))
    with pytest.raises(ConfigError, match="needs --firmware-pcrs"):
        settings.golden_sets(golden, ())
    assert settings.selectors(["site=plant1,line=2"]) == ((("line", "2"), ("site", "plant1")),)
    with pytest.raises(ConfigError, match="empty selector"):
        settings.selectors([""])
