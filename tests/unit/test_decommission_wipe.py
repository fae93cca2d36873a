"""The node's side of a decommission, without processes: the order on the wire (frame field,
403 header), the wipe, the marker and the refusal to start (`edgewise.edge.decommission`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgewise.cli.common import EXIT_DECOMMISSIONED, exit_code
from edgewise.edge import decommission as dc
from edgewise.edge.device_http import CloudRefusal
from edgewise.edge.identity import Revoked
from edgewise.errors import NodeDecommissioned, PeerError
from edgewise.sync import protocol


@pytest.mark.parametrize(("header", "order"), [
    (None, (False, False)), ("wipe", (True, True)), ("keep", (True, False)),
    (" WIPE ", (True, True)), ("yes", (False, False)), ("", (False, False)),
    ("wipe, keep", (False, False)),
])
def test_header_order(header: str | None, order: tuple[bool, bool]) -> None:
    assert protocol.decommission_order(header) == order


def test_revoked_frame_fields() -> None:
    plain = protocol.decode(protocol.encode({"t": "revoked", "reason": "r"}))
    assert "wipe" not in plain
    told = protocol.decode(protocol.encode({"t": "revoked", "reason": "r",
                                            "decommissioned": True, "wipe": True}))
    assert (told["decommissioned"], told["wipe"]) == (True, True)
    for bad in ({"wipe": 1}, {"wipe": "true"}, {"decommissioned": None}):
        with pytest.raises(PeerError, match="must be bool"):
            protocol.decode(protocol.encode({"t": "revoked", "reason": "r", **bad}))


def test_refusals_carry_the_order_only_on_403() -> None:
    r = Revoked.of(CloudRefusal("GET", "/x", 403, "gone", (True, True)))
    assert (r.decommissioned, r.wipe) == (True, True) and "decommissioned" in str(r)
    r = Revoked.of(CloudRefusal("GET", "/x", 403, "revoked"))
    assert (r.decommissioned, r.wipe) == (False, False) and "revoked by" in str(r)
    assert CloudRefusal("GET", "/x", 401, "no", (True, True)).wipe is False
    assert Revoked("r", decommissioned=False, wipe=True).wipe is False  # no wipe without it


def node_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    for sub in ("identity", "engine", "twin", "uplink", "releases/a", "pipelines"):
        (d / sub).mkdir(parents=True)
    for f in ("identity/node.key", "identity/node.pem", "identity/node_id", "identity/ca.pem",
              "identity/cloud.json", "engine/outbox.db", "engine/outbox.db-wal",
              "engine/outbox.db.damaged-20261206T000000Z", "twin/desired.msgpack",
              "uplink/ledger.msgpack", "releases/a/manifest.json", "pipelines/out.csv",
              "status.json", "notes.txt"):
        (d / f).write_text("x")
    return d


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_finish_with_wipe_leaves_only_the_marker_and_what_is_not_ours(tmp_path: Path) -> None:
    d = node_dir(tmp_path)
    err = dc.finish(d, "node-1", "decommissioned, wipe: e2e", True)
    assert isinstance(err, NodeDecommissioned) and exit_code(err) == EXIT_DECOMMISSIONED == 4
    assert names(d) == [dc.MARKER, "notes.txt"]  # a file the agent did not make stays
    marker = json.loads((d / dc.MARKER).read_text())
    assert (marker["node_id"], marker["wipe"], marker["wiped"]) == ("node-1", True, True)
    assert marker["removed"] == ["identity", "engine", "twin", "uplink", "releases",
                                 "pipelines", "status.json"]
    assert "node node-1 was decommissioned" in str(err) and "\n" not in str(err)
    assert (d / dc.MARKER).stat().st_mode & 0o777 == 0o600


def test_finish_without_wipe_keeps_everything(tmp_path: Path) -> None:
    d = node_dir(tmp_path)
    before = names(d)
    err = dc.finish(d, "node-2", "decommissioned", False)
    assert names(d) == sorted([*before, dc.MARKER])
    assert "its keys and data are kept" in str(err)


def test_start_refused_and_an_interrupted_wipe_finished(tmp_path: Path) -> None:
    d = node_dir(tmp_path)
    dc.check_start(d, token_given=False)  # no marker: nothing happens
    # a power cut right after the marker was written, before the wipe
    (d / dc.MARKER).write_text(json.dumps({"node_id": "node-3", "wipe": True, "wiped": False}))
    with pytest.raises(NodeDecommissioned, match=r"node node-3 was decommissioned.*wiped"):
        dc.check_start(d, token_given=False)
    assert names(d) == [dc.MARKER, "notes.txt"]
    with pytest.raises(NodeDecommissioned):  # and again, for every restart
        dc.check_start(d, token_given=False)


def test_damaged_marker_counts_and_wipes(tmp_path: Path) -> None:
    d = node_dir(tmp_path)
    (d / dc.MARKER).write_bytes(b"{\"node_id\": \"no")
    with pytest.raises(NodeDecommissioned, match=r"node \(unknown\) was decommissioned"):
        dc.check_start(d, token_given=False)
    assert names(d) == [dc.MARKER, "notes.txt"]


def test_a_new_token_starts_over(tmp_path: Path) -> None:
    d = node_dir(tmp_path)
    dc.finish(d, "node-4", "decommissioned", False)  # kept: the old key is still there
    dc.check_start(d, token_given=True)
    # the marker and the revoked identity go; the rest is for the new node to use or not
    assert "identity" not in names(d) and dc.MARKER not in names(d)
    assert "engine" in names(d)
    dc.check_start(d, token_given=False)  # nothing to refuse any more
