"""The store's cloud pipelines: set (versions grow, same text is no change), list, delete,
each change audited in its transaction; the marks of one stream across nodes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgewise.cloud.store import MarkWrite, Store, database_url


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_cloud_pipeline_rows(tmp_path: Path, backend: str, request: pytest.FixtureRequest
                             ) -> None:
    url = (database_url(None, tmp_path) if backend == "sqlite"
           else request.getfixturevalue("postgres"))

    async def main() -> None:
        async with Store(url) as s:
            assert await s.schema_revision() is not None
            info, changed = await s.put_cloud_pipeline("p1", "a: 1\n", actor="op:x")
            assert (info.version, changed) == (1, True)
            info, changed = await s.put_cloud_pipeline("p1", "a: 1\n", actor="op:x")
            assert (info.version, changed) == (1, False)
            info, changed = await s.put_cloud_pipeline("p1", "a: 2\n", actor="op:y")
            assert (info.version, changed, info.updated_by) == (2, True, "op:y")
            await s.put_cloud_pipeline("p0", "b: 1\n", actor="op:x")
            assert [p.name for p in await s.list_cloud_pipelines()] == ["p0", "p1"]
            got = await s.get_cloud_pipeline("p1")
            assert got is not None and got.text == "a: 2\n"
            assert await s.delete_cloud_pipeline("p1", actor="op:z") is True
            assert await s.delete_cloud_pipeline("p1", actor="op:z") is False
            assert await s.get_cloud_pipeline("p1") is None
            t = datetime.now(UTC)
            await s.commit_ingest((), (), [MarkWrite("n1", "raw", 7, t),
                                           MarkWrite("n2", "raw", 3, t),
                                           MarkWrite("n1", "other", 9, t)])
            assert await s.stream_marks("raw") == {"n1": 7, "n2": 3}
            audit = await s.list_audit(target="cloud-pipeline:p1")
            assert [(a.action, a.actor) for a in audit] == [
                ("cloud-pipeline.delete", "op:z"), ("cloud-pipeline.set", "op:y"),
                ("cloud-pipeline.set", "op:x")]

    asyncio.run(main())
