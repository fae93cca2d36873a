"""`edgewise release ...`: build a release from a folder, publish it, list and show releases.

    edgewise release build DIR --version V [-o OUT]   manifest (and, with -o, a release folder
                                                      OUT: manifest.json + blobs/<sha256>)
    edgewise release publish OUT|DIR [--version V]    upload the files the control plane lacks,
                                                      then the manifest (signed there)
    edgewise release list
    edgewise release show V

``publish`` takes what ``build -o`` wrote (a folder with ``manifest.json``) or a release's
source folder (built on the spot; ``--version`` needed). The operator commands find the server
and token like `edgewise node` (``--config``, ``$EDGEWISE_CONFIG``, ``--data DIR``) and print
the API's JSON with ``--json``. docs/updates.md describes the release format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click

from edgewise.cli.common import escape, fail
from edgewise.cli.operator import _out, _when, api_command
from edgewise.cli.output import Output, output_options
from edgewise.common.files import write_atomic
from edgewise.errors import ConfigError, EdgewiseError, PeerError

MANIFEST_FILE = "manifest.json"
BLOBS = "blobs"


def _parse_time(value: Any) -> Any:
    """An ISO time from the API as a datetime (for `_when`); anything else as it is."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return value


@click.group()
def release() -> None:
    """Build, publish, list and show releases (pipelines, plugins, config, models, agent)."""


def _copy_blobs(source: Path, manifest: Any, out: Path) -> None:
    blobs = out / BLOBS
    blobs.mkdir(parents=True, exist_ok=True)
    for f in manifest.files:
        target = blobs / f.sha256
        if target.exists() and target.stat().st_size == f.length:
            continue
        tmp = blobs / f".{f.sha256}.tmp"
        shutil.copyfile(source / f.path, tmp)
        tmp.replace(target)


@release.command("build")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--version", "version", required=True, help="The release's version, e.g. 2026.12.1.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the release here: manifest.json and blobs/<sha256>.")
@output_options(name="output")
def build(directory: Path, version: str, out: Path | None, output: Output) -> None:
    """Make the manifest of the release in DIRECTORY (same folder, same bytes)."""
    from rich.table import Table

    from edgewise.sync.release import build_manifest, hash_file

    try:
        manifest = build_manifest(directory, version)
        if out is not None:
            if out.resolve() == directory.resolve() or out.resolve().is_relative_to(
                    directory.resolve()):
                raise ConfigError(f"-o {out}: write the release outside {directory}")
            out.mkdir(parents=True, exist_ok=True)
            _copy_blobs(directory, manifest, out)
            for f in manifest.files:  # the copies are what is published: check them
                if hash_file(out / BLOBS / f.sha256) != (f.sha256, f.length):
                    raise ConfigError(f"{f.path} changed while it was copied; build again")
            write_atomic(out / MANIFEST_FILE, manifest.to_bytes())
    except EdgewiseError as exc:
        fail(exc)
    summary = {"version": manifest.version, "digest": manifest.digest(),
               "files": len(manifest.files), "bytes": manifest.total_bytes(),
               "setpoints": len(manifest.setpoints),
               "out": str(out) if out is not None else None}
    if output.data:
        output.emit(summary)
        return
    t = Table(title=f"release {escape(version)} (manifest {manifest.digest()[:12]})")
    for c in ("path", "kind", "bytes", "sha256"):
        t.add_column(c)
    for f in manifest.files:
        t.add_row(escape(f.path), f.kind, f"{f.length:,}", f.sha256[:12])
    _out().print(t)
    if out is not None:
        click.echo(f"written to {out} ({MANIFEST_FILE} and {BLOBS}/)", err=True)


def _load(path: Path, version: str | None) -> tuple[Any, bytes, Path]:
    """(manifest, its bytes, the folder its files are in, by sha256 or by path)."""
    from edgewise.sync.release import Manifest, build_manifest

    if (path / MANIFEST_FILE).is_file():
        data = (path / MANIFEST_FILE).read_bytes()
        try:
            manifest = Manifest.from_bytes(data)
        except PeerError as exc:
            raise ConfigError(f"{path / MANIFEST_FILE}: {exc}; build it again") from None
        if version is not None and version != manifest.version:
            raise ConfigError(f"{path / MANIFEST_FILE} is release {manifest.version}, not "
                              f"--version {version}")
        return manifest, data, path / BLOBS
    if version is None:
        raise ConfigError(f"{path} has no {MANIFEST_FILE}: give what `edgewise release build "
                          "-o OUT` wrote, or the release's folder with --version V")
    manifest = build_manifest(path, version)
    return manifest, manifest.to_bytes(), path


@release.command("publish")
@click.argument("path", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--version", "version", default=None,
              help="The version, when PATH is a release's source folder.")
@api_command
def publish(client: Any, path: Path, version: str | None) -> Any:
    """Upload the files the control plane lacks, then publish (it signs the release)."""
    from edgewise.sync.release import hash_file

    manifest, data, files = _load(path, version)
    by_sha = {f.sha256: f for f in manifest.files}
    answer, missing = client.publish_release(data)
    uploaded = 0
    if missing:
        for sha in missing:
            f = by_sha.get(sha)
            if f is None:
                raise PeerError(f"the control plane asks for {sha}, not a file of this release")
            source = files / sha if (files / sha).is_file() else files / f.path
            if hash_file(source) != (f.sha256, f.length):
                raise ConfigError(f"{source}: its content is not what the manifest says "
                                  f"({f.path}); build the release again")
            client.upload_blob(sha, source, f.length)
            uploaded += 1
        answer, missing = client.publish_release(data)
        if missing:
            raise PeerError(f"the control plane still lacks {len(missing)} file(s) after the "
                            "upload; publish again")
    answer["uploaded"] = uploaded
    info = answer.get("release", {})

    def render() -> None:
        state = "published" if answer.get("new") else "was published already"
        click.echo(f"release {info.get('version')} {state}: {info.get('files')} file(s), "
                   f"{info.get('bytes'):,} bytes, {uploaded} uploaded now")

    return answer, render


@release.command("list")
@api_command
def list_(client: Any) -> Any:
    """The published releases, newest first."""
    from rich.table import Table

    answer = client.list_releases()

    def render() -> None:
        t = Table(title="releases")
        for c in ("version", "files", "bytes", "published", "by", "manifest"):
            t.add_column(c)
        for r in answer.get("releases", []):
            t.add_row(escape(str(r["version"])), str(r["files"]), f"{r['bytes']:,}",
                      _when(_parse_time(r["created"])), escape(str(r["created_by"])),
                      str(r["digest"])[:12])
        _out().print(t)

    return answer, render


@release.command("show")
@click.argument("version")
@api_command
def show(client: Any, version: str) -> Any:
    """One release: its files and setpoint defaults."""
    from rich.table import Table

    answer = client.show_release(version)

    def render() -> None:
        info, manifest = answer["release"], answer["manifest"]
        published = _when(_parse_time(info["created"]))
        t = Table(title=f"release {escape(str(info['version']))}, published {published} by "
                        f"{escape(str(info['created_by']))}")
        for c in ("path", "kind", "bytes", "sha256"):
            t.add_column(c)
        for f in manifest.get("files", []):
            t.add_row(escape(f["path"]), f["kind"], f"{f['length']:,}", f["sha256"][:12])
        _out().print(t)
        if manifest.get("setpoints"):
            click.echo("setpoint defaults: " + json.dumps(manifest["setpoints"],
                                                          sort_keys=True))

    return answer, render
