"""The control plane's /readyz (src/edgewise/cloud/health.py) on a real aiohttp server over a
real SQLite store: 200 when it answers at this code's newest migration; 503 while its schema
is at another revision and while the store is closed (unreachable); the answer names no
database path; each change is logged once, both ways at WARNING."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from edgewise.cloud import migrations
from edgewise.cloud.app import create_app
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.health import head_revision
from edgewise.cloud.store import Store
from edgewise.security.pki import CertificateAuthority


async def test_readyz_follows_store_and_migrations(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgewise.cloud.health")
    db_file = tmp_path / "cloud.db"
    url = f"sqlite+aiosqlite:///{db_file}"
    store = Store(url)  # the app does not open or close a store it is given
    ca = CertificateAuthority.create(tmp_path / "pki")
    app = create_app(CloudConfig(data_dir=tmp_path, db=url), ca, store=store)
    head = head_revision()
    versions = Path(migrations.__file__).parent / "versions"
    assert head == max(p.name[:4] for p in versions.glob("0*.py"))  # the newest file there
    await store.open()  # connects and migrates to head; the app's startup needs it open
    try:
        async with TestClient(TestServer(app)) as http:
            r = await http.get("/readyz")
            assert (r.status, await r.json()) == (200, {"status": "ready",
                                                        "schema_revision": head})

            with sqlite3.connect(db_file) as db:  # an older schema: as if not migrated yet
                db.execute("UPDATE alembic_version SET version_num = '0003'")
            r = await http.get("/readyz")
            body = await r.json()
            assert r.status == 503
            assert body == {"status": "not ready", "schema_revision": "0003",
                            "why": f"database schema at 0003, this version needs {head}: "
                                   "migrations not applied"}
            assert (await http.get("/readyz")).status == 503  # asked again: logged once
            with sqlite3.connect(db_file) as db:
                db.execute("UPDATE alembic_version SET version_num = ?", (head,))
            assert (await http.get("/readyz")).status == 200

            await store.close()  # the store gone (a database server down)
            r = await http.get("/readyz")
            assert r.status == 503
            assert await r.json() == {"status": "not ready", "why": "the store is unreachable"}
            assert str(tmp_path) not in await r.text()
            assert (await http.get("/healthz")).status == 200  # alive all the same
            await store.open()
            assert (await http.get("/readyz")).status == 200
    finally:
        await store.close()
    logged = [(r.levelname, r.getMessage()) for r in caplog.records
              if r.name == "edgewise.cloud.health"]
    assert logged == [
        ("WARNING", f"not ready: database schema at 0003, this version needs {head}: "
                    "migrations not applied"),
        ("WARNING", f"ready again (was: database schema at 0003, this version needs {head}: "
                    "migrations not applied)"),
        ("WARNING", "not ready: store is not open"),
        ("WARNING", "ready again (was: store is not open)"),
    ]
