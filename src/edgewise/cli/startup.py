"""What the ``edgewise`` process does about its own start-up cost (docs/benchmarks.md, "CLI
start-up"). Both apply only when the command line is this process's own (`own_process`,
called by the root group when ``main()`` reads ``sys.argv``: the ``edgewise`` script and
``python -m edgewise.cli``); a program that calls ``main(args)`` in its own process, such as
the tests, keeps its settings.

* **One BLAS thread.** numpy's OpenBLAS starts a thread per core when numpy is imported, and
  those threads spin while they wait for work; no command of Edgewise gives BLAS work that
  threads would speed up (the engine's column operations are not BLAS; the planner's
  least-squares fits are small). That start cost 0.05-0.08 s of CPU per process on the
  benchmark machine (2 cores; numpy issue 29193 shows more cores cost more). So
  ``OPENBLAS_NUM_THREADS=1`` is set unless the environment already says how many BLAS threads
  to use (`BLAS_THREADS`): set one of those to give a plugin's own numpy work more threads.
* **The garbage collector while loading.** Importing numpy, pydantic, asyncio and our modules
  and loading a pipeline makes about 45,000 objects that live as long as the process; the
  cyclic garbage collector would walk them again and again while they are made and again at
  exit. `loading` turns it off while a command loads and then freezes what exists
  (`gc.freeze`: later collections, the ones at exit too, skip those objects); objects made
  afterwards, while the command works, are collected as usual.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")
"""What OpenBLAS reads for its number of threads; when none is set, we set the first to 1."""

_own = False


def own_process() -> None:
    """This process runs the ``edgewise`` command line: one BLAS thread (unless told
    otherwise), and `loading` applies. Called before anything imports numpy."""
    global _own
    _own = True
    if not any(os.environ.get(name) for name in BLAS_THREADS):
        os.environ[BLAS_THREADS[0]] = "1"


@contextmanager
def loading() -> Iterator[None]:
    """Around what a command loads before it starts its work (imports, the pipeline, the
    engine): the garbage collector is off meanwhile and what exists is frozen after, in the
    ``edgewise`` process only (`own_process`).

    The little garbage in cycles made while loading (225 objects of 45,000 for the pipeline
    of benchmarks/cli_startup.py) is frozen with the rest and kept for the life of the
    process: finding it would walk all 45,000 (``gc.collect(0)``: 12 ms)."""
    if not _own or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
