"""`edgewise cloud serve --processes N`: N control-plane processes on one port (issue 11).

`supervise(n, serve_one)` is the process the operator started. It has bootstrapped the data
directory already (CA, server certificate, admin token: once, before any other process reads
them), and it forks the N serving processes before it starts a thread or an event loop. Each
runs ``serve_one(i)``: the whole control plane, listening on the same port with SO_REUSEPORT
(the kernel spreads new connections over them), sharing the PostgreSQL database; what they
tell each other is `edgewise.cloud.replicas`. The supervisor serves nothing itself:

* **stop.** SIGTERM or SIGINT: it passes SIGTERM on to every serving process and waits for
  them (each stops as one process does: sessions told, commits finished).
* **restart.** A serving process that dies is started again, after 1 s, doubling to 30 s while
  it keeps dying within a minute of its start. Its nodes reconnect meanwhile to the others.
* **fail fast.** A serving process that exits with an error within `START_WINDOW` seconds of
  the first start (the port is taken, the database is unreachable) stops them all: the
  supervisor exits with its exit code instead of restarting it forever. One killed by a
  signal is restarted whenever it dies.
* **orphans.** If the supervisor itself is killed, Linux sends each serving process SIGTERM
  (``PR_SET_PDEATHSIG``), so no process keeps serving without it.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import click

from edgewise.cli.common import fail
from edgewise.common import eventloop
from edgewise.errors import EdgewiseError

if TYPE_CHECKING:
    from edgewise.cloud.config import CloudConfig

START_WINDOW = 10.0  # s: a process dying this soon after the first start stops them all
RESTART_MIN, RESTART_MAX = 1.0, 30.0  # s before a dead serving process is started again
HEALTHY_AFTER = 60.0  # s up after which a process's earlier deaths are forgotten
PR_SET_PDEATHSIG = 1


def _echo(text: str) -> None:
    click.echo(text, err=True)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os._exit(0)


def _child(index: int, parent: int, serve_one: Callable[[int], None]) -> None:
    """In a freshly forked process: serve, then leave without running the parent's exits."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent(parent)
        serve_one(index)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 0
    except BaseException:  # whatever it was: say it, end this process only
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def supervise(n: int, serve_one: Callable[[int], None]) -> int:
    """Fork ``n`` processes running ``serve_one(i)`` and keep them running until SIGTERM /
    SIGINT; the exit code (see the module docstring)."""
    parent = os.getpid()
    children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
    deaths = [0] * n
    first_start = time.monotonic()
    stopping = False
    code = 0

    def spawn(index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(index, parent, serve_one)
        children[pid] = (index, time.monotonic())

    def stop(_sig: int = 0, _frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(n):
        spawn(i)
    _echo(f"{n} serving processes started (pids {', '.join(map(str, children))})")
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index, started = children.pop(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        now = time.monotonic()
        if exit_code > 0 and now - first_start < START_WINDOW:  # its own error, not a kill
            _echo(f"serving process {index} exited with code {exit_code} at start; stopping "
                  "the others")
            code = exit_code if exit_code > 0 else 1
            stop()
            continue
        if now - started >= HEALTHY_AFTER:
            deaths[index] = 0
        deaths[index] += 1
        delay = min(RESTART_MAX, RESTART_MIN * 2.0 ** (deaths[index] - 1))
        _echo(f"serving process {index} (pid {pid}) exited with code {exit_code}; starting it "
              f"again in {delay:g} s")
        deadline = now + delay
        while not stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))
        if not stopping:
            spawn(index)
    return code


def serve_processes(config: CloudConfig, processes: int,
                    serve: Callable[..., Coroutine[Any, Any, None]]) -> int:
    """Bootstrap once, then run ``processes`` serving processes of ``serve`` (the CLI's
    one-process serve, with ``index=``) under `supervise`; the exit code."""
    from edgewise.cloud.pipelines.worker import replica_name

    asyncio.run(_boot(config))
    replica_name(config.data_dir)  # made once, before the processes read it

    def serve_one(index: int) -> None:
        try:
            eventloop.run(serve(replace(config, process=index, reuse_port=True), index=index))
        except EdgewiseError as exc:
            fail(exc)

    return supervise(processes, serve_one)


async def _boot(config: CloudConfig) -> None:
    """`bootstrap` and its messages, once, before the fork."""
    from edgewise.cloud.bootstrap import bootstrap, prepare_data_dir, server_url, write_cli_config
    from edgewise.cloud.store import Store

    echo = lambda s: click.echo(s, err=True)  # noqa: E731 - progress goes to stderr
    prepare_data_dir(config.data_dir)
    url = server_url(config.host, config.port)
    async with Store(config.db_url, wait=config.server.store_wait) as store:
        boot = await bootstrap(config.data_dir, store, host=config.host,
                               trust_domain=config.trust_domain, extra_names=config.server_names,
                               url=url, tls=config.tls)
        for line in boot.created:
            echo(f"created {line}")
        if boot.admin_token is not None:
            click.echo(f"admin token (shown once): {boot.admin_token}")
            echo(f"saved with the URL and CA to {boot.cli_config} (mode 0600)")
        write_cli_config(boot.cli_config, url, boot.ca_path)
        echo(f"CA certificate for agents (--ca): {boot.ca_path}")
        echo(f"control plane on {url}: {store.describe()}")
