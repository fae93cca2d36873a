"""Waves and the disruption budget: pure functions, no I/O.

`plan_waves` cuts the selected nodes into the canary and the waves. The order is a hash of the
rollout id and the node id, so it is fixed for a rollout (a restart plans the same) and mixes
sites and enrolment order; the canary is its first nodes, and wave *i* takes the nodes up to
its cumulative percent of all of them (rounded up). Waves left empty (a canary larger than the
first percent) are dropped, so every wave has a node.

`admit` is the budget: of the candidates, in order, those whose site (the value of the site
label) has fewer than ``limit`` nodes of the rollout busy, counting the ones it admits as it
goes. A node without the label is a site of its own. No limit: all are admitted.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence

from edgewise.cloud.rollouts.spec import Amount


def order(rollout_id: str, node_ids: Iterable[str]) -> list[str]:
    return sorted(node_ids,
                  key=lambda n: hashlib.sha256(f"{rollout_id}\0{n}".encode()).digest())


def plan_waves(rollout_id: str, node_ids: Sequence[str], canary: Amount,
               waves: Sequence[float]) -> list[tuple[str, list[str]]]:
    """``[(name, [node ids])]``: the canary (when it has a node), then the waves; every node in
    exactly one, none empty."""
    nodes = order(rollout_id, set(node_ids))
    total = len(nodes)
    out: list[tuple[str, list[str]]] = []
    done = canary.of(total)
    if done:
        out.append(("canary", nodes[:done]))
    for i, percent in enumerate(waves, start=1):
        upto = total if percent >= 100 else min(total, math.ceil(total * percent / 100 - 1e-9))
        if upto > done:
            out.append((f"wave {i} ({percent:g}%)", nodes[done:upto]))
            done = upto
    return out


def admit(candidates: Iterable[tuple[str, str | None]], busy: Counter[str],
          limit: int | None) -> list[str]:
    """The candidates ``(node, site)`` that fit the budget, in order (``busy`` is updated)."""
    out: list[str] = []
    for node, site in candidates:
        if limit is None or site is None:
            out.append(node)
            continue
        if busy[site] < limit:
            busy[site] += 1
            out.append(node)
    return out
