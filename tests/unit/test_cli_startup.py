"""Start-up: `edgewise --help` and `edgewise run --json` import only what they use, and the
``edgewise`` process applies its start-up settings (cli/startup.py) while a program calling
``main(args)`` keeps its own (docs/benchmarks.md, "CLI start-up"). Each check runs a fresh
interpreter; the CPU figures are in benchmarks/cli_startup.py, not asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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

HEAVY = (
    # what the run path needs (listed so the check says when they are loaded)
    "asyncio", "numpy", "pydantic", "yaml", "edgewise.pipeline",
    # what it does not: terminal output, the agent's and the control plane's libraries, the
    # planner's figures, other parts of Edgewise and other commands
    "rich", "aiohttp", "httpx", "gmqtt", "cryptography", "prometheus_client", "tuf",
    "sqlalchemy", "asyncpg", "alembic", "paho", "nats", "jinja2", "matplotlib",
    "edgewise.cloud", "edgewise.edge", "edgewise.plan", "edgewise.testbed", "edgewise.security",
    "edgewise.cli.agent", "edgewise.cli.fleet", "edgewise.cli.cloud", "edgewise.cli.operator",
    "edgewise.cli.plan",
)

PROBE = """\
import gc, json, os, sys
from edgewise.cli import main
try:
    main(%s)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": sorted(m for m in %r if m in sys.modules),
                  "blas": os.environ.get("OPENBLAS_NUM_THREADS"),
                  "frozen": gc.get_freeze_count(), "gc": gc.isenabled()}), file=sys.stderr)
"""

BLAS_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def probe(*args: str, cwd: Path, library: bool = False, **env: str) -> dict[str, Any]:
    """Run the CLI in a fresh interpreter as the ``edgewise`` script does (``main()`` reads
    ``sys.argv``), or with ``library`` as a program calling ``main(args)``; what it left."""
    environ = {k: v for k, v in os.environ.items() if k not in BLAS_VARS} | env
    code = PROBE % ("sys.argv[1:]" if library else "", HEAVY)
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=environ,
                       capture_output=True, text=True, timeout=120)
    return json.loads(r.stderr.strip().splitlines()[-1])


def test_help_imports_none_of_the_heavy_modules(tmp_path: Path) -> None:
    # the top-level groups' modules are imported for their one-line help (of those listed:
    # agent, cloud, operator, plan), none of the libraries their commands use; not sim's fleet
    doc = probe("--help", cwd=tmp_path)
    assert (doc["code"], doc["loaded"]) == (0, ["edgewise.cli.agent", "edgewise.cli.cloud",
                                                "edgewise.cli.operator", "edgewise.cli.plan"])
    assert doc["frozen"] == 0  # nothing loaded: nothing frozen


def test_run_json_imports_the_engine_but_no_rich_cloud_or_other_commands(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    doc = probe("run", "p.yaml", "--json", cwd=tmp_path)
    assert doc["code"] in (0, None)
    assert doc["loaded"] == ["asyncio", "edgewise.pipeline", "numpy", "pydantic", "yaml"]
    assert (tmp_path / ".edgewise" / "startup" / "outbox.db").is_file()


def test_the_edgewise_process_runs_with_one_blas_thread_and_what_it_loaded_frozen(
        tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    doc = probe("run", "p.yaml", "--json", cwd=tmp_path)
    assert doc["code"] in (0, None)
    assert doc["blas"] == "1"
    # numpy, pydantic and the engine's modules were frozen after loading; the collector is on
    assert doc["frozen"] > 20_000
    assert doc["gc"] is True


def test_blas_threads_the_environment_names_are_kept(tmp_path: Path) -> None:
    assert probe("--help", cwd=tmp_path, OPENBLAS_NUM_THREADS="4")["blas"] == "4"
    # OpenBLAS also reads OMP_NUM_THREADS: then it is that number, not ours
    assert probe("--help", cwd=tmp_path, OMP_NUM_THREADS="3")["blas"] is None


def test_a_program_calling_main_with_args_keeps_its_settings(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    doc = probe("run", "p.yaml", "--json", cwd=tmp_path, library=True)
    assert doc["code"] in (0, None)
    assert (doc["blas"], doc["frozen"], doc["gc"]) == (None, 0, True)
    assert doc["loaded"] == ["asyncio", "edgewise.pipeline", "numpy", "pydantic", "yaml"]
