"""CLI start-up: CPU seconds of `edgewise --help` and of a short `edgewise run` (a simulator
source that ends after its first batch of 200 readings, committed to the outbox), next to plain
``python -c pass`` and the floor of the run path, measured in the same run. Target (issue 15):
at most 0.25 s CPU each.

    .venv/bin/python benchmarks/cli_startup.py [--runs 9] [--importtime] [--parts]
                                               [--before OTHER/src] [--steps]

Each command runs ``--runs`` times as a child process, the commands taking turns (so a change
of load hits all of them alike); its CPU (user + system, from ``os.wait4``) is the median. The
commands run as from an installed package: with a bytecode cache (a temporary
``PYTHONPYCACHEPREFIX``, filled by one run before the measured ones; ``PYTHONDONTWRITEBYTECODE``
is dropped), since pip writes ``.pyc`` files at install.

The floor is what the run path cannot do without: the libraries (click, numpy, yaml, asyncio,
sqlite3) imported and one pydantic model built (pydantic imports most of itself, and
``importlib.metadata`` for its plugins, on the first model), once as Python does it and once
with the start-up settings of the ``edgewise`` process (cli/startup.py: one BLAS thread, the
garbage collector off while importing, then frozen). For comparison, also in the same run:
``edgewise run`` called as a library (``main(args)`` in a program: no start-up settings) and
compiling our modules from source on every start (no bytecode cache, what a checkout with
``PYTHONDONTWRITEBYTECODE=1`` does). ``--importtime`` also prints the ten slowest imports of each
command (``python -X importtime``, cumulative microseconds). ``--parts`` also times each
library of the floor alone, with the start-up settings, less ``python -c pass`` (what it
costs on its own; the parts share some of the standard library, so they add up to more than
the floor). ``--before DIR`` also runs ``--help`` and ``run`` with ``PYTHONPATH=DIR``
(the ``src`` of another checkout, e.g. a ``git worktree`` of an older commit), taking turns
with the others: a before-and-after under the same load. ``--steps`` runs the steps of
``edgewise run`` one by one in a child with the same settings and prints the CPU of each
(``time.process_time``; the last step, exit, is the child's total from ``os.wait4`` less what
it measured), minimum and median of ``--runs`` children."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import emit_json, print_table

PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: startup
spec:
  sources:
    - {id: sensors, type: simulator, realtime: false, limit: 200, batch: 200}
  sinks:
    - {id: out, type: outbox, inputs: [sensors], stream: raw}
"""

STEPS = """\
import json, time
T = [("python start-up", time.process_time())]
def step(name):
    T.append((name, time.process_time()))
from edgewise.cli import startup
startup.own_process()
step("click and our CLI modules")
import gc
gc.disable()
import asyncio, sqlite3
step("asyncio, sqlite3")
import numpy
step("numpy")
import yaml
step("yaml")
from pydantic import BaseModel
class M(BaseModel):
    x: int
step("pydantic and its first model")
from edgewise.outbox import Outbox, outbox_file
step("our outbox modules (with msgpack, zstandard)")
from edgewise.outbox.quarantine import open_outbox
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.spec import load_pipeline
step("our engine and spec modules")
spec = load_pipeline("p.yaml")
step("loading the pipeline (its components' modules)")
outbox = Outbox(outbox_file(".edgewise/startup"), spec.body.outbox.max_bytes,
                spec.body.outbox.sync)
open_outbox(outbox)
step("creating the outbox")
engine = Engine(spec, ".edgewise/startup", outbox=outbox)
step("the engine (the simulator imports numpy.random)")
gc.freeze()
gc.enable()
asyncio.run(engine.run())
outbox.close()
step("the first batch, committed")
print(json.dumps([(b, t1 - t0) for (_, t0), (b, t1) in zip([("", 0.0), *T], T)]))
"""

TARGET_S = 0.25
HELP = "edgewise --help"
RUN = "edgewise run (first batch, then exit)"
LIBRARY = "  ... called as a library: no start-up settings"
COMPILING = "  ... compiling our modules on every start"
FLOOR = "floor: click, numpy, yaml, asyncio, sqlite3, a pydantic model"
FLOOR_SET = "  ... with the start-up settings of edgewise"
LIBS = """\
import click, numpy, yaml, asyncio, sqlite3
from pydantic import BaseModel
class M(BaseModel):
    x: int
"""
PARTS = {
    "click": "import click",
    "numpy": "import numpy",
    "yaml": "import yaml",
    "asyncio": "import asyncio",
    "sqlite3": "import sqlite3",
    "pydantic and one model": "from pydantic import BaseModel\nclass M(BaseModel):\n    x: int",
}
SETTINGS = """\
import gc, os
if not any(os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                                       "OMP_NUM_THREADS")):
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
gc.disable()
"""


def child_cpu(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """CPU seconds (user + system) of one run of ``argv``; it must exit 0."""
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env)
    _pid, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read() if p.stderr else b""
    if p.returncode != 0:
        raise SystemExit(f"{argv} exited {p.returncode}: {err.decode(errors='replace')}")
    return usage.ru_utime + usage.ru_stime


