"""The machine fingerprint calibrated CPU costs are cached under (`machine_fingerprint`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
from pathlib import Path

import numpy as np

_CODE = ("pipeline/operators", "pipeline/engine.py", "pipeline/commit.py", "pipeline/batch.py",
         "pipeline/checkpoint.py", "outbox", "sync/codec.py", "plan/costs.py",
         "plan/calibration_scope.py",
         "plan/cost_model.py", "plan/site_calibration.py", "plan/engine_calibration.py",
         "plan/source.py", "plan/flows.py", "plan/encoding.py", "sim/signals.py")


def machine_fingerprint() -> dict[str, str]:
    """What calibrated costs depend on: CPU, interpreter, numpy and the Edgewise code."""
    import edgewise

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    root = Path(edgewise.__file__).parent
    h = hashlib.sha256()
    for rel in _CODE:
        p = root / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            with contextlib.suppress(OSError):
                h.update(f.read_bytes())
    return {"cpu": model, "cores": str(os.cpu_count()), "python": sys.version.split()[0],
            "numpy": np.__version__, "edgewise": edgewise.__version__,
            "code": h.hexdigest()[:16]}
