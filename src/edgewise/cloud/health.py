"""Readiness of the control plane: ``GET /readyz`` (no auth), for a load balancer or Kubernetes.

200 ``{"status": "ready", "schema_revision": REV}`` when the store answers a query within
`READY_TIMEOUT_S` and its schema is at the newest migration this code has (``alembic_version``
equals the head of ``cloud/migrations``); else 503 with ``why``: the store is not open or does
not answer, or its schema is behind or ahead (another version migrated it). ``/healthz``
(`edgewise.cloud.app`) only says the process serves requests.

The answer names no database URL or driver message (it is unauthenticated); the cause goes to
the log, once per change: "not ready" and "ready again" both at WARNING.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import cache

from aiohttp import web
from alembic.script import ScriptDirectory

from edgewise.cloud.state import STORE
from edgewise.cloud.store.db import MIGRATIONS
from edgewise.errors import StorageError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 5.0  # a store slower than this to answer one query is not ready


@cache
def head_revision() -> str | None:
    """The newest migration of this code (read from cloud/migrations once)."""
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


@dataclass
class Readiness:
    """The last answer, to log changes only."""

    why: str | None = None  # None: ready (or never asked)


READINESS = web.AppKey("readiness", Readiness)


async def check(app: web.Application) -> tuple[bool, dict[str, str | None], str | None]:
    """(ready, the answer's body, the cause to log when not ready)."""
    try:
        rev = await asyncio.wait_for(app[STORE].schema_revision(), READY_TIMEOUT_S)
    except TimeoutError:
        why = f"the store did not answer within {READY_TIMEOUT_S:.0f} s"
        return False, {"status": "not ready", "why": why}, why
    except StorageError as exc:
        return False, {"status": "not ready", "why": "the store is unreachable"}, str(exc)
    head = head_revision()
    if rev != head:
        why = f"database schema at {rev}, this version needs {head}: migrations not applied"
        return False, {"status": "not ready", "why": why, "schema_revision": rev}, why
    return True, {"status": "ready", "schema_revision": rev}, None


async def readyz(request: web.Request) -> web.Response:
    ready, body, cause = await check(request.app)
    state = request.app[READINESS]
    if not ready and state.why is None:
        log.warning("not ready: %s", cause)
    elif ready and state.why is not None:
        log.warning("ready again (was: %s)", state.why)
    state.why = None if ready else (cause or "not ready")
    return web.json_response(body, status=200 if ready else 503)


def setup(app: web.Application) -> None:
    """Add ``GET /readyz``."""
    app[READINESS] = Readiness()
    app.router.add_get("/readyz", readyz)
