"""The NATS JetStream forwarder against the real nats-server: exact messages, dedupe by Msg-Id."""

from __future__ import annotations

import uuid

import nats
import nats.js.errors
import numpy as np
import orjson
import pytest

from edgewise.cloud.dataout.nats import NatsForwarder, subject_filter, subject_token
from edgewise.cloud.dataout.setup import forwarders_from_config

pytestmark = pytest.mark.service


@pytest.fixture
async def js_env(nats_server):
    """A unique subject prefix and stream name; the stream is deleted afterwards."""
    host, port = nats_server
    tag = uuid.uuid4().hex[:10]
    nc = await nats.connect(f"nats://{host}:{port}")
    js = nc.jetstream()
    env = {"url": f"nats://{host}:{port}", "stream": f"EWTEST_{tag}",
           "subject": f"ewtest{tag}.{{node}}.{{stream}}", "prefix": f"ewtest{tag}", "js": js}
    yield env
    try:
        await js.delete_stream(env["stream"])
    except nats.js.errors.NotFoundError:
        pass
    await nc.close()


def columns(n: int) -> dict[str, np.ndarray]:
    return {
        "sensor": np.array([f"s{i}" for i in range(n)], dtype=object),
        "ts": np.round(1_764_547_200.0 + np.arange(n) * 0.5, 2),
        "value": np.round(100.5 + np.arange(n), 2),
    }


async def stored(js, stream: str) -> list[tuple[str, str, dict]]:
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        out.append((msg.subject, msg.headers["Nats-Msg-Id"], orjson.loads(msg.data)))
    return out


async def test_records_once_and_redelivery_deduped(js_env) -> None:
    fwd = forwarders_from_config(
        [{"type": "nats", "servers": [js_env["url"]], "subject": js_env["subject"],
          "stream_name": js_env["stream"]}]
    )
    (f,) = fwd.forwarders
    assert isinstance(f, NatsForwarder)
    async with fwd:
        await fwd.forward("node-a", "alarms", 100, columns(3))
        await fwd.forward("node-a", "alarms", 100, columns(3))  # the same chunk again
        await fwd.forward("node-b", "line1.agg", 0, columns(2))  # '.' is not a subject token
    st = f.stats()
    assert f.stream_created is True
    assert st["forwarded_chunks"] == 3
    assert st["messages"] == 8
    assert st["duplicates"] == 3
    assert st["dropped_chunks"] == 0
    p = js_env["prefix"]
    assert await stored(js_env["js"], js_env["stream"]) == [
        (f"{p}.node-a.alarms", "node-a:alarms:100",
         {"node": "node-a", "stream": "alarms", "seq": 100,
          "data": {"sensor": "s0", "ts": 1764547200.0, "value": 100.5}}),
        (f"{p}.node-a.alarms", "node-a:alarms:101",
         {"node": "node-a", "stream": "alarms", "seq": 101,
          "data": {"sensor": "s1", "ts": 1764547200.5, "value": 101.5}}),
        (f"{p}.node-a.alarms", "node-a:alarms:102",
         {"node": "node-a", "stream": "alarms", "seq": 102,
          "data": {"sensor": "s2", "ts": 1764547201.0, "value": 102.5}}),
        (f"{p}.node-b.line1_agg", "node-b:line1.agg:0",
         {"node": "node-b", "stream": "line1.agg", "seq": 0,
          "data": {"sensor": "s0", "ts": 1764547200.0, "value": 100.5}}),
        (f"{p}.node-b.line1_agg", "node-b:line1.agg:1",
         {"node": "node-b", "stream": "line1.agg", "seq": 1,
          "data": {"sensor": "s1", "ts": 1764547200.5, "value": 101.5}}),
    ]
    info = await js_env["js"].stream_info(js_env["stream"])
    assert info.config.subjects == [f"{p}.*.*"]
    assert info.config.duplicate_window == 120.0


async def test_restarted_forwarder_is_deduped_too(js_env) -> None:
    """A control plane that restarts and forwards a chunk again: JetStream keeps one copy."""
    cfg = [{"type": "nats", "servers": [js_env["url"]], "subject": js_env["subject"],
            "stream_name": js_env["stream"], "per": "chunk"}]
    for _ in range(2):
        async with forwarders_from_config(cfg) as fwd:
            await fwd.forward("n1", "raw", 5000, columns(1500))
            await fwd.forward("n1", "raw", 6500, columns(10))
        st = fwd.stats()[0]
        assert st["forwarded_chunks"] == 2
    assert st["duplicates"] == 2
    got = await stored(js_env["js"], js_env["stream"])
    assert [(s, i, d["seq_first"], d["count"]) for s, i, d in got] == [
        (f"{js_env['prefix']}.n1.raw", "n1:raw:5000", 5000, 1500),
        (f"{js_env['prefix']}.n1.raw", "n1:raw:6500", 6500, 10),
    ]
    assert got[0][2]["records"][1499] == {"sensor": "s1499", "ts": 1764547949.5,
                                          "value": 1599.5}


async def test_unreachable_nats_retries_and_stop_counts_drops() -> None:
    fwd = forwarders_from_config(
        [{"type": "nats", "servers": ["nats://127.0.0.1:1"], "retry_min": 0.05,
          "retry_max": 0.05, "flush_timeout": 0.3, "connect_timeout": 0.5}]
    )
    async with fwd:
        await fwd.forward("n", "s", 0, columns(4))
        await fwd.forward("n", "s", 4, columns(4))
    st = fwd.stats()[0]
    assert st["forwarded_chunks"] == 0
    assert st["dropped_chunks"] == 2
    assert st["dropped_records"] == 8
    assert st["errors"] >= 2
    assert "cannot reach NATS at nats://127.0.0.1:1" in st["last_error"]


def test_subject_helpers() -> None:
    assert subject_token("line1/temp.x*>") == "line1_temp_x__"
    assert subject_filter("edgewise.{node}.{stream}") == "edgewise.*.*"
