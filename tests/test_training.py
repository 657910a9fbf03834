"""The training procedure's bookkeeping: what a run directory says when training does not finish."""

from __future__ import annotations

import json

import pytest
from stable_baselines3.common.callbacks import BaseCallback

from agents.training import TrainingInterrupted, train
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


def tiny_config():
    return resolve_config("CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", overrides=TINY)


def test_a_crash_marks_the_run_failed(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_config(), tmp_path, callbacks=[RaiseAt(RuntimeError("boom"))])
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["status"] == "failed" and "boom" in meta["error"] and meta["timesteps"] >= 64


def test_ctrl_c_saves_a_checkpoint_and_marks_the_run_interrupted(tmp_path):
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_config(), tmp_path, callbacks=[RaiseAt(KeyboardInterrupt())])
    assert (
        stop.value.checkpoint.is_file()
        and stop.value.checkpoint.name == f"interrupted_{stop.value.timesteps}_steps.zip"
    )
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
