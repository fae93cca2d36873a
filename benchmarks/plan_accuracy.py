"""Planner accuracy: the model's estimates against the real engine, per example workload.

For each workload in examples/workloads/ the planner's estimate (flow model, codec model, CPU
constants) is printed next to what `edgewise plan --simulate` measured on the engine, with
their ratio (measured / estimated): uplink bytes per second, records per second to the cloud,
thread CPU of the edge stages, and node cores at the real rate.

Run: python benchmarks/plan_accuracy.py [WORKLOAD.yaml ...]
The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json

from edgewise.plan.cli import run_plan

ROOT = Path(__file__).resolve().parent.parent
KEYS = (("uplink_bytes_per_s", "uplink B/s"), ("records_per_s", "records/s to cloud"),
        ("stage_cpu_us_per_s", "stage CPU us/s"), ("cores", "node cores"))


def main(paths: list[Path]) -> None:
    figures: dict[str, dict] = {}
    for path in paths:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = run_plan(path, Path(tmp), simulate=True)
            took = time.perf_counter() - t0
        summary = result["summary"]
        print(f"\n{summary['workload']} ({took:.1f} s with --simulate)")
        print(f"  {'site / figure':32s} {'estimate':>14s} {'measured':>14s} {'ratio':>7s}")
        for site, s in summary["sites"].items():
            row: dict[str, dict] = {}
            for key, label in KEYS:
                est, meas = s["estimate"][key], s["measured"][key]
                ratio = meas / est if est else float("nan")
                print(f"  {site + ' / ' + label:32s} {est:14,.3f} {meas:14,.3f} {ratio:7.3f}")
                row[key] = {"estimate": est, "measured": meas, "ratio": ratio}
            figures[f"{summary['workload']}/{site}"] = row
    emit_json(figures)


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]] or sorted((ROOT / "examples" / "workloads").glob(
        "*.yaml"))
    main(args)
