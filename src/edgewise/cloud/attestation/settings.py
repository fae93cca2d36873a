"""The attestation policy's options of ``edgewise cloud serve``, parsed (`AttestationSettings`).

* ``--require-attestation-for SELECTOR`` (repeatable, ``site=plant1,line=2``): a node whose
  labels match one must attest; one without a TPM is quarantined;
* ``--firmware-pcrs 0-7`` (or ``0,1,2,7``): the firmware's measured-boot PCRs the quote covers;
* ``--golden-firmware FILE``: JSON, a list of allowed sets, each ``{"0": "<sha256 hex>", ...}``
  naming exactly the firmware PCRs (one set per known firmware build: a node's values must be
  one whole set, never a mix of two).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import orjson

from edgewise.cloud.openapi.models import parse_selector
from edgewise.errors import ConfigError

MAX_GOLDEN_BYTES = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


def selectors(texts: Iterable[str]) -> tuple[tuple[tuple[str, str], ...], ...]:
    out = []
    for text in texts:
        try:
            sel = parse_selector(text)
        except ValueError as exc:
            raise ConfigError(f"--require-attestation-for {text!r}: {exc}") from None
        out.append(tuple(sorted(sel.items())))
    return tuple(out)


def pcr_list(text: str | None) -> tuple[int, ...]:
    """``0-7`` or ``0,2,7`` → the PCRs (0 to 7: the firmware's)."""
    if not text:
        return ()
    out: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError(f"--firmware-pcrs {text!r}: write 0-7 or 0,1,7") from None
        if not 0 <= first <= last <= 7:
            raise ConfigError(f"--firmware-pcrs {text!r}: firmware PCRs are 0 to 7")
        out.update(range(first, last + 1))
    return tuple(sorted(out))


def golden_sets(path: Path | None, pcrs: tuple[int, ...]
                ) -> tuple[tuple[tuple[int, str], ...], ...]:
    """The golden firmware sets in ``path`` (see the module docstring)."""
    if path is None:
        return ()
    if not pcrs:
        raise ConfigError("--golden-firmware needs --firmware-pcrs (the PCRs its sets name)")
    try:
        raw = path.read_bytes()[:MAX_GOLDEN_BYTES + 1]
    except OSError as exc:
        raise ConfigError(f"--golden-firmware {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_GOLDEN_BYTES:
        raise ConfigError(f"--golden-firmware {path}: over {MAX_GOLDEN_BYTES} bytes")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"--golden-firmware {path}: not JSON ({exc})") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--golden-firmware {path}: expected a list of sets "
                          '[{"0": "<sha256 hex>", ...}, ...]')
    want = {str(p) for p in pcrs}
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or set(entry) != want or not all(
                isinstance(v, str) and _HEX64.fullmatch(v) for v in entry.values()):
            raise ConfigError(f"--golden-firmware {path}: set {i} must map exactly PCRs "
                              f"{','.join(sorted(want, key=int))} to lower-case sha256 hex")
        out.append(tuple(sorted((int(k), v) for k, v in entry.items())))
    return tuple(out)
