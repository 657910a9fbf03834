"""Test-session settings shared by every test module."""

from __future__ import annotations

import os
import sys


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test`` runs two workers), each worker gets an equal share of the cores for its
    torch threads, and so do the commands the tests start (``OMP_NUM_THREADS`` is inherited). Left at torch's
    default, every worker ran one thread per core: on the 2-core CI machine, four busy-waiting OpenMP threads on two
    cores made a conv-net training fixture ~5x slower than alone (705 s). Tests whose numbers depend on the thread
    count set it themselves (the learning tests: one thread)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, _cores() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:  # already imported: its pool was sized from the cores
            sys.modules["torch"].set_num_threads(threads)
