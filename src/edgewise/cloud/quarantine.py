"""What a quarantined node may still do (docs/security.md, "What quarantine allows").

A node is quarantined by a failed attestation (`attestation.api`, actor ``attestation``) or by
an operator (``edgewise node quarantine``); the reason is stored with it (`Store.set_quarantine`,
audited) and never holds an expected measurement. While it is quarantined:

* its **session** goes on: heartbeats, reports and batches are taken, and every batch is
  acknowledged as usual (so its outbox drains and exactly-once accounting is unchanged), but
  its chunks are stored **flagged** (``chunks.quarantined``, `session.Session.quarantined`):
  ``data query``, data out and cloud pipelines skip them unless asked
  (``edgewise data query --include-quarantined``);
* it may **receive a new release** (a desired change that only assigns a release: ``config set
  --node ID --release V``; rollouts skip quarantined nodes) and be revoked or decommissioned;
* **everything else** an operator would send it is refused (409) with the reason (`refusal`,
  `refuse_if_quarantined`): pipelines, config, setpoints, labels. A push to a selector
  skips the quarantined nodes it matches and names them as ``held`` in its answer (`split`);
  nothing is queued for them: push again once the quarantine is lifted.

A later successful attestation lifts a quarantine the attestation set; an operator lifts their
own (``edgewise node unquarantine``). Chunks stored while quarantined stay flagged.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgewise.cloud.desired import DesiredChange
from edgewise.cloud.store import NodeInfo, Store
from edgewise.errors import BadRequest


class NodeQuarantined(BadRequest):
    """The node is quarantined: only a new release, a revocation or a decommission reach it."""

    status = 409


def release_only(change: DesiredChange) -> bool:
    """Whether ``change`` only assigns a release (what a quarantined node may receive)."""
    return (change.pipelines is None and not change.config and change.setpoints is None
            and not change.replace_config and change.release is not None)


def refusal(node_id: str, reason: str, what: str) -> NodeQuarantined:
    return NodeQuarantined(
        f"node {node_id} is quarantined ({reason}): {what} is refused; only a new release "
        "(config set --release), a revocation or a decommission reach it until the "
        "quarantine is lifted (a successful attestation, or `edgewise node unquarantine`)")


async def split(store: Store, nodes: Sequence[NodeInfo], change: DesiredChange | None
                ) -> tuple[list[NodeInfo], dict[str, str]]:
    """``nodes`` a desired ``change`` may go to, and the held ones ``{node: reason}`` (all
    quarantined nodes unless the change only assigns a release; ``change`` None: a config
    apply, never release-only)."""
    if change is not None and release_only(change):
        return list(nodes), {}
    held: dict[str, str] = {}
    for i in range(0, len(nodes), 1000):
        held.update(await store.quarantines([n.id for n in nodes[i:i + 1000]]))
    return [n for n in nodes if n.id not in held], held


async def refuse_if_quarantined(store: Store, node_id: str, what: str) -> None:
    """Raise `NodeQuarantined` naming ``what`` if ``node_id`` is quarantined."""
    reason = (await store.quarantines([node_id])).get(node_id)
    if reason is not None:
        raise refusal(node_id, reason, what)
