"""What a node says about itself, as a rollout needs it: `Seen`, read from what the node
already reports (nothing new is asked of the node).

* ``quarantine``: the reason, when an operator or a failed attestation quarantined the node
  (``node_health.quarantine``; docs/operations.md, *Health states*): a rollout skips it.
* ``online``: the node's status in the store (``online`` while it has a session; written by the
  sessions, about a second late).
* the release it runs, whether that is on trial, and its last failure: the node's updater puts
  them in the reported state's status line (``edge/updater/updater.py``, ``status_text``:
  ``release V``, ``release V on trial``, ``; release W failed (PHASE): REASON``). The line
  does not say whether the node will try again; a ``download`` or ``switch`` failure is most
  often the network or the disk (the node tries again), so `machine.classify` does not count
  it as a failure of the release: the node timeout decides.
* ``applied_version``: the desired version the node applied (reported state).
* counters (`spec.Sample`): ``readings_in``, ``alarms``, ``dead_lettered`` of its engine (they
  start again at 0 when the engine restarts, as it does when a release is switched in) and the
  outbox's ``<stream>.dropped`` (kept across restarts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from edgewise.cloud.rollouts.spec import Sample

_RUNNING = re.compile(r"(?:^|; )release (\S+?)( on trial)?(?=;|$)")
_FAILED = re.compile(r"(?:^|; )release (\S+) failed \(([^)]*)\): ([^;]*)")


@dataclass(frozen=True)
class Seen:
    online: bool = False
    applied_version: int = 0
    running: str | None = None
    on_trial: bool = False
    failed: str | None = None  # the version of the node's last failure
    failure: str = ""
    failure_phase: str = ""  # download, verify, install, validate, switch, gate, ...
    sample: Sample = field(default_factory=Sample)
    desired_version: int = 0  # the newest desired version stored for the node
    desired_release: str | None = None  # the release it assigns
    quarantine: str | None = None  # why it is quarantined; None: it is not


def seen(status: str | None, reported: dict[str, Any] | None, desired_version: int = 0,
         desired_release: str | None = None, quarantine: str | None = None) -> Seen:
    """From the node's status in the store and its reported state (wire form)."""
    text = str((reported or {}).get("status") or "")
    running = _RUNNING.search(text)
    failed = _FAILED.search(text)
    counters = (reported or {}).get("counters") or {}
    applied = (reported or {}).get("applied_version")
    return Seen(
        online=status == "online",
        applied_version=applied if isinstance(applied, int) else 0,
        running=running.group(1) if running else None,
        on_trial=bool(running and running.group(2)),
        failed=failed.group(1) if failed else None,
        failure=f"{failed.group(2)}: {failed.group(3)}".strip() if failed else "",
        failure_phase=failed.group(2) if failed else "",
        sample=Sample.from_counters(counters if isinstance(counters, dict) else {}),
        desired_version=desired_version, desired_release=desired_release,
        quarantine=quarantine)
