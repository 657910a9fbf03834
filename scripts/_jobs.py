"""Experiment scripts' runs in worker processes, a few at a time, so that an interrupt starts nothing new."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Hashable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

INTERRUPTED = "interrupted: the runs are checkpointed; run the same command again to continue"


def run_jobs(fn: Callable[..., Any], jobs: dict[Hashable, tuple], workers: int) -> dict[Hashable, Any]:
    """``{key: fn(*args)}`` for ``jobs = {key: args}``, in the order given, at most ``workers`` at once (each in a
    worker process). Jobs are handed to the pool only when a worker is free: a pool given them all at once starts
    queued ones even after Ctrl-C. A job returning None (a signal stopped its run, which checkpointed) or Ctrl-C
    ends the script with :data:`INTERRUPTED` once the running jobs have stopped (Ctrl-C reaches them too: they
    checkpoint); no job starts after it.

    Workers are spawned, not forked: a fork of a process that has made an OpenGL (EGL) context hangs in the child's
    first ``mujoco.Renderer`` (``cheetah_table.py`` records the demonstrations in the parent, then its forked
    workers froze in their first DAgger round), and forking a process with threads (torch's pools) is unsafe as well.
    ``fn`` must therefore be importable: a module-level function of the script.

    SIGTERM (``kill``, a scheduler's stop) is taken as Ctrl-C: by default it killed this process at once, and the
    workers, stopped by the same signal to the process group, checkpointed and then idled forever, orphaned. A
    SIGTERM sent to this process alone lets the running jobs finish and starts no new one.
    """
    pending, running, results = list(jobs.items()), {}, {}
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                while pending or running:
                    while pending and len(running) < workers:
                        key, args = pending.pop(0)
                        running[pool.submit(fn, *args)] = key
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        results[running.pop(future)] = result = future.result()
                        if result is None:
                            raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise SystemExit(INTERRUPTED) from None  # leaving the pool waits for the running jobs
    finally:
        signal.signal(signal.SIGTERM, previous)
    return {key: results[key] for key in jobs}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
