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
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

SCRIPT = """
import sys
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
