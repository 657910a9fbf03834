"""A wheel built from the checkout works without it: installed into a fresh environment and run from another
directory, only ``rims_rl`` is importable (no bare ``agents``/``envs``/``cli``), the shipped configs and expert are
found as package data, and ``rims-rl train``, ``evaluate`` and ``demos`` work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # The Python RIM loop (same results as the C++ one, whose build this test leaves to the others; the C++ source
    # is checked to be in the wheel).
    env = {**os.environ, "RIMS_RL_NATIVE": "0", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_runs_train_evaluate_and_demos_without_the_checkout(tmp_path):
    wheels, source = tmp_path / "wheels", tmp_path / "source"
    # built from a copy: setuptools writes build/ into the tree, and a stale one would leak into later wheels
    skip = (".venv", "build", "runs", ".git", "*.egg-info", "__pycache__", "wandb", "demos", ".pytest_cache")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skip))
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("rims_rl-*.whl")
    # A fresh environment: a new venv whose only extra path is this environment's site-packages, for the
    # dependencies (a .pth line adds the directory without running its .pth files, so this environment's editable
    # install of the checkout is not active there).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()

    probe = "import importlib.util as u, rims_rl; print(rims_rl.__file__, [u.find_spec(m) is None for m in ('agents', 'envs', 'cli')])"  # noqa: E501
    out = _run(python, "-c", probe, cwd=work)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(site)) and out.stdout.strip().endswith("[True, True, True]"), out.stdout
    assert (site / "rims_rl" / "csrc" / "rim_loop.cpp").is_file()
    assert {p.name for p in (site / "rims_rl" / "configs").glob("*.yaml")} >= {"classic.yaml", "babyai.yaml"}

    cli = ("-c", "import sys; from rims_rl.cli import main; sys.exit(main())")
    run_dir = work / "run"
    train = _run(python, *cli, "train", "--env", "CartPoleNoVel-v1", "--policy", "rims", "--total-timesteps", "512",
                 "--run-dir", str(run_dir), "--wandb", "disabled", "--no-progress", "--set", "eval.freq=0",
                 "--set", "eval.episodes=2", cwd=work)  # fmt: skip
    assert train.returncode == 0, train.stderr
    evaluate = _run(python, *cli, "evaluate", str(run_dir), "--episodes", "2", "--json", cwd=work)
    assert evaluate.returncode == 0, evaluate.stderr
    assert json.loads(evaluate.stdout)["episodes"] == 2
    demos = _run(python, *cli, "demos", "--episodes", "1", "--max-steps", "5", "--size", "32", "--out",
                 str(work / "demos.npz"), cwd=work)  # fmt: skip
    assert demos.returncode == 0, demos.stderr
    assert (work / "demos.npz").is_file()
