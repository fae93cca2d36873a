"""Pipelines pushed by the control plane cannot reach files outside the node's allowed folders
(docs/security.md, *Pipelines from the control plane*): ``edgewise cloud serve`` and ``edgewise
agent run`` as processes (`edgewise.testbed.system`), pipelines pushed through the operator API.

* node A (no ``--allow-path``): a file sink at ``../../../escape/out.ndjson`` and a file source
  at an absolute path outside are refused, with the field and the allowed folder, reported to
  the control plane as refused versions; nothing is created or read outside;
* node B (``--allow-path OUTSIDE``): the same kind of pipeline, inside OUTSIDE, runs;
* ``--allow-path`` holding the node's data directory is refused at start (exit code 2).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgewise.cloud import openapi as oa
from edgewise.errors import EdgewiseError
from edgewise.testbed.system import AgentProcess, ControlPlane, System, run_cli

pytestmark = pytest.mark.timeout(180)

LOCAL = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: local
spec:
  sources:
    - {id: sim, type: simulator, profile: custom, rate_hz: 5, groups: [{prefix: l/t, count: 1}]}
  sinks:
    - {id: out, type: outbox, inputs: [sim], stream: local}
  outbox:
    sync: normal
"""

FILES = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: {name}
spec:
  sources:
    - {{id: src, type: {source}}}
  sinks:
    - {{id: copy, type: file, inputs: [src], path: "{sink}"}}
    - {{id: up, type: outbox, inputs: [src], stream: {name}}}
  outbox:
    sync: normal
"""

READINGS = 50


async def until(what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``probe()`` until it returns something true (errors count as not yet); that."""
    end = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except (OSError, EdgewiseError, ValueError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}; last: {last!r}")
        await asyncio.sleep(0.2)


async def push(cloud: ControlPlane, node: str, name: str, text: str) -> int:
    """``config set`` of one pipeline for ``node`` through the operator API; its version."""
    res = await asyncio.to_thread(cloud.operator().set_config,
                                  oa.ConfigSetRequest(node=node, pipelines={name: text}))
    return res.nodes[0].version


def refused(agent: AgentProcess, version: int) -> str | None:
    """Why the node refused ``version`` (``agent status``), None while it has not."""
    twin = agent.status().twin
    return twin.refused.get(str(version)) if twin is not None else None


async def refusal(agent: AgentProcess, version: int) -> str:
    """Wait until the node refused or applied ``version``; why it refused it."""
    def decided() -> tuple[str | None, int] | None:
        twin = agent.status().twin
        if twin is None:
            return None
        why = twin.refused.get(str(version))
        return (why, twin.applied_version) if why or twin.applied_version >= version else None
    why, applied = await until(f"{agent.name} to decide on v{version}", decided)
    assert why is not None, f"{agent.name} applied v{version} (applied: v{applied})"
    return why


async def reported(cloud: ControlPlane, node: str, what: str,
                   cond: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll ``node show`` until its reported state satisfies ``cond``."""
    def probe() -> dict[str, Any] | None:
        rep = cloud.operator().get_node(node).model_dump(mode="json")["reported"]
        return rep if rep is not None and cond(rep) else None
    return await until(what, lambda: probe())


async def test_pushed_pipelines_stay_inside_the_nodes_allowed_folders(tmp_path: Path) -> None:
    outside = (tmp_path / "outside").resolve()
    outside.mkdir()
    replay = outside / "readings.ndjson"
    replay.write_bytes(b"".join(
        orjson.dumps({"sensor": "r/1", "ts": 1_764_547_200 + i, "value": float(i)}) + b"\n"
        for i in range(READINGS)))
    escape = tmp_path / "escape"  # where ../../../ leads from DATA/pipelines (and DATA/engine)
    local = tmp_path / "local.yaml"
    local.write_text(LOCAL)
    async with System(tmp_path / "sys") as system:
        cloud = await system.start_cloud()
        a = await system.add_agent("a", local, await cloud.token({"site": "a"}), proxy=False)
        node_a = await until("node a to enrol", lambda: a.node_id)
        base_a = (a.data_dir / "pipelines").resolve()

        # node A: a file sink that climbs out of DATA/pipelines
        v1 = await push(cloud, node_a, "leak", FILES.format(
            name="leak", source="simulator, realtime: false, limit: 10",
            sink="../../../escape/out.ndjson"))
        why = await refusal(a, v1)
        assert why.startswith("desired v1 pipeline 'leak' is invalid:\ndesired-v1-leak.yaml:9: "
                              "spec.sinks.0.path: '../../../escape/out.ndjson' is outside the "
                              "folders this node allows for pipelines from the control plane "
                              f"(it resolves to {escape.resolve()}/out.ndjson); "
                              f"allowed: {base_a}; "), why
        assert "`edgewise agent run --allow-path DIR`" in why
        await reported(cloud, node_a, "the refusal of v1",
                       lambda r: r["status"].startswith("desired v1 refused"))

        # node A: a file source with an absolute path outside
        v2 = await push(cloud, node_a, "peek", FILES.format(
            name="peek", source=f'file, path: "{replay}"', sink="peek.ndjson"))
        why = await refusal(a, v2)
        assert (f"desired-v2-peek.yaml:7: spec.sources.0.path: '{replay}' is outside the "
                f"folders this node allows for pipelines from the control plane; allowed: "
                f"{base_a}; ") in why, why
        rep = await reported(cloud, node_a, "the refusal of v2",
                             lambda r: r["status"].startswith("desired v2 refused"))
        assert rep["applied_version"] is None  # neither version was applied
        st = a.status()
        assert st.engine is not None and st.engine.pipeline == "local"  # --pipeline runs on
        assert not escape.exists() and not (base_a / "peek.ndjson").exists()
        assert "peek" not in a.status().to_json()["streams"]

        # node B allows OUTSIDE: the same kind of pipeline runs, reading and writing there
        b = await system.add_agent("b", local, await cloud.token({"site": "b"}), proxy=False,
                                   extra_args=["--allow-path", str(outside)])
        node_b = await until("node b to enrol", lambda: b.node_id)
        v1 = await push(cloud, node_b, "copy", FILES.format(
            name="copy", source=f'file, path: "{replay}"', sink="../../../outside/copy.ndjson"))
        await reported(cloud, node_b, "node b to apply v1",
                       lambda r: r["applied_version"] == v1)
        copy = outside / "copy.ndjson"
        await until("the copy", lambda: copy.exists() and copy.read_bytes().count(b"\n")
                    == READINGS)
        got = [orjson.loads(line) for line in copy.read_bytes().splitlines()]
        assert [(r["sensor"], r["value"]) for r in got] == [("r/1", float(i))
                                                            for i in range(READINGS)]
        assert refused(b, v1) is None and not escape.exists()
        assert a.running and b.running

    # an allowed folder that holds the node's data directory: refused before anything starts
    res = await run_cli("agent", "run", "--data", str(tmp_path / "sys" / "c"), "--cloud",
                        "https://127.0.0.1:9", "--token", "ewe_x", "--allow-path", str(tmp_path))
    assert res.returncode == 2, res.stderr
    assert f"--allow-path {tmp_path}: it holds the node's data directory" in " ".join(
        res.stderr.split())
