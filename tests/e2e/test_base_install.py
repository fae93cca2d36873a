"""The lean edge install (pyproject.toml: the base dependencies, no extra), for real.

A virtualenv gets the Edgewise wheel built from this tree with its base dependencies resolved by
pip from the package index (``pip install -c deploy/constraints-edge.txt``; nothing of
``[cloud]``, ``[plan]``, ``[industrial]`` or ``[test]``). In it:

* ``edgewise run`` runs a simulator pipeline to its end (exact reading count);
* ``edgewise agent run`` enrols with a real control plane (run from the test environment, which
  has ``[cloud]``), runs its pipeline and has every record acknowledged, its /metrics answering;
* ``import edgewise.cloud`` and ``import edgewise.plan`` fail naming their extra, and
  ``edgewise cloud serve`` exits 2 saying what to install;
* the virtualenv takes at most 150 MB without bytecode (the figure is printed; README.md
  quotes it).

Resolving and downloading the dependencies takes about a minute the first time; the virtualenv
with its dependencies is then kept in ``~/.cache/edgewise-tests`` (``EDGEWISE_TEST_CACHE``),
keyed by the base dependencies, the lock file and the Python version, and only the Edgewise
wheel is installed again on later runs. The other test here checks, in this environment, that
the agent's and the runtime's modules import no control-plane or planner library.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from edgewise.testbed.system import System, factory_pipeline, free_port

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "deploy" / "constraints-edge.txt"
CACHE = Path(os.environ.get("EDGEWISE_TEST_CACHE") or Path.home() / ".cache" / "edgewise-tests")
HEAVY = ("sqlalchemy", "alembic", "asyncpg", "aiosqlite", "matplotlib", "nats", "paho",
         "pymodbus", "asyncua", "edgewise.cloud", "edgewise.plan", "edgewise.testbed")
LIMIT_MB = 150
READINGS = 20_000


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "-q", *args], capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


def size_mb(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*")
                if f.is_file() and not f.is_symlink() and "__pycache__" not in f.parts)
    return total / 1e6


def build_wheel(out: Path) -> Path:
    """The wheel of this tree, built with setuptools>=77 kept in the cache (no isolated build
    environment to download each time)."""
    tools = CACHE / "build-tools"
    if not (tools / ".complete").exists():
        shutil.rmtree(tools, ignore_errors=True)
        pip("install", "--target", str(tools), "setuptools>=77", "wheel")
        (tools / ".complete").touch()
    env = {**os.environ, "PYTHONPATH": str(tools)}
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT), env=env)
    (wheel,) = out.glob("edgewise-*.whl")
    return wheel


def base_venv(wheel: Path) -> Path:
    """A virtualenv with the wheel and its base dependencies (kept between runs, see above)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.sha256(json.dumps([deps, CONSTRAINTS.read_text(), sys.version]).encode())
    venv = CACHE / f"base-venv-{key.hexdigest()[:16]}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        pip("--python", str(python), "install", "--no-compile", "-c", str(CONSTRAINTS),
            str(wheel))
        (venv / ".complete").touch()
    else:  # the dependencies are those of the key: put this tree's code in again
        pip("--python", str(python), "install", "--no-compile", "--no-deps",
            "--force-reinstall", str(wheel))
    return venv


