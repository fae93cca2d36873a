"""CPU of encoding small batches (issue 11): what a node pays per batch when it sends a few
readings at a time, as a virtual node of the fleet simulator does every 10 s.

Compares the working tree's `edgewise.sync.codec.encode` with the codec of a git revision
(``--against``, default ``HEAD``), loaded from ``git show`` into this process, on the same
batches in one run, interleaved (the machine is shared: compare the ratio). Both must give the
same bytes; the script fails if they do not.

    .venv/bin/python benchmarks/small_batches.py [--against a3ae534] [--rounds 5]

Last line: one JSON object, µs per encode for each size, ours and the revision's.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json

from edgewise.sync import codec

ROOT = Path(__file__).resolve().parent.parent


def load_revision(rev: str) -> object:
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/edgewise/sync/codec.py"],
                          check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="edgewise-codec-")) / "codec_then.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("codec_then", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def batch(n: int, node: int, t0: float) -> dict[str, np.ndarray]:
    """The fleet simulator's telemetry batch: ``n`` sensors, a timestamp, a value."""
    return {"sensor": np.array([f"sim/{node}/{k}" for k in range(n)], dtype=object),
            "ts": np.round(t0 + np.arange(n) * 0.01, 2),
            "value": np.round(20.0 + np.arange(n) * 0.25 + node % 7, 2)}


def per_call(fn: object, batches: list[dict[str, np.ndarray]]) -> float:
    start = time.process_time()
    for b in batches:
        fn(b)  # type: ignore[operator]
    return (time.process_time() - start) / len(batches) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default="HEAD")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    then = load_revision(args.against)
    t0 = time.time()
    out: dict[str, float] = {}
    for n in (1, 5, 20, 64, 1000):
        batches = [batch(n, i, t0 + i) for i in range(args.calls if n < 1000 else 200)]
        for b in batches[:50]:
            if codec.encode(b) != then.encode(b):  # type: ignore[attr-defined]
                raise SystemExit(f"the codecs disagree on a batch of {n}")
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(per_call(codec.encode, batches))
            theirs.append(per_call(then.encode, batches))  # type: ignore[attr-defined]
        out[f"encode_{n}_us"] = round(float(np.median(ours)), 1)
        out[f"encode_{n}_us_{args.against}"] = round(float(np.median(theirs)), 1)
        print(f"{n:5d} records: {out[f'encode_{n}_us']:8.1f} µs, {args.against}: "
              f"{out[f'encode_{n}_us_{args.against}']:8.1f} µs "
              f"({out[f'encode_{n}_us_{args.against}'] / out[f'encode_{n}_us']:.2f}x)")
    emit_json(out)


if __name__ == "__main__":
    main()
