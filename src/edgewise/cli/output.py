"""How every command that prints data prints it: ``--format table|wide|json|yaml`` (``--json``
is ``--format json``), and times for people in this machine's zone or, with ``--utc``, in UTC.

* ``table`` (the default): rich tables fitted to the terminal (long cells wrap, never cut).
* ``wide``: the same tables at their full width, whatever the terminal (for ``| less -S``,
  logs and wide screens); commands with more to say add columns.
* ``json``: one JSON document on stdout (what the API answered, or the command's summary).
* ``yaml``: the same document as YAML.

Progress and errors go to stderr in every format, so stdout stays machine-readable.
``-o`` is not used for the format: ``sim factory-line``, ``release build`` and ``plan`` have
long used it for where they write.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from rich.console import Console

FORMATS = ("table", "wide", "json", "yaml")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Output:
    """The output settings of one command run."""

    format: str = "table"
    utc: bool = False

    @property
    def data(self) -> bool:
        """True for json and yaml: print `emit`'s document, no tables."""
        return self.format in ("json", "yaml")

    def emit(self, doc: Any) -> None:
        """Print ``doc`` (JSON-able; datetimes become ISO strings) as JSON or YAML."""
        text = doc if isinstance(doc, str) else json.dumps(doc, default=str)
        if self.format == "yaml":
            import yaml

            click.echo(yaml.safe_dump(json.loads(text), sort_keys=False,
                                      allow_unicode=True), nl=False)
        else:
            click.echo(text)

    def console(self) -> Console:
        """A rich console on stdout: fitted to the terminal, or unbounded for ``wide``."""
        from rich.console import Console

        if self.format == "wide":
            return Console(soft_wrap=True, width=100_000)
        return Console(soft_wrap=True)

    def when(self, t: datetime | float | str | None) -> str:
        """A time for people: ``2026-12-06 10:01:18 UTC`` with ``--utc``, else in this
        machine's zone with its name (``2026-12-06 11:01:18 CET``); None as ``-``."""
        if t is None:
            return "-"
        if isinstance(t, str):  # not a time after all: shown as it is
            return t
        if isinstance(t, int | float):
            t = datetime.fromtimestamp(t, UTC)
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        if self.utc:
            return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return t.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


_CURRENT: ContextVar[Output | None] = ContextVar("edgewise_output", default=None)


def current() -> Output:
    """The output settings of the command running now (`using`); table, local times if
    none was set."""
    return _CURRENT.get() or Output()


@contextlib.contextmanager
def using(out: Output) -> Iterator[Output]:
    """Make ``out`` what `current` returns while the block runs (renders deep in a command,
    e.g. the operator commands' tables, read it instead of taking it as an argument)."""
    token = _CURRENT.set(out)
    try:
        yield out
    finally:
        _CURRENT.reset(token)


def output_options(times: bool = False, name: str = "out") -> Callable[[F], F]:
    """Add ``--format``, ``--json`` (and ``--utc`` when the command shows times) to a command;
    it receives them as one `Output` in the keyword argument ``name``."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, fmt: str | None, as_json: bool, utc: bool = False,
                    **kw: Any) -> Any:
            if as_json and fmt not in (None, "json"):
                raise click.UsageError(f"--json and --format {fmt}: give one of them")
            with using(Output("json" if as_json else fmt or "table", utc)) as out:
                return fn(*args, **{name: out}, **kw)

        if times:
            wrapper = click.option(
                "--utc", is_flag=True,
                help="Times in UTC (default: this machine's time zone).")(wrapper)
        wrapper = click.option("--json", "as_json", is_flag=True,
                               help="The same as --format json.")(wrapper)
        return click.option(  # type: ignore[no-any-return]
            "--format", "fmt", type=click.Choice(FORMATS), default=None,
            help="table (default), wide (not fitted to the terminal), json or yaml.")(wrapper)

    return decorate