def test_agent_path_imports_no_cloud_or_planner_library() -> None:
    code = ("import sys\n"
            "import edgewise.cli, edgewise.cli.agent, edgewise.edge.agent, edgewise.edge.metrics\n"
            "import edgewise.pipeline.engine, edgewise.edge.updater.launcher\n"
            "from edgewise.pipeline.registry import KINDS, known, resolve\n"
            "for k in KINDS:\n"
            "    for t in known(k, load_code=False):\n"
            "        if t not in ('modbus', 'opcua'):  # edgewise[industrial]\n"
            "            resolve(k, t, load_code=False)\n"
            f"heavy = {HEAVY!r}\n"
            "print([m for m in sys.modules if any(m == h or m.startswith(h + '.') "
            "for h in heavy)])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert res.stdout.strip() == "[]"


@pytest.mark.slow
async def test_base_install(tmp_path: Path) -> None:
    venv = base_venv(build_wheel(tmp_path / "wheel"))
    mb = size_mb(venv)
    print(f"\nbase install: {mb:.0f} MB without bytecode in {venv}")
    assert mb <= LIMIT_MB
    exe = str(venv / "bin" / "edgewise")
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(list(args), capture_output=True, text=True, timeout=120, env=env,
                             cwd=tmp_path, stdin=subprocess.DEVNULL)
        if check:
            assert res.returncode == 0, res.stderr
        return res

    installed = run(python, "-c", "import importlib.metadata as m; "
                    "print(sorted(d.metadata['Name'].lower() for d in m.distributions()))")
    names = set(json.loads(installed.stdout.replace("'", '"')))
    assert "edgewise" in names and "numpy" in names
    assert not names & {"sqlalchemy", "alembic", "asyncpg", "aiosqlite", "matplotlib",
                        "nats-py", "paho-mqtt", "pymodbus", "asyncua", "pytest"}

    for module, extra in (("edgewise.cloud", "cloud"), ("edgewise.plan", "plan")):
        res = run(python, "-c", f"import {module}", check=False)
        assert res.returncode == 1
        assert res.stderr.strip().splitlines()[-1].startswith("edgewise.errors.MissingExtra: ")
        assert f"install it with: pip install 'edgewise[{extra}]'" in res.stderr
    res = run(exe, "cloud", "serve", "--data", str(tmp_path / "c"), check=False)
    assert res.returncode == 2
    assert "error: edgewise cloud needs edgewise[cloud]" in res.stderr
    assert "Traceback" not in res.stderr
    assert "launch" in run(exe, "agent", "--help").stdout

    yaml_text, _ = factory_pipeline(READINGS, ROOT / "examples" / "factory-line.yaml")
    pipeline = tmp_path / "factory.yaml"
    pipeline.write_text(yaml_text, encoding="utf-8")
    summary = json.loads(run(exe, "run", str(pipeline), "--data", str(tmp_path / "run"),
                             "--json").stdout)
    assert summary["readings_in"] == READINGS

    async with System(tmp_path / "sys") as system:
        cloud = await system.start_cloud()
        token = await cloud.token({"site": "lean"})
        data = tmp_path / "agent"
        port = free_port()
        agent = subprocess.Popen(
            [exe, "agent", "run", "--data", str(data), "--cloud", cloud.url, "--ca",
             str(cloud.ca), "--pipeline", str(pipeline), "--metrics", f"127.0.0.1:{port}"],
            env={**env, "EDGEWISE_ENROL_TOKEN": token}, cwd=tmp_path,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        try:
            deadline = time.monotonic() + 60
            status: dict = {}
            while time.monotonic() < deadline:
                res = run(exe, "agent", "status", "--data", str(data), "--json", check=False)
                if res.returncode != 0:  # before the agent made its data directory
                    assert "no such directory" in res.stderr, res.stderr
                    time.sleep(0.3)
                    continue
                status = json.loads(res.stdout)
                streams = status.get("streams") or {}
                if (status.get("engine", {}).get("state") == "finished" and streams
                        and all(s["pending"] == 0 and s["acknowledged"] == s["produced"] > 0
                                for s in streams.values())):
                    break
                time.sleep(0.3)
            else:
                raise AssertionError(f"not all acknowledged: {status}")
            assert status["engine"]["readings_in"] == READINGS
            assert set(status["streams"]) == {"alarms", "aggregates"}
            stored = await cloud.stats()
            node = status["node_id"]
            for name, st in status["streams"].items():
                assert stored[(node, name)].records_stored == st["produced"]
            r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            assert r.status_code == 200 and "edgewise_outbox_records_acked_total" in r.text
        finally:
            agent.send_signal(signal.SIGTERM)
            _, err = agent.communicate(timeout=30)
        assert agent.returncode == 0, err
