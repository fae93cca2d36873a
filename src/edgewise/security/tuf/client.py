"""The node's side of TUF: `TufClient` wraps ``tuf.ngclient.Updater`` with a fetcher that
speaks to the control plane over the node's mutual-TLS identity (`MtlsFetcher`). The release
vocabulary on top of it (manifests, blobs) is `edgewise.edge.release_fetcher.ReleaseFetcher`.

Trust starts at the root the node got at enrolment (``trusted_root``) or the newest root it has
verified since (``<metadata_dir>/root_history``); `ReleaseFetcher.refresh` follows root
rotations, then checks timestamp, snapshot and targets: signatures against the root's keys and
thresholds, versions never going back (rollback), expiry (freeze), snapshot and targets
matching the versions, lengths and hashes the newer role names (mix-and-match, endless data).
A file is verified (length and sha256 from the signed targets) before it is written where the
caller asked (`TufClient.fetch_to`: a temp file beside ``dest``, renamed over it once verified).

Every refusal by TUF is `UpdateRefused` (a `PeerError`) naming what failed; the network is
`TransportError`; the local disk `StorageError`. Nothing here runs on an event loop: the caller
runs these methods in a thread.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from edgewise.common.files import fsync_dir
from edgewise.errors import ConfigError, PeerError, StorageError, TransportError, UpdateRefused

METADATA_PATH = "/v1/device/tuf/"  # the control plane's TUF metadata, under the device API
TARGETS_PATH = "/v1/device/tuf/targets/"
TIMEOUT_S = 30.0  # s for a connection or a read to make progress
MAX_RETRY_WAIT_S = 10.0  # s waited at most for one 429 answer's Retry-After
MAX_RETRIES = 6  # 429 answers retried for one request
# Slow retrieval (a control plane or proxy that sends a byte just within every read timeout):
# after SLOW_GRACE_S, a download must have averaged MIN_RATE bytes/s since it started, so one
# takes at most SLOW_GRACE_S + length / MIN_RATE (plus one read timeout) however it is sent
MIN_RATE = 256  # bytes/s: 2 kbit/s, below any link a node is meant to update over
SLOW_GRACE_S = TIMEOUT_S


class MtlsFetcher(FetcherInterface):
    """Downloads over HTTPS with the node's TLS context (its client certificate), in pieces,
    on one kept-alive connection (an update's metadata, manifest and files cost one mutual-TLS
    handshake, not one each); the caller (ngclient) bounds the length, the fetcher the time
    (every read `TIMEOUT_S`, a whole download `MIN_RATE` on average after `SLOW_GRACE_S`). A
    429 answer is waited out (Retry-After, at most `MAX_RETRY_WAIT_S` each, `MAX_RETRIES`
    times)."""

    def __init__(self, ssl_context: ssl.SSLContext, timeout: float = TIMEOUT_S) -> None:
        self._client = httpx.Client(verify=ssl_context, timeout=timeout,
                                    headers={"Accept-Encoding": "identity"},
                                    limits=httpx.Limits(max_connections=1))
        self.requests = 0  # requests made (tests, metrics)

    def close(self) -> None:
        self._client.close()

    def _open(self, url: str) -> httpx.Response:
        for attempt in range(MAX_RETRIES + 1):
            self.requests += 1
            try:
                response = self._client.send(self._client.build_request("GET", url),
                                             stream=True)
            except httpx.HTTPError as exc:
                raise tuf_errors.DownloadError(f"{url}: {exc}") from exc
            if response.status_code == 200:
                return response
            response.close()
            if response.status_code == 429 and attempt < MAX_RETRIES:
                try:
                    wait = float(response.headers.get("Retry-After", "1"))
                except ValueError:
                    wait = 1.0
                time.sleep(min(max(wait, 0.05), MAX_RETRY_WAIT_S))
                continue
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {response.status_code}",
                                               response.status_code)
        raise tuf_errors.DownloadHTTPError(f"{url}: HTTP 429 too often", 429)

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith("https://"):
            raise tuf_errors.DownloadError(f"{url}: only https is allowed")
        response = self._open(url)
        return self._pieces(url, response)

    @staticmethod
    def _pieces(url: str, response: httpx.Response) -> Iterator[bytes]:
        start, got = time.monotonic(), 0
        try:
            for piece in response.iter_raw():  # as they come (a chunk size would wait to fill)
                got += len(piece)
                late = time.monotonic() - start - SLOW_GRACE_S
                if late > 0 and got < MIN_RATE * late:
                    raise tuf_errors.DownloadError(
                        f"{url}: {got} bytes in {late + SLOW_GRACE_S:.0f} s, under the "
                        f"{MIN_RATE} bytes/s a download must average (slow retrieval)")
                yield piece
        except httpx.HTTPError as exc:
            raise tuf_errors.DownloadError(f"{url}: {exc}") from exc
        finally:
            response.close()


def _refused(what: str, exc: BaseException) -> PeerError:
    """The one translation of python-tuf's errors (and the fetcher's) into ours."""
    name = type(exc).__name__
    if isinstance(exc, tuf_errors.RepositoryError | tuf_errors.DownloadLengthMismatchError):
        return UpdateRefused(f"{what}: refused by TUF verification ({name}: {exc})")
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        return PeerError(f"{what}: the control plane answered HTTP {exc.status_code}")
    return PeerError(f"{what}: {name}: {exc}")


class TufClient:
    """Verified metadata and targets from the control plane at ``base_url``.

    ``metadata_dir`` holds the node's trusted metadata (it persists between runs: that is what
    makes rollback detectable); ``trusted_root`` is the root from enrolment, or None to trust
    the newest root already verified into ``metadata_dir``.
    """

    def __init__(self, metadata_dir: Path, base_url: str, ssl_context: ssl.SSLContext,
                 trusted_root: bytes | None = None) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.base_url = base_url.rstrip("/")
        self.fetcher = MtlsFetcher(ssl_context)
        self._trusted_root = trusted_root
        self._updater: Updater | None = None
        self.config = UpdaterConfig(prefix_targets_with_hash=False,  # names are hashes already
                                    targets_max_length=16 << 20)

    def _new_updater(self) -> Updater:
        try:
            self.metadata_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self._trusted_root is None and not (self.metadata_dir / "root.json").exists():
                raise ConfigError(f"no trusted TUF root in {self.metadata_dir}: the node gets "
                                  "it at enrolment; enrol again or restore the identity folder")
            return Updater(str(self.metadata_dir), self.base_url + METADATA_PATH,
                           target_base_url=self.base_url + TARGETS_PATH,
                           fetcher=self.fetcher, config=self.config,
                           bootstrap=self._trusted_root)
        except tuf_errors.RepositoryError as exc:
            raise UpdateRefused(f"the trusted TUF root is not valid: {exc}") from None
        except OSError as exc:
            raise StorageError(f"{self.metadata_dir}: {exc.strerror or exc}") from None

    def _run(self, what: str, call):  # type: ignore[no-untyped-def]
        try:
            return call()
        except (tuf_errors.RepositoryError, tuf_errors.DownloadLengthMismatchError,
                tuf_errors.DownloadHTTPError) as exc:
            raise _refused(what, exc) from None
        except tuf_errors.DownloadError as exc:
            cause = exc.__cause__ or exc
            raise TransportError(f"{what}: {type(cause).__name__}: {cause}") from None
        except OSError as exc:
            raise StorageError(f"{what}: {exc.strerror or exc}") from None

    def refresh(self) -> None:
        """Update the trusted metadata: root (rotations), timestamp, snapshot, targets.

        Raises `UpdateRefused` when any of it fails verification, `PeerError` for an HTTP error
        answer, `TransportError` when the control plane is out of reach."""
        updater = self._new_updater()
        self._run("TUF refresh", updater.refresh)
        self._updater = updater

    def target(self, name: str) -> TargetFile:
        """The signed length and hashes of target ``name`` (refreshing first if not yet);
        `UpdateRefused` when the signed targets do not list it."""
        if self._updater is None:
            self.refresh()
        updater = self._updater
        assert updater is not None  # type narrowing: refresh sets it
        info = self._run(f"target {name}", lambda: updater.get_targetinfo(name))
        if info is None:
            raise UpdateRefused(f"{name} is not among the signed targets")
        return info  # type: ignore[no-any-return]

    def fetch_bytes(self, name: str, max_length: int) -> bytes:
        """Target ``name``'s verified bytes; `UpdateRefused` when its signed length is over
        ``max_length``."""
        info = self.target(name)
        if info.length > max_length:
            raise UpdateRefused(f"{name}: signed length {info.length} is over the bound "
                                f"of {max_length} bytes")
        downloads = self.metadata_dir / "downloads"
        downloads.mkdir(exist_ok=True, mode=0o700)
        tmp = downloads / f"target.{secrets.token_hex(8)}.part"
        updater = self._updater
        assert updater is not None  # type narrowing: target refreshed
        try:
            self._run(name, lambda: updater.download_target(info, filepath=str(tmp)))
            return tmp.read_bytes()
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def fetch_to(self, name: str, dest: Path, *, sha256: str | None = None) -> None:
        """Download target ``name`` to ``dest``, verified (length and hashes from the signed
        targets; and ``sha256`` when given) before ``dest`` is written; never a partial file."""
        info = self.target(name)
        if sha256 is not None and info.hashes.get("sha256") != sha256:
            raise UpdateRefused(f"{name}: the signed targets give it another sha256")
        dest = Path(dest)
        tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.part"
        updater = self._updater
        assert updater is not None  # type narrowing: target refreshed
        try:
            self._run(name, lambda: updater.download_target(info, filepath=str(tmp)))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            raise StorageError(f"cannot write {dest}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        fsync_dir(dest.parent)
