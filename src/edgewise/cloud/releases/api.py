"""The release routes: the operator's ``/v1/releases`` and the nodes' ``/v1/device/tuf/``.

Operator (``Authorization: Bearer ewo_...``; viewers read, operators and admins publish):

    GET  /v1/releases                       the releases, newest first
    GET  /v1/releases/{version}             one release with its manifest
    PUT  /v1/releases/blobs/{sha256}        one file's content, streamed (``Content-Length``
                                            required, at most `MAX_BLOB_BYTES`); 201 stored,
                                            200 held already, 400 when the bytes do not hash
    POST /v1/releases                       the manifest (its canonical bytes, at most
                                            `MAX_MANIFEST_BYTES`): 201 published, 200 the same
                                            manifest again, 409 files missing (``missing``
                                            lists their sha256) or the version taken

Device (the node's client certificate, within its request rate; the same authentication as
every device endpoint, `device_api.authenticate`). Only release data is reachable here, and
the same for every node:

    GET  /v1/device/tuf/{n}.root.json       every root version (rotation)
    GET  /v1/device/tuf/timestamp.json      the newest timestamp
    GET  /v1/device/tuf/{n}.snapshot.json   snapshot / targets by version (consistent
    GET  /v1/device/tuf/{n}.targets.json    snapshots)
    GET  /v1/device/tuf/targets/releases/{version}/manifest.json
    GET  /v1/device/tuf/targets/blobs/{sha256}
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

import orjson
from aiohttp import web

from edgewise.cloud.config import CONFIG
from edgewise.cloud.device_api import authenticate as authenticate_device
from edgewise.cloud.http_errors import error_answer
from edgewise.cloud.operator_call import CHALLENGE, actor_of
from edgewise.cloud.operator_call import authenticate as authenticate_operator
from edgewise.cloud.releases.blobs import MAX_BLOB_BYTES
from edgewise.cloud.releases.service import ReleaseService
from edgewise.cloud.request_body import read_body
from edgewise.cloud.state import STORE
from edgewise.errors import BadRequest, EdgewiseError, NotFound
from edgewise.security.tokens import OperatorToken
from edgewise.sync.release import MAX_MANIFEST_BYTES, SHA256_RE, VERSION_RE

RELEASES = web.AppKey("releases", ReleaseService)
_META = re.compile(r"(?:([1-9][0-9]{0,18})\.(root|snapshot|targets)|(timestamp))\.json")
PIECE = 1 << 20


async def _operator(request: web.Request, *, write: bool) -> tuple[OperatorToken, str]:
    token = await authenticate_operator(request)
    token.authorize(datetime.now(UTC), mutating=write, admin=False)
    return token, actor_of(token)


def _answer(exc: EdgewiseError) -> web.Response:
    answer = error_answer(exc, challenge=CHALLENGE)  # BlobsMissing's 409 lists "missing"
    if answer is None:
        raise exc
    return answer


def _version(request: web.Request) -> str:
    version = request.match_info["version"]
    if VERSION_RE.fullmatch(version) is None:
        raise NotFound(f"no release {version[:80]!r}")
    return version


async def list_releases(request: web.Request) -> web.Response:
    try:
        await _operator(request, write=False)
        releases = await request.app[STORE].list_releases()
    except EdgewiseError as exc:
        return _answer(exc)
    return web.json_response({"releases": [r.to_json() for r in releases]})


async def show_release(request: web.Request) -> web.Response:
    try:
        await _operator(request, write=False)
        found = await request.app[STORE].get_release(_version(request))
        if found is None:
            raise NotFound(f"no release {request.match_info['version']!r}; `edgewise release "
                           "list` shows the published ones")
    except EdgewiseError as exc:
        return _answer(exc)
    info, manifest = found
    return web.json_response({"release": info.to_json(), "manifest": orjson.loads(manifest)})


async def publish_release(request: web.Request) -> web.Response:
    try:
        _, actor = await _operator(request, write=True)
        body = await read_body(request, MAX_MANIFEST_BYTES)
        info, new = await request.app[RELEASES].publish(body, actor=actor)
    except EdgewiseError as exc:
        return _answer(exc)
    return web.json_response({"release": info.to_json(), "new": new},
                             status=201 if new else 200)


async def upload_blob(request: web.Request) -> web.Response:
    try:
        _, actor = await _operator(request, write=True)
        sha = request.match_info["sha256"]
        if SHA256_RE.fullmatch(sha) is None:
            raise BadRequest("the path must name the file's sha256 (64 lowercase hex digits)")
        length = request.content_length
        if length is None:
            raise BadRequest("send Content-Length: the file's length in bytes")
        if length > MAX_BLOB_BYTES:
            raise BadRequest(f"a release file has at most {MAX_BLOB_BYTES} bytes")
        timeout = request.app[CONFIG].server.read_timeout

        async def read(n: int) -> bytes:
            try:
                return await asyncio.wait_for(request.content.read(n), timeout)
            except TimeoutError:
                raise BadRequest(f"no bytes of the upload for {timeout:g} s") from None

        stored = await request.app[RELEASES].blobs.receive(sha, length, read, piece=PIECE)
        if stored:
            await request.app[STORE].audit(actor, "release.blob", f"blob:{sha[:16]}",
                                           {"length": length})
    except EdgewiseError as exc:
        return _answer(exc)
    return web.json_response({"sha256": sha, "stored": stored}, status=201 if stored else 200)


async def tuf_metadata(request: web.Request) -> web.Response:
    await authenticate_device(request)
    m = _META.fullmatch(request.match_info["name"])
    if m is None:
        raise NotFound("no such TUF metadata file")
    role, version = (m.group(2), int(m.group(1))) if m.group(3) is None else ("timestamp", None)
    data = await request.app[STORE].tuf_metadata(role, version)
    if data is None:
        raise NotFound(f"no {m.group(0)}")
    return web.Response(body=data, content_type="application/json")


async def tuf_manifest(request: web.Request) -> web.Response:
    await authenticate_device(request)
    found = await request.app[STORE].get_release(_version(request))
    if found is None:
        raise NotFound("no such release")
    return web.Response(body=found[1], content_type="application/json")


async def tuf_blob(request: web.Request) -> web.StreamResponse:
    await authenticate_device(request)
    sha = request.match_info["sha256"]
    if SHA256_RE.fullmatch(sha) is None:
        raise NotFound("no such file")
    path = request.app[RELEASES].blobs.path(sha)
    if not path.is_file():
        raise NotFound("no such file")
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


def setup(app: web.Application, service: ReleaseService) -> None:
    """Register the routes (their OpenAPI items are in `openapi.RELEASE_ROUTES`)."""
    app[RELEASES] = service
    r = app.router
    r.add_get("/v1/releases", list_releases)
    r.add_post("/v1/releases", publish_release)
    r.add_get("/v1/releases/{version}", show_release)
    r.add_put("/v1/releases/blobs/{sha256}", upload_blob)
    r.add_get("/v1/device/tuf/{name}", tuf_metadata)
    r.add_get("/v1/device/tuf/targets/releases/{version}/manifest.json", tuf_manifest)
    r.add_get("/v1/device/tuf/targets/blobs/{sha256}", tuf_blob)
