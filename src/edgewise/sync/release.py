"""The release format, shared by the control plane (which builds, stores and serves releases)
and the node (which verifies and applies them); docs/updates.md describes it for people.

A release is one versioned bundle for a node, built from a directory:

    pipelines/<name>.yaml      kind "pipeline"
    plugins/<name>.whl         kind "plugin"   (operator plugins, installed offline)
    agent/edgewise-*.whl       kind "agent"    (at most one: the agent itself)
    config/...                 kind "config"
    setpoints.yaml             setpoint defaults (a flat map of scalars; not a file of the release)
    anything else              kind "model"    (models/*, data files)

`Manifest` lists every file with its sha256 and length; `Manifest.to_bytes` is canonical JSON
(sorted keys, no whitespace, files sorted by path), so `build_manifest` on the same directory
gives the same bytes whatever the mtimes or the order the filesystem lists files in.

TUF target names (`manifest_target`, `blob_target`): the manifest of version V is the target
``releases/V/manifest.json``; every file's content is the target ``blobs/<sha256>``
(content-addressed: a file with the same hash is the same target, so a node that holds it
already downloads nothing).

Everything here is bounded: a manifest's bytes (`MAX_MANIFEST_BYTES`), its files
(`MAX_FILES`), a path's length (`MAX_PATH`), a version's form (`VERSION_RE`). Parsing a peer's
manifest (`Manifest.from_bytes`) raises `PeerError` naming the field; building one from a
directory raises `ConfigError` naming the file.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import orjson
import yaml

from edgewise.errors import ConfigError, PeerError

FORMAT = 1  # the manifest format's version, written as "format"
MAX_MANIFEST_BYTES = 4 << 20  # a manifest's canonical JSON
MAX_FILES = 10_000  # files in one release
MAX_PATH = 255  # characters of a file's relative path
MAX_PART = 128  # characters of one path component
MAX_FILE_BYTES = 1 << 32  # one file of a release (4 GiB)
MAX_SETPOINTS = 1_000  # setpoint defaults in one release
MAX_SETPOINTS_BYTES = 64 << 10  # setpoints.yaml
MAX_SETPOINT_TEXT = 1_024  # characters of a setpoint's name or text value

KINDS = ("agent", "config", "model", "pipeline", "plugin")
VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PART_RE = re.compile(r"[0-9A-Za-z_][0-9A-Za-z._@+=,-]*")
SETPOINTS_FILE = "setpoints.yaml"
_READ = 1 << 20


def manifest_target(version: str) -> str:
    """The TUF target name of a release's manifest."""
    return f"releases/{version}/manifest.json"


def blob_target(sha256: str) -> str:
    """The TUF target name of a file's content."""
    return f"blobs/{sha256}"


def check_version(version: object) -> str:
    """``version`` if it is a valid release version, else ValueError saying what is allowed."""
    if not isinstance(version, str) or VERSION_RE.fullmatch(version) is None:
        raise ValueError(
            f"bad release version {version!r}: use 1-64 characters of letters, digits and "
            "'._+-', starting with a letter or digit (e.g. 2026.12.1)"
        )
    return version


def check_sha256(value: object) -> str:
    """``value`` if it is a lowercase sha256 hex digest, else ValueError."""
    if not isinstance(value, str) or SHA256_RE.fullmatch(value) is None:
        raise ValueError(f"not a sha256 hex digest: {str(value)[:80]!r}")
    return value


def check_path(path: object) -> str:
    """``path`` if it is a safe relative POSIX path of a release file, else ValueError.

    Refused: absolute paths, ``..`` and ``.`` components, empty components, backslashes,
    characters outside letters, digits and ``._@+=,-``, components starting with ``.`` or
    ``-``, more than `MAX_PATH` characters in all or `MAX_PART` in one component.
    """
    if not isinstance(path, str) or not path:
        raise ValueError("a file path must be non-empty text")
    if len(path) > MAX_PATH:
        raise ValueError(f"path longer than {MAX_PATH} characters: {path[:60]!r}...")
    if "\\" in path:
        raise ValueError(f"backslash in path {path!r}: use '/'")
    if path.startswith("/"):
        raise ValueError(f"absolute path {path!r}: paths are relative to the release")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"path {path!r} has an empty, '.' or '..' component")
        if len(part) > MAX_PART or _PART_RE.fullmatch(part) is None:
            raise ValueError(
                f"path {path!r}: component {part[:60]!r} must be at most {MAX_PART} letters, "
                "digits and '._@+=,-', not starting with '.' or '-'"
            )
    return path


def kind_of(path: str) -> str:
    """The kind of the release file at ``path`` (checked), or ValueError for a path under a
    known folder that does not fit it (``pipelines/x.txt``, ``plugins/sub/x.whl``)."""
    parts = PurePosixPath(path).parts
    top = parts[0]
    if top == "pipelines":
        if len(parts) != 2 or not parts[1].endswith(".yaml"):
            raise ValueError("pipelines/ holds <name>.yaml files only")
        return "pipeline"
    if top == "plugins":
        if len(parts) != 2 or not parts[1].endswith(".whl"):
            raise ValueError("plugins/ holds <name>.whl wheels only")
        return "plugin"
    if top == "agent":
        if len(parts) != 2 or not (parts[1].startswith("edgewise-") and parts[1].endswith(".whl")):
            raise ValueError("agent/ holds one edgewise-<version>-*.whl wheel only")
        return "agent"
    if top == "config":
        if len(parts) < 2:
            raise ValueError("config must be a folder")
        return "config"
    if path == SETPOINTS_FILE:
        raise ValueError("setpoint defaults are not a file of the release")
    return "model"


