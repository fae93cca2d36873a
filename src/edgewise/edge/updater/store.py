"""The slots on disk and the one state file that says which of them runs.

Layout (``DATA/releases/``)::

    state.json              the `SlotState` (one atomic, fsynced write per transition)
    a/  b/                  the two slots, each:
        files/<path>        the release's files, as the manifest names them (read-only)
        site/               its plugin wheels, installed offline (on sys.path while it runs)
        agent/              its agent wheel, installed offline (the launcher runs it)
        manifest.json       the manifest, written last: a slot without it is incomplete
    tmp/                    downloads before they are verified and moved into a slot

The switch from one release to the other is one `save_state` (write_atomic: temp file, fsync,
rename, fsync of the folder). Everything the state file names was fsynced before it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import orjson

from edgewise.common.files import fsync_dir, write_atomic
from edgewise.edge.updater.machine import SlotState
from edgewise.errors import ConfigError, PeerError, StorageError
from edgewise.sync.release import MAX_MANIFEST_BYTES, Manifest, hash_file

RELEASES_DIR = "releases"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
MAX_STATE_BYTES = 64 << 10


class Slots:
    """Paths of ``DATA/releases`` and the state file's reads and writes."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / RELEASES_DIR

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def slot(self, name: str) -> Path:
        return self.root / name

    def files(self, name: str) -> Path:
        return self.root / name / "files"

    def site(self, name: str) -> Path:
        return self.root / name / "site"

    def agent(self, name: str) -> Path:
        return self.root / name / "agent"

    def manifest_path(self, name: str) -> Path:
        return self.root / name / MANIFEST_FILE

    # -- state ------------------------------------------------------------------------------
    def load(self) -> SlotState:
        """The persisted state; a node that never had a release has none (the empty state).
        Raises `StorageError` for a file that cannot be read or does not parse (it was written
        atomically: only a failing disk or a person can damage it; the fix is in the message)."""
        path = self.state_path
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return SlotState()
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            if len(raw) > MAX_STATE_BYTES:
                raise ValueError(f"more than {MAX_STATE_BYTES} bytes")
            return SlotState.from_json(orjson.loads(raw))
        except (ValueError, orjson.JSONDecodeError) as exc:
            raise StorageError(
                f"{path} is damaged ({exc}): remove {self.root} to run the installed agent "
                "with the desired state's pipelines; the assigned release is then applied "
                "again") from None

    def save(self, state: SlotState) -> None:
        """Persist ``state`` (atomic and durable). Raises `StorageError`."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, orjson.dumps(state.to_json()), mode=0o600)

    # -- slots ------------------------------------------------------------------------------
    def read_manifest(self, name: str) -> Manifest | None:
        """The manifest of a complete slot, else None."""
        path = self.manifest_path(name)
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError:
            return None
        try:
            return Manifest.from_bytes(raw)
        except PeerError:
            return None

    def check(self, name: str, digest: str, *, hashes: bool = True) -> str | None:
        """Why slot ``name`` does not hold the release with manifest ``digest`` whole (every
        file present with its length and, with ``hashes``, its sha256), or None if it does."""
        manifest = self.read_manifest(name)
        if manifest is None:
            return f"slot {name} has no readable manifest"
        if manifest.digest() != digest:
            return f"slot {name} holds release {manifest.version}, not the one named"
        for kind, folder in (("plugin", self.site(name)), ("agent", self.agent(name))):
            if manifest.by_kind(kind) and not folder.is_dir():
                return f"slot {name}: its {kind} wheels are not installed"
        base = self.files(name)
        for f in manifest.files:
            path = base / f.path
            try:
                size = path.stat().st_size
            except OSError:
                return f"slot {name}: {f.path} is missing"
            if size != f.length:
                return f"slot {name}: {f.path} has {size} bytes, not {f.length}"
            if hashes:
                try:
                    sha, _ = hash_file(path)
                except ConfigError as exc:
                    return str(exc)
                if sha != f.sha256:
                    return f"slot {name}: {f.path} does not have its sha256"
        return None

    def clear(self, path: Path) -> None:
        """Remove a folder of a slot (installed wheels, a stale download) if it exists."""
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot remove {path}: {exc.strerror or exc}") from exc


def sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (an install written by a library that does
    not), so that naming it in the state file survives a power loss."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)
