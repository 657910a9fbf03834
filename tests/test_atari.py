"""Atari: every game builds and steps; the native and wrapper paths agree; compact minibatches change no result."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch as th
import yaml
from sb3_contrib.common.recurrent.buffers import RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.monitor import Monitor

from rims_rl.agents.buffers import CompactRecurrentRolloutBuffer
from rims_rl.agents.ppo import RecurrentPPO
from rims_rl.envs import FAMILIES, make_env
from rims_rl.envs.atari import ATARI_V4_IDS, ATARI_V5_IDS, AtariSettings, AtariVecEnv, make_atari_wrapped


def test_every_game_is_listed():
    assert len(ATARI_V4_IDS) == 62
    assert "DemonAttackNoFrameskip-v4" in ATARI_V4_IDS and "ALE/DemonAttack-v5" in ATARI_V5_IDS
    assert len(ATARI_V5_IDS) >= 100
    assert set(ATARI_V4_IDS) | set(ATARI_V5_IDS) == set(FAMILIES["atari"].ids)


@pytest.mark.parametrize("env_id", ATARI_V4_IDS)
def test_every_v4_game_builds_resets_and_steps(env_id):
    env = make_env(env_id, n_envs=2, seed=0)
    try:
        obs = env.reset()
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        rng = np.random.default_rng(0)
        for _ in range(8):
            obs, rewards, dones, infos = env.step(rng.integers(0, env.action_space.n, size=2))
        assert obs.shape == (2, 4, 84, 84) and rewards.dtype == np.float32 and dones.shape == (2,)
        assert set(np.unique(rewards)) <= {-1.0, 0.0, 1.0}  # clipped for learning
        assert all("lives" in info for info in infos)
    finally:
        env.close()


def test_v5_ids_use_sticky_actions_and_build():
    env = AtariVecEnv("ALE/Pong-v5", n_envs=1, seed=0)
    try:
        assert env.reset().shape == (1, 4, 84, 84)
    finally:
        env.close()


def _play_one_game(env, seed: int = 0, max_steps: int = 20_000):
    """Random actions in env 0 until its first game ends: (learning rewards, dones, the episode info)."""
    rng = np.random.default_rng(seed)
    env.reset()
    rewards, dones = [], []
    for _ in range(max_steps):
        _, r, d, infos = env.step(rng.integers(0, env.action_space.n, size=env.num_envs))
        rewards.append(r[0])
        dones.append(bool(d[0]))
        if "episode" in infos[0]:
            return np.array(rewards), np.array(dones), infos[0]["episode"]
    raise AssertionError("no game ended")


@pytest.mark.parametrize("path", ["ale", "dummy"])
def test_scores_are_whole_unclipped_games_while_learning_sees_lives_and_clipped_rewards(path):
    # DemonAttack: 4 lives (3 shown), 10-35 points per demon.
    def build(settings):
        if path == "ale":
            return AtariVecEnv("DemonAttackNoFrameskip-v4", n_envs=1, seed=3, settings=settings)
        return make_atari_wrapped("DemonAttackNoFrameskip-v4", n_envs=1, seed=3, settings=settings)

    env = build(AtariSettings())
    try:
        rewards, dones, info = _play_one_game(env)
    finally:
        env.close()
    assert set(np.unique(rewards)) <= {0.0, 1.0, -1.0}
    assert dones.sum() >= 3, "each life lost ends a learning episode"
    assert dones[-1]
    if path == "ale":
        assert info["l"] == len(rewards), "the episode length is the whole game's, in agent steps"
    else:  # SB3's EpisodicLifeEnv (a no-op) and FireResetEnv (2 steps) act after each reset and life lost
        assert len(rewards) < info["l"] <= len(rewards) + 3 * dones.sum()
    assert info["r"] > rewards.sum() > 0, "the score is unclipped and covers every life"

    env = build(AtariSettings().full_games())
    try:
        rewards, dones, info = _play_one_game(env)
    finally:
        env.close()
    assert dones.sum() == 1 and dones[-1], "evaluation: one episode is one game"
    assert info["r"] == pytest.approx(rewards.sum()) and info["r"] > 35, "evaluation: raw rewards"


def test_native_and_wrapper_paths_agree_on_spaces():
    native = AtariVecEnv("BreakoutNoFrameskip-v4", n_envs=2, seed=0)
    wrapped = make_atari_wrapped("BreakoutNoFrameskip-v4", n_envs=2, seed=0)
    try:
        assert native.observation_space == wrapped.observation_space
        assert native.action_space == wrapped.action_space
        a, b = native.reset(), wrapped.reset()
        assert a.shape == b.shape and a.dtype == b.dtype
        assert native.env_is_wrapped(Monitor) == [True, True]
    finally:
        native.close()
        wrapped.close()


def test_options_the_env_cannot_honour_are_refused():
    with pytest.raises(ValueError, match="efference_copy"):
        make_env("PongNoFrameskip-v4", efference_copy=True)
    with pytest.raises(ValueError, match="Atari games only"):
        make_env("CartPoleNoVel-v1", vec_env="ale")


@pytest.mark.parametrize("policy", ["RIMCnnPolicy", "CnnLstmPolicy"])
def test_compact_minibatches_give_the_same_update_as_padded_ones(policy):
    """One PPO update with the compact buffer (unpadded uint8 observations) equals sb3-contrib's padded buffer."""
    kwargs = dict(lstm_hidden_size=32) if policy == "CnnLstmPolicy" else dict(num_units=3, unit_size=8, k_active=2)
    params = []
    for compact in (True, False):
        env = AtariVecEnv("BreakoutNoFrameskip-v4", n_envs=2, seed=0)
        model = RecurrentPPO(
            policy, env, n_steps=32, batch_size=24, n_epochs=1, seed=0, device="cpu",
            policy_kwargs=dict(**kwargs, enable_critic_lstm=False) if policy == "CnnLstmPolicy" else
            dict(**kwargs, enable_critic_rim=False),
        )  # fmt: skip
        assert isinstance(model.rollout_buffer, CompactRecurrentRolloutBuffer)
        if not compact:
            old = model.rollout_buffer
            model.rollout_buffer = RecurrentRolloutBuffer(
                model.n_steps, model.observation_space, model.action_space, old.hidden_state_shape, "cpu",
                gamma=model.gamma, gae_lambda=model.gae_lambda, n_envs=model.n_envs,
            )  # fmt: skip
        model.learn(64)
        params.append(th.nn.utils.parameters_to_vector(model.policy.parameters()).detach())
        env.close()
    assert th.allclose(params[0], params[1], atol=1e-6, rtol=1e-5)