@dataclass(frozen=True)
class ReleaseFile:
    """One file of a release: where it goes in the slot, its content's hash and length."""

    path: str  # relative POSIX path inside the release (checked by `check_path`)
    sha256: str  # lowercase hex
    length: int  # bytes
    kind: str  # one of KINDS, as `kind_of(path)` says

    def target(self) -> str:
        """The TUF target name of this file's content."""
        return blob_target(self.sha256)


@dataclass(frozen=True)
class Manifest:
    """A release: its version, its files (sorted by path) and its setpoint defaults."""

    version: str
    files: tuple[ReleaseFile, ...]
    setpoints: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, files sorted by path."""
        files = sorted(self.files, key=lambda f: f.path)
        doc = {
            "format": FORMAT,
            "version": self.version,
            "files": [
                {"path": f.path, "sha256": f.sha256, "length": f.length, "kind": f.kind}
                for f in files
            ],
            "setpoints": self.setpoints,
        }
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    def digest(self) -> str:
        """sha256 hex of `to_bytes`."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def total_bytes(self) -> int:
        """Bytes of all files (a blob shared by two paths counted twice)."""
        return sum(f.length for f in self.files)

    def blobs(self) -> dict[str, int]:
        """The distinct contents: sha256 → length."""
        return {f.sha256: f.length for f in self.files}

    def by_kind(self, kind: str) -> tuple[ReleaseFile, ...]:
        """The files of one kind, sorted by path."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
        return tuple(f for f in self.files if f.kind == kind)

    def pipelines(self) -> tuple[ReleaseFile, ...]:
        """The pipeline files, sorted by path."""
        return self.by_kind("pipeline")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and check a manifest a peer sent. Raises `PeerError` naming the field."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise PeerError("release manifest: not bytes")
        if len(data) > MAX_MANIFEST_BYTES:
            raise PeerError(f"release manifest: more than {MAX_MANIFEST_BYTES} bytes")
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise PeerError(f"release manifest: not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise PeerError("release manifest: not a JSON object")
        extra = set(doc) - {"format", "version", "files", "setpoints"}
        if extra:
            raise PeerError(f"release manifest: unknown field {sorted(extra)[0]!r}")
        if doc.get("format") != FORMAT:
            raise PeerError(f"release manifest: format: {doc.get('format')!r}, expected {FORMAT}")
        try:
            version = check_version(doc.get("version"))
        except ValueError as exc:
            raise PeerError(f"release manifest: version: {exc}") from None
        raw_files = doc.get("files")
        if not isinstance(raw_files, list):
            raise PeerError("release manifest: files: not a list")
        if len(raw_files) > MAX_FILES:
            raise PeerError(f"release manifest: files: more than {MAX_FILES}")
        files = tuple(_parse_file(i, item) for i, item in enumerate(raw_files))
        paths = [f.path for f in files]
        if paths != sorted(paths):
            raise PeerError("release manifest: files: not sorted by path")
        if len(set(paths)) != len(paths):
            raise PeerError("release manifest: files: a path is listed twice")
        _check_tree(paths, PeerError, "release manifest: files: ")
        if len([f for f in files if f.kind == "agent"]) > 1:
            raise PeerError("release manifest: files: more than one agent wheel")
        try:
            setpoints = check_setpoints(doc.get("setpoints"))
        except ValueError as exc:
            raise PeerError(f"release manifest: setpoints: {exc}") from None
        manifest = cls(version, files, setpoints)
        if manifest.to_bytes() != bytes(data):
            raise PeerError("release manifest: not in canonical form")
        return manifest


class ReleaseSource(Protocol):
    """What the node's updater needs from a release fetcher; `edgewise.security.tuf.ReleaseFetcher`
    is the real one (TUF-verified, over the node's mutual-TLS identity)."""

    def refresh(self) -> None:
        """Bring the trusted metadata up to date; raises `UpdateRefused` on any attack."""

    def manifest(self, version: str) -> Manifest:
        """The verified manifest of ``version``."""

    def fetch_blob(self, sha256: str, dest: Path) -> None:
        """Download and verify one file's content into ``dest`` (written only once verified)."""


def _parse_file(i: int, item: object) -> ReleaseFile:
    where = f"release manifest: files[{i}]"
    if not isinstance(item, dict) or set(item) != {"path", "sha256", "length", "kind"}:
        raise PeerError(f"{where}: needs exactly path, sha256, length and kind")
    try:
        path = check_path(item["path"])
    except ValueError as exc:
        raise PeerError(f"{where}.path: {exc}") from None
    try:
        sha = check_sha256(item["sha256"])
    except ValueError as exc:
        raise PeerError(f"{where}.sha256: {exc}") from None
    length = item["length"]
    if type(length) is not int or not 0 <= length <= MAX_FILE_BYTES:
        raise PeerError(f"{where}.length: not an integer in 0..{MAX_FILE_BYTES}")
    try:
        kind = kind_of(path)
    except ValueError as exc:
        raise PeerError(f"{where}.path: {exc}") from None
    if item["kind"] != kind:
        raise PeerError(f"{where}.kind: {item['kind']!r}, but {path} is a {kind}")
    return ReleaseFile(path, sha, length, kind)


def _check_tree(paths: list[str], error: type[Exception], prefix: str) -> None:
    """No path may be both a file and a folder of another (``a`` and ``a/b``)."""
    files = set(paths)
    for path in paths:
        parts = path.split("/")
        for n in range(1, len(parts)):
            folder = "/".join(parts[:n])
            if folder in files:
                raise error(f"{prefix}{folder} is a file and a folder of {path}")


def check_setpoints(value: object) -> dict[str, Any]:
    """``value`` if it is a flat map of setpoint name → scalar (number, text, bool), else
    ValueError. Floats must be finite."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("not a map of name to value")
    if len(value) > MAX_SETPOINTS:
        raise ValueError(f"more than {MAX_SETPOINTS} setpoints")
    for key, item in value.items():
        if not isinstance(key, str) or not key or len(key) > MAX_SETPOINT_TEXT:
            raise ValueError(f"name {str(key)[:60]!r}: names are text of 1-{MAX_SETPOINT_TEXT}")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{key}: not a finite number")
        if isinstance(item, str) and len(item) > MAX_SETPOINT_TEXT:
            raise ValueError(f"{key}: text longer than {MAX_SETPOINT_TEXT}")
        if not isinstance(item, bool | int | float | str):
            raise ValueError(f"{key}: {type(item).__name__} is not a number, text or bool")
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 1 << 63:
            raise ValueError(f"{key}: integer out of range")
    return dict(value)


def load_setpoints(path: Path) -> dict[str, Any]:
    """Setpoint defaults from ``setpoints.yaml``: a flat map of scalars, no aliases, at most
    `MAX_SETPOINTS_BYTES`. ConfigError naming the file otherwise."""
    try:
        size = path.stat().st_size
        if size > MAX_SETPOINTS_BYTES:
            raise ConfigError(f"{path}: more than {MAX_SETPOINTS_BYTES} bytes")
        text = path.read_text("utf-8")
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"{path}: YAML aliases are not allowed in setpoint defaults")
        value = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return check_setpoints(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc} (write 'name: value' lines)") from None


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Every regular file under ``root`` as (relative POSIX path, real path); symlinks are
    followed only when they stay inside ``root``."""
    real_root = root.resolve()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise ConfigError(f"{folder}: cannot list: {exc.strerror or exc}") from None
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if entry.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(real_root):
                    raise ConfigError(
                        f"{path}: symbolic link to {target}, outside the release folder "
                        "(copy the file in instead)"
                    )
            try:
                mode = path.stat().st_mode
            except OSError as exc:
                raise ConfigError(f"{path}: {exc.strerror or exc}") from None
            if stat.S_ISDIR(mode):
                stack.append(path)
            elif stat.S_ISREG(mode):
                yield rel, path
            else:
                raise ConfigError(f"{path}: not a regular file or folder")


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, length) of a file, read in pieces."""
    digest = hashlib.sha256()
    length = 0
    try:
        with path.open("rb") as f:
            while piece := f.read(_READ):
                digest.update(piece)
                length += len(piece)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return digest.hexdigest(), length


def build_manifest(directory: Path, version: str) -> Manifest:
    """The manifest of the release in ``directory``: same directory, same bytes.

    Raises `ConfigError` naming the file for a bad version, a symlink leaving the directory,
    a path or layout the format does not allow, too many files, or an empty release.
    """
    try:
        check_version(version)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a folder (give the release's folder)")
    files: list[ReleaseFile] = []
    setpoints: dict[str, Any] = {}
    for rel, path in _walk(directory):
        if rel == SETPOINTS_FILE:
            setpoints = load_setpoints(path)
            continue
        try:
            check_path(rel)
            kind = kind_of(rel)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if len(files) >= MAX_FILES:
            raise ConfigError(f"{directory}: more than {MAX_FILES} files in one release")
        sha, length = hash_file(path)
        if length > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: more than {MAX_FILE_BYTES} bytes")
        files.append(ReleaseFile(rel, sha, length, kind))
    if not files:
        raise ConfigError(
            f"{directory}: an empty release: put pipelines/*.yaml, plugins/*.whl, config/*, "
            "models/* or agent/edgewise-*.whl in it"
        )
    agents = [f.path for f in files if f.kind == "agent"]
    if len(agents) > 1:
        raise ConfigError(f"{directory}: more than one agent wheel: {', '.join(sorted(agents))}")
    files.sort(key=lambda f: f.path)
    _check_tree([f.path for f in files], ConfigError, f"{directory}: ")
    return Manifest(version, tuple(files), setpoints)
