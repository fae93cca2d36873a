"""Building releases for the updater's tests: release folders, wheels, a published folder.

`make_wheel` writes a minimal, valid wheel (WHEEL, METADATA, RECORD with hashes, optional
entry points) with the standard library only; `publish` (edgewise.edge.updater.source) lays a
release out for `DirectorySource`.
"""

from __future__ import annotations

import base64
import hashlib
import textwrap
import zipfile
from pathlib import Path


def pipeline_yaml(name: str = "line", *, high: float = 100.0, rate_hz: float = 50.0,
                  sensors: int = 20, extra_stage: str = "") -> str:
    """A simulated line (``sensors`` sensors at ``rate_hz``), threshold alarms above ``high``,
    alarms and readings to the outbox. ``extra_stage``: YAML of one more stage reading the
    sensors (its output is not used)."""
    stage = textwrap.indent(textwrap.dedent(extra_stage).strip("\n"), "    ") + "\n" \
        if extra_stage else ""
    return f"""apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: {name}
spec:
  sources:
    - id: sensors
      type: simulator
      profile: custom
      rate_hz: {rate_hz}
      groups:
        - {{prefix: "line1/temp", count: {sensors}}}
  stages:
    - id: alarms
      type: threshold
      inputs: [sensors]
      field: value
      high: {high}
{stage}  sinks:
    - id: alarms-out
      type: outbox
      inputs: [alarms]
      stream: alarms
      priority: alarm
"""


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(dest_dir: Path, dist: str, version: str, files: dict[str, str] | dict[str, bytes],
               entry_points: str | None = None) -> Path:
    """A pure-Python wheel ``dist-version-py3-none-any.whl`` holding ``files`` (path → text
    or bytes)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    info = f"{dist}-{version}.dist-info"
    contents: dict[str, bytes] = {p: t.encode() if isinstance(t, str) else t
                                  for p, t in files.items()}
    contents[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {dist}\n"
                                    f"Version: {version}\n").encode()
    contents[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: release_kit\n"
                                 b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    if entry_points:
        contents[f"{info}/entry_points.txt"] = entry_points.encode()
    record = [_record_line(n, d) for n, d in contents.items()] + [f"{info}/RECORD,,"]
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = dest_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in contents.items():
            info_ = zipfile.ZipInfo(n, date_time=(2026, 1, 1, 0, 0, 0))
            z.writestr(info_, d)
    return path


def agent_wheel(dest_dir: Path, version: str) -> Path:
    """An ``edgewise`` wheel of this source tree (every file of src/edgewise but caches): the
    agent itself, as a release carries it."""
    src = Path(__file__).resolve().parents[1] / "src"
    files = {p.relative_to(src).as_posix(): p.read_bytes()
             for p in sorted((src / "edgewise").rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts}
    return make_wheel(dest_dir, "edgewise", version, files)


def write_release(folder: Path, files: dict[str, str | bytes]) -> Path:
    """A release folder with ``files`` (relative path → content)."""
    for rel, content in files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder
