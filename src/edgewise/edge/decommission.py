"""A decommissioned node: wiping its data directory, and refusing to start again.

The control plane decommissions a node with `edgewise node decommission ID [--wipe]`; the node
hears it as `Revoked` with ``decommissioned`` set, either on its live session (a ``revoked``
frame) or on its next request (a 403 with ``Edgewise-Decommissioned``). The agent then stops
everything it runs and calls `finish`:

* it writes ``DATA/decommissioned.json`` first (the **marker**: node id, when, the reason, whether
  to wipe), so a power cut in the middle leaves a node that still knows what it was told;
* with ``wipe``, it deletes what belonged to the node (`WIPED`): ``identity/`` (key,
  certificate, CA, node id, control plane), ``engine/`` (the outbox with its write-ahead log,
  quarantined copies and checkpoint), ``twin/``, ``uplink/``, ``releases/`` (release slots, if
  there are any), ``pipelines/`` and ``status.json``. The key file is overwritten with zeros
  and synced before it is unlinked (best effort: flash storage and journaling file systems may
  keep old blocks; docs/security.md);
* it returns `NodeDecommissioned`, which the CLI turns into exit code 4.

At start (`check_start`) a marker stops the agent with that error again (one line: which node,
when, and that it needs a new enrolment token) after finishing a wipe a power cut interrupted,
so a supervisor that restarts it anyway gets the same answer, not a crash loop of
reconnections. Given ``--token``, the agent starts over as a new node: the marker goes, and so
does the old identity (its key is revoked for good, it could never connect again).

Only files named in `WIPED` are deleted; anything else found in the data directory is left
and named in the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from edgewise.common.files import write_atomic
from edgewise.errors import NodeDecommissioned, StorageError

log = logging.getLogger(__name__)

MARKER = "decommissioned.json"
WIPED = ("identity", "engine", "twin", "uplink", "releases", "pipelines", "status.json",
         "status.json.damaged")
MAX_MARKER_BYTES = 64 * 1024


def marker_path(data_dir: Path) -> Path:
    return Path(data_dir) / MARKER


def read_marker(data_dir: Path) -> dict[str, Any] | None:
    """The marker's content; None if there is none. A damaged marker still counts as one
    (``{}``): the node was told, even if what it wrote was cut short."""
    path = marker_path(data_dir)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MARKER_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        value = json.loads(data) if len(data) <= MAX_MARKER_BYTES else None
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {}


def _write_marker(data_dir: Path, content: dict[str, Any]) -> None:
    write_atomic(marker_path(data_dir), json.dumps(content, indent=1).encode(), mode=0o600)


def _zero(path: Path) -> None:
    """Overwrite a file with zeros and sync it (best effort), before it is unlinked."""
    with contextlib.suppress(OSError), open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())


def wipe(data_dir: Path) -> list[str]:
    """Delete every entry of `WIPED` in ``data_dir``; the names removed. Raises
    `StorageError` when one cannot be removed (the marker stays, the next start tries again)."""
    data_dir = Path(data_dir)
    key = data_dir / "identity" / "node.key"
    if key.is_file():
        _zero(key)
    removed: list[str] = []
    for name in WIPED:
        path = data_dir / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
        except OSError as exc:
            raise StorageError(f"cannot delete {path} while wiping the decommissioned node: "
                               f"{exc.strerror or exc}") from exc
        removed.append(name)
    with contextlib.suppress(OSError):
        fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return removed


def _message(content: dict[str, Any], data_dir: Path) -> str:
    node = content.get("node_id") or "(unknown)"
    when = content.get("heard_at")
    at = (time.strftime(" at %Y-%m-%d %H:%M:%SZ", time.gmtime(when))
          if isinstance(when, int | float) else "")
    wiped = ("its keys and data were wiped" if content.get("wiped")
             else "its keys and data are kept (revoked)")
    return (f"node {node} was decommissioned by the control plane{at}; {wiped}. It needs a new "
            f"enrolment token to run again: edgewise agent run --data {data_dir} --cloud "
            f"https://HOST:PORT --ca CA.pem --token NEW (see {marker_path(data_dir)})")


def describe(data_dir: Path) -> str | None:
    """One line for ``agent status`` if this data directory belongs to a decommissioned node."""
    content = read_marker(data_dir)
    return None if content is None else _message(content, Path(data_dir))


def finish(data_dir: Path, node_id: str | None, reason: str, wipe_data: bool
           ) -> NodeDecommissioned:
    """The agent heard it was decommissioned and has stopped everything: write the marker,
    wipe if told to, log it; the error to stop with."""
    data_dir = Path(data_dir)
    content: dict[str, Any] = {"node_id": node_id, "heard_at": time.time(), "reason": reason,
                               "wipe": wipe_data, "wiped": False}
    _write_marker(data_dir, content)
    if wipe_data:
        content["removed"] = wipe(data_dir)
        content["wiped"] = True
        _write_marker(data_dir, content)
    left = sorted(p.name for p in data_dir.iterdir() if p.name != MARKER)
    log.error("DECOMMISSIONED: the control plane decommissioned node %s (%s); %s; the agent "
              "exits and will not start again without a new enrolment token%s", node_id, reason,
              f"wiped {', '.join(content['removed']) or 'nothing (already empty)'}"
              if wipe_data else "its files are kept", f"; left in place: {', '.join(left)}"
              if wipe_data and left else "")
    return NodeDecommissioned(_message(content, data_dir))


def check_start(data_dir: Path, token_given: bool) -> None:
    """At start: raise `NodeDecommissioned` if this data directory belongs to a decommissioned
    node (finishing a wipe a power cut interrupted); with a new token, clear it and start over
    as a new node."""
    data_dir = Path(data_dir)
    content = read_marker(data_dir)
    if content is None:
        return
    if content.get("wipe", True) and not content.get("wiped"):
        content["removed"] = wipe(data_dir)  # a damaged marker wipes too: it was told to
        content["wiped"] = True
        _write_marker(data_dir, content)
    if not token_given:
        raise NodeDecommissioned(_message(content, data_dir))
    identity = data_dir / "identity"
    if identity.exists():
        shutil.rmtree(identity, ignore_errors=True)
    marker_path(data_dir).unlink(missing_ok=True)
    log.warning("this data directory belonged to decommissioned node %s; enrolling as a new "
                "node with the --token given", content.get("node_id") or "(unknown)")
