"""An httpx client for the operator API, and where the CLI finds the server and its token.

The CLI config file is JSON ``{"url": "https://HOST:PORT", "token": "ewo_...", "ca": ...}``
(``edgewise cloud serve`` writes ``DIR/cli.json``); ``ca`` is the path of the CA certificate
that signed the server's certificate (relative paths are taken from the file's directory) or
the PEM text itself. TLS is verified against that CA only, never the system store, and the
host name is checked. `find_config` picks the file (first that applies):

1. ``--config PATH``;
2. ``$EDGEWISE_CONFIG``;
3. ``~/.config/edgewise/cli.json`` if it exists;
4. ``DIR/cli.json`` for ``--data DIR`` (default ``.edgewise/cloud``, as `edgewise cloud`).

The environment is read by the CLI and passed in; nothing here reads it.

Errors (all `EdgewiseError`s, so the CLI prints one line):

    ConfigError      no or bad config file; other 4xx answers
    ├─ BadRequest    400 (the message names the field)        edgewise.errors
    ├─ NotFound      404                                      edgewise.errors
    └─ AuthError     401 (token refused) / 403 (the message names the role needed)
    TransportError   server unreachable (says which URL and how to start it), TLS failure
    PeerError        5xx or an answer that does not match the API
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from edgewise.cloud import openapi as oa
from edgewise.errors import BadRequest, ConfigError, NotFound, PeerError, TransportError

DEFAULT_DATA_DIR = Path(".edgewise/cloud")
# s to wait for the answer to a bulk call (``config set`` by selector: the server stores a
# version for every node it targets before it answers); other calls use the client's timeout
BULK_READ_TIMEOUT = 600.0
USER_CONFIG = Path(".config/edgewise/cli.json")  # under the home directory
CONFIG_FILE = "cli.json"

M = TypeVar("M", bound=BaseModel)


class AuthError(ConfigError):
    """The server refused the token (401) or its role (403)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CliConfig:
    url: str
    token: SecretStr
    ca: str  # PEM text
    ca_source: str  # where the CA came from, for messages
    path: Path

    def __repr__(self) -> str:
        return f"CliConfig(url={self.url!r}, path={str(self.path)!r})"


def find_config(
    explicit: Path | None = None,
    env: str | None = None,
    home: Path | None = None,
    data_dir: Path | None = None,
) -> Path:
    """The config file to use (see the module docstring). Raises `ConfigError` naming the
    places it looked when there is none."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"--config {explicit}: no such file")
        return explicit
    if env:
        p = Path(env)
        if not p.is_file():
            raise ConfigError(f"$EDGEWISE_CONFIG={env}: no such file")
        return p
    tried: list[str] = []
    if home is not None:
        p = home / USER_CONFIG
        if p.is_file():
            return p
        tried.append(str(p))
    d = data_dir if data_dir is not None else DEFAULT_DATA_DIR
    p = d / CONFIG_FILE
    if p.is_file():
        return p
    tried.append(str(p))
    raise ConfigError(
        f"no CLI config found (looked for {' and '.join(tried)}); start the control plane with "
        "`edgewise cloud serve --data DIR` (it writes DIR/cli.json) and pass --data DIR, or "
        "give --config PATH or $EDGEWISE_CONFIG"
    )


def load_config(path: Path) -> CliConfig:
    """Read and check a CLI config file. Raises `ConfigError` naming the file and field."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object with url, token and ca")
    for name in ("url", "token", "ca"):
        if not isinstance(doc.get(name), str) or not doc[name].strip():
            raise ConfigError(f"{path}: field {name!r} is missing or not a string")
    url = doc["url"].rstrip("/")
    if not url.startswith("https://"):
        raise ConfigError(f"{path}: url {url!r} must start with https:// (the API is TLS only)")
    ca = doc["ca"]
    if ca.lstrip().startswith("-----BEGIN"):
        pem, source = ca, f"{path} (inline)"
    else:
        ca_path = Path(ca) if Path(ca).is_absolute() else path.parent / ca
        try:
            pem = ca_path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the CA certificate {ca_path}: {exc}") from None
        source = str(ca_path)
    return CliConfig(url, SecretStr(doc["token"].strip()), pem, source, path)


def _tls(config: CliConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cadata=config.ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"{config.ca_source}: not a PEM CA certificate: {exc}") from None
    return ctx


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    return response.text[:300]


