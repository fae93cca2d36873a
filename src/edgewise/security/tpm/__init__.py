"""Hardware-rooted trust: a TPM 2.0 through tpm2-pytss (the `tpm` extra).

* `device`: one TPM: its endorsement key, the node and attestation keys made inside it, PCR
  extends, quotes, sealing.
* `credential`: the control plane's side of enrolment: a credential only the challenged TPM can
  activate (MakeCredential), the key attributes it must show, the EK certificate chain.
* `measure`: measured launch: the digests of the agent code and the active release, extended
  into a PCR and written to an event log that explains its value.
* `quote`: checking a quote: signature by the registered AK, the nonce, the PCR digest the
  event log replays to.

Pure library code apart from `device` (which talks to the TPM): the control plane's verifier
(`edgewise.cloud.attestation`) and the agent do the I/O around it. docs/security.md,
"Hardware-rooted trust".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgewise.security.tpm.device import KeyBlob, Tpm, TpmError, available

__all__ = ["KeyBlob", "Tpm", "TpmError", "available"]


def __getattr__(name: str) -> Any:
    """`device` (and tpm2-pytss under it) is imported on first use, not with the package: the
    control plane and the agent import the pure modules whether or not a TPM is used."""
    if name in __all__:
        from edgewise.security.tpm import device

        return getattr(device, name)
    raise AttributeError(name)
