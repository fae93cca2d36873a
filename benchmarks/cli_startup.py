"""CLI start-up: CPU seconds of `edgewise --help` and of a short `edgewise run` (a simulator
source that ends after its first batch of 200 readings, committed to the outbox), next to plain
``python -c pass`` measured in the same run. Target (issue 15): at most 0.25 s CPU each.

    .venv/bin/python benchmarks/cli_startup.py [--runs 7]

Each command runs ``--runs`` times as a child process; its CPU (user + system, from
``os.wait4``) is the median. The commands run as from an installed package: with a bytecode
cache (a temporary ``PYTHONPYCACHEPREFIX``, filled by one run before the measured ones;
``PYTHONDONTWRITEBYTECODE`` is dropped), since pip writes ``.pyc`` files at install. For
comparison, in the same run: ``edgewise run`` compiling our modules from source on every start
(no bytecode cache, what a checkout with ``PYTHONDONTWRITEBYTECODE=1`` does) and the floor of
the run path: ``python -c "import numpy, pydantic, yaml, asyncio, sqlite3"``. ``--importtime``
also prints the ten slowest imports of each command (``python -X importtime``, cumulative
microseconds)."""

from __future__ import annotations

import argparse
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

TARGET_S = 0.25
RUN = "edgewise run (first batch, then exit)"
FLOOR = "python -c 'import numpy, pydantic, yaml, asyncio, sqlite3'"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--importtime", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    cli = [py, "-c", "from edgewise.cli import main; main()"]  # what the console script runs
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "p.yaml").write_text(PIPELINE)
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        source = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        source.pop("PYTHONPYCACHEPREFIX", None)
        run = [*cli, "run", "p.yaml", "--json"]
        commands = {
            "python -c pass": ([py, "-c", "pass"], cached),
            FLOOR:
                ([py, "-c", "import numpy, pydantic, yaml, asyncio, sqlite3"], cached),
            "edgewise --help": ([*cli, "--help"], cached),
            RUN: (run, cached),
            "  ... compiling our modules on every start": (run, source),
        }
        med: dict[str, float] = {}
        for name, (argv, env) in commands.items():
            samples = []
            for i in range(args.runs + 1):
                subprocess.run(["rm", "-rf", str(work / ".edgewise")], check=True)
                cpu = child_cpu(argv, work, env)
                if i:  # the first run fills the bytecode cache
                    samples.append(cpu)
            med[name] = statistics.median(samples)
            if args.importtime:
                print(f"\nslowest imports of {name} (cumulative us):")
                for us, mod in slowest_imports(argv, work, env):
                    print(f"  {us:>9,}  {mod}")
    base = med["python -c pass"]
    rows = [(name, f"{s:.3f} s", "baseline" if name.startswith(("python", " ")) else
             f"target <= {TARGET_S} s: {'met' if s <= TARGET_S else 'NOT met'}; "
             f"python -c pass {base:.3f} s")
            for name, s in med.items()]
    print_table(f"CPU seconds, median of {args.runs} runs", rows)
    emit_json({"runs": args.runs, "python_pass_cpu_s": round(base, 4),
               "help_cpu_s": round(med["edgewise --help"], 4),
               "run_first_batch_cpu_s": round(med[RUN], 4),
               "run_floor_imports_cpu_s": round(med[FLOOR], 4),
               "run_compiling_cpu_s": round(med["  ... compiling our modules on every start"], 4)})


if __name__ == "__main__":
    main()
