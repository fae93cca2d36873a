"""The operator routes of cloud pipelines (``/v1/cloud/pipelines``), audited, by role:

    GET    /v1/cloud/pipelines          viewer     every pipeline, with its state here
    GET    /v1/cloud/pipelines/{name}   viewer     one, with its YAML
    PUT    /v1/cloud/pipelines/{name}   operator   set it: validated (file:line errors, 400),
                                                   stored with the next version; the worker
                                                   (re)starts it within a second
    DELETE /v1/cloud/pipelines/{name}   operator   stop and remove it; its results stay

Routes go through `operator_call.endpoint` (authentication, roles, parsing, errors, 403s
audited); the store audits each change in its transaction. `setup` registers them and their
OpenAPI path items; ``app[WORKER]`` (when the app runs one) gives each pipeline's state.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence, Set
from pathlib import Path

from aiohttp import web

from edgewise.cloud import openapi as oa
from edgewise.cloud.ingest import GroupCommitter
from edgewise.cloud.operator_call import Call, endpoint
from edgewise.cloud.pipelines.models import (
    CloudPipelineDeleteResponse,
    CloudPipelineDetail,
    CloudPipelineList,
    CloudPipelineSet,
    CloudPipelineSetResponse,
    CloudPipelineSummary,
)
from edgewise.cloud.pipelines.spec import parse_cloud_pipeline, results_node
from edgewise.cloud.pipelines.worker import LEASE, CloudPipelineWorker, replica_name
from edgewise.cloud.state import OPENAPI
from edgewise.cloud.store import ChunkWrite
from edgewise.cloud.store.cloud_pipelines import CloudPipelineInfo
from edgewise.errors import BadRequest, NotFound

WORKER = web.AppKey("cloud_pipeline_worker", CloudPipelineWorker)
NAME = r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$"
BASE = "/v1/cloud/pipelines"

ROUTES: tuple[oa.Route, ...] = (
    oa.Route("GET", BASE, "list_cloud_pipelines", "Cloud pipelines and their state",
             "viewer", "cloud-pipelines", response=CloudPipelineList),
    oa.Route("GET", BASE + "/{name}", "show_cloud_pipeline",
             "One cloud pipeline: its YAML, version, state", "viewer", "cloud-pipelines",
             response=CloudPipelineDetail, not_found=True, patterns=(("name", NAME),)),
    oa.Route("PUT", BASE + "/{name}", "set_cloud_pipeline",
             "Set a cloud pipeline (validated: file:line errors); the control plane runs it",
             "operator", "cloud-pipelines", body=CloudPipelineSet,
             response=CloudPipelineSetResponse, mutating=True, patterns=(("name", NAME),)),
    oa.Route("DELETE", BASE + "/{name}", "delete_cloud_pipeline",
             "Stop and remove a cloud pipeline (its stored results stay)", "operator",
             "cloud-pipelines", response=CloudPipelineDeleteResponse, mutating=True,
             not_found=True, patterns=(("name", NAME),)),
)


async def _summary(call: Call, p: CloudPipelineInfo, *, text: bool = False
                   ) -> CloudPipelineSummary:
    worker = call.app.get(WORKER)
    st = (worker.status() if worker is not None else {}).get(p.name, {})
    held = await call.store.pipeline_runner(p.name)
    fields = dict(name=p.name, version=p.version, digest=p.digest, updated=p.updated,
                  updated_by=p.updated_by, results_node=results_node(p.name),
                  runner=held.runner if held is not None else None,
                  term=held.term if held is not None else 0,
                  state=st.get("state", "unknown") if st.get("version") == p.version
                  else "unknown", error=st.get("error"),
                  status={k: v for k, v in st.items() if k not in ("state", "error", "version")})
    if text:
        return CloudPipelineDetail(text=p.text, **fields)
    return CloudPipelineSummary(**fields)


def _name(call: Call) -> str:
    name = call.request.match_info["name"]
    if re.fullmatch(NAME, name) is None:
        raise NotFound(f"no cloud pipeline {name[:80]!r}")
    return name


async def list_cloud_pipelines(call: Call) -> CloudPipelineList:
    return CloudPipelineList(pipelines=[await _summary(call, p)
                                        for p in await call.store.list_cloud_pipelines()])


async def show_cloud_pipeline(call: Call) -> CloudPipelineDetail:
    p = await call.store.get_cloud_pipeline(_name(call))
    if p is None:
        raise NotFound(f"no cloud pipeline {_name(call)!r}; `edgewise cloud pipeline list`")
    out = await _summary(call, p, text=True)
    assert isinstance(out, CloudPipelineDetail)
    return out


async def set_cloud_pipeline(call: Call) -> CloudPipelineSetResponse:
    name = _name(call)
    body: CloudPipelineSet = call.body
    spec = await asyncio.to_thread(parse_cloud_pipeline, body.text, name)
    if spec.name != name:
        raise BadRequest(f"{name}: metadata.name is {spec.name!r}; set it under that name or "
                         "rename it")
    info, changed = await call.store.put_cloud_pipeline(name, body.text, actor=call.actor,
                                                        now=call.now)
    return CloudPipelineSetResponse(name=name, version=info.version, changed=changed)


async def delete_cloud_pipeline(call: Call) -> CloudPipelineDeleteResponse:
    name = _name(call)
    if not await call.store.delete_cloud_pipeline(name, actor=call.actor, now=call.now):
        raise NotFound(f"no cloud pipeline {name!r}")
    return CloudPipelineDeleteResponse(name=name, deleted=True)


HANDLERS = {"list_cloud_pipelines": list_cloud_pipelines,
            "show_cloud_pipeline": show_cloud_pipeline,
            "set_cloud_pipeline": set_cloud_pipeline,
            "delete_cloud_pipeline": delete_cloud_pipeline}


def setup(app: web.Application) -> None:
    """Register the routes and their OpenAPI path items."""
    for route in ROUTES:
        app.router.add_route(route.method, route.path, endpoint(route, HANDLERS[route.name]))
    app[OPENAPI].update(oa.path_items(ROUTES))


async def start_worker(app: web.Application, db_url: str, data_dir: Path,
                       committer: GroupCommitter, lease_s: float = LEASE, *,
                       process: int = 0) -> None:
    """Start the worker that runs the cloud pipelines this replica holds the lease of (not
    for an in-memory store, which another connection cannot see); the results it stores go to
    data out through ``committer``'s ``after_commit``, as ingested chunks do."""
    if ":memory:" in db_url or db_url.endswith("sqlite+aiosqlite://"):
        return
    loop = asyncio.get_running_loop()

    async def forward(chunks: Sequence[ChunkWrite], inserted: Set[tuple[str, str, int]]) -> None:
        after = committer.after_commit
        if after is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                after(list(chunks), set(inserted)), loop))

    # one name per process: `cloud serve --processes N` runs N replicas on one data directory
    runner = f"{replica_name(data_dir)}-{process}" if process else None
    worker = CloudPipelineWorker(db_url, data_dir, forward=forward, lease_s=lease_s,
                                 runner=runner)
    await asyncio.to_thread(worker.start)
    app[WORKER] = worker


async def stop_worker(app: web.Application) -> None:
    """Stop the worker: each run commits and ships what it holds (before the group commit
    stops, which it needs)."""
    worker = app.get(WORKER)
    if worker is not None:
        await asyncio.to_thread(worker.stop)
