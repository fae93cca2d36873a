"""A file of the agent's data directory found damaged: empty, garbage, or cut short.

Every file the agent keeps is read through a check that turns "does not parse" into one line
naming the file and the fix (docs/agent.md, *Damaged files*):

* what only the operator can put right (the node key, its certificate, the CA, the control
  plane's URL, setpoints written on site) is a `DamagedFile`, a `ConfigError`: the agent does
  not start, and the CLI prints the one line and exits with code 2;
* what is safe to repair (the node id, which the certificate names; the desired state, which the
  control plane sends again; the uplink's ledger and refused list; ``status.json``, a view) is
  repaired where it is read, with one log line saying so.

`set_aside` keeps the bytes of a damaged file the agent replaces (``NAME.damaged``), for a look
afterwards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgewise.errors import ConfigError

log = logging.getLogger(__name__)

SUFFIX = ".damaged"


class DamagedFile(ConfigError):
    """A file of the data directory does not hold what the agent wrote there."""

    def __init__(self, path: Path, why: str, fix: str) -> None:
        self.path = path
        self.why = why
        self.fix = fix
        super().__init__(f"{self.what}: {fix}")

    @property
    def what(self) -> str:
        """``PATH is damaged (WHY)``: the first half of the line, for a repair's log line."""
        return f"{self.path} is damaged ({self.why})"


def reason(exc: BaseException | None, data: bytes | None = None) -> str:
    """Why a file did not parse, in a few words on one line (``empty`` for an empty file)."""
    if data is not None and not data.strip():
        return "empty"
    if exc is None:
        return "unreadable"
    if isinstance(exc, UnicodeDecodeError):
        return "not text"
    text = " ".join(str(exc).split())
    return text[:160] if text else type(exc).__name__


def set_aside(path: Path) -> Path | None:
    """Rename a damaged file to ``NAME.damaged`` (replacing an older one); None if it cannot
    be renamed (it is then left where it is and overwritten by the next write)."""
    target = path.with_name(path.name + SUFFIX)
    try:
        os.replace(path, target)
    except OSError as exc:
        log.debug("cannot move %s aside: %s", path, exc)
        return None
    return target
