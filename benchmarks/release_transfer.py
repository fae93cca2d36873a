"""A release over a thin link: bytes and time for a large release, then for a release that
changes one pipeline file (issue 10).

Real processes: ``edgewise cloud serve`` (with `cloud keys init`), releases published with
``edgewise release publish`` and assigned with ``edgewise config set --release``, one
``edgewise agent run`` behind a `LinkProxy` shaped to ``--link-mbit`` Mbit/s in each direction.
Measured at the proxy: the bytes it forwarded from the control plane to the node from the
assignment until the node's status says the release runs and is committed (download, TUF
metadata, the switch, the health gate), and the time that took. Baselines from the same run: the
release's own bytes and the time they take at the link's rate (the floor any updater pays), and
for the second release twice the changed file plus the TUF metadata (the issue's bound).

Run: python benchmarks/release_transfer.py [--size-mb 20] [--link-mbit 2] [--gate-window 5]
The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json, print_table

from edgewise.testbed.system import AgentProcess, System, run_cli

PIPELINE = """apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: {name}
spec:
  sources:
    - id: sensors
      type: simulator
      profile: custom
      rate_hz: 50
      groups:
        - {{prefix: "line1/temp", count: 20}}
  stages:
    - id: alarms
      type: threshold
      inputs: [sensors]
      field: value
      high: {high}
  sinks:
    - id: alarms-out
      type: outbox
      inputs: [alarms]
      stream: alarms
      priority: alarm
"""


async def cli(*args: str) -> None:
    res = await run_cli(*args)
    if res.returncode != 0:
        raise SystemExit(f"edgewise {' '.join(args)} failed: {res.stderr}{res.stdout}")


def status(agent: AgentProcess) -> dict[str, Any]:
    try:
        return json.loads((agent.data_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def write(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def metadata_bytes(cloud_data: Path) -> int:
    db = sqlite3.connect(f"file:{cloud_data / 'edgewise.db'}?mode=ro", uri=True)
    try:
        return sum(len(data) for role, data in db.execute(
            "SELECT role, data FROM tuf_metadata t WHERE version = (SELECT MAX(version) FROM "
            "tuf_metadata WHERE role = t.role)") if role != "root")
    finally:
        db.close()


async def apply(agent: AgentProcess, data: str, node: str, version: str,
                timeout: float) -> tuple[int, float]:
    assert agent.link is not None
    before, t0 = agent.link.stats.bytes_down, time.monotonic()
    await cli("config", "set", "--node", node, "--release", version, "--data", data)
    while True:
        rel = status(agent).get("release") or {}
        if rel.get("running") == version and rel.get("state") == "committed":
            return agent.link.stats.bytes_down - before, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"release {version} not committed after {timeout:.0f} s: {rel}\n"
                             f"{agent.log.read_text()[-3000:]}")
        await asyncio.sleep(0.2)


async def measure(size: int, rate: float, gate: float, work: Path) -> dict[str, Any]:
    model = os.urandom(size)
    one = PIPELINE.format(name="line-one", high=100.0).encode()
    two = PIPELINE.format(name="line-two", high=97.0).encode()
    v1 = write(work / "r1", {"pipelines/line.yaml": one, "models/model.bin": model})
    v2 = write(work / "r2", {"pipelines/line.yaml": two, "models/model.bin": model})
    (work / "base.yaml").write_text(PIPELINE.format(name="base", high=100.0))
    async with System(work / "sys") as system:
        cloud = await system.start_cloud()
        data = str(cloud.data_dir)
        await cli("cloud", "keys", "init", str(work / "root-keys"), "--data", data)
        await cli("release", "publish", str(v1), "--version", "1.0", "--data", data)
        await cli("release", "publish", str(v2), "--version", "1.1", "--data", data)
        agent = await system.add_agent(
            "edge", work / "base.yaml", await cloud.token({"bench": "release"}),
            extra_args=["--gate-window", str(gate), "--gate-start", "60"])
        assert agent.link is not None
        deadline = time.monotonic() + 60
        while not (status(agent).get("node_id")
                   and (status(agent).get("link") or {}).get("state") == "connected"):
            if time.monotonic() > deadline:
                raise SystemExit(f"the agent did not connect:\n{agent.log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)
        node = status(agent)["node_id"]
        agent.link.rate = rate
        timeout = 4 * size / rate + 120
        big_bytes, big_s = await apply(agent, data, node, "1.0", timeout)
        small_bytes, small_s = await apply(agent, data, node, "1.1", 120)
        meta = metadata_bytes(cloud.data_dir)
        await agent.stop()
    release = len(model) + len(one)
    return {
        "release_bytes": release, "link_bytes_per_s": rate, "gate_window_s": gate,
        "full_bytes_down": big_bytes, "full_s": round(big_s, 1),
        "full_floor_s": round(release / rate, 1),
        "full_overhead_pct": round(100 * (big_bytes - release) / release, 2),
        "changed_file_bytes": len(two), "one_file_bytes_down": small_bytes,
        "one_file_s": round(small_s, 1), "tuf_metadata_bytes": meta,
        "one_file_bound_bytes": 2 * len(two) + meta,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=20.0)
    ap.add_argument("--link-mbit", type=float, default=2.0)
    ap.add_argument("--gate-window", type=float, default=5.0)
    args = ap.parse_args()
    rate = args.link_mbit * 1e6 / 8
    with tempfile.TemporaryDirectory(prefix="edgewise-release-") as tmp:
        f = asyncio.run(measure(int(args.size_mb * 1e6), rate, args.gate_window, Path(tmp)))
    print_table(f"A {args.size_mb:g} MB release over a {args.link_mbit:g} Mbit/s link", [
        ("full release: bytes down", f"{f['full_bytes_down']:,}",
         f"{f['release_bytes']:,} B of files ({f['full_overhead_pct']}% over)"),
        ("full release: time to committed", f"{f['full_s']} s",
         f"{f['full_floor_s']} s to carry its bytes, + {f['gate_window_s']:g} s gate"),
        ("one pipeline changed: bytes down", f"{f['one_file_bytes_down']:,}",
         f"2 x {f['changed_file_bytes']} B + {f['tuf_metadata_bytes']:,} B TUF metadata = "
         f"{f['one_file_bound_bytes']:,} B (the link also carries a TLS handshake, headers "
         "and the session)"),
        ("one pipeline changed: time to committed", f"{f['one_file_s']} s",
         f"{f['gate_window_s']:g} s gate"),
    ])
    emit_json(f)


if __name__ == "__main__":
    main()
