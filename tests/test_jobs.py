"""scripts/_jobs.py: the experiment scripts' worker pool survives a parent that has rendered (an EGL context).

``cheetah_table.py`` records the demonstrations in the parent and then trains in workers, which render in their
DAgger rounds. With forked workers the child's first ``mujoco.Renderer`` waited forever on a lock copied from the
parent (both workers froze in their first DAgger round, found in a full comparison); spawned workers start clean.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

SCRIPT = """
import sys
import time
sys.path.insert(0, {scripts!r})
from _jobs import run_jobs
from rims_rl.envs.cheetah import make_pixel_cheetah


def render(seed):
    env = make_pixel_cheetah()
    obs, _ = env.reset(seed=seed)
    env.close()
    return obs.shape


if __name__ == "__main__":
    env = make_pixel_cheetah()  # the parent renders first, as cheetah_table.py does when it records demonstrations
    env.reset(seed=0)
    print(run_jobs(render, {{0: (0,), 1: (1,)}}, 2))
"""


def test_workers_render_after_the_parent_has_rendered(tmp_path):
    script = tmp_path / "render_in_workers.py"
    script.write_text(SCRIPT.format(scripts=str(SCRIPTS)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too
        proc.communicate()
        raise AssertionError("the workers hung rendering after the parent had rendered") from None
    assert proc.returncode == 0, out
    assert "{0: (64, 64, 12), 1: (64, 64, 12)}" in out, out


STOPPABLE = """
import signal, sys, time
from pathlib import Path
sys.path.insert(0, {scripts!r})
from _jobs import run_jobs

OUT = Path({out!r})


def job(key):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # as the runs' GracefulStop: finish, checkpoint
    (OUT / f"started-{{key}}").touch()
    while not stop:
        time.sleep(0.05)
    (OUT / f"checkpointed-{{key}}").touch()
    return None  # a run stopped by a signal


if __name__ == "__main__":
    run_jobs(job, {{0: (0,), 1: (1,), 2: (2,)}}, 2)
"""


def test_sigterm_to_the_group_stops_the_script_and_its_workers(tmp_path):
    """``kill -- -PGID`` (how a detached comparison is stopped): the workers checkpoint, the script exits with the
    interrupted message and starts no queued job, and no worker is left behind (SIGTERM's default action killed the
    parent at once and left both workers idling forever)."""
    script = tmp_path / "stoppable.py"
    script.write_text(STOPPABLE.format(scripts=str(SCRIPTS), out=str(tmp_path)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(1200):
            if (tmp_path / "started-0").exists() and (tmp_path / "started-1").exists():
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the two jobs did not start within 60 s")
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        left = True
        for _ in range(200):  # exited children are reaped by init, within a second or two here
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                left = False
                break
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode != 0 and "interrupted: the runs are checkpointed" in out, out
    assert (tmp_path / "checkpointed-0").exists() and (tmp_path / "checkpointed-1").exists()
    assert not (tmp_path / "started-2").exists()
    assert not left, "a worker outlived the script"
