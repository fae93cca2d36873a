"""Certificate renewal that fails, then succeeds, over real TLS (a `FakeCloud` whose renew
endpoint answers 503 twice): the failures are WARNINGs, and so is the success that ends them,
so a log read at WARNING says the node has a fresh certificate again (issue 15)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from test_agent_fakecloud import FakeCloud, wait_for
from test_agent_identity import enrolled, replace_cert
from test_agent_session import make_agent

pytestmark = pytest.mark.timeout(60)


class FlakyRenewal(FakeCloud):
    failures = 2  # the renew endpoint answers 503 this many times first

    async def renew(self, request: web.Request) -> web.Response:
        if self.failures:
            self.failures -= 1
            return self._error(503, "busy")
        return await super().renew(request)


async def test_renewal_success_after_failures_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgewise.edge.identity")
    data = tmp_path / "node"
    async with FlakyRenewal(tmp_path) as cloud:
        await enrolled(data, cloud)
        replace_cert(data, cloud, datetime.now(UTC) - timedelta(hours=17), timedelta(hours=24))
        agent = make_agent(data, cloud)
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: cloud.counts["renew"] == 1, 20, "a renewal")
            await asyncio.sleep(0.2)
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
    lines = [(r.levelname, r.getMessage().split(" (")[0].split(";")[0]) for r in caplog.records
             if r.name == "edgewise.edge.identity" and "renew" in r.getMessage()]
    assert lines == [("WARNING", "certificate renewal failed"),
                     ("WARNING", "certificate renewal failed"),
                     ("INFO", "certificate renewed"),
                     ("WARNING", "certificate renewal succeeded after 2 failed attempt(s)")]
