"""Numbers as the architecture document writes them: rates, durations, sizes, money, shares."""

from __future__ import annotations

import math


def rate(bps: float) -> str:
    """Bytes per second as kbit/s or Mbit/s."""
    bits = bps * 8
    if bits >= 1e6:
        return f"{bits / 1e6:,.2f} Mbit/s"
    return f"{bits / 1e3:,.2f} kbit/s"


def ms(s: float) -> str:
    if not math.isfinite(s):
        return "never"
    return f"{s * 1000:,.2f} ms" if s < 1 else f"{s * 1000:,.0f} ms"


def dur(s: float) -> str:
    if not math.isfinite(s):
        return "never"
    if s < 120:
        return f"{s:,.0f} s"
    if s < 3 * 3600:
        return f"{s / 60:,.0f} min"
    return f"{s / 3600:,.1f} h"


def size(b: float) -> str:
    if b >= 1024**4:
        return f"{b / 1024**4:,.1f} TiB"
    if b >= 1024**3:
        return f"{b / 1024**3:,.1f} GiB"
    return f"{b / 1024**2:,.0f} MiB"


def usd(x: float) -> str:
    return f"${x:,.2f}" if x < 100 else f"${x:,.0f}"


def pct(x: float) -> str:
    return f"{x:.1%}" if x < 0.999 or x == 1 else f"{x:.3%}"


def num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:,.2f}"
    return f"{x:.3g}"


def ratio(meas: float, est: float) -> str:
    return f"{meas / est:.2f}" if est else "-"


def plural(count: int, noun: str) -> str:
    """``1 site``, ``3 sites``."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"
