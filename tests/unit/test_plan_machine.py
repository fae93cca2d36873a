"""The calibration cache key hashes the code the calibrated costs depend on: every path it names
must exist, or a moved module would silently stop invalidating the cache."""

from __future__ import annotations

from pathlib import Path

import edgewise
from edgewise.plan import machine


def test_every_hashed_code_path_exists() -> None:
    root = Path(edgewise.__file__).parent
    missing = [rel for rel in machine._CODE if not (root / rel).exists()]
    assert missing == []
