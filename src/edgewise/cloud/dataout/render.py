"""Data out, the messages: a committed chunk as JSON messages, and the topic templates.

Record ``i`` of a chunk has sequence number ``seq_first + i`` (true for every uncompacted chunk;
a compacted chunk covers more sequence numbers than it has records, and its records are
numbered from ``seq_first`` the same way, which keeps message ids unique and stable).

Messages are JSON. ``per: record`` (default) sends one message per record::

    {"node": "n1", "stream": "alarms", "seq": 41, "data": {"sensor": "...", "ts": ..., ...}}

``per: chunk`` sends one message per chunk::

    {"node": "n1", "stream": "alarms", "seq_first": 40, "count": 2, "records": [{...}, {...}]}

Internal ``_`` columns are never sent. `record_dicts` is also how the operator API's data query
turns stored columns into records.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

_FORMATTER = string.Formatter()
TEMPLATE_FIELDS = frozenset({"node", "stream"})


@dataclass(frozen=True)
class Chunk:
    """One committed chunk waiting to be forwarded."""

    node: str
    stream: str
    seq_first: int
    columns: Mapping[str, np.ndarray]

    @property
    def records(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def record_dicts(columns: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Columns as a list of plain JSON-able dicts (internal ``_`` columns are left out)."""
    cols = {k: v for k, v in columns.items() if not k.startswith("_")}
    if not cols:
        return []
    names = list(cols)
    lists = [np.asarray(cols[k]).tolist() for k in names]
    return [dict(zip(names, row, strict=True)) for row in zip(*lists, strict=True)]


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=str)


def render(chunk: Chunk, per: Literal["record", "chunk"]) -> list[tuple[int, bytes]]:
    """The messages for a chunk as ``(seq, payload)``; see the module docstring for shapes."""
    rows = record_dicts(chunk.columns)
    if per == "chunk":
        doc = {
            "node": chunk.node,
            "stream": chunk.stream,
            "seq_first": chunk.seq_first,
            "count": len(rows),
            "records": rows,
        }
        return [(chunk.seq_first, _dumps(doc))]
    return [
        (
            chunk.seq_first + i,
            _dumps({"node": chunk.node, "stream": chunk.stream, "seq": chunk.seq_first + i,
                    "data": row}),
        )
        for i, row in enumerate(rows)
    ]


def check_template(template: str, what: str) -> str:
    """A topic/subject template may use only ``{node}`` and ``{stream}``."""
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(f"{what} template {template!r} is not valid: {exc}") from None
    for _literal, name, spec, conv in parts:
        if name is not None and (name not in TEMPLATE_FIELDS or spec or conv):
            raise ValueError(
                f"{what} template {template!r} uses {{{name}}}; only {{node}} and {{stream}} "
                "are available"
            )
    return template
