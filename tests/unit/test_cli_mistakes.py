"""User mistakes that used to end in a traceback or a wrong answer, and the --json outputs of
validate and sim (issue 15)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgewise.cli.main import main
from edgewise.errors import StorageError
from edgewise.outbox import Outbox, outbox_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "factory-line.yaml"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="edgewise", env={"COLUMNS": "200"})


def test_dead_letters_in_an_agent_directory_points_at_its_engine_folder(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    (agent / "engine").mkdir(parents=True)
    with Outbox(outbox_file(agent / "engine")):
        pass
    r = run("dead-letters", "--data", str(agent))
    assert r.exit_code == 2
    assert r.output == (f"error: {agent}/outbox.db: no outbox here; the outbox is in "
                        f"{agent}/engine: pass --data {agent}/engine\n")
    r = run("dead-letters", "--data", str(agent / "engine"), "--json")
    assert r.exit_code == 0 and json.loads(r.output) == []


def test_sim_json_and_an_output_folder_that_is_not_there(tmp_path: Path) -> None:
    out = tmp_path / "x.ndjson"
    r = run("sim", "factory-line", "--count", "5000", "-o", str(out), "--json")
    assert r.exit_code == 0
    got = json.loads(r.output)
    values = [json.loads(line)["value"] for line in out.read_text().splitlines()]
    assert len(values) == 5000
    assert got == {"output": str(out), "readings": 5000, "seed": 42,
                   "above_100": sum(v > 100.0 for v in values)}
    r = run("sim", "factory-line", "-o", str(tmp_path / "no" / "x.ndjson"))
    assert r.exit_code == 2
    assert r.output == (f"error: -o {tmp_path}/no/x.ndjson: folder {tmp_path}/no does not "
                        "exist; create it first (mkdir -p) or write somewhere else\n")


def test_validate_json(tmp_path: Path) -> None:
    r = run("validate", str(EXAMPLE), "--json")
    assert r.exit_code == 0
    assert json.loads(r.output) == {
        "file": str(EXAMPLE), "ok": True, "pipeline": "factory-line", "sources": ["sensors"],
        "stages": ["windows", "alarms"], "sinks": ["alarms-out", "aggregates-out", "alarm-log"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("size: 1s", "size: often"))
    r = CliRunner().invoke(main, ["validate", str(bad), "--json"])
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["file"] == str(bad)
    (problem,) = doc["problems"]
    assert problem["line"] == 19 and "size" in problem["field"]
    assert r.stderr.startswith(f"error: {bad}:19:")


def test_the_store_is_named_as_the_operator_knows_it(tmp_path: Path) -> None:
    pytest.importorskip("sqlalchemy")
    from edgewise.cloud.store import Store

    assert Store(f"sqlite+aiosqlite:///{tmp_path}/e.db").describe() == \
        f"SQLite file {tmp_path}/e.db"
    assert Store("postgresql+asyncpg://ew:secret@db.example:5433/fleet").describe() == \
        "PostgreSQL database fleet on db.example:5433 as ew"
    (tmp_path / "afile").write_text("")  # a file where the store's folder should be
    store = Store(f"sqlite+aiosqlite:///{tmp_path}/afile/e.db")
    with pytest.raises(StorageError) as e:
        asyncio.run(store.open())
    assert str(e.value).startswith(
        f"cannot open the store (SQLite file {tmp_path}/afile/e.db): ")
    assert "Store(" not in str(e.value) and "aiosqlite" not in str(e.value)
