"""Messages the MQTT source received, parsed into readings and dead letters.

`Received` is one message as the source keeps it between gmqtt handing it over and the engine
taking it; `parse_messages` turns a list of them into one `Batch` (one orjson call on the fast
path: every message a JSON object), stamping each record with the time its message arrived
(``_accepted``). What cannot be used becomes a dead letter whose reason names the topic, in
message order: a message over ``max_message_bytes``, malformed JSON, something other than an
object or an array of objects, or a reading `readings_from_dicts` refuses.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import orjson

from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import SourceOutput
from edgewise.pipeline.sources.parse import readings_from_dicts


class Received:
    """One received message, as `MqttSource._take` keeps it."""

    __slots__ = ("accepted", "gen", "mid", "payload", "qos", "size", "topic")

    def __init__(
        self, topic: str, payload: bytes, size: int, qos: int, mid: int, gen: int, accepted: float
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.size = size
        self.qos = qos
        self.mid = mid
        self.gen = gen
        self.accepted = accepted


def parse_messages(
    items: list[Received],
    out: SourceOutput,
    *,
    max_message_bytes: int,
    sensor_from_topic: bool = False,
    topic_strip_levels: int = 0,
) -> tuple[Batch, int]:
    """Readings of ``items``, and how many dead letters went to ``out`` (in message order).

    With ``sensor_from_topic`` a reading without a ``sensor`` field is named after its topic,
    less ``topic_strip_levels`` leading levels.
    """
    limit = max_message_bytes
    dead: list[tuple[int, int, str, bytes]] = []  # (message, record, reason, raw)
    good = [i for i, it in enumerate(items) if it.size <= limit]
    if len(good) != len(items):
        for i, it in enumerate(items):
            if it.size > limit:
                dead.append((i, 0, f"message is {it.size} bytes, over max_message_bytes="
                                   f"{limit}; dropped", it.payload))
    recs: list[Any] = []
    owners: list[int] = []  # the message (index in ``items``) each record came from
    docs: Any = None
    if good:
        try:
            docs = orjson.loads(b"[" + b",".join(items[i].payload for i in good) + b"]")
        except orjson.JSONDecodeError:
            pass
    if (
        isinstance(docs, list)
        and len(docs) == len(good)
        and all(type(d) is dict for d in docs)
    ):
        recs = docs
        owners = good
    else:
        for i in good:
            payload = items[i].payload
            try:
                doc = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                dead.append((i, 0, f"malformed JSON: {exc}", payload))
                continue
            if isinstance(doc, list):
                recs.extend(doc)
                owners.extend([i] * len(doc))
            elif isinstance(doc, dict):
                recs.append(doc)
                owners.append(i)
            else:
                dead.append((i, 0, "expected a JSON object or an array of objects, got "
                                   f"{type(doc).__name__}", payload))
    if sensor_from_topic:
        skip = topic_strip_levels
        for rec, i in zip(recs, owners, strict=True):
            if type(rec) is dict and "sensor" not in rec:
                topic = items[i].topic
                rec["sensor"] = topic.split("/", skip)[-1] if skip else topic
    batch, bad = readings_from_dicts(recs)
    if bad:
        per_message = collections.Counter(owners)
        for j, reason in bad:
            i = owners[j]
            # a message holding one reading keeps its raw payload; an array, the one record
            raw = items[i].payload
            if per_message[i] > 1:
                raw = orjson.dumps(recs[j], default=str)
            dead.append((i, j, reason, raw))
    if dead:
        dead.sort(key=lambda d: (d[0], d[1]))
        for i, _, reason, raw in dead:
            out.dead_letter(f"topic {items[i].topic}: {reason}", raw)
    if batch.n:
        accepted = np.fromiter((items[i].accepted for i in owners), np.float64, len(owners))
        if bad:
            keep = np.ones(len(owners), dtype=bool)
            keep[[j for j, _ in bad]] = False
            accepted = accepted[keep]
        batch = batch.with_columns(**{ACCEPTED: accepted})
    return batch, len(dead)
