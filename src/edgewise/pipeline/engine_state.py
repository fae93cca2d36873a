"""The engine's checkpoint entry: operator state and source positions, each kept under a digest
of its component's config, packed into one value of the outbox checkpoint (`CHECKPOINT_KEY`).

The committer takes a `snapshot` at the instant it cuts a group commit (no commit is cut while a
batch is being routed); `restore` hands it back to the stages and sources at the start of a run,
skipping any whose config changed since (it starts fresh, with a warning).

The source positions of each commit also go to the outbox's note (`positions_note`): an outbox
file that lost its latest commits (its write-ahead log deleted, or a power loss with ``sync:
normal``), or a new file in place of the note's (moved away, deleted, damaged), hands them back
(`Outbox.take_rewound`), and the run continues its sources from there with fresh operator
state (`restore_positions`) instead of producing the lost commits' records again under new
sequence numbers, where the cloud may already hold them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from edgewise.outbox import Outbox
from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline.component import Operator, Source
from edgewise.pipeline.spec import PipelineSpec

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "engine"

Digests = dict[str, str]


def digests(spec: PipelineSpec) -> tuple[Digests, Digests]:
    """(per stage, per source) fingerprints of the configs their saved state belongs to."""
    return (
        {c.id: ckpt.config_digest(c.config) for c in spec.stages},
        {c.id: ckpt.config_digest(c.config) + c.entry.type for c in spec.sources},
    )


def snapshot(stages: Mapping[str, Operator], stage_digest: Digests, source_digest: Digests,
             positions: Mapping[str, Any]) -> dict[str, bytes]:
    state = {
        "operators": {
            sid: {"digest": stage_digest[sid], "state": op.snapshot()}
            for sid, op in stages.items()
        },
        "positions": {
            sid: {"digest": source_digest.get(sid), "position": pos}
            for sid, pos in positions.items()
        },
    }
    return {CHECKPOINT_KEY: ckpt.pack(state)}


def resume(outbox: Outbox, stages: Mapping[str, Operator], sources: Mapping[str, Source],
           stage_digest: Digests, source_digest: Digests) -> dict[str, Any]:
    """Restore the run's state from the outbox (`restore`), or, if the file lost its latest
    commits or replaced the note's file and the note kept positions, only the positions
    (`restore_positions`)."""
    rewound = outbox.take_rewound()
    if rewound is None:
        return restore(outbox.load_checkpoint().get(CHECKPOINT_KEY), stages, sources,
                       stage_digest, source_digest)
    given = restore_positions(rewound, sources, source_digest)
    log.warning("the outbox lost its latest commits (or is a new file in place of the one its "
                "note is of); the sources continue from the positions of the last commit made "
                "(%s) and operator state starts fresh, so nothing is produced twice (what "
                "those commits held is reported as lost where the cloud does not hold it)",
                ", ".join(sorted(given)) or "none kept")
    return given


def positions_note(source_digest: Digests, positions: Mapping[str, Any]) -> bytes:
    """The source positions alone, packed as in the checkpoint (for the outbox's note)."""
    return ckpt.pack({"positions": {
        sid: {"digest": source_digest.get(sid), "position": pos}
        for sid, pos in positions.items()
    }})


def restore_positions(note: bytes, sources: Mapping[str, Source],
                      source_digest: Digests) -> dict[str, Any]:
    """Give sources the positions of a `positions_note` (operators keep their fresh state);
    returns the positions given. A note that cannot be read gives none."""
    try:
        state = ckpt.unpack(note)
        entries = state.get("positions", {}) if isinstance(state, dict) else {}
    except (ValueError, TypeError, AttributeError):
        entries = {}
    return _positions(entries if isinstance(entries, dict) else {}, sources, source_digest)


def restore(saved: bytes | None, stages: Mapping[str, Operator], sources: Mapping[str, Source],
            stage_digest: Digests, source_digest: Digests) -> dict[str, Any]:
    """Give stages their state and sources their position; returns the positions given."""
    if saved is None:
        return {}
    state = ckpt.unpack(saved)
    for sid, entry in state.get("operators", {}).items():
        op = stages.get(sid)
        if op is None:
            continue
        if entry.get("digest") != stage_digest[sid]:
            log.warning("stage %s changed since the last run; starting it fresh", sid)
            continue
        op.restore(entry.get("state"))
    return _positions(state.get("positions", {}), sources, source_digest)


def _positions(entries: dict[str, Any], sources: Mapping[str, Source],
               source_digest: Digests) -> dict[str, Any]:
    positions: dict[str, Any] = {}
    for sid, entry in entries.items():
        src = sources.get(sid)
        if src is None or not isinstance(entry, dict) or entry.get("position") is None:
            continue
        if entry.get("digest") != source_digest[sid]:
            log.warning("source %s changed since the last run; starting it afresh", sid)
            continue
        src.restore(entry["position"])
        positions[sid] = entry["position"]
    return positions
