"""Long runs that survive: a training process killed (SIGKILL) or stopped (SIGTERM) partway, then resumed, ends
with the same metrics as a run that was never interrupted, the same W&B run, and no duplicate or missing step."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rims_rl.agents.training import resume, train
from rims_rl.config import CONFIG_DIR, resolve_config

# 16 updates of 256 steps, a checkpoint every 4 updates, an evaluation every 4 updates
ARGS = ["--env", "CartPoleNoVel-v1", "--policy", "rims", "--total-timesteps", "4096", "--n-envs", "4",
        "--set", "ppo.n_steps=64", "--set", "ppo.batch_size=128", "--set", "ppo.n_epochs=2",
        "--set", "checkpoint.every_steps=1024", "--set", "checkpoint.keep=5", "--set", "eval.freq=1024",
        "--set", "eval.episodes=3", "--wandb", "offline", "--no-progress"]  # fmt: skip
STEPS = list(range(256, 4097, 256))


def cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("rims-rl")), *args]


def run_env() -> dict[str, str]:
    return dict(os.environ, WANDB_SILENT="true")


def metrics(run_dir: Path) -> list[dict[str, str]]:
    """progress.csv rows without the wall-clock columns."""
    with open(run_dir / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in ("time/fps", "time/time_elapsed")} for row in rows]


def steps_logged(run_dir: Path) -> list[int]:
    try:
        text = (run_dir / "progress.csv").read_text()
    except FileNotFoundError:
        return []
    lines = [line for line in text.splitlines()[1:] if line.count(",") == text.splitlines()[0].count(",")]
    column = text.splitlines()[0].split(",").index("time/total_timesteps") if lines else 0
    return [int(line.split(",")[column]) for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run(cli("train", *ARGS, "--run-dir", str(run_dir)), capture_output=True, text=True,
                          env=run_env(), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_the_uninterrupted_runs_metrics(signum, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli("train", *ARGS, "--run-dir", str(run_dir)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=run_env())  # fmt: skip
    deadline = time.monotonic() + 300
    # partway: after the first periodic checkpoint, with updates logged beyond it (lost to SIGKILL, redone)
    while not ((run_dir / "checkpoints" / "ckpt_1024_steps").is_dir() and max(steps_logged(run_dir)) >= 1536):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    meta = json.loads((run_dir / "run.json").read_text())
    checkpoints = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("ckpt_*_steps"))
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and meta["status"] == "running"
    else:  # the update in progress finished, was checkpointed, and the process said how to resume
        assert proc.returncode == 128 + signal.SIGTERM and meta["status"] == "interrupted"
        assert f"rims-rl train --resume {run_dir}" in err and "Traceback" not in err
        assert checkpoints[-1] >= 1536 and checkpoints[-1] % 256 == 0
    last = checkpoints[-1]
    wandb_id = meta["wandb"]["id"]

    proc = subprocess.run(cli("train", "--resume", str(run_dir), "--no-progress"), capture_output=True, text=True,
                          env=run_env(), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"resumed at step {last}" in proc.stdout  # no finished update lost beyond the last checkpoint

    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and meta["timesteps"] == 4096
    assert meta["wandb"]["id"] == wandb_id and meta["resumes"][0]["from_timesteps"] == last
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(segments) == 2  # one W&B run id, one offline segment per process (`wandb sync --id` joins them)

    resumed, uninterrupted = metrics(run_dir), metrics(reference)
    assert [int(r["time/total_timesteps"]) for r in resumed] == STEPS  # no duplicate, no missing step
    assert [r["time/iterations"] for r in resumed] == [str(i) for i in range(1, 17)]
    assert [r["eval/mean_reward"] != "" for r in resumed] == [step % 1024 == 0 for step in STEPS]
    first_after = STEPS.index(last) + 1
    assert resumed[first_after]["train/learning_rate"] == uninterrupted[first_after]["train/learning_rate"]
    assert resumed == uninterrupted  # exact: same seeds, device and thread count (CPU)
    for name in ("timesteps", "results", "ep_lengths"):
        assert np.array_equal(np.load(run_dir / "evaluations.npz")[name], np.load(reference / "evaluations.npz")[name])
    eval_a = json.loads((run_dir / "eval.json").read_text())
    assert eval_a == json.loads((reference / "eval.json").read_text())


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    import shutil

    overrides = ["policy=lstm", "total_timesteps=4096", "n_envs=4", "ppo.n_steps=64", "ppo.batch_size=128",
                 "ppo.n_epochs=2", "checkpoint.every_steps=1024", "checkpoint.keep=5",
                 "wandb.mode=disabled"]  # fmt: skip
    source, run_dir = tmp_path / "source", tmp_path / "run"
    train(resolve_config("CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", overrides=overrides), source)
    shutil.copytree(source, run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(dict(meta, status="interrupted")))  # as if stopped at 3072
    shutil.rmtree(run_dir / "checkpoints" / "ckpt_4096_steps")
    model = run_dir / "checkpoints" / "ckpt_3072_steps" / "model.zip"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    model.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        result = resume(run_dir)
    assert "checkpoint ckpt_3072_steps is damaged (model.zip does not match its manifest)" in caplog.text
    assert result.resumed_from == 2048 and result.timesteps == 4096
    assert metrics(run_dir) == metrics(source)
