"""Staging releases into slots (edgewise.edge.updater.stage) against a `DirectorySource`:
only missing content is fetched, verification refuses bad content before it reaches a slot,
invalid pipelines are refused, a cut-short staging resumes, a damaged active slot is not run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from edgewise.edge.updater import machine
from edgewise.edge.updater.source import DirectorySource, publish
from edgewise.edge.updater.stage import StageFailed, stage, switch
from edgewise.edge.updater.store import Slots
from edgewise.edge.updater.updater import Updater, UpdaterConfig
from edgewise.errors import UpdateRefused
from release_kit import make_wheel, pipeline_yaml, write_release

MODEL = os.urandom(1 << 20)


def _files(version: str, high: float = 95.0) -> dict[str, str | bytes]:
    return {"pipelines/line.yaml": pipeline_yaml(f"line-{version}", high=high),
            "models/model.bin": MODEL, "config/site.json": '{"site": "x"}'}


def _apply(slots: Slots, source: DirectorySource, version: str) -> machine.SlotState:
    state, result = stage(slots, slots.load(), source.manifest(version), source)
    state = switch(slots, state, result.release, None)
    state = machine.commit(state)
    slots.save(state)
    return state


def test_a_release_changing_one_pipeline_fetches_only_that_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    whl = make_wheel(tmp_path / "w", "unitconv", "1.0", {"unitconv/__init__.py": "X = 1\n"})
    v1 = {**_files("1"), f"plugins/{whl.name}": whl.read_bytes()}
    v2 = {**v1, "pipelines/line.yaml": pipeline_yaml("line-2", high=97.0)}
    publish(write_release(tmp_path / "r1", v1), "1", repo)
    publish(write_release(tmp_path / "r2", v2), "2", repo)
    slots = Slots(tmp_path / "data")
    source = DirectorySource(repo)
    _apply(slots, source, "1")
    assert source.fetches == 4
    assert source.bytes_fetched == sum(len(v if isinstance(v, bytes) else v.encode())
                                       for v in v1.values())
    source = DirectorySource(repo)
    state = _apply(slots, source, "2")
    pipeline = v2["pipelines/line.yaml"]
    assert isinstance(pipeline, str)
    assert (source.fetches, source.bytes_fetched) == (1, len(pipeline.encode()))
    assert state.active == machine.Release("b", "2", source.manifest("2").digest())
    assert state.previous is not None and state.previous.slot == "a"
    # the model in b is the same file as in a (a hard link), and both slots are whole
    a_model, b_model = (slots.files(s) / "models/model.bin" for s in "ab")
    assert a_model.stat().st_ino == b_model.stat().st_ino
    assert slots.check("a", state.previous.digest) is None
    assert slots.check("b", state.active.digest) is None
    assert sorted(p.name for p in slots.site("b").iterdir()) == ["unitconv",
                                                                 "unitconv-1.0.dist-info"]


def test_content_that_fails_verification_never_reaches_a_slot(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(write_release(tmp_path / "r1", _files("1")), "1", repo)
    m2 = publish(write_release(tmp_path / "r2", _files("2", high=98.0)), "2", repo)
    slots = Slots(tmp_path / "data")
    _apply(slots, DirectorySource(repo), "1")
    bad = next(f for f in m2.files if f.path == "pipelines/line.yaml")
    blob = repo / "blobs" / bad.sha256
    blob.write_bytes(blob.read_bytes().replace(b"98.0", b"-1.0"))  # same length, other hash
    source = DirectorySource(repo)
    with pytest.raises(StageFailed) as err:
        stage(slots, slots.load(), source.manifest("2"), source)
    assert (err.value.phase, err.value.permanent) == ("download", True)
    assert "another hash" in err.value.reason
    assert not (slots.files("b") / "pipelines/line.yaml").exists()
    assert slots.read_manifest("b") is None  # not complete: never switched to
    assert list(slots.tmp.iterdir()) == []
    # endless data: more bytes than the manifest names are not read past the length
    blob.write_bytes(b"x" * (bad.length * 10))
    with pytest.raises(StageFailed):
        stage(slots, slots.load(), source.manifest("2"), source)
    assert source.bytes_fetched <= 2 * (bad.length + 1)
    state = slots.load()
    assert state.running_version == "1" and slots.check("a", state.active.digest) is None


def test_a_blob_not_in_any_manifest_is_refused(tmp_path: Path) -> None:
    source = DirectorySource(tmp_path)
    with pytest.raises(UpdateRefused):
        source.fetch_blob("0" * 64, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("files", "reason"), [
    ({"pipelines/line.yaml": "apiVersion: edgewise.io/v1\nkind: Pipeline\n"}, "spec"),
    ({"pipelines/a.yaml": pipeline_yaml("a"), "pipelines/b.yaml": pipeline_yaml("b")},
     "2 pipelines (pipelines/a.yaml, pipelines/b.yaml); this agent runs one pipeline per node"),
    ({"pipelines/line.yaml": pipeline_yaml("x").replace(
        "type: threshold", "type: python\n      class: \"nosuchmod:X\"")},
     "cannot import 'nosuchmod'"),
], ids=["invalid", "two pipelines", "missing plugin"])
def test_invalid_pipelines_are_refused_before_the_switch(tmp_path: Path, files: dict,
                                                         reason: str) -> None:
    repo = tmp_path / "repo"
    publish(write_release(tmp_path / "r", files), "9", repo)
    slots = Slots(tmp_path / "data")
    source = DirectorySource(repo)
    with pytest.raises(StageFailed) as err:
        stage(slots, slots.load(), source.manifest("9"), source)
    assert (err.value.phase, err.value.permanent) == ("validate", True)
    assert reason in err.value.reason
    assert slots.read_manifest("a") is None


def test_a_staging_cut_short_resumes_with_what_it_has(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(write_release(tmp_path / "r1", _files("1")), "1", repo)
    slots = Slots(tmp_path / "data")
    source = DirectorySource(repo)
    manifest = source.manifest("1")

    class Cut(Exception):
        pass

    def cut(phase: str) -> None:
        if phase == "install":
            raise Cut

    with pytest.raises(Cut):
        stage(slots, slots.load(), manifest, source, progress=cut)
    assert source.fetches == 3
    state = machine.on_start(slots.load(), max_attempts=3, count=True, now=0).state
    slots.save(state)
    again = DirectorySource(repo)
    state, result = stage(slots, state, again.manifest("1"), again)
    assert (again.fetches, result.fetched, result.reused) == (0, 0, 3)


def test_a_damaged_active_slot_is_not_run(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(write_release(tmp_path / "r1", _files("1")), "1", repo)
    publish(write_release(tmp_path / "r2", _files("2", high=97.0)), "2", repo)
    slots = Slots(tmp_path / "data")
    _apply(slots, DirectorySource(repo), "1")
    _apply(slots, DirectorySource(repo), "2")
    model = slots.files("b") / "models/model.bin"
    model.unlink()  # the hard link shared with slot a: a's copy stays whole
    model.write_bytes(MODEL[:-1] + b"\0")
    updater = Updater(tmp_path / "data", UpdaterConfig())
    updater.prepare()
    assert updater.state.running_version == "1"
    assert updater.state.last_failure is not None
    assert updater.state.last_failure.reason == "slot b: models/model.bin does not have its " \
        "sha256"
    assert machine.should_apply(updater.state, "2")  # staged again when assigned
    assert str(slots.site("a")) not in sys.path
