"""Steady-state CPU of one control plane under N simulated nodes (issue 11), for comparing
revisions: the control plane and the simulator run from ``--src`` (a checkout's ``src``, e.g. a
``git worktree`` of the revision before a change), so two runs back to back give a figure and
its baseline on the same machine.

    .venv/bin/python benchmarks/fleet_steady.py --nodes 300 [--src /tmp/old/src] [--window 30]

Starts ``edgewise cloud serve`` (SQLite) and ``edgewise sim fleet --processes 2``, waits until
every node has a session and ``--settle`` s more (15), then reads the server's CPU time from
/proc over ``--window`` seconds; ack latencies are the simulator's in that window. Last line:
one JSON object (``server_cpu_us_per_node_s``, ack p50/p99, RSS and ``server_kb_per_node``: the RSS
growth from the idle server before any node, per node, as ``fleet_scale.py`` gives it; how
many pool timeouts the server logged).

``--profile FILE``: py-spy (``pip install py-spy``) records the server over the window at
100 Hz, every thread that is not idle, native frames included (OpenSSL, SQLite), one line per
stack with the thread first (py-spy's raw format). Native stacks need py-spy to pause the
process for each sample, so the CPU figure of such a run is not the one to compare: measure
without ``--profile``. ``--cprofile FILE``: the server's event-loop thread under cProfile for
the window (switched on and off by SIGUSR1 / SIGUSR2; pstats file): exact call counts per
function, times inflated by the profiler.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
# counters read from the server's /metrics before and after the window (rates in the output)
WATCH = ("edgewise_batches_total", "edgewise_commit_seconds_count",
         "edgewise_commit_seconds_sum", "edgewise_session_bytes_total",
         "edgewise_node_writes_total", "edgewise_sessions_opened_total")


CPROFILED = """
import cProfile, signal, sys
prof = cProfile.Profile()
out = sys.argv[1]
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
def stop(*_):
    prof.disable()
    prof.dump_stats(out)
