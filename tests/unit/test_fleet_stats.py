"""The fleet simulator's pure parts: percentiles, --link parsing, recorder merge, profile
summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.errors import ConfigError
from edgewise.testbed.fleet.profile import summarize
from edgewise.testbed.fleet.run import parse_link
from edgewise.testbed.fleet.stats import NodeResult, Recorder, percentile


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0, 99.0, 100.0)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


@pytest.mark.parametrize(("text", "want"), [
    (None, (0.0, 0.0)),
    ("latency=50ms", (0.05, 0.0)),
    ("latency=0.2s,loss=0.01", (0.2, 0.01)),
    ("loss=2%", (0.0, 0.02)),
])
def test_parse_link(text: str | None, want: tuple[float, float]) -> None:
    assert parse_link(text) == pytest.approx(want)


@pytest.mark.parametrize(("text", "error"), [
    ("jitter=5ms", "unknown setting 'jitter'"),
    ("latency=fast", "'latency=fast' is not a number"),
    ("loss=1", "loss 0 to below 1"),
])
def test_parse_link_refuses(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_link(text)


def test_recorders_cross_processes_and_merge() -> None:
    a, b = Recorder(), Recorder()
    a.sample("ack_ms", 10.0)
    a.count("reconnects", 2)
    a.failure("no welcome")
    a.enrolled(100.0)
    a.nodes = [NodeResult(0, "node-a", 10, 10, 5, [(5, 5)], True, 3, None)]
    b.sample("ack_ms", 30.0)
    b.count("reconnects", 1)
    b.failure("no welcome")
    b.enrolled(90.0)
    b.enrolled(120.0)
    total = Recorder()
    for r in (a, b):
        total.merge(Recorder.from_wire(r.to_wire()))
    assert list(total.samples["ack_ms"]) == [10.0, 30.0]
    assert (total.counts["reconnects"], total.failures["no welcome"]) == (3, 2)
    assert (total.first_enrol_at, total.last_enrol_at) == (90.0, 120.0)
    assert total.nodes == a.nodes


def test_profile_summary_counts_self_and_inclusive(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        "main (x/cli/cloud.py:1);commit (edgewise/cloud/ingest.py:5);execute (engine/base.py:9) 6\n"
        "main (x/cli/cloud.py:1);read (edgewise/cloud/session.py:7) 4\n")
    total, by_self, by_incl = summarize(raw)
    assert total == 10
    assert by_self == [("execute (engine/base.py)", 60.0), ("read (cloud/session.py)", 40.0)]
    assert by_incl == [("commit (cloud/ingest.py)", 60.0), ("execute (engine/base.py)", 60.0),
                       ("read (cloud/session.py)", 40.0)]
