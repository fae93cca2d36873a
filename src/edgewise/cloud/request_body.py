"""Request bodies of both APIs: read whole, under a size limit and the read timeout, and parsed
as strict JSON.

`read_json(request, limit)` reads the body to its end (not just what happens to be buffered),
answers 413 (`BodyTooLarge`) above ``limit`` bytes and 408 (`RequestTimeout`) when the body
does not arrive within ``ServerLimits.read_timeout``; `parse_json` answers 400 for text that is
not JSON, for nesting deeper than `MAX_DEPTH`, and for ``NaN`` / ``Infinity`` (Python's json
module accepts them, JSON has no such numbers, and they would travel to the nodes), naming the
field.

    DEVICE_BODY    64 KiB   a device API request (`device_api`)
    OPERATOR_BODY   8 MiB   an operator API request (pipelines are YAML text; `operator_call`)
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from aiohttp import web

from edgewise.cloud.config import CONFIG
from edgewise.cloud.http_errors import BodyTooLarge, RequestTimeout
from edgewise.errors import BadRequest

DEVICE_BODY = 64 * 1024
OPERATOR_BODY = 8 * 1024 * 1024
MAX_DEPTH = 64  # nested objects and arrays


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body; `BodyTooLarge` above ``limit``, `RequestTimeout` if it is too slow."""
    too_large = BodyTooLarge(f"request body over {_size(limit)} ({limit} bytes), this "
                             "endpoint's limit")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    timeout = request.app[CONFIG].server.read_timeout
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)


def _check(value: Any) -> None:
    """`BadRequest` for NaN / Infinity (naming the field) or nesting deeper than MAX_DEPTH."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise BadRequest(f"invalid request body: {path or 'the body'}: {v} is not a "
                             "number JSON allows (no NaN or Infinity)")
        if isinstance(v, dict):
            items: Any = ((f"{path}.{k}" if path else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            items = ((f"{path}[{i}]", x) for i, x in enumerate(v))
        else:
            continue
        if depth >= MAX_DEPTH:
            raise BadRequest(f"invalid request body: nested deeper than {MAX_DEPTH} levels "
                             f"at {path}")
        stack.extend((x, sub, depth + 1) for sub, x in items)


def parse_json(raw: bytes) -> Any:
    """Strict JSON (see the module docstring); `BadRequest` naming what is wrong."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"invalid request body: nested deeper than {MAX_DEPTH} levels") \
            from None
    except ValueError:
        raise BadRequest("request body is not JSON") from None
    _check(data)
    return data


async def read_json(request: web.Request, limit: int, *, empty: Any = None) -> Any:
    """The body as strict JSON; ``empty`` (if not None) stands for an empty body."""
    raw = await read_body(request, limit)
    if not raw and empty is not None:
        return empty
    return parse_json(raw)
