"""HTTPS to the control plane's device API: one JSON request, and what its failures mean.

`device_request` sends one request over the TLS context it is given (the node's identity makes
it: verified against ``ca.pem``, with or without the node certificate) and returns the JSON
object that came back. An error status is a `CloudRefusal` carrying the status and the
control plane's reason; the control plane out of reach is a `TransportError` with one stable
line from `describe_network_error`; a server certificate that does not verify against our CA is
a `ConfigError` (the flags are wrong, retrying will not help).

A 429 (the control plane's admission control or a node's rate limit) carries ``Retry-After``:
`retry_after` reads it (seconds or an HTTP date, bounded by `MAX_RETRY_AFTER_S`) and the
refusal keeps it, so the caller waits at least that long instead of its own shorter backoff.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from edgewise.errors import ConfigError, PeerError, TransportError
from edgewise.sync.protocol import DECOMMISSIONED_HEADER, decommission_order

MAX_ANSWER_BYTES = 4 * 1024 * 1024
REQUEST_TIMEOUT_S = 15.0
MAX_RETRY_AFTER_S = 600.0  # a larger Retry-After (or a broken one) is taken as this


class CloudRefusal(PeerError):
    """The control plane answered a device request with an error status; a 403 may carry a
    decommission order (``decommissioned``, ``wipe``: `protocol.decommission_order`)."""

    def __init__(self, method: str, path: str, status: int, reason: str,
                 order: tuple[bool, bool] = (False, False),
                 retry_after: float | None = None) -> None:
        self.status = status
        self.reason = reason
        self.retry_after = retry_after  # seconds the control plane asked us to wait (429/503)
        self.decommissioned, self.wipe = order if status == 403 else (False, False)
        super().__init__(f"{method} {path}: the control plane answered {status}: {reason}")


class LinkDown(TransportError):
    """The uplink's session ended: closed by the control plane, reset, or timed out
    (``retry_after``: the pause a 429 asked for)."""

    retry_after: float | None = None


def check_cloud_url(url: str) -> str:
    """``https://HOST:PORT`` (no path): the only form the device API accepts."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(
            f"--cloud {url!r}: use https://HOST:PORT (the device API is TLS only)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"--cloud {url!r}: give only https://HOST:PORT, without a path")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(f"--cloud {url!r}: {exc}") from None
    return f"https://{parts.netloc}"


def describe_network_error(exc: BaseException) -> str:
    """One stable line for a network failure (no object addresses, so repeats compare equal)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        why = os_error.strerror or str(os_error) or type(os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port}: {why}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """The seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), at most
    `MAX_RETRY_AFTER_S`; None when there is none. A value that cannot be read counts as 1 s:
    the server did ask us to slow down."""
    value = (headers or {}).get("Retry-After")
    if value is None:
        return None
    value = value.strip()[:64]
    try:
        seconds = float(int(value))
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            seconds = 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _reason(data: bytes) -> str:
    """The error text of a control-plane answer (JSON ``error``/``detail``/``reason`` or text)."""
    text = data[:2000].decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300] or "(no reason given)"
    if isinstance(body, dict):
        for k in ("error", "detail", "reason", "message"):
            if isinstance(body.get(k), str):
                return body[k][:300]
    return text[:300]


async def device_request(
    cloud: str, ctx: ssl.SSLContext, method: str, path: str,
    body: dict[str, Any] | None = None,
    *, ca_path: str | os.PathLike[str], timeout: float = REQUEST_TIMEOUT_S,
) -> dict[str, Any]:
    """One JSON request to the device API at ``cloud`` (``https://HOST:PORT``).

    Raises `TransportError`, `CloudRefusal`, `PeerError` (an answer that is not a JSON object)
    or `ConfigError` (the server's certificate does not verify against ``ca_path``).
    """
    url = cloud + path
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout)
        ) as session, session.request(method, url, json=body, ssl=ctx) as resp:
            data = await resp.content.read(MAX_ANSWER_BYTES + 1)
            status = resp.status
            order = decommission_order(resp.headers.get(DECOMMISSIONED_HEADER))
            wait = retry_after(resp.headers) if status in (429, 503) else None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise ConfigError(
            f"the control plane at {cloud} presented a certificate that does not "
            f"verify against {ca_path} ({exc.certificate_error}); check --cloud and --ca"
        ) from None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise TransportError(f"{method} {path}: {describe_network_error(exc)}") from None
    if len(data) > MAX_ANSWER_BYTES:
        raise PeerError(f"{method} {path}: answer larger than {MAX_ANSWER_BYTES} bytes")
    if status >= 400:
        raise CloudRefusal(method, path, status, _reason(data), order, wait)
    try:
        answer = json.loads(data)
    except ValueError:
        raise PeerError(f"{method} {path}: the answer is not JSON") from None
    if not isinstance(answer, dict):
        raise PeerError(f"{method} {path}: the answer is not a JSON object")
    return answer
