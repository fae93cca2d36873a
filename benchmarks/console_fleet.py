"""The console's fleet page over N nodes: server time per page, measured on the control plane's
own app (in-process, real TLS on 127.0.0.1, SQLite or PostgreSQL), signed in as a viewer.

    .venv/bin/python benchmarks/console_fleet.py [--nodes 10000] [--db URL]

Nodes are written straight into the store (`testbed.rollout_fleet.add_nodes`, every tenth with a
heartbeat's health, every hundredth quarantined). Timed, one request at a time, each the whole
answer (TLS, handler, store, template): the first page right after the start, before the fleet
gauges' first pass (no counts yet; the page competes with that pass for the store), then,
once the gauges have passed (as on any control plane up for a few seconds; counts and the state
filter read their index), the first page, each following page, and a state filter
(``state=quarantined``). The baseline in the same run is the
operator API's ``GET /v1/nodes?limit=100`` (one store page as JSON, no states). Prints the
figures and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from edgewise.cloud.app import start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.fleet_metrics import FLEET_GAUGES
from edgewise.cloud.store import Store
from edgewise.security.tokens import OperatorToken
from edgewise.testbed.rollout_fleet import add_nodes


async def timed(http: httpx.AsyncClient, url: str, **kw: object) -> tuple[float, str]:
    t = time.perf_counter()
    r = await http.get(url, **kw)  # type: ignore[arg-type]
    took = time.perf_counter() - t
    assert r.status_code == 200, (url, r.status_code, r.text[:300])
    return took, r.text


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--db", default=None, help="an empty PostgreSQL database URL")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = CloudConfig(data_dir=Path(tmp) / "cloud", port=0, db=args.db)
        async with Store(config.db_url) as store:
            boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                                   trust_domain="edgewise.local")
            now = datetime.now(UTC)
            await add_nodes(store, [(f"node-{i:06d}", f"site-{i // 2}")
                                    for i in range(args.nodes)], now)
            health = {f"node-{i:06d}": ({"release": "1.0", "outbox": {"0": [0, 0.0]}}, now)
                      for i in range(0, args.nodes, 10)}
            await store.write_health(health)
            for i in range(0, args.nodes, 100):
                await store.set_quarantine(f"node-{i:06d}", "benchmark", actor="bench")
            plain, rec = OperatorToken.issue("bench", "viewer")
            await store.add_operator_token(rec)
            token = plain.get_secret_value()
            running = await start(config, boot.ca, store=store)
            try:
                ctx = ssl.create_default_context(cafile=str(boot.ca_path))
                async with httpx.AsyncClient(base_url=running.url, verify=ctx,
                                             timeout=60) as http:
                    r = await http.post("/console/login", data={"token": token})
                    assert r.status_code == 303, r.text
                    cold, html = await timed(http, "/console/fleet")
                    gauges = running.app[FLEET_GAUGES]
                    while gauges.summary is None:  # its first pass runs when the app starts
                        await asyncio.sleep(0.1)
                    warm, html = await timed(http, "/console/fleet")
                    assert f"{args.nodes} nodes" in html, html[:500]
                    pages = []
                    after = None
                    for _ in range(10):
                        took, html = await timed(http, "/console/fleet",
                                                 params={"after": after} if after else None)
                        pages.append(took)
                        after = html.split("after=")[-1].split('"')[0] if "after=" in html \
                            else None
                        if after is None:
                            break
                    scan, html = await timed(http, "/console/fleet",
                                             params={"state": "quarantined"})
                    api = [(await timed(http, "/v1/nodes", params={"limit": "100"},
                                        headers={"Authorization": f"Bearer {token}"}))[0]
                           for _ in range(10)]
            finally:
                await running.stop()
    out = {"nodes": args.nodes, "db": "postgresql" if args.db else "sqlite",
           "first_page_before_gauges_s": round(cold, 3), "first_page_s": round(warm, 3),
           "next_pages_median_s": round(statistics.median(pages), 3),
           "next_pages_max_s": round(max(pages), 3), "state_filter_s": round(scan, 3),
           "baseline_api_nodes_page_median_s": round(statistics.median(api), 3)}
    print(f"{args.nodes:,} nodes ({out['db']}): first page {warm:.3f} s ({cold:.3f} s before the "
          f"fleet gauges' first pass); next pages median {out['next_pages_median_s']:.3f} s, max "
          f"{out['next_pages_max_s']:.3f} s; state filter {scan:.3f} s; baseline: the API's "
          f"100-node page {out['baseline_api_nodes_page_median_s']:.3f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
