"""`edgewise data query|stats`: records and per-stream statistics in the control plane's store,
over `client.OperatorClient` (found as by every operator command, see `cli.operator`).

    edgewise data query --node N --stream S [--since T] [--limit N] [--from-seq SEQ] [--utc]
                        [--include-quarantined]
    edgewise data stats [--node N]

`data query` shows times (``ts``, ``window_start``, ``window_end``) as ISO 8601 in this
machine's zone, or in UTC with ``--utc``; ``--format json|yaml`` gives the records as stored
(Unix seconds).
A stream the node does not have is an error naming the streams it has (exit 2).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from edgewise.cli.common import escape
from edgewise.cli.operator import _out, api_command, parse_since, streams_table
from edgewise.cli.output import current
from edgewise.errors import ConfigError


@click.group()
def data() -> None:
    """Data stored in the control plane: per-stream statistics and records."""


@data.command("query")
@click.option("--node", "node_id", required=True)
@click.option("--stream", required=True)
@click.option("--since", default=None, help="Records with ts at or after: Unix s, ISO, or 10m.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--from-seq", type=click.IntRange(0), default=0, show_default=True,
              help="Start at this sequence number (the answer's next_seq continues).")
@click.option("--include-quarantined", is_flag=True,
              help="Also records the node sent while it was quarantined (marked).")
@api_command
def data_query(client: Any, node_id: str, stream: str, since: str | None, limit: int,
               from_seq: int, include_quarantined: bool) -> Any:
    """Stored records of one stream, in sequence order; times shown as ISO 8601 (--json:
    Unix seconds, as stored). Records a quarantined node sent are left out unless
    --include-quarantined (docs/security.md)."""
    from rich.table import Table

    res = client.data_query(node_id, stream, since=parse_since(since) if since else None,
                            from_seq=from_seq, limit=limit,
                            include_quarantined=include_quarantined)
    if not res.records:  # an empty answer: is it an empty page or a stream that is not there?
        names = sorted({s.stream for s in client.data_stats(node_id).streams})
        if stream not in names:
            raise ConfigError(
                f"node {node_id} has no stream {stream!r} in the cloud store; its streams: "
                + (", ".join(names) if names else "none yet (nothing received from it)"))

    def render() -> None:
        utc = current().utc
        cols: list[str] = []
        for r in res.records:
            cols.extend(k for k in r.data if k not in cols)
        more = f"; more from seq {res.next_seq}" if res.next_seq is not None else ""
        t = Table(title=f"{escape(res.node)}/{escape(res.stream)}: {len(res.records):,} "
                        f"record(s){more}")
        t.add_column("seq", justify="right")
        for c in cols:
            t.add_column(escape(c))
        flagged = [(f.first, f.first + f.count) for f in res.quarantined]
        if flagged:
            t.add_column("quarantined")
        for r in res.records:
            mark = ["yes" if any(a <= r.seq < b for a, b in flagged) else "-"] if flagged \
                else []
            t.add_row(str(r.seq), *(escape(_time(r.data.get(c), utc) if c in TIME_FIELDS
                                           else _cell(r.data.get(c))) for c in cols), *mark)
        _out().print(t)

    return res, render


TIME_FIELDS = frozenset({"ts", "window_start", "window_end"})
"""Record fields holding Unix seconds, shown as ISO 8601 times by `data query`."""


def _time(v: Any, utc: bool) -> str:
    """Unix seconds as ISO 8601 with milliseconds: ``2026-12-01T08:00:00.250Z`` (``utc``) or
    in this machine's zone with its offset; anything else as `_cell` shows it."""
    from datetime import UTC

    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _cell(v)
    try:
        t = datetime.fromtimestamp(v, UTC)
    except (OverflowError, OSError, ValueError):
        return _cell(v)
    if not utc:
        return t.astimezone().isoformat(timespec="milliseconds")
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6f}".rstrip("0").rstrip(".") if abs(v) < 1e15 else repr(v)
    return str(v)


@data.command("stats")
@click.option("--node", "node_id", default=None, help="One node (adds gaps and missing ranges).")
@api_command
def data_stats(client: Any, node_id: str | None) -> Any:
    """Per node and stream: records stored, highest contiguous sequence number, losses."""
    res = client.data_stats(node_id)
    title = f"cloud store: {len(res.streams)} stream(s)" + (f" of {node_id}" if node_id else "")
    return res, lambda: _out().print(streams_table(res.streams, title, with_node=True))
