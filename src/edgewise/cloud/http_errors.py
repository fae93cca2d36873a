"""The one mapping from the exception tree (`edgewise.errors`) to HTTP answers.

The device API (`device_api`) and the operator API (`operator_call`) both answer errors through
`error_answer`; the CLI's side of the same tree is `edgewise.cli.common.exit_code`.

    exception            answer
    NotFound             404
    BadRequest           400; its subclasses here carry their own status: `BodyTooLarge`
                         413, `RequestTimeout` 408
    TooManyRequests      429 with ``Retry-After`` (the per-node rate limit of the device API)
    (any of these)       the headers in its ``answer_headers``, if it has them (the device
                         API's 403 to a decommissioned node carries ``Edgewise-Decommissioned``),
                         and the fields in its ``answer_fields`` beside ``error`` (a release's
                         409 lists the ``missing`` files)
    PeerError            its ``status`` (the security errors carry theirs: 401 for a bad token
                         or identity, 403 for a role that may not or a revoked node, 400 for a
                         bad CSR, 409 for a key enrolled as another node); 400 when it has none
    ConfigError          400 where requests carry configuration (the operator API: pipelines,
                         labels, selectors; `SpecError` reads ``name:line: field: message``).
                         Device requests carry none, so there a `ConfigError` is the server's
                         own (e.g. a CA that expires too soon to sign) and is not mapped
    StorageError         503 "the control plane cannot reach its store: ..."
    anything else        not mapped: the caller re-raises it, and `json_errors` answers 500

Every answer is JSON ``{"error": "<message>"}`` (with ``answer_fields``, if any); a 401
carries ``WWW-Authenticate`` when the API names its challenge (the operator API: ``Bearer
realm="edgewise"``). `json_errors`, the app's outermost middleware, makes aiohttp's own answers
JSON too (404 unknown path, 405 with ``Allow``, 413) and turns an unexpected exception into a
JSON 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

from aiohttp import web

from edgewise.errors import BadRequest, ConfigError, NotFound, PeerError, StorageError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BodyTooLarge(BadRequest):
    """The request body is over the endpoint's documented limit (413)."""

    status = 413


class RequestTimeout(BadRequest):
    """The request body did not arrive within the read timeout (408)."""

    status = 408


class TooManyRequests(PeerError):
    """A node made more requests than its rate allows (429, ``Retry-After``)."""

    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def status_of(exc: BaseException, *, config_is_input: bool = True) -> int | None:
    """The HTTP status for an error, or None when it is not one the API answers."""
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, BadRequest):
        return int(getattr(exc, "status", 400))
    if isinstance(exc, PeerError):
        return int(getattr(exc, "status", 400))
    if isinstance(exc, ConfigError):
        return 400 if config_is_input else None
    if isinstance(exc, StorageError):
        return 503
    return None


def message_of(exc: BaseException) -> str:
    if isinstance(exc, StorageError):
        return f"the control plane cannot reach its store: {exc}"
    return str(exc)


def error_response(status: int, message: str, *, challenge: str | None = None,
                   headers: dict[str, str] | None = None,
                   fields: dict[str, object] | None = None) -> web.Response:
    """``{"error": message}`` (and ``fields``) with ``status`` (and ``WWW-Authenticate`` on a
    401, if given)."""
    extra = dict(headers or {})
    if challenge and status == 401:
        extra["WWW-Authenticate"] = challenge
    return web.json_response({**(fields or {}), "error": message}, status=status,
                             headers=extra or None)


def error_answer(exc: BaseException, *, config_is_input: bool = True,
                 challenge: str | None = None) -> web.Response | None:
    """The answer for ``exc`` (see the module docstring), or None: re-raise it then."""
    status = status_of(exc, config_is_input=config_is_input)
    if status is None:
        return None
    headers = dict(getattr(exc, "answer_headers", None) or {})  # e.g. a decommission order
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return error_response(status, message_of(exc), challenge=challenge,
                          headers=headers or None,
                          fields=getattr(exc, "answer_fields", None))  # e.g. missing files


def _http_message(exc: web.HTTPException, request: web.Request) -> str:
    # never echo the path: it may carry what the caller has no business seeing confirmed
    if exc.status == 404:
        return "no such endpoint; GET /openapi.json lists them"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} is not allowed here; allowed: {allowed or 'none'}"
    if exc.status == 413:
        return "request body too large"
    return exc.reason


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's plain-text error answers as JSON; an unexpected exception as a JSON 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items()
                if k in ("Allow", "Retry-After", "WWW-Authenticate")}
        return error_response(exc.status, _http_message(exc, request), headers=keep)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            raise  # the session may be past its upgrade: no HTTP answer is possible there
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(500, "internal error in the control plane; its log has the "
                                   "details")
