"""Helpers shared by the benchmark scripts: CPU timing, tables, the final JSON line."""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from typing import Any


def cpu_timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run ``fn``; return (result, CPU seconds of this process (all threads), wall seconds)."""
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - c0, time.perf_counter() - w0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"  {'figure'.ljust(w0)}  {'ours'.rjust(w1)}  baseline / target")
    for name, ours, base in rows:
        print(f"  {name.ljust(w0)}  {ours.rjust(w1)}  {base}")


def emit_json(figures: dict[str, Any]) -> None:
    print(json.dumps(figures, sort_keys=True))
