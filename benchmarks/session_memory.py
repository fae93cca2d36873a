"""Where a control plane's memory per device session goes (issue 11): tracemalloc in the server.

Runs the control plane in this process (`edgewise.cloud.app.start`, SQLite) with tracemalloc
on, and ``edgewise sim fleet`` with ``--nodes`` virtual nodes as a child process; once every
node has its session (and 10 s more), compares a snapshot with the one taken before the fleet
started: traced bytes per session by source line, and the process's RSS growth per session.
tracemalloc slows the server down several times, so keep ``--nodes`` in the low hundreds.

``--tls-read-buffer BYTES`` sets the read buffer the control plane gives asyncio's TLS
connections (`edgewise.common.tls`: 16 KiB since it was measured here; Python 3.11's own default,
262144, is the baseline). The simulator always reads 16 KiB at a
time (`edgewise.testbed.fleet.run.lean_tls_buffers`).

Run: python benchmarks/session_memory.py --nodes 120 [--tls-read-buffer 262144]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import tempfile
import tracemalloc
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json

from edgewise.cloud.app import start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.state import SESSIONS
from edgewise.cloud.store import Store
from edgewise.security.tokens import EnrolmentToken
from edgewise.testbed.fleet.stats import rss_kb
from edgewise.testbed.system import CLI


async def measure(nodes: int, work: Path) -> dict:
    config = CloudConfig(data_dir=work / "cloud", port=0)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            plain, record = EnrolmentToken.issue({"fleet": "mem"}, timedelta(hours=1), nodes)
            await store.add_enrolment_token(record)
            await asyncio.sleep(1.0)
            gc.collect()
            r0 = rss_kb()
            tracemalloc.start(1)
            s0 = tracemalloc.take_snapshot()
            sim = subprocess.Popen(
                [*CLI, "sim", "fleet", "--nodes", str(nodes), "--cloud", running.url,
                 "--token", plain.get_secret_value(), "--ca", str(work / "cloud/pki/ca.pem"),
                 "--duration", "600", "--no-verify", "--json"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                for _ in range(300):
                    await asyncio.sleep(1.0)
                    if len(running.app[SESSIONS]) >= nodes:
                        break
                await asyncio.sleep(10.0)
                gc.collect()
                s1 = tracemalloc.take_snapshot()
                r1 = rss_kb()
                n = max(1, len(running.app[SESSIONS]))
            finally:
                sim.terminate()
                sim.wait(120)
            diff = s1.compare_to(s0, "lineno")
            tracemalloc.stop()
            top = []
            for d in diff[:12]:
                f = d.traceback[0]
                where = "/".join(Path(f.filename).parts[-2:])
                top.append((f"{where}:{f.lineno}", round(d.size_diff / 1024 / n, 1)))
            return {"sessions": n, "rss_kb_per_session": round((r1 - r0) / n, 1),
                    "traced_kb_per_session": round(sum(d.size_diff for d in diff) / 1024 / n, 1),
                    "top": top}
        finally:
            await running.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=120)
    ap.add_argument("--tls-read-buffer", type=int, default=None)
    args = ap.parse_args()
    import edgewise.common.tls

    if args.tls_read_buffer:  # the control plane sets this when its listener starts
        edgewise.common.tls.READ_BUFFER = args.tls_read_buffer
    buf = edgewise.common.tls.READ_BUFFER
    with tempfile.TemporaryDirectory(prefix="edgewise-session-memory-") as tmp:
        res = asyncio.run(measure(args.nodes, Path(tmp)))
    print(f"{res['sessions']} sessions, TLS read buffer {buf:,} B: RSS "
          f"+{res['rss_kb_per_session']} KB/session, traced +{res['traced_kb_per_session']} "
          "KB/session; by line:")
    for where, kb in res["top"]:
        print(f"  {kb:8.1f} KB/session  {where}")
    emit_json({"nodes": args.nodes, "tls_read_buffer": buf, **{k: v for k, v in res.items()
                                                              if k != "top"}})


if __name__ == "__main__":
    main()
