"""A stop that a library swallowed, raised again.

On Python 3.11 `asyncio.wait_for` can drop a cancellation that arrives just as the operation it
waits for finishes: it returns that result (or raises that error, e.g. a refused connection)
instead of `CancelledError`, and the task goes on as if never told to stop (fixed in Python
3.12). pymodbus waits this way when it connects and on every request. The task still counts the
request (`Task.cancelling()`), so a source loop calls `stop_if_cancelled` after each attempt and
each round of work, and before it sleeps: a stop is then never lost, and a source stopped while
it reconnects ends instead of retrying. Our own waits use `asyncio.timeout`, which keeps it.
"""

from __future__ import annotations

import asyncio


def stop_if_cancelled() -> None:
    """Raise `CancelledError` if the current task was asked to stop (and it was swallowed)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
