"""Observation normalisation (``normalize_obs``): trained with running statistics, saved with the model, applied
wherever the model is played, and restored on resume."""

from __future__ import annotations

import json
import pickle
import shutil
import signal

import numpy as np
import pytest
from stable_baselines3.common.vec_env import VecNormalize

from rims_rl.agents.evaluation import EVAL_SEED_OFFSET, evaluate
from rims_rl.agents.normalization import STATS_FILE, read_stats
from rims_rl.agents.ppo import RecurrentPPO
from rims_rl.agents.training import ConfigRejected, TrainingInterrupted, prepare, resume, train
from rims_rl.cli import main
from rims_rl.config import CONFIG_DIR, resolve_config
from rims_rl.envs import make_env
from rims_rl.envs.babyai import split_env_id
from tests.test_training import SignalAt

TINY = ["total_timesteps=256", "n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "ppo.n_epochs=1",
        "eval.episodes=2", "eval.freq=128", "wandb.mode=disabled", "normalize_obs=true",
        "checkpoint.every_steps=128"]  # fmt: skip


def config(policy: str = "rims"):
    return resolve_config("CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", overrides=[*TINY, f"policy={policy}"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("norm") / "run"
    result = train(config(), run_dir)
    return run_dir, result


def test_statistics_are_saved_with_the_model_and_used_by_its_evaluations(run):
    run_dir, result = run
    with open(run_dir / STATS_FILE, "rb") as f:
        saved = pickle.load(f)  # what VecNormalize.save writes: rl-zoo and SB3 users load it with VecNormalize.load
    assert isinstance(saved, VecNormalize) and saved.norm_obs and not saved.norm_reward
    assert saved.obs_rms.count == pytest.approx(2 + 256 + 1e-4)  # every observation: 2 resets, 256 steps
    seen = [0, 2]  # position and angle (the velocities are zeroed: mean and variance stay 0, so they stay 0)
    assert np.all(saved.obs_rms.mean[seen] != 0) and np.all(saved.obs_rms.var[seen] > 0)

    stats = read_stats(run_dir / "model.zip")
    np.testing.assert_array_equal(stats.obs_rms.mean, saved.obs_rms.mean)
    # the final evaluation is the one a user gets from the saved model and statistics (same env seeds)
    model = RecurrentPPO.load(run_dir / "model.zip", device="cpu")
    cfg = config()
    again = evaluate(model, cfg.env, episodes=2, seed=cfg.seed + EVAL_SEED_OFFSET, obs_stats=stats)
    assert again.returns == result.final_eval.returns

    # the frozen statistics are what the env applies: (obs - mean) / sqrt(var + eps), clipped
    raw, normed = make_env(cfg.env, n_envs=1, seed=3), stats.apply(make_env(cfg.env, n_envs=1, seed=3))
    expected = np.clip((raw.reset() - stats.obs_rms.mean) / np.sqrt(stats.obs_rms.var + stats.epsilon), -10, 10)
    np.testing.assert_allclose(normed.reset(), expected, rtol=1e-6)
    normed.step(np.array([1]))
    np.testing.assert_array_equal(normed.obs_rms.mean, stats.obs_rms.mean)  # not updated while playing


def test_a_checkpoint_holds_the_statistics_of_its_step(run):
    run_dir, _ = run
    final = read_stats(run_dir / "checkpoints" / "ckpt_256_steps" / "model.zip")
    earlier = read_stats(run_dir / "checkpoints" / "ckpt_128_steps" / "model.zip")
    np.testing.assert_array_equal(final.obs_rms.mean, read_stats(run_dir / "model.zip").obs_rms.mean)
    assert earlier.obs_rms.count == pytest.approx(2 + 128 + 1e-4)


def test_evaluate_and_activations_apply_the_statistics(run, tmp_path, capsys):
    run_dir, result = run
    assert main(["evaluate", str(run_dir), "--episodes", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["returns"] == result.final_eval.returns

    # a run stopped before its model.zip is played from its newest checkpoint, with that checkpoint's statistics
    stopped = tmp_path / "stopped"
    shutil.copytree(run_dir, stopped)
    (stopped / "model.zip").unlink()
    (stopped / STATS_FILE).unlink()
    assert main(["evaluate", str(stopped), "--episodes", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["returns"] == result.final_eval.returns

    assert main(["activations", str(run_dir), "--episodes", "1", "--out", str(tmp_path / "act")]) == 0
    assert "episode 0: return" in capsys.readouterr().out

    shutil.rmtree(stopped / "checkpoints")
    shutil.copy(run_dir / "model.zip", stopped / "model.zip")  # a model without its statistics: one clear line
    for command in ("evaluate", "activations"):
        with pytest.raises(SystemExit) as exit_:
            main([command, str(stopped), "--episodes", "1"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "trained with normalize_obs" in err[0] and STATS_FILE in err[0], err


def test_resume_restores_the_statistics(run, tmp_path):
    """Stopped at step 128 and resumed: the same statistics and evaluation as the uninterrupted run."""
    run_dir, result = run
    with pytest.raises(TrainingInterrupted):
        train(config(), tmp_path / "resumed", callbacks=[SignalAt(signal.SIGINT, 100)])
    resumed = resume(tmp_path / "resumed")
    a, b = read_stats(run_dir / "model.zip"), read_stats(tmp_path / "resumed" / "model.zip")
    np.testing.assert_array_equal(a.obs_rms.mean, b.obs_rms.mean)
    np.testing.assert_array_equal(a.obs_rms.var, b.obs_rms.var)
    assert resumed.final_eval.returns == result.final_eval.returns


def test_image_observations_are_rejected_in_one_line():
    cfg = resolve_config(split_env_id("train"), CONFIG_DIR / "babyai.yaml", overrides=["normalize_obs=true"])
    with pytest.raises(ConfigRejected, match=r"^normalize_obs needs vector observations .*normalize_obs: false") as err:
        prepare(cfg)
    assert "\n" not in str(err.value) and "image: a Box of shape (7, 7, 3) and dtype uint8" in str(err.value)
