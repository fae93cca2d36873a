"""`edgewise.common.eventloop`: which loop a server process runs on, chosen by
EDGEWISE_EVENT_LOOP."""

from __future__ import annotations

import asyncio

import pytest

from edgewise.common import eventloop
from edgewise.errors import ConfigError


def test_asyncio_unless_told_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.loop_factory() == ("asyncio", None)
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    assert eventloop.loop_factory() == ("uvloop", uvloop.new_event_loop)
    monkeypatch.setenv(eventloop.ENV, " AsyncIO ")
    assert eventloop.loop_factory() == ("asyncio", None)


def test_run_runs_on_the_chosen_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def which() -> type:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop())

    monkeypatch.setenv(eventloop.ENV, "uvloop")
    assert eventloop.run(which()) is uvloop.Loop
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.run(which()) is not uvloop.Loop


def test_an_unknown_loop_is_an_error_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "trio")
    with pytest.raises(ConfigError, match=r"EDGEWISE_EVENT_LOOP='trio': use asyncio \(the "
                                          r"default\) or uvloop"):
        eventloop.loop_factory()
