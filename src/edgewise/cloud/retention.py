"""Retention: delete stored chunks by age, across the whole store.

`prune(store, older_than)` deletes stored chunks received before a time (or an age), in
transactions of at most ``batch`` chunks (`Store.purge_chunks`), so writers are not blocked for
long; stream marks and counters stay, so ``data stats`` still shows what was received.
`run_retention(store, keep, every)` is the one periodic task for the whole store; the data-out
wiring (`dataout.setup.setup_data_out`) starts it when ``retention`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

from edgewise.cloud.store import Store
from edgewise.errors import ConfigError
from edgewise.pipeline.units import parse_duration

log = logging.getLogger(__name__)


def parse_retention(value: str | float | None) -> timedelta | None:
    """``"7d"``, ``"12h"``, seconds, or None/"forever"/"0" (keep everything)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "forever")):
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"retention: {exc}") from None
    return None if seconds == 0 else timedelta(seconds=seconds)


async def prune(store: Store, older_than: datetime | timedelta, *, batch: int = 10_000) -> int:
    """Delete stored chunks received before ``older_than`` (a time, or an age from now).

    Returns the number of chunks deleted. Works over the whole store (not per node), in
    transactions of at most ``batch`` chunks (`Store.purge_chunks`) so writers are not
    blocked for long; stream marks and counters are kept.
    """
    if isinstance(older_than, timedelta):
        cutoff = datetime.now(UTC) - older_than
    else:
        if older_than.tzinfo is None:
            raise ValueError("older_than must be timezone-aware (use datetime.now(UTC))")
        cutoff = older_than
    total = 0
    while True:
        n = int(await store.purge_chunks(cutoff, limit=batch))
        total += n
        if n < batch:
            return total
        await asyncio.sleep(0)  # let sessions and ingest in between batches


async def run_retention(store: Store, keep: timedelta, every: float = 3600.0, *,
                        first_delay: float = 0.0) -> None:
    """Prune chunks older than ``keep`` after ``first_delay`` s and then every ``every`` s,
    until cancelled.

    The control plane runs one of these for the whole store. Errors are logged and retried at
    the next period, never raised (a failed prune must not stop the server).
    """
    if first_delay > 0:
        await asyncio.sleep(first_delay)
    while True:
        started = time.monotonic()
        try:
            n = await prune(store, keep)
            if n:
                log.info("retention: pruned %d chunk(s) older than %s", n, keep)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("retention: pruning failed; will retry in %.0f s", every)
        await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))
