"""The agent's local endpoint and logs with real processes: a control plane (``edgewise cloud
serve``) and an agent (``edgewise agent run --metrics 127.0.0.1:PORT --log-format json``)
behind a `LinkProxy` (src/edgewise/edge/metrics.py, src/edgewise/cli/logs.py).

* /metrics parses with prometheus_client's own parser; every family follows the conventions
  (``edgewise_`` prefix, counters end in ``_total``, byte and second units in the name), and
  the figures equal what ``edgewise agent status --json`` reads from the outbox itself: the
  readings of a finite simulator, per stream produced = acknowledged, nothing pending;
* /healthz and /readyz answer 200 while the pipeline runs, and /readyz stays 200 while the link
  is cut (the node works without its cloud) while ``edgewise_uplink_connected`` drops to 0;
* the agent's log is JSON lines with UTC timestamps, and the link's loss and its return are
  both logged at WARNING;
* the control plane answers /readyz 200 over TLS once its store is open and migrated.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgewise.security.tls import client_context
from edgewise.testbed.system import System, factory_pipeline, free_port, run_cli

pytestmark = pytest.mark.timeout(120)

READINGS = 20_000  # two seconds of the factory line
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

# every family the agent exports once its uplink has connected and the pipeline finished
FAMILIES = {
    "edgewise_agent_info": "gauge", "edgewise_agent_state": "gauge",
    "edgewise_agent_start_time_seconds": "gauge",
    "edgewise_pipeline_state": "gauge", "edgewise_pipeline_starts": "counter",
    "edgewise_pipeline_readings_in": "counter", "edgewise_pipeline_alarms": "counter",
    "edgewise_pipeline_late": "counter", "edgewise_pipeline_dead_lettered": "counter",
    "edgewise_outbox_records_produced": "counter", "edgewise_outbox_records_acked": "counter",
    "edgewise_outbox_records_dropped": "counter", "edgewise_outbox_records_compacted": "counter",
    "edgewise_outbox_pending_records": "gauge", "edgewise_outbox_pending_bytes": "gauge",
    "edgewise_outbox_disk_bytes": "gauge", "edgewise_outbox_max_bytes": "gauge",
    "edgewise_outbox_disk_full": "gauge", "edgewise_outbox_held_records": "gauge",
    "edgewise_uplink_connected": "gauge", "edgewise_uplink_state": "gauge",
    "edgewise_uplink_state_seconds": "gauge", "edgewise_uplink_sessions": "counter",
    "edgewise_uplink_connect_attempts": "counter", "edgewise_uplink_sent_bytes": "counter",
    "edgewise_uplink_received_bytes": "counter", "edgewise_uplink_chunks_sent": "counter",
    "edgewise_uplink_records_sent": "counter", "edgewise_uplink_chunks_resent": "counter",
    "edgewise_uplink_chunks_acked": "counter", "edgewise_uplink_records_acked": "counter",
    "edgewise_uplink_inflight_bytes": "gauge",
    "edgewise_certificate_expiry_timestamp_seconds": "gauge",
    "edgewise_certificate_expires_in_seconds": "gauge",
    "edgewise_certificate_renewals": "counter",
    "edgewise_certificate_reauthentications": "counter",
    "edgewise_release_info": "gauge", "edgewise_desired_applied_version": "gauge",
}


def scrape(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    fam = families[name]
    want = name + "_total" if fam.type == "counter" else name
    found = [s.value for s in fam.samples
             if s.name == want and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, fam.samples)
    return found[0]


async def get(http: httpx.AsyncClient, url: str) -> httpx.Response | None:
    try:
        return await http.get(url)
    except httpx.TransportError:
        return None


async def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def json_log(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a log file (every line starting with "{" must parse)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


async def test_agent_metrics_health_and_logs(tmp_path: Path) -> None:
    yaml_text, _seed = factory_pipeline(READINGS)
    pipeline = tmp_path / "factory.yaml"
    pipeline.write_text(yaml_text, encoding="utf-8")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with System(tmp_path / "sys") as system, httpx.AsyncClient(timeout=5.0) as http:
        cloud = await system.start_cloud()
        async with httpx.AsyncClient(verify=client_context(cloud.ca), timeout=5.0) as tls:
            r = await tls.get(f"{cloud.url}/readyz")
        assert (r.status_code, r.json()["status"]) == (200, "ready"), r.text
        token = await cloud.token({"site": "obs"})
        agent = await system.add_agent(
            "a", pipeline, token,
            extra_args=["--metrics", f"127.0.0.1:{port}", "--log-format", "json",
                        "--backoff-base", "0.05", "--backoff-cap", "0.2"])

        async def settled() -> dict[str, Any] | None:
            r = await get(http, f"{base}/metrics")
            if r is None or r.status_code != 200:
                return None
            fams = scrape(r.text)
            if "edgewise_outbox_records_produced" not in fams:
                return None
            streams = {s.labels["stream"] for s in fams["edgewise_outbox_records_produced"]
                       .samples}
            done = (value(fams, "edgewise_pipeline_state", state="finished") == 1
                    if any(s.labels.get("state") == "finished"
                           for s in fams["edgewise_pipeline_state"].samples) else False)
            acked = done and streams == {"alarms", "aggregates"} and all(
                value(fams, "edgewise_outbox_records_produced", stream=s)
                == value(fams, "edgewise_outbox_records_acked", stream=s) for s in streams)
            return fams if acked and "edgewise_uplink_records_acked" in fams else None

        fams = await wait_for(settled, 60, "the pipeline finished and all acknowledged")
        r = await http.get(f"{base}/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=")

        # names and types: exactly the families expected, each by the conventions
        assert {n: f.type for n, f in fams.items()} == FAMILIES
        for name, fam in fams.items():
            assert name.startswith("edgewise_")
            for s in fam.samples:
                assert s.name.endswith("_total") == (fam.type == "counter"), s.name
            assert not re.search(r"_(ms|kb|mb|kilobytes|milliseconds|minutes)(_|$)", name)

        # the figures, against what `agent status --json` counts in the outbox itself
        res = await run_cli("agent", "status", "--data", str(agent.data_dir), "--json")
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)
        assert value(fams, "edgewise_pipeline_readings_in") == READINGS
        assert value(fams, "edgewise_pipeline_starts") == 1
        assert value(fams, "edgewise_agent_state", state="running") == 1
        assert value(fams, "edgewise_agent_info", node_id=status["node_id"]) == 1
        for name, st in status["streams"].items():
            labels = {"stream": name, "priority": str(st["priority"])}
            assert value(fams, "edgewise_outbox_records_produced", **labels) == st["produced"]
            assert value(fams, "edgewise_outbox_records_acked", **labels) == st["acknowledged"]
            assert value(fams, "edgewise_outbox_pending_records", **labels) == 0
            assert value(fams, "edgewise_outbox_records_dropped", **labels) == 0
        produced = sum(st["produced"] for st in status["streams"].values())
        assert produced > 0
        assert value(fams, "edgewise_uplink_records_acked") == produced
        assert value(fams, "edgewise_pipeline_alarms") == status["streams"]["alarms"]["produced"]
        assert value(fams, "edgewise_uplink_connected") == 1
        assert value(fams, "edgewise_uplink_state", state="connected") == 1
        expires_in = value(fams, "edgewise_certificate_expires_in_seconds")
        assert 0 < expires_in <= status["certificate_expires_in_s"] + 5
        assert value(fams, "edgewise_uplink_sent_bytes", layer="websocket") > 0

        for path in ("/healthz", "/readyz"):
            r = await http.get(base + path)
            assert r.status_code == 200, (path, r.text)
        assert r.json() == {"status": "ready", "why": "pipeline finished"}
        assert (await http.post(f"{base}/metrics")).status_code == 405

        # the link cut: ready all the same, uplink 0; then back
        assert agent.link is not None
        agent.link.cut("reset")

        async def down() -> bool:
            f = scrape((await http.get(f"{base}/metrics")).text)
            return value(f, "edgewise_uplink_connected") == 0

        await wait_for(down, 20, "the uplink saw the cut")
        r = await http.get(f"{base}/readyz")
        assert r.status_code == 200, r.text
        agent.link.restore()

        async def up() -> bool:
            f = scrape((await http.get(f"{base}/metrics")).text)
            return value(f, "edgewise_uplink_connected") == 1

        await wait_for(up, 20, "the uplink connected again")
        agent_url = agent.url
        await agent.stop()
        assert await get(http, f"{base}/healthz") is None  # the endpoint ends with the agent

    records = json_log(agent.log)
    assert records, agent.log.read_text()
    for rec in records:
        assert set(rec) >= {"ts", "level", "logger", "message"}
        assert TS.match(rec["ts"]), rec
    cloud_url = f"link to {agent_url}"
    link = [(r["level"], r["message"]) for r in records
            if r["logger"] == "edgewise.edge.uplink" and r["message"].startswith(cloud_url)]
    # lost (maybe with more than one cause while it stays cut) and regained, all at WARNING
    assert link[0][1].startswith(f"{cloud_url} down: "), link
    assert link[-1][1].startswith(f"{cloud_url} up again after "), link
    assert all(m.startswith(f"{cloud_url} down: ") for _, m in link[:-1]), link
    assert {level for level, _ in link} == {"WARNING"}, link


def test_metrics_address_is_checked(tmp_path: Path) -> None:
    """A bad --metrics value is the user's: exit 2 naming the flag, before anything starts."""
    import subprocess

    res = subprocess.run([sys.executable, "-m", "edgewise.cli", "agent", "run", "--data",
                          str(tmp_path / "d"), "--metrics", "9464"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert "--metrics '9464': give HOST:PORT" in res.stderr
    assert not (tmp_path / "d").exists()
