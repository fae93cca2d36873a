"""Start-up: `edgewise --help` and `edgewise run --json` import only what they use
(docs/benchmarks.md, "CLI start-up"); each check runs a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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

HEAVY = ("numpy", "pydantic", "rich", "yaml", "asyncio", "httpx", "sqlalchemy", "edgewise.cloud",
         "edgewise.pipeline", "edgewise.cli.agent", "edgewise.cli.fleet", "edgewise.cli.cloud")

PROBE = """\
import json, sys
from edgewise.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": sorted(m for m in %r if m in sys.modules)}),
      file=sys.stderr)
"""


def loaded(*args: str, cwd: Path) -> tuple[int, list[str]]:
    r = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,), *args], cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    doc = json.loads(r.stderr.strip().splitlines()[-1])
    return doc["code"], doc["loaded"]


def test_help_imports_none_of_the_heavy_modules(tmp_path: Path) -> None:
    # the top-level groups' modules are imported for their one-line help; not sim's fleet
    assert loaded("--help", cwd=tmp_path) == (0, ["edgewise.cli.agent", "edgewise.cli.cloud"])


def test_run_json_imports_the_engine_but_no_rich_cloud_or_other_commands(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    code, mods = loaded("run", "p.yaml", "--json", cwd=tmp_path)
    assert code in (0, None)
    assert mods == ["asyncio", "edgewise.pipeline", "numpy", "pydantic", "yaml"]

