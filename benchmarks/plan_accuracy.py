"""Planner accuracy: the model's estimates against the real engine, per example workload.

For each workload in examples/workloads/ the planner's estimate (flow model, codec model, CPU
model calibrated on this machine) is printed next to what `edgewise plan --simulate` measured
on the engine, with their ratio (measured / estimated): uplink bytes per second, records per
second to the cloud, thread CPU of the edge stages (in total and per stage), and node cores at
the real rate, with their parts, and without protocol decoding (the simulator decodes nothing:
the same modelled figure is on both sides, so only the rest is checked). The calibration
starts from scratch (a fresh cache shared by the workloads, so the engine itself is calibrated
once), as on a machine that has never planned before.

Node cores are measured in several realtime runs per site (`--rounds`, default
`edgewise.plan.simulate.REALTIME_ROUNDS`), their median reported; every round's figure is
printed beside the estimate with that round's own neighbouring runs of the engine alone.

Run: python benchmarks/plan_accuracy.py [--rounds N] [WORKLOAD.yaml ...]
The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json

from edgewise.plan.run import run_plan

ROOT = Path(__file__).resolve().parent.parent
KEYS = (("uplink_bytes_per_s", "uplink B/s"), ("records_per_s", "records/s to cloud"),
        ("stage_cpu_us_per_s", "stage CPU us/s"), ("cores", "node cores"))


def main(paths: list[Path], rounds: int | None = None) -> None:
    figures: dict[str, dict] = {}
    worst: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        for path in paths:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                result = run_plan(path, Path(tmp), simulate=True, cache_dir=Path(cache),
                                  rounds=rounds)
                took = time.perf_counter() - t0
            summary = result["summary"]
            print(f"\n{summary['workload']} ({took:.1f} s with --simulate)")
            print(f"  {'site / figure':40s} {'estimate':>14s} {'measured':>14s} {'ratio':>7s}")
            for site, s in summary["sites"].items():
                row: dict[str, dict] = {}
                est_all, meas_all = s["estimate"], s["measured"]
                for key, label in KEYS:
                    est, meas = est_all[key], meas_all[key]
                    ratio = meas / est if est else float("nan")
                    print(f"  {site + ' / ' + label:40s} {est:14,.3f} {meas:14,.3f} "
                          f"{ratio:7.3f}")
                    row[key] = {"estimate": est, "measured": meas, "ratio": ratio}
                    worst[key] = max(worst.get(key, 0.0), abs(ratio - 1.0))
                for stage, est in est_all["stage_cpu_us"].items():
                    meas = meas_all["stage_cpu_us"][stage]
                    ratio = meas / est if est else float("nan")
                    print(f"  {'  stage ' + stage + ' CPU us/s':40s} {est:14,.1f} "
                          f"{meas:14,.1f} {ratio:7.3f}")
                    row[f"stage:{stage}"] = {"estimate": est, "measured": meas,
                                             "ratio": ratio}
                # decoding is the model's on both sides (the simulator does none): the ratio
                # of the rest is what the measurement checks
                est_rest = est_all["cores"] - est_all["cores_parts"].get("ingest", 0.0)
                meas_rest = meas_all["cores"] - meas_all["cores_parts"].get("ingest", 0.0)
                ratio = meas_rest / est_rest if est_rest else float("nan")
                print(f"  {site + ' / node cores, decoding left out':40s} {est_rest:14,.3f} "
                      f"{meas_rest:14,.3f} {ratio:7.3f}")
                row["cores_without_decoding"] = {"estimate": est_rest, "measured": meas_rest,
                                                 "ratio": ratio}
                worst["cores_without_decoding"] = max(
                    worst.get("cores_without_decoding", 0.0), abs(ratio - 1.0))
                print("  node cores by part, estimate: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in est_all["cores_parts"].items()))
                if est_all.get("commits_per_s") is not None:  # the commits part's factors
                    print(f"  commits part: {est_all['commits_per_s']:.2f} commits/s (the "
                          "engine's run at the site's pace) x snapshots "
                          f"{est_all['snapshot_us_per_commit']:,.0f} us a commit")
                halves = est_all.get("engine_site_halves")
                if halves:  # the engine's runs at the site's pace, around the realtime runs
                    print("  engine at the site's pace, around the realtime run(s): "
                          + " / ".join(f"{c:.4f}" for c in halves) + " cores")
                sim = s["simulation"]
                per_round = sim.get("cores_rounds") or []
                pairs = est_all.get("engine_site_rounds") or []
                if len(per_round) > 1:  # the realtime runs, the median of whose cores counts
                    engine = est_all["cores_parts"].get("engine at the site's pace", 0.0)
                    # decoding is the model's figure on both sides, added to every round
                    ingest = meas_all["cores_parts"].get("ingest", 0.0)
                    per_round = [m + ingest for m in per_round]
                    # each round against the estimate with its own neighbouring engine runs
                    est_k = [est_all["cores"] - engine + p for p in pairs] \
                        if len(pairs) == len(per_round) else [est_all["cores"]] * len(per_round)
                    print("  realtime rounds, node cores measured / estimated with the "
                          "round's engine runs: " + ", ".join(
                              f"{m:.4f} / {e:.4f} ({m / e if e else float('nan'):.3f})"
                              for m, e in zip(per_round, est_k, strict=True)))
                    row["cores_rounds"] = {"measured": per_round, "engine": pairs,
                                           "estimate": est_k}
                print("  node cores by part, measured: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in meas_all["cores_parts"].items()))
                row["cores_parts"] = {"estimate": est_all["cores_parts"],
                                      "measured": meas_all["cores_parts"]}
                print(f"  measured over 12 segments of {sim['cpu_segment_seconds']:,.1f} s of "
                      "events; spread (max-min)/mean per stage: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in sim["stage_cpu_spread"].items()))
                figures[f"{summary['workload']}/{site}"] = row
        first = next(iter(result["summary"]["sites"].values()))
        print(f"\nestimate: {first['estimate']['method']}")
        print(f"measured: {first['measured']['method']}")
    print("\nlargest |ratio - 1| over the workloads: "
          + ", ".join(f"{label} {worst[key]:.3f}" for key, label in KEYS)
          + f", node cores with decoding left out {worst['cores_without_decoding']:.3f}")
    figures["largest_deviation"] = worst
    emit_json(figures)


if __name__ == "__main__":
    argv = sys.argv[1:]
    n_rounds = None
    if argv[:1] == ["--rounds"]:
        n_rounds, argv = int(argv[1]), argv[2:]
    args = [Path(a) for a in argv] or sorted((ROOT / "examples" / "workloads").glob("*.yaml"))
    main(args, n_rounds)
