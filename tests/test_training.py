"""The training procedure's bookkeeping: what a run directory says when training does not finish."""

from __future__ import annotations

import json
import os
import signal

import pytest
from stable_baselines3.common.callbacks import BaseCallback

from rims_rl.agents.training import TrainingInterrupted, resume, train
from rims_rl.config import CONFIG_DIR, resolve_config

TINY = ["total_timesteps=256", "n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "ppo.n_epochs=1",
        "eval.episodes=2", "wandb.mode=disabled"]  # fmt: skip


class RaiseAt(BaseCallback):
    def __init__(self, error: BaseException, step: int = 64) -> None:
        super().__init__()
        self.error, self.step = error, step

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.step:
            raise self.error
        return True


class SignalAt(BaseCallback):
    """Sends this process ``signum`` ``times`` times once ``step`` env steps are done (as a user or a cloud would)."""

    def __init__(self, signum: int, step: int, times: int = 1) -> None:
        super().__init__()
        self.signum, self.step, self.times = signum, step, times

    def _on_step(self) -> bool:
        if self.times and self.num_timesteps >= self.step:
            for _ in range(self.times):
                self.times -= 1
                os.kill(os.getpid(), self.signum)
        return True


def tiny_config():
    return resolve_config("CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", overrides=TINY)


def test_a_crash_marks_the_run_failed(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_config(), tmp_path, callbacks=[RaiseAt(RuntimeError("boom"))])
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["status"] == "failed" and "boom" in meta["error"] and meta["failed_at"] >= 64


def test_ctrl_c_finishes_the_update_checkpoints_and_resume_completes_the_run(tmp_path):
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_config(), tmp_path, callbacks=[SignalAt(signal.SIGINT, step=70)])
    # the signal came during the rollout that ends at 128: that update finished, then the checkpoint was written
    assert stop.value.timesteps == 128 and stop.value.signal_name == "SIGINT"
    assert stop.value.checkpoint == tmp_path / "checkpoints" / "ckpt_128_steps"
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
    result = resume(tmp_path)
    assert result.resumed_from == 128 and result.timesteps == 256 and result.final_eval is not None
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["status"] == "finished" and meta["resumes"][0]["from_timesteps"] == 128


def test_a_second_signal_stops_at_once_without_a_new_checkpoint(tmp_path):
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_config(), tmp_path, callbacks=[SignalAt(signal.SIGINT, step=70, times=2)])
    assert stop.value.checkpoint is None and not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
