"""Where a control plane's CPU goes: py-spy sampling of a server process and a summary of it.

`Spy` runs ``py-spy record --format raw`` (collapsed stacks: ``frame;frame;... count``) against a
pid for a while, without pausing the target (``--nonblocking``) and only while a thread holds
the GIL (``--gil``: busy Python time, not waits; ``gil=False`` samples every thread that is not
idle, which shows what runs with the GIL released, such as OpenSSL's handshakes); `summarize`
reads such a file and lists the busiest functions by self samples and by inclusive samples
(only frames of our code, aiohttp, ssl, SQLAlchemy and the database drivers, so the common
ancestors of every stack do not crowd the list). py-spy is an optional tool
(``pip install py-spy``); without it `Spy.start` returns False.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Spy:
    def __init__(self, pid: int, out: Path, rate: int = 49, gil: bool = True) -> None:
        self.pid, self.out, self.rate, self.gil = pid, out, rate, gil
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, duration: float | None = None) -> bool:
        exe = _py_spy()
        if exe is None:
            return False
        self.out.parent.mkdir(parents=True, exist_ok=True)
        argv = [exe, "record", "--pid", str(self.pid), "--format", "raw", "--rate",
                str(self.rate), "--nonblocking", "--subprocesses", "-o", str(self.out)]
        if self.gil:
            argv.append("--gil")
        # --subprocesses: `cloud serve --processes N` serves from the supervisor's children
        if duration is not None:
            argv += ["--duration", str(int(max(1, duration)))]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """End the recording (SIGINT makes py-spy write its file) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_INCLUSIVE = ("cloud/", "store/", "sync/", "security/", "aiohttp/", "ssl.py", "engine/",
              "aiosqlite/", "asyncpg/")


def _name(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)`` grouped by module file."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    return f"{func} ({short})"


def summarize(raw: Path, top: int = 15) -> tuple[int, list[tuple[str, float]],
                                                 list[tuple[str, float]]]:
    """(samples, busiest by self %, busiest by inclusive %) of a py-spy raw file."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_name(f) for f in stack.split(";")]
        self_c[frames[-1]] += n
        for f in set(frames):
            if any(m in f for m in _INCLUSIVE):
                incl[f] += n
    if total == 0:
        return 0, [], []

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        ranked = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]  # ties by name
        return [(k, round(100.0 * v / total, 1)) for k, v in ranked]

    return total, pct(self_c), pct(incl)


def markdown(raw: Path, title: str, top: int = 15) -> str:
    total, by_self, by_incl = summarize(raw, top)
    lines = [f"### {title}", "", f"{total:,} samples", "", "| self % | function |", "|---|---|"]
    lines += [f"| {p} | `{k}` |" for k, p in by_self]
    lines += ["", "| inclusive % | function |", "|---|---|"]
    lines += [f"| {p} | `{k}` |" for k, p in by_incl]
    return "\n".join(lines) + "\n"
