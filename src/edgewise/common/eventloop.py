"""The event loop a long-running server process runs on.

`run` runs a coroutine to completion like ``asyncio.run``: on asyncio's own loop, or on uvloop
when ``EDGEWISE_EVENT_LOOP=uvloop`` (uvloop installed separately: ``pip install uvloop``).
asyncio's loop is the default. uvloop was tried for the control plane (issue 11) and is not
the default: at 2,000 nodes its CPU per node was not shown lower on this shared machine (the
pairs disagreed), and `tests/e2e/test_system_security.py`'s memory bound for 200 garbage
sessions failed on it (+49-69 MB against +32 MB allowed; docs/benchmarks.md, "uvloop").
The listener works on both (`edgewise.cloud.listener`); tests check that.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from edgewise.errors import ConfigError

T = TypeVar("T")
ENV = "EDGEWISE_EVENT_LOOP"


def loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """(name, factory) of the loop to run on; factory None: asyncio's default."""
    want = os.environ.get(ENV, "").strip().lower() or "asyncio"
    if want not in ("asyncio", "uvloop"):
        raise ConfigError(f"{ENV}={want!r}: use asyncio (the default) or uvloop")
    if want == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        raise ConfigError(f"{ENV}=uvloop but uvloop is not installed (pip install uvloop)"
                          ) from None
    return "uvloop", uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop `loop_factory` picks."""
    _name, factory = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
