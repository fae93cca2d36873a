"""A cloud pipeline passes over what a quarantined node sent (docs/security.md, "What quarantine
allows"): in-process, the real engine over the store; the fleet window's results equal the
offline computation without the flagged chunk, and the source counts the records it passed."""

from __future__ import annotations

import numpy as np
from test_cloud_pipeline_run import NOW, T0, enrol, offline, readings, run_for, spec_text, stored

from edgewise.cloud.pipelines.runner import PipelineRun, direct_ship
from edgewise.cloud.pipelines.spec import parse_cloud_pipeline
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store, database_url
from edgewise.security.pki import CertificateAuthority
from edgewise.sync import codec


async def test_cloud_pipeline_skips_chunks_sent_while_quarantined(tmp_path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    async with Store(database_url(None, tmp_path)) as store:
        parts = {"node-a": [readings(0, T0, T0 + 30), readings(0, T0 + 30, T0 + 60)],
                 "node-b": [readings(1, T0, T0 + 30), readings(1, T0 + 30, T0 + 60)]}
        for node, cols in parts.items():
            await enrol(store, ca, node)
            seq = 0
            for i, c in enumerate(cols):
                n = len(c["ts"])
                flagged = node == "node-b" and i == 1  # sent while node-b was quarantined
                await store.commit_ingest(
                    [ChunkWrite(node, "ten", seq, n, n, False, codec.encode(c), NOW, flagged)],
                    (), [MarkWrite(node, "ten", seq + n, NOW)])
                seq += n
        spec = parse_cloud_pipeline(spec_text(max_wait="1s"), "fleet")
        run = PipelineRun(spec, tmp_path, store, direct_ship(store))

        source = run.sources["ten"]

        async def done() -> bool:  # every trusted record read, and windows up to 50 s out
            return source.records == 90 and len(
                (await stored(store, "cloud:fleet", "total")).get("count", [])) >= 5

        await run_for(run, done)
        got = await stored(store, "cloud:fleet", "total")
    trusted = [*parts["node-a"], parts["node-b"][0]]
    want = offline(trusted)
    rows = {float(w): (int(c), float(s)) for w, c, s in zip(
        got["window_start"].tolist(), got["count"].tolist(), got["sum"].tolist(), strict=True)}
    assert set(rows) <= set(want) and len(rows) >= 5
    for w, (count, total) in rows.items():
        assert count == want[w][0] and np.isclose(total, want[w][1]), w
    assert rows[T0 + 30.0][0] == 10  # node-a alone: node-b's flagged records left out
    assert (source.records, source.quarantined, source.lost) == (90, 30, 0)