signal.signal(signal.SIGUSR2, stop)
sys.argv = ["edgewise", *sys.argv[2:]]
from edgewise.cli.main import main
main()
"""


def rss_now(pid: int) -> int:
    """The resident set of process ``pid`` in KB (``/proc/<pid>/status``)."""
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])


CHILDREN: list[subprocess.Popen[bytes]] = []  # stopped however the run ends (`stop_children`)


def stop_children() -> None:
    """SIGTERM every child still running, then SIGKILL what has not ended within 60 s: a
    failed or interrupted run leaves no control plane or simulator behind (one that did kept
    2,000 virtual nodes running and loaded the machine for the next runs)."""
    for p in CHILDREN:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in CHILDREN:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    # SIGTERM ends the run like an error: the finally blocks stop the children
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run()
    finally:
        stop_children()


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=300)
    ap.add_argument("--src", type=Path, default=SRC)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=15.0,
                    help="s after the last node connected before the window (the nodes' "
                    "backlog from enrolment is sent then: give a large fleet time to catch up)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--cprofile", type=Path, default=None)
    args = ap.parse_args()
    n, work = args.nodes, args.workdir or Path(tempfile.mkdtemp(prefix="edgewise-steady-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(args.src))
    cli = [sys.executable, "-m", "edgewise.cli"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = work / "serve.log"
    serve = [*cli, "cloud", "serve", "--data", str(work / "cloud"), "--port", str(port)]
    if args.cprofile is not None:  # the same command under a profiler switched by signals
        serve = [sys.executable, "-c", CPROFILED, str(args.cprofile), *serve[3:]]
    with open(log, "w") as out:
        srv = subprocess.Popen(serve, env=env, stdout=out, stderr=subprocess.STDOUT)
    CHILDREN.append(srv)
    cfg = work / "cloud" / "cli.json"
    for _ in range(1200):
        if cfg.exists() and "listening" in log.read_text():
            break
        time.sleep(0.1)
    idle_kb = rss_now(srv.pid)  # before any node: what the sessions add is measured from here
    token = subprocess.run([sys.executable, "-c", (
        "import sys; from pathlib import Path; from edgewise.cloud.client import OperatorClient;"
        f"print(OperatorClient.from_file(Path({str(cfg)!r})).create_enrolment_token("
        f"{{'fleet': 'steady'}}, 86400, {n}).token)")], env=env, capture_output=True,
        text=True, check=True).stdout.strip()
    events = work / "events.jsonl"
    with open(work / "sim.out", "w") as out:
        sim = subprocess.Popen([*cli, "sim", "fleet", "--nodes", str(n), "--cloud",
                                f"https://127.0.0.1:{port}", "--token", token, "--ca",
                                str(work / "cloud" / "pki" / "ca.pem"), "--processes", "2",
                                "--duration", "3600", "--events", str(events), "--no-verify",
                                "--json"], env=env, stdout=out, stderr=subprocess.STDOUT)
    CHILDREN.append(sim)

    def ups() -> int:
        if not events.exists():
            return 0
        with open(events) as f:
            return sum(1 for line in f if '"e": "up"' in line)

    def metrics() -> dict[str, float]:
        """The server's counters (``/metrics``): what it did in the window, per second."""
        import ssl
        import urllib.request
        ctx = ssl.create_default_context(cafile=str(work / "cloud" / "pki" / "ca.pem"))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx,
                                    timeout=30) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(WATCH):
                name, _, value = line.rpartition(" ")
                out[name] = out.get(name, 0.0) + float(value)
        return out

    def thread_cpu() -> dict[str, float]:
        """CPU seconds of the server's event-loop thread (``main``) and of all its other
        threads (aiosqlite's connection threads, executors, the cloud pipelines' loop)."""
        out: dict[str, float] = {}
        for task in Path(f"/proc/{srv.pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = "main" if task.name == str(srv.pid) else "other threads"
            fields = stat[stat.rindex(")") + 2:].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        return out

    tick = os.sysconf("SC_CLK_TCK")

    def cpu(pid: int | None = None) -> float:
        fields = Path(f"/proc/{pid or srv.pid}/stat").read_text().split()
        return (int(fields[13]) + int(fields[14])) / tick

    def sim_cpu() -> float:
        """CPU seconds of the simulator's processes (its parent and the processes it
        started): on this machine they share the cores with the server."""
        pids, total = {sim.pid}, 0.0
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (d / "stat").read_text()
                    if int(stat[stat.rindex(")") + 2:].split()[1]) == sim.pid:
                        pids.add(int(d.name))
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += cpu(pid)
        return total

    started = time.time()
    try:
        while ups() < n and time.time() - started < 600:
            time.sleep(2)
        all_up = time.time() - started
        time.sleep(args.settle)
        spy = None
        if args.profile is not None:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record",
                                    "--pid", str(srv.pid), "--format", "raw", "--rate", "100",
                                    "--native", "--threads", "--duration",
                                    str(int(args.window)), "-o", str(args.profile)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = thread_cpu()
        m0 = metrics()
        if args.cprofile is not None:
            srv.send_signal(signal.SIGUSR1)
        c0, s0, w0 = cpu(), sim_cpu(), time.time()
        time.sleep(args.window)
        c1, s1, w1 = cpu(), sim_cpu(), time.time()
        if args.cprofile is not None:
            srv.send_signal(signal.SIGUSR2)
        m1 = metrics()
        t1 = thread_cpu()
        if spy is not None:
            spy.wait(120)
        acks: list[float] = []
        with open(events) as f:
            for line in f:
                if '"e": "acks"' in line:
                    ev = json.loads(line)
                    if w0 <= ev["t"] <= w1 + 5:  # each covers the 5 s before it
                        acks += ev["ms"]
        acks.sort()
        rss_kb = rss_now(srv.pid)
    finally:
        sim.send_signal(signal.SIGTERM)
        srv.send_signal(signal.SIGTERM)
        for p in (sim, srv):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()

    def pct(q: float) -> float | None:
        return round(acks[min(len(acks) - 1, int(q * len(acks)))], 1) if acks else None

    print(json.dumps({
        "src": str(args.src), "nodes": n, "up": ups(), "all_up_s": round(all_up, 1),
        "server_cpu_us_per_node_s": round((c1 - c0) / (w1 - w0) / n * 1e6, 1),
        "server_cpu_pct": round((c1 - c0) / (w1 - w0) * 100, 1),
        "sim_cpu_us_per_node_s": round((s1 - s0) / (w1 - w0) / n * 1e6, 1),
        "ack_p50_ms": pct(0.5), "ack_p99_ms": pct(0.99), "rss_mb": round(rss_kb / 1024),
        "server_kb_per_node": round(max(0, rss_kb - idle_kb) / n, 1),
        "pool_timeouts_logged": log.read_text().count("QueuePool"),
        "thread_cpu_pct": {k: round((t1[k] - t0.get(k, 0.0)) / (w1 - w0) * 100, 2)
                           for k in sorted(t1) if t1[k] - t0.get(k, 0.0) > 0},
        "per_s": {k: round((m1[k] - m0.get(k, 0.0)) / (w1 - w0), 1) for k in sorted(m1)},
        "load_average": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
