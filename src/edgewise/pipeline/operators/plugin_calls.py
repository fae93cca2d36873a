"""How a user operator's calls are run: in its own thread, each within a time budget.

A plugin runs synchronously on the engine's behalf, but not on the engine's loop: every call
(``__init__``, ``process``, ``on_timer``, ``flush``, ``snapshot``, ``restore``) is handed to the
stage's `Worker`, one daemon thread that runs them one at a time, in order, so a plugin always
sees the same thread. The engine waits for the answer up to the stage's ``timeout``; a call that
takes longer raises `Overrun` and is abandoned: its thread is retired (it ends once the call
returns, if ever) and never used again. What the stage does next is `PythonOperator`'s choice
(see docs/plugins.md, "Errors and time").

Also here: the pieces a stateless plugin's isolation needs: halving a batch, merging the
results of its parts, and turning records into dead-letter payloads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import orjson

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import Emit

MAX_PAYLOAD = 4096  # bytes of a dead letter's payload that are kept (as for sources)


class Overrun(Exception):
    """A call did not return within its budget; it was abandoned."""


class Worker:
    """One daemon thread running a plugin's calls one at a time."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]
                                      | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=_serve, args=(self._jobs,), name=name,
                                        daemon=True)
        self._thread.start()

    def call(self, budget: float, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the worker thread; its result or exception, or `Overrun` after
        ``budget`` seconds (the call keeps running; retire this worker then)."""
        fut: Future[Any] = Future()
        self._jobs.put((fut, fn, args))
        try:
            return fut.result(budget)
        except TimeoutError:
            if not fut.done():  # our wait timed out, not the call (which may raise its own)
                raise Overrun from None
            return fut.result()

    def retire(self) -> None:
        """No more calls: the thread ends after the one it runs (if any)."""
        self._jobs.put(None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def _serve(jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]
                                   | None]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        fut, fn, args = job
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            result = fn(*args)
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        del job, fut, fn, args  # hold nothing of the call while waiting for the next


def halves(batch: Batch) -> tuple[Batch, Batch]:
    mid = batch.n // 2
    return batch.take(np.arange(mid)), batch.take(np.arange(mid, batch.n))


def merge(results: list[Emit]) -> Emit:
    """The results of consecutive parts of a batch as one result (per port, in order)."""
    ports: dict[str, list[Batch]] = {}
    for result in results:
        if result is None:
            continue
        if isinstance(result, Batch):
            result = {"out": result}
        for port, b in result.items():
            if b is not None:
                ports.setdefault(port, []).append(b)
    if not ports:
        return None
    return {port: Batch.concat(parts) for port, parts in ports.items()}


def record_lines(batch: Batch) -> bytes:
    """The batch's records (public columns) as JSON lines: a dead letter's payload."""
    return b"".join(
        orjson.dumps(r, default=repr,
                     option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
        for r in batch.to_records()
    )
