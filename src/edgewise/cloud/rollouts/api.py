"""The rollout routes and the driver's place in the app.

Operator API (``Authorization: Bearer ewo_...``; viewers read, operators and admins act),
through `operator_call.endpoint` like every operator route (token, role, parsing, errors, a
refused mutating call audited as ``denied``):

    POST /v1/rollouts                       create (201): the nodes the selector names now,
                                            planned into the canary and waves (quarantined
                                            ones skipped); 409 when one is in a rollout that
                                            is not over
    GET  /v1/rollouts                       newest first
    GET  /v1/rollouts/{rollout_id}          state, waves with their nodes by state, and the
                                            nodes (``?nodes=problems|all|none``)
    POST /v1/rollouts/{rollout_id}/pause    running -> paused
    POST /v1/rollouts/{rollout_id}/resume   paused -> running (the failures and the gate that
                                            paused it are accepted)
    POST /v1/rollouts/{rollout_id}/abort    running|paused|completed -> aborting: the driver
                                            assigns every node it changed its release before
    POST /v1/rollouts/{rollout_id}/cancel   running|paused -> cancelled: nothing more is
                                            assigned, nothing rolled back

`setup(app)` registers them, adds their OpenAPI items and runs one `driver.Driver` for the
app's lifetime (``cleanup_ctx``, after the store is open). The gauge of rollouts per state is
the fleet gauges' (`cloud.fleet_metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from aiohttp import web

from edgewise.cloud import openapi as oa
from edgewise.cloud.config import CONFIG
from edgewise.cloud.operator_call import Call, Handler, endpoint, selector
from edgewise.cloud.rollouts import models as m
from edgewise.cloud.rollouts.driver import Driver
from edgewise.cloud.rollouts.plan import plan_waves
from edgewise.cloud.rollouts.spec import Amount, Gate, RolloutSpec, parse_waves
from edgewise.cloud.state import OPENAPI, POKES, STORE
from edgewise.cloud.store import NodeInfo
from edgewise.cloud.store.rollouts import Rollouts
from edgewise.errors import BadRequest, NotFound
from edgewise.sync.release import check_version

DRIVER = web.AppKey("rollout_driver", Driver)
PROBLEMS = ("failed", "assigning", "assigned", "deferred", "rolling_back")
ID = r"^ro-[0-9a-f]{8}$"

ROUTES: tuple[oa.Route, ...] = (
    oa.Route("POST", "/v1/rollouts", "create_rollout",
             "Start a staged rollout of a release: canary, waves, bake, gates, budget",
             "operator", "rollouts", body=m.RolloutCreate, response=m.RolloutDetail,
             status=201, mutating=True, not_found=True,
             answers=((409, "A node is in a rollout that is not over"),)),
    oa.Route("GET", "/v1/rollouts", "list_rollouts", "List rollouts, newest first", "viewer",
             "rollouts", query=m.RolloutListQuery, response=m.RolloutList),
    oa.Route("GET", "/v1/rollouts/{rollout_id}", "show_rollout",
             "One rollout: state, waves, nodes", "viewer", "rollouts", query=m.RolloutQuery,
             response=m.RolloutDetail, not_found=True, patterns=(("rollout_id", ID),)),
    *(oa.Route("POST", f"/v1/rollouts/{{rollout_id}}/{verb}", f"{verb}_rollout", summary,
               "operator", "rollouts", body=m.RolloutCommand, response=m.Rollout,
               mutating=True, not_found=True, patterns=(("rollout_id", ID),),
               answers=((400, "The rollout is in a state this does not apply to"),))
      for verb, summary in (
          ("pause", "Pause: nothing more is assigned"),
          ("resume", "Resume a paused rollout (its failures and gate are accepted)"),
          ("abort", "Abort: every node the rollout changed gets its release before again"),
          ("cancel", "Cancel: stop here; nothing more is assigned, nothing rolled back"))),
)


def _rollout(row: dict[str, Any], counts: dict[tuple[int, str], int]) -> dict[str, Any]:
    states: Counter[str] = Counter()
    for (_, s), n in counts.items():
        states[s] += n
    waves = row["waves"]
    return {"id": row["id"], "release": row["release"], "state": row["state"],
            "wave": row["wave"],
            "wave_name": waves[row["wave"]] if row["wave"] < len(waves) else None,
            "reason": row["reason"], "paused_by": row["paused_by"], "spec": row["spec"],
            "total": row["total"], "states": dict(states), "created": row["created"],
            "created_by": row["created_by"], "updated": row["updated"],
            "completed_at": row["completed_at"], "driver": row["driver"]}


async def _detail(rollouts: Rollouts, rollout_id: str, nodes: str) -> m.RolloutDetail:
    row = await rollouts.get(rollout_id)
    if row is None:
        raise NotFound(f"no rollout {rollout_id!r}; `edgewise rollout list` shows them")
    counts = await rollouts.counts(rollout_id)
    waves = [m.Wave(index=i, name=name,
                    nodes=sum(n for (w, _), n in counts.items() if w == i),
                    states={s: n for (w, s), n in counts.items() if w == i})
             for i, name in enumerate(row["waves"])]
    listed = [] if nodes == "none" else await rollouts.nodes(
        rollout_id, states=None if nodes == "all" else PROBLEMS, limit=10_000)
    return m.RolloutDetail(**_rollout(row, counts), waves=waves, nodes=[
        m.RolloutNode(node=n["node_id"], wave=n["wave"], site=n["site"], state=n["state"],
                      previous=n["previous"], version=n["version"],
                      assigned_at=n["assigned_at"], changed_at=n["changed_at"],
                      reason=n["reason"]) for n in listed])


def _spec(body: m.RolloutCreate) -> RolloutSpec:
    try:
        check_version(body.release)
    except ValueError as exc:
        raise BadRequest(f"release: {exc}") from None
    return RolloutSpec(
        release=body.release, selector=selector(body.selector),
        canary=Amount.parse(body.canary, "canary"), waves=parse_waves(body.waves),
        bake_s=body.bake_s, max_failures=Amount.parse(body.max_failures, "max_failures"),
        max_unavailable_per_site=body.max_unavailable_per_site, site_label=body.site_label,
        gates=tuple(Gate.parse(g) for g in body.gates), node_timeout_s=body.node_timeout_s,
        intent_ttl_s=body.intent_ttl_s)


async def create_rollout(call: Call) -> m.RolloutDetail:
    spec = _spec(call.body)
    if await call.store.get_release(spec.release) is None:
        raise BadRequest(f"release: no release {spec.release!r} is published; `edgewise "
                         "release list` shows them")
    nodes = []
    after: str | None = None
    while True:
        page = await call.store.list_nodes(spec.selector, limit=1000, after=after)
        nodes.extend(n for n in page if not n.revoked)
        if len(page) < 1000:
            break
        after = page[-1].id
    if not nodes:
        raise NotFound(f"no node (that is not revoked) matches selector {call.body.selector!r}")
    rollouts = Rollouts(call.store)
    rollout_id = await plan_and_create(rollouts, f"ro-{secrets.token_hex(4)}", spec, nodes,
                                       actor=call.actor, now=call.now)
    return await _detail(rollouts, rollout_id, "none")


async def plan_and_create(rollouts: Rollouts, rollout_id: str, spec: RolloutSpec,
                          nodes: Sequence[NodeInfo], *, actor: str, now: datetime) -> str:
    """Plan ``nodes`` into the canary and waves and store the rollout. Quarantined nodes are
    in no wave: they are stored as ``skipped`` with the reason (`BadRequest` if every node
    is quarantined)."""
    held = {n: f"quarantined: {why}" for n, why in
            (await rollouts.quarantined([n.id for n in nodes])).items()}
    if len(held) == len(nodes):
        raise BadRequest(f"every node the selector names is quarantined ({len(nodes)}); "
                         "`edgewise node list --state quarantined` says why")
    waves = plan_waves(rollout_id, [n.id for n in nodes if n.id not in held], spec.canary,
                       spec.waves)
    sites = {n.id: n.labels.get(spec.site_label) for n in nodes}
    await rollouts.create(rollout_id, spec.release, spec.to_json(), waves, sites,
                          actor=actor, now=now, skipped=held)
    return rollout_id


async def list_rollouts(call: Call) -> m.RolloutList:
    rollouts = Rollouts(call.store)
    rows = await rollouts.list(call.query.limit)
    return m.RolloutList(rollouts=[m.Rollout(**_rollout(r, await rollouts.counts(r["id"])))
                                   for r in rows])


async def show_rollout(call: Call) -> m.RolloutDetail:
    return await _detail(Rollouts(call.store), call.request.match_info["rollout_id"],
                         call.query.nodes)


COMMANDS = {  # verb: (from, to, skip the nodes not assigned yet)
    "pause": (("running",), "paused", False),
    "resume": (("paused",), "running", False),
    "abort": (("running", "paused", "completed"), "aborting", False),
    "cancel": (("running", "paused"), "cancelled", True),
}


def _command(verb: str) -> Handler:
    allowed, to, skip = COMMANDS[verb]

    async def handle(call: Call) -> m.Rollout:
        rollout_id = call.request.match_info["rollout_id"]
        rollouts = Rollouts(call.store)
        extra = {"paused_by": "operator"} if verb == "pause" else None
        row = await rollouts.command(
            rollout_id, allowed_from=allowed, to=to, actor=call.actor,
            action=f"rollout.{verb}", reason=call.body.reason or f"{verb} by {call.actor}",
            fields=extra, skip_waiting=skip, now=call.now)
        if row is None:
            raise NotFound(f"no rollout {rollout_id!r}; `edgewise rollout list` shows them")
        return m.Rollout(**_rollout(row, await rollouts.counts(rollout_id)))

    handle.__name__ = f"{verb}_rollout"
    return handle


HANDLERS: dict[str, Handler] = {
    "create_rollout": create_rollout, "list_rollouts": list_rollouts,
    "show_rollout": show_rollout, **{f"{v}_rollout": _command(v) for v in COMMANDS}}


def setup(app: web.Application, *, tick_s: float = 1.0, lease_s: float = 15.0,
          owner: str | None = None) -> None:
    """Register the routes and run the driver while the app runs (after the store opens)."""
    for route in ROUTES:
        app.router.add_route(route.method, route.path, endpoint(route, HANDLERS[route.name]))
    app[OPENAPI].update(oa.path_items(ROUTES))
    limits = app[CONFIG].server
    driver = Driver(app[STORE], app[POKES], owner=owner, tick_s=tick_s, lease_s=lease_s,
                    fetch_rate=limits.push_fetch_rate, max_jitter=limits.push_max_jitter)
    app[DRIVER] = driver

    async def run_driver(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(driver.run(), name="edgewise-rollouts")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(run_driver)