class OperatorClient:
    """Typed calls to the operator API (sync; the CLI's client). Use as a context manager."""

    def __init__(self, config: CliConfig, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        self.url = config.url
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=config.url,
            verify=_tls(config),
            timeout=timeout,
            headers={"Authorization": f"Bearer {config.token.get_secret_value()}",
                     "User-Agent": "edgewise-cli"},
            transport=transport,
        )

    @classmethod
    def from_file(cls, path: Path, **kw: Any) -> OperatorClient:
        return cls(load_config(path), **kw)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ----------------------------------------------------------------------------
    def call(self, method: str, path: str, model: type[M], *, body: BaseModel | None = None,
             params: dict[str, Any] | None = None, read_timeout: float | None = None) -> M:
        content = body.model_dump_json(exclude_none=True).encode() if body is not None else None
        r = self.send(method, path, content=content, params=params,
                      headers={"Content-Type": "application/json"} if content is not None
                      else None, read_timeout=read_timeout)
        if r.status_code >= 400:
            self._raise(r)
        try:
            return model.model_validate_json(r.content)
        except ValidationError as exc:
            raise PeerError(
                f"the control plane at {self.url} answered {method} {path} with something "
                f"unexpected (a different version?): {exc.errors()[0]['msg']}"
            ) from None

    def send(self, method: str, path: str, *, content: Any = None,
             params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
             read_timeout: float | None = None) -> httpx.Response:
        """One request, any status; network and TLS failures as `TransportError`.
        ``read_timeout`` (s) waits longer for the answer than the client's timeout."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        extra: dict[str, Any] = {}
        if read_timeout is not None:
            extra["timeout"] = httpx.Timeout(self.timeout,
                                             read=max(self.timeout, read_timeout))
        try:
            return self._http.request(method, path, content=content, params=query,
                                      headers=headers, **extra)
        except httpx.ConnectError as exc:
            text = str(exc)
            if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
                raise TransportError(
                    f"TLS: the server at {self.url} is not trusted by the CA "
                    f"{self.config.ca_source} ({text}); is {self.config.path} for this server?"
                ) from None
            raise TransportError(
                f"cannot reach the control plane at {self.url} ({text or type(exc).__name__}); "
                "is it running? Start it with `edgewise cloud serve --data DIR` (config from "
                f"{self.config.path})"
            ) from None
        except httpx.TimeoutException as exc:
            raise TransportError(
                f"the control plane at {self.url} did not answer in time "
                f"({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise TransportError(f"talking to the control plane at {self.url} failed: {exc}"
                                 ) from None

    def _raise(self, r: httpx.Response) -> None:
        msg = _message(r)
        status = r.status_code
        if status == 401:
            raise AuthError(
                f"the control plane at {self.url} refused the operator token in "
                f"{self.config.path}: {msg}", status)
        if status == 403:
            raise AuthError(f"not allowed: {msg}", status)
        if status == 404:
            raise NotFound(msg)
        if status == 400:
            raise BadRequest(msg)
        if status < 500:
            raise ConfigError(msg)
        raise PeerError(f"the control plane at {self.url} failed ({status}): {msg}")

    # -- tokens -------------------------------------------------------------------------------
    def create_enrolment_token(self, labels: dict[str, str], ttl_s: float, uses: int = 1
                               ) -> oa.EnrolmentTokenResponse:
        return self.call("POST", "/v1/tokens/enrolment", oa.EnrolmentTokenResponse,
                         body=oa.EnrolmentTokenRequest(labels=labels, ttl_s=ttl_s, uses=uses))

    def create_operator_token(self, name: str, role: str, ttl_s: float | None = None
                              ) -> oa.OperatorTokenResponse:
        return self.call("POST", "/v1/tokens/operator", oa.OperatorTokenResponse,
                         body=oa.OperatorTokenRequest(name=name, role=role, ttl_s=ttl_s))

    def list_operator_tokens(self) -> oa.OperatorTokenList:
        return self.call("GET", "/v1/tokens/operator", oa.OperatorTokenList)

    def revoke_operator_token(self, token: str) -> oa.OperatorTokenRevokeResponse:
        return self.call("POST", "/v1/tokens/operator/revoke", oa.OperatorTokenRevokeResponse,
                         body=oa.OperatorTokenRevokeRequest(token=token))

    # -- nodes --------------------------------------------------------------------------------
    def list_nodes(self, selector: str | None = None, *, page: int = 1000) -> list[oa.Node]:
        """Every node (matching ``selector``), fetched page by page."""
        return self._all_pages("/v1/nodes", oa.NodeList, {"selector": selector}, page)

    def get_node(self, node_id: str) -> oa.NodeDetail:
        return self.call("GET", f"/v1/nodes/{_seg(node_id)}", oa.NodeDetail)

    def patch_labels(self, node_id: str, set_: dict[str, str], remove: list[str]) -> oa.Node:
        return self.call("PATCH", f"/v1/nodes/{_seg(node_id)}/labels", oa.Node,
                         body=oa.LabelPatch(set=set_, remove=remove))

    def revoke_node(self, node_id: str, reason: str = "") -> oa.Node:
        return self.call("POST", f"/v1/nodes/{_seg(node_id)}/revoke", oa.Node,
                         body=oa.RevokeRequest(reason=reason))

    def decommission_node(self, node_id: str, *, wipe: bool = False,
                          reason: str = "") -> oa.Node:
        return self.call("POST", f"/v1/nodes/{_seg(node_id)}/decommission", oa.Node,
                         body=oa.DecommissionRequest(wipe=wipe, reason=reason))

    # -- config -------------------------------------------------------------------------------
    def set_config(self, request: oa.ConfigSetRequest) -> oa.ConfigSetResponse:
        return self.call("PUT", "/v1/config", oa.ConfigSetResponse, body=request,
                         read_timeout=BULK_READ_TIMEOUT)

    def get_config(self, node_id: str) -> oa.ConfigGetResponse:
        return self.call("GET", "/v1/config", oa.ConfigGetResponse, params={"node": node_id})

    # -- fleet operations: config layers, diff, apply, drift, states ---------------------------
    def list_layers(self, node_id: str | None = None) -> oa.LayerList:
        return self.call("GET", "/v1/config/layers", oa.LayerList, params={"node": node_id})

    def write_layer(self, request: oa.LayerWrite) -> oa.LayerWriteResponse:
        return self.call("PUT", "/v1/config/layers", oa.LayerWriteResponse, body=request)

    def diff_config(self, node_id: str) -> oa.ConfigDiff:
        return self.call("GET", "/v1/config/diff", oa.ConfigDiff, params={"node": node_id})

    def apply_config(self, request: oa.ConfigApplyRequest) -> oa.ConfigApplyResponse:
        return self.call("POST", "/v1/config/apply", oa.ConfigApplyResponse, body=request,
                         read_timeout=BULK_READ_TIMEOUT)

    def drift(self, selector: str | None = None, *, page: int = 1000) -> list[oa.DriftEntry]:
        """Every node with drift (matching ``selector``), page by page."""
        return self._all_pages("/v1/config/drift", oa.DriftList, {"selector": selector}, page)

    def fleet_nodes(self, state: str | None = None, selector: str | None = None, *,
                    page: int = 1000) -> list[oa.FleetNode]:
        """Every node in ``state`` (matching ``selector``) with its state, page by page."""
        return self._all_pages("/v1/fleet/nodes", oa.FleetNodeList,
                               {"state": state, "selector": selector}, page)

    def _all_pages(self, path: str, model: type[Any], params: dict[str, Any],
                   page: int) -> list[Any]:
        """Every item of a keyset-paged list route (``nodes`` and ``next`` in its answer)."""
        out: list[Any] = []
        after: str | None = None
        while True:
            res = self.call("GET", path, model, params={**params, "limit": page, "after": after})
            out.extend(res.nodes)
            if res.next is None:
                return out
            after = res.next

    def quarantine(self, node_id: str, reason: str | None) -> oa.FleetNode:
        return self.call("POST", f"/v1/nodes/{_seg(node_id)}/quarantine", oa.FleetNode,
                         body=oa.QuarantineRequest(reason=reason))

    # -- data ---------------------------------------------------------------------------------
    def data_stats(self, node_id: str | None = None) -> oa.StatsResponse:
        return self.call("GET", "/v1/data/stats", oa.StatsResponse, params={"node": node_id})

    def data_query(self, node_id: str, stream: str, *, since: float | None = None,
                   from_seq: int = 0, limit: int = 1000, include_quarantined: bool = False
                   ) -> oa.DataQueryResponse:
        return self.call("GET", "/v1/data/query", oa.DataQueryResponse, params={
            "node": node_id, "stream": stream, "since": since, "from_seq": from_seq,
            "limit": limit, "include_quarantined": "true" if include_quarantined else None})

    def audit(self, *, target: str | None = None, actor: str | None = None, limit: int = 100,
              before_id: int | None = None) -> oa.AuditList:
        return self.call("GET", "/v1/audit", oa.AuditList, params={
            "target": target, "actor": actor, "limit": limit, "before_id": before_id})


    # -- releases (bodies are bytes, answers plain JSON objects) -------------------------------
    def _json(self, r: httpx.Response) -> dict[str, Any]:
        if r.status_code >= 400:
            self._raise(r)
        try:
            body = r.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise PeerError(f"the control plane at {self.url} answered with something that is "
                            "not a JSON object (a different version?)")
        return body

    def list_releases(self) -> dict[str, Any]:
        return self._json(self.send("GET", "/v1/releases"))

    def show_release(self, version: str) -> dict[str, Any]:
        return self._json(self.send("GET", f"/v1/releases/{_seg(version)}"))

    def upload_blob(self, sha256: str, path: Path, length: int) -> dict[str, Any]:
        """Stream one release file (its bytes must hash to ``sha256``)."""
        with path.open("rb") as f:
            return self._json(self.send(
                "PUT", f"/v1/releases/blobs/{_seg(sha256)}", content=_read_pieces(f),
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(length)}))

    def publish_release(self, manifest: bytes) -> tuple[dict[str, Any], list[str]]:
        """``(answer, [])`` when published (or published already); ``({}, missing)`` when
        the control plane lacks files (their sha256)."""
        r = self.send("POST", "/v1/releases", content=manifest,
                      headers={"Content-Type": "application/json"})
        if r.status_code == 409:
            try:
                missing = r.json().get("missing")
            except (ValueError, AttributeError):
                missing = None
            if isinstance(missing, list) and all(isinstance(m, str) for m in missing):
                return {}, missing
        return self._json(r), []


def _read_pieces(f: Any, size: int = 1 << 20) -> Any:
    while piece := f.read(size):
        yield piece


def _seg(value: str) -> str:
    """One URL path segment (node ids are [a-z0-9-], but never trust that here)."""
    from urllib.parse import quote

    return quote(value, safe="")