def slowest_imports(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
                    n: int = 10) -> list[tuple[int, str]]:
    r = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=cwd,
                       capture_output=True, text=True, check=True, env=env)
    rows = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _self, cum, name = line.removeprefix("import time:").split("|")
            if cum.strip().isdigit():
                rows.append((int(cum), name.rstrip()))
    return sorted(rows, reverse=True)[:n]


def print_steps(py: str, work: Path, env: dict[str, str], runs: int) -> None:
    """The CPU of each step of ``edgewise run`` (`STEPS`), minimum and median of ``runs``."""
    rows: dict[str, list[float]] = {}
    for _ in range(runs):
        subprocess.run(["rm", "-rf", str(work / ".edgewise")], check=True)
        p = subprocess.Popen([py, "-c", STEPS], cwd=work, env=env, stdout=subprocess.PIPE)
        out = p.stdout.read() if p.stdout else b""
        _pid, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"the steps exited {os.waitstatus_to_exitcode(status)}")
        steps = json.loads(out)
        steps.append(("exit", usage.ru_utime + usage.ru_stime - sum(t for _, t in steps)))
        for name, t in steps:
            rows.setdefault(name, []).append(t)
    print(f"\nsteps of edgewise run, CPU ms (min / median of {runs}):")
    for name, ts in rows.items():
        print(f"  {min(ts) * 1e3:6.1f} {statistics.median(ts) * 1e3:6.1f}  {name}")
    print(f"  {sum(min(ts) for ts in rows.values()) * 1e3:6.1f}         sum of the minimums")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--before", type=Path, default=None, metavar="DIR")
    ap.add_argument("--steps", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    cli = [py, "-c", "from edgewise.cli import main; main()"]  # what the console script runs
    library = [py, "-c", "import sys; from edgewise.cli import main; main(sys.argv[1:])"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "p.yaml").write_text(PIPELINE)
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        source = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        source.pop("PYTHONPYCACHEPREFIX", None)
        run_args = ["run", "p.yaml", "--json"]
        commands = {
            "python -c pass": ([py, "-c", "pass"], cached),
            FLOOR: ([py, "-c", LIBS], cached),
            FLOOR_SET: ([py, "-c", SETTINGS + LIBS + "gc.freeze()\ngc.enable()\n"], cached),
            HELP: ([*cli, "--help"], cached),
            RUN: ([*cli, *run_args], cached),
            LIBRARY: ([*library, *run_args], cached),
            COMPILING: ([*cli, *run_args], source),
        }
        if args.parts:
            commands |= {f"  part: {name}": ([py, "-c", SETTINGS + code + "\ngc.freeze()\n"],
                                             cached) for name, code in PARTS.items()}
        if args.before:
            other = dict(cached, PYTHONPATH=str(args.before.resolve()))
            commands |= {f"  before: {HELP}": ([*cli, "--help"], other),
                         f"  before: {RUN}": ([*cli, *run_args], other)}
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(args.runs + 1):
            for name, (argv, env) in commands.items():  # taking turns
                subprocess.run(["rm", "-rf", str(work / ".edgewise")], check=True)
                cpu = child_cpu(argv, work, env)
                if i:  # the first round fills the bytecode cache
                    samples[name].append(cpu)
        med = {name: statistics.median(v) for name, v in samples.items()}
        if args.importtime:
            for name, (argv, env) in commands.items():
                print(f"\nslowest imports of {name.strip()} (cumulative us):")
                for us, mod in slowest_imports(argv, work, env):
                    print(f"  {us:>9,}  {mod}")
        if args.steps:
            print_steps(py, work, cached, args.runs)
    base = med["python -c pass"]
    rows = [(name, f"{s:.3f} s", f"target <= {TARGET_S} s: "
             f"{'met' if s <= TARGET_S else 'NOT met'}; python -c pass {base:.3f} s"
             if name in (HELP, RUN) else
             f"alone, less python -c pass: {s - med['python -c pass']:.3f} s"
             if name.startswith("  part:") else "baseline")
            for name, s in med.items()]
    print_table(f"CPU seconds, median of {args.runs} runs (load average "
                f"{os.getloadavg()[0]:.1f})", rows)
    emit_json({"runs": args.runs, "python_pass_cpu_s": round(base, 4),
               "help_cpu_s": round(med[HELP], 4),
               "run_first_batch_cpu_s": round(med[RUN], 4),
               "run_as_library_cpu_s": round(med[LIBRARY], 4),
               "run_compiling_cpu_s": round(med[COMPILING], 4),
               "floor_cpu_s": round(med[FLOOR], 4),
               "floor_with_settings_cpu_s": round(med[FLOOR_SET], 4),
               **({"before_help_cpu_s": round(med[f"  before: {HELP}"], 4),
                   "before_run_cpu_s": round(med[f"  before: {RUN}"], 4)} if args.before else {})})


if __name__ == "__main__":
    main()