def test_unpadded_observations_without_a_mask_are_refused():
    env = AtariVecEnv("PongNoFrameskip-v4", n_envs=1, seed=0)
    model = RecurrentPPO("CnnLstmPolicy", env, n_steps=8, policy_kwargs=dict(lstm_hidden_size=8), device="cpu")
    obs = th.zeros(3, 4, 84, 84, dtype=th.uint8)
    states = model.policy.lstm_actor.weight_hh_l0.new_zeros(1, 1, 8)
    with pytest.raises(ValueError, match="padding_mask"):
        model.policy.evaluate_actions(obs, th.zeros(4), RNNStates((states, states), (states, states)), th.zeros(4))
    env.close()


# ---- the command, as the README gives it ---------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["rims", "lstm"])
def test_train_demon_attack_then_evaluate_a_full_game(policy, tmp_path):
    from tests.test_cli import run_cli

    run_dir = tmp_path / policy
    proc = run_cli("train", "--env", "DemonAttackNoFrameskip-v4", "--policy", policy, "--total-timesteps", "4096",
                   "--run-dir", str(run_dir), "--no-progress", "--set", "eval.episodes=2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "evaluation: DemonAttackNoFrameskip-v4: mean return" in proc.stdout
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["n_envs"] == 8 and cfg["ppo"]["n_steps"] == 128 and cfg["ppo"]["clip_range"] == 0.1  # atari.yaml
    assert cfg["rim"]["k_active"] == 5 and cfg["network"]["recurrent_critic"] == "shared"
    proc = run_cli("evaluate", str(run_dir), "--episodes", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["episodes"] == 1 and record["mean_return"] >= 0
    assert record["lengths"][0] > 100, "a whole game, not one life"
    if policy == "rims":  # the activations of a whole game, with the frames the agent saw beside them
        proc = run_cli("activations", str(run_dir), "--max-frames", "20", "--wandb", "disabled")
        assert proc.returncode == 0, proc.stderr
        out = run_dir / "analysis" / "DemonAttackNoFrameskip-v4"
        summary = json.loads((out / "summary.json").read_text())["episodes"][0]
        assert summary["length"] > 100 and len(summary["activation_rate"]) == 6
        assert sum(summary["activation_rate"]) == pytest.approx(5)  # k_active = 5 of 6 at every step
        with PIL.Image.open(out / "episode_000.gif") as gif:
            assert gif.n_frames == 20 and gif.size[1] == 2 * 84 and gif.size[0] > 2 * 84


def _suite():
    path = Path(__file__).resolve().parent.parent / "scripts" / "atari_suite.py"
    spec = importlib.util.spec_from_file_location("atari_suite", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["atari_suite"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_suite_skips_finished_runs_and_resumes_or_restarts_unfinished_ones(tmp_path, capsys):
    suite = _suite()
    cells = suite.plan(tmp_path, ["PongNoFrameskip-v4"], ["rims", "lstm"], [0])
    (cells[0].run_dir).mkdir(parents=True)
    (cells[0].run_dir / "run.json").write_text('{"status": "finished"}')
    (cells[1].run_dir).mkdir(parents=True)
    (cells[1].run_dir / "run.json").write_text('{"status": "interrupted"}')
    assert suite.main(["--games", "Pong", "--seeds", "0", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs, 1 finished, 1 to run" in out
    args = suite.argparse.Namespace(device="cpu", wandb="disabled", total_timesteps=1000, set=None)
    assert "--overwrite" in suite.command(cells[1], args)  # no checkpoint: from scratch
    checkpoint = cells[1].run_dir / "checkpoints" / "ckpt_8_steps"
    checkpoint.mkdir(parents=True)
    for name in ("model.zip", "state.pkl"):
        (checkpoint / name).write_bytes(b"")
    empty = {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    manifest = {"format": 1, "files": {"model.zip": empty, "state.pkl": empty}}
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))
    assert suite.command(cells[1], args)[3:6] == ["train", "--resume", str(cells[1].run_dir)]
    assert suite.main(["--games", "Pongg", "--dry-run"]) == 2
    assert "did you mean Pong" in capsys.readouterr().err


def test_sweep_file_covers_the_grid():
    sweep = yaml.safe_load((Path(__file__).parent.parent / "configs/sweeps/atari.yaml").read_text())
    assert sorted(sweep["parameters"]["env"]["values"]) == sorted(ATARI_V4_IDS)
    assert sweep["parameters"]["policy"]["values"] == ["rims", "lstm"]
    assert sweep["command"][1:3] == ["rims-rl", "train"]


def test_an_atari_run_stops_on_sigint_and_resumes_with_fresh_episodes(tmp_path, caplog):
    """The native vector env's emulators are not saved: the episodes in progress restart, the rest continues."""
    import signal

    from rims_rl.agents.training import TrainingInterrupted, resume, train
    from rims_rl.config import CONFIG_DIR, resolve_config
    from tests.test_training import SignalAt

    overrides = ["policy=lstm", "total_timesteps=512", "n_envs=2", "ppo.n_steps=64", "ppo.batch_size=64",
                 "ppo.n_epochs=1", "eval.episodes=1", "wandb.mode=disabled"]  # fmt: skip
    cfg = resolve_config("PongNoFrameskip-v4", CONFIG_DIR / "atari.yaml", overrides=overrides)
    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg, tmp_path, callbacks=[SignalAt(signal.SIGINT, step=130)])
    assert stop.value.timesteps == 256
    with caplog.at_level("WARNING"):
        result = resume(tmp_path)
    assert "the state of AtariVecEnv is not saved in checkpoints" in caplog.text
    assert result.resumed_from == 256 and result.timesteps == 512 and result.final_eval.episodes == 1
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["status"] == "finished" and meta["resumes"][0]["env_state_restored"] is False
