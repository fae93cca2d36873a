"""What every command shares: the one mapping from errors to exit codes, and output helpers.

Exit codes of errors (the only place they are decided; besides these, `agent run` exits 75,
`EXIT_RESTART`, to be started again on another release slot, and `agent launch` and `demo`
end with the code of what they ran):

    0  success
    1  the run failed: `PeerError`, `TransportError`, `StorageError`, any other `EdgewiseError`
    2  the user's input is wrong: `ConfigError` (and `SpecError`, with file, line, field, fix)
    3  a plan does not meet its workload's constraints (`ConstraintsUnmet`, ``plan --strict``)
    4  this node has been decommissioned (`NodeDecommissioned`): the agent stopped, and starts
       again only with a new enrolment token; a supervisor must not restart it
       (systemd: ``RestartPreventExitStatus=4``)

Errors are printed as one ``error: ...`` line on stderr, so ``--json`` output on stdout stays
machine-readable. The HTTP side of the same mapping is `edgewise.cloud.http_errors`.

Start-up: a command pays only for what it uses (docs/benchmarks.md, "CLI start-up").
`LazyGroup` imports a subcommand's module when that subcommand is looked up (``--help``
of a group lists its own commands only), and rich is imported on first output. When `Cli`
reads the command line of its process (``main()``, as the ``edgewise`` script does), the
process's start-up settings apply (`edgewise.cli.startup`).

`Cli`, the class of the root command group, is the net under every command: an `OSError` a
command did not turn into an `EdgewiseError` (a path that is missing, a folder where a file
belongs, no permission) is one line, exit 2 for those the user fixes by changing the path, else
1; any other exception is one line calling it a bug, exit 1, with the traceback only at ``-vv``.
"""

from __future__ import annotations

import errno
import importlib
import logging
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from edgewise.cli.startup import own_process
from edgewise.errors import ConfigError, ConstraintsUnmet, EdgewiseError, NodeDecommissioned

if TYPE_CHECKING:
    from rich.console import Console


@cache
def stderr_console() -> Console:
    """The rich console on stderr (made on first use: importing rich costs start-up time)."""
    from rich.console import Console

    return Console(stderr=True)


class _StderrConsole:
    """`stderr_console`, made when it is first used."""

    def __getattr__(self, name: str) -> Any:
        return getattr(stderr_console(), name)


err_console: Any = _StderrConsole()


def escape(text: str) -> str:
    """rich's markup escape, imported when needed."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNMET = 3
EXIT_DECOMMISSIONED = 4


def exit_code(exc: EdgewiseError) -> int:
    """The exit code for an error: 2 when the user must change their input, 3 for a plan that
    does not meet its constraints, 4 for a decommissioned node, else 1."""
    if isinstance(exc, NodeDecommissioned):
        return EXIT_DECOMMISSIONED
    if isinstance(exc, ConstraintsUnmet):
        return EXIT_UNMET
    return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED


def fail(exc: EdgewiseError) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with `exit_code`."""
    err_console.print(
        f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True
    )
    sys.exit(exit_code(exc))


PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FileExistsError)
"""`OSError`s the user fixes by giving another path (exit 2)."""


def os_error_message(exc: OSError) -> str:
    """One line for an `OSError`: the path, what is wrong, and what to do."""
    what = exc.strerror or type(exc).__name__
    where = f"{exc.filename}: " if exc.filename else ""
    if isinstance(exc, PATH_ERRORS):
        return f"{where}{what}; check the path (and its folder) and try again"
    return f"{where}{what}"


class LazyGroup(click.Group):
    """A group whose subcommands named in ``lazy`` (``name: "module:attribute"``) are imported
    when they are looked up, not when the group is built."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, _, attr = self.lazy[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return self.commands.get(cmd_name)


class Cli(LazyGroup):
    """The root group: runs a command and turns what escaped it into one ``error:`` line."""

    def main(self, args: Any = None, *rest: Any, **kw: Any) -> Any:
        if args is None:  # the command line of this process (cli/startup.py)
            own_process()
        return super().main(args, *rest, **kw)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click prints these itself (usage errors: exit 2)
        except EdgewiseError as exc:
            fail(exc)
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # stdout closed (| head): click handles it
                raise
            err_console.print(f"[bold red]error:[/] {escape(os_error_message(exc))}",
                              highlight=False, soft_wrap=True)
            sys.exit(EXIT_USAGE if isinstance(exc, PATH_ERRORS) else EXIT_FAILED)
        except Exception as exc:
            logging.getLogger("edgewise.cli").debug("unexpected error", exc_info=True)
            err_console.print(
                f"[bold red]error:[/] unexpected {escape(type(exc).__name__)}: "
                f"{escape(str(exc))}; this is a bug in Edgewise: please report it with the "
                "output of the same command run with -vv", highlight=False, soft_wrap=True)
            sys.exit(EXIT_FAILED)


CLOUD_DATA = Path(".edgewise/cloud")
"""``--data`` of every control-plane command (``cloud serve|admin-token|token|keys``) when not
given; the operator commands read ``CLOUD_DATA/cli.json`` last (`cloud.client.find_config`)."""
AGENT_DATA = Path(".edgewise/agent")
"""``--data`` of ``agent run|launch|status`` when not given."""
# ``edgewise run``: .edgewise/<pipeline name>; ``dead-letters`` has no default (it reads what
# ``run`` or an agent wrote: give that directory, or DATA/engine of an agent)

def need_extra(extra: str, part: str) -> None:
    """Exit 2 naming ``edgewise[extra]`` when a command needs an extra that is not installed."""
    from edgewise.common.extras import require_extra

    try:
        require_extra(extra, part)
    except EdgewiseError as exc:
        fail(exc)


def fmt(n: Any) -> str:
    """A number for a table: thousands separated, floats to three places, None as '-'."""
    if isinstance(n, float):
        return f"{n:,.3f}"
    if isinstance(n, int):
        return f"{n:,}"
    return "-" if n is None else str(n)
