"""Writing a release into the inactive slot: download, verify, install, validate, switch.

`stage` runs the steps in order, each one durable before the next, and never touches the
active slot (it only reads it, to reuse files by hash):

1. ``state.json`` says the inactive slot is being staged (a committed previous release in it
   is given up from here on);
2. the slot's ``manifest.json`` (its "complete" mark), ``site/`` and ``agent/`` go;
3. every file of the manifest: kept if the slot already has it with the right hash (a staging
   cut short resumes), else a hard link to the same content in the active slot (or a copy
   where links are not possible), else fetched from the source into ``tmp/`` (the source
   writes it only once verified), checked again (length, sha256), fsynced and renamed in;
4. plugin wheels installed offline into ``site/``, the agent wheel into ``agent/`` (pypa's
   ``installer``, no network, no dependencies: the wheel's dependencies must be those of the
   installed agent), each into a temp folder fsynced and renamed;
5. every pipeline of the release validated by the project's own spec parser with the slot's
   plugins importable (in a child process when the slot has plugins, so the agent never
   imports a release it has not switched to) and its files confined to the slot;
6. ``manifest.json`` written (fsynced): the slot is complete.

`switch` is then one atomic write of ``state.json``. Failures raise `StageFailed` with the
phase and whether trying again could help (the network) or not (a wrong file or pipeline).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgewise.common.files import fsync_dir, write_atomic
from edgewise.edge.updater import machine
from edgewise.edge.updater.store import Slots, sync_tree
from edgewise.errors import ConfigError, EdgewiseError, PeerError, StorageError, TransportError
from edgewise.pipeline.spec import PipelineSpec
from edgewise.sync.release import Manifest, ReleaseSource, hash_file

MAX_PIPELINES = 1  # the agent runs one pipeline per node (docs/agent.md)
VALIDATE_TIMEOUT_S = 120.0

Progress = Callable[[str], None]
"""Called at each step (prepare, file, verify, install, validate, complete); what it raises
ends the staging there, as a power loss would (the next staging resumes)."""


class StageFailed(EdgewiseError):
    """A release could not be staged; ``permanent`` when trying again cannot help."""

    def __init__(self, phase: str, reason: str, *, permanent: bool) -> None:
        self.phase = phase
        self.reason = reason
        self.permanent = permanent
        super().__init__(f"{phase}: {reason}")


@dataclass(frozen=True)
class StageResult:
    release: machine.Release
    fetched: int  # blobs downloaded
    reused: int  # files linked or copied from the active slot, or kept in the slot


@dataclass(frozen=True)
class Validation:
    """How the pipelines of a slot are checked: relative paths from the slot's files, files
    allowed there and in ``allowed`` (``DATA/pipelines`` and ``--allow-path``)."""

    allowed: tuple[Path, ...] = ()


def stage(slots: Slots, state: machine.SlotState, manifest: Manifest, source: ReleaseSource,
          validation: Validation = Validation(), progress: Progress = lambda _p: None,
          ) -> tuple[machine.SlotState, StageResult]:
    """Write ``manifest``'s release into the inactive slot (module docstring). Returns the
    state to `switch` from (persisted: ``staging`` set) and what was done. Raises `StageFailed`;
    `StorageError` when the disk refuses."""
    state = machine.begin_staging(state, manifest.version)
    slots.save(state)
    name = state.staging
    if name is None:  # begin_staging sets it
        raise machine.TransitionError("no staging slot")
    progress("prepare")
    slot, files = slots.slot(name), slots.files(name)
    slots.manifest_path(name).unlink(missing_ok=True)
    if slot.exists():
        fsync_dir(slot)
    slots.clear(slots.site(name))
    slots.clear(slots.agent(name))
    slots.clear(slots.tmp)
    try:
        files.mkdir(parents=True, exist_ok=True)
        slots.tmp.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {files}: {exc.strerror or exc}") from exc
    _remove_strays(files, {f.path for f in manifest.files})
    have = _content_index(slots, state)
    fetched = reused = 0
    progress("download")
    for f in manifest.files:
        progress("file")  # between files: the caller may stop here (it raises)
        dest = files / f.path
        if _holds(dest, f.sha256, f.length):
            reused += 1
            have.setdefault(f.sha256, dest)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = slots.tmp / f.sha256
        src = have.get(f.sha256)
        if src is not None and _link_or_copy(src, tmp) and _holds(tmp, f.sha256, f.length):
            reused += 1
        else:
            tmp.unlink(missing_ok=True)
            try:
                source.fetch_blob(f.sha256, tmp)
            except PeerError as exc:
                raise StageFailed("download", f"{f.path}: {exc}", permanent=True) from None
            except (TransportError, OSError) as exc:
                raise StageFailed("download", f"{f.path}: {exc}", permanent=False) from None
            fetched += 1
            progress("verify")
            if not _holds(tmp, f.sha256, f.length):
                tmp.unlink(missing_ok=True)
                raise StageFailed("verify", f"{f.path}: the downloaded content does not have "
                                  "the manifest's length and sha256", permanent=True)
        _fsync_file(tmp)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        have[f.sha256] = dest
    progress("install")
    _install(slots, name, manifest)
    progress("validate")
    _validate(slots, name, manifest, validation)
    progress("complete")
    write_atomic(slots.manifest_path(name), manifest.to_bytes(), mode=0o444)
    release = machine.Release(name, manifest.version, manifest.digest())
    return state, StageResult(release, fetched, reused)


def switch(slots: Slots, state: machine.SlotState, release: machine.Release,
           alarm_rate: float | None) -> machine.SlotState:
    """The atomic switch: one durable write of ``state.json``. The slot must be complete."""
    problem = slots.check(release.slot, release.digest, hashes=False)
    if problem:
        raise StageFailed("switch", problem, permanent=False)
    new = machine.switch(state, release, alarm_rate)
    slots.save(new)
    return new


def refuse(slots: Slots, state: machine.SlotState, version: str, exc: StageFailed,
           now: float | None = None) -> machine.SlotState:
    """Record a staging that failed (nothing changes for what runs)."""
    new = machine.refuse(state, version, exc.phase, exc.reason,
                         time.time() if now is None else now, permanent=exc.permanent)
    slots.save(new)
    return new


# -- steps ---------------------------------------------------------------------------------------


def _content_index(slots: Slots, state: machine.SlotState) -> dict[str, Path]:
    """sha256 -> a file with that content in the active slot (to link instead of fetching)."""
    out: dict[str, Path] = {}
    if state.active is None:
        return out
    manifest = slots.read_manifest(state.active.slot)
    if manifest is None:
        return out
    base = slots.files(state.active.slot)
    for f in manifest.files:
        out.setdefault(f.sha256, base / f.path)
    return out


def _holds(path: Path, sha256: str, length: int) -> bool:
    try:
        if path.stat().st_size != length:
            return False
        return hash_file(path)[0] == sha256
    except (OSError, ConfigError):
        return False


def _link_or_copy(src: Path, dest: Path) -> bool:
    try:
        os.link(src, dest)
        return True
    except OSError:
        pass
    try:
        with src.open("rb") as fin, dest.open("wb") as fout:
            while piece := fin.read(1 << 20):
                fout.write(piece)
        return True
    except OSError:
        dest.unlink(missing_ok=True)
        return False


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_strays(files: Path, keep: set[str]) -> None:
    """Files of an earlier content of the slot that this release does not have."""
    for folder, _dirs, names in os.walk(files):
        for n in names:
            path = Path(folder) / n
            if path.relative_to(files).as_posix() not in keep:
                path.unlink(missing_ok=True)


def _install(slots: Slots, name: str, manifest: Manifest) -> None:
    """Plugin wheels into ``site/``, the agent wheel into ``agent/``, offline."""
    for kind, target in (("plugin", slots.site(name)), ("agent", slots.agent(name))):
        wheels = manifest.by_kind(kind)
        if not wheels:
            continue
        tmp = target.with_name(f".{target.name}.tmp")
        slots.clear(tmp)
        for f in wheels:
            try:
                install_wheel(slots.files(name) / f.path, tmp)
            except Exception as exc:  # a broken wheel of any kind: the release's fault
                raise StageFailed("install", f"{f.path}: {type(exc).__name__}: {exc}",
                                  permanent=True) from None
        sync_tree(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)


def install_wheel(wheel: Path, target: Path) -> None:
    """Unpack ``wheel`` into ``target`` as ``pip install --target`` would, without pip or a
    network (pypa ``installer``): code and ``.dist-info`` (entry points) in ``target``,
    scripts in ``target/bin``."""
    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile

    t = str(target)
    scheme = {"purelib": t, "platlib": t, "headers": f"{t}/include", "scripts": f"{t}/bin",
              "data": f"{t}/data"}
    destination = SchemeDictionaryDestination(scheme, interpreter=sys.executable,
                                              script_kind="posix")
    with WheelFile.open(wheel) as source:
        install(source, destination, additional_metadata={})


def _validate(slots: Slots, name: str, manifest: Manifest, validation: Validation) -> None:
    pipelines = manifest.pipelines()
    if len(pipelines) > MAX_PIPELINES:
        names = ", ".join(f.path for f in pipelines)
        raise StageFailed("validate", f"{len(pipelines)} pipelines ({names}); this agent runs "
                          "one pipeline per node", permanent=True)
    if not pipelines:
        return
    files = slots.files(name)
    argv = [str(files / f.path) for f in pipelines]
    from edgewise.edge.updater.check import check_pipelines, needs_user_code

    paths = [Path(a) for a in argv]
    if slots.site(name).is_dir() and needs_user_code(paths, files, validation.allowed):
        # the release's own code: import it in a child, never in the running agent
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(slots.site(name)), env.get("PYTHONPATH", "")) if p)
        allowed = [a for p in validation.allowed for a in ("--allow", str(p))]
        try:
            done = subprocess.run(
                [sys.executable, "-m", "edgewise.edge.updater.check", "--base", str(files),
                 *allowed, *argv], env=env, capture_output=True, text=True,
                timeout=VALIDATE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise StageFailed("validate", f"validating the pipelines took more than "
                              f"{VALIDATE_TIMEOUT_S:.0f} s", permanent=True) from None
        if done.returncode != 0:
            why = (done.stderr.strip() or done.stdout.strip())[-2000:]
            raise StageFailed("validate", why or f"exit code {done.returncode}",
                              permanent=True)
        return
    problem = check_pipelines(paths, files, validation.allowed)
    if problem:
        raise StageFailed("validate", problem, permanent=True)


def parse_slot_pipeline(slots: Slots, name: str, manifest: Manifest,
                        allowed: Sequence[Path] = ()) -> PipelineSpec | None:
    """The pipeline of the release in slot ``name`` (None if it has none), parsed to run."""
    from edgewise.edge.updater.check import parse_one

    pipelines = manifest.pipelines()
    if not pipelines:
        return None
    files = slots.files(name)
    return parse_one(files / pipelines[0].path, files, tuple(allowed))
