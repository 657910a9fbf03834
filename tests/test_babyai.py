"""BabyAI object picking: the splits are what envs/babyai.py documents, levels reproduce, the task's rules hold,
and a RIM-A2C run trains and evaluates on every split from the command line."""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium.utils.env_checker import check_env
from minigrid.core.world_object import Ball, Key

import rims_rl.envs  # noqa: F401  (registers the ids)
from rims_rl.cli import main
from rims_rl.envs import family_of
from rims_rl.envs.babyai import (
    BABYAI_IDS,
    MISSION_VOCAB,
    POOLS,
    SPLITS,
    ObjectPickingEnv,
    split_env_id,
    tokenize_mission,
)

PICKUP, FORWARD, LEFT = 3, 2, 0


def _objects(env: ObjectPickingEnv) -> list[tuple[str, str]]:
    """Every pickable object on the grid, as (type, colour)."""
    return [(o.type, o.color) for o in env.grid.grid if o is not None and o.type in ("ball", "box", "key")]


def test_pools_are_disjoint_as_documented():
    train = set(POOLS["train"])
    parts = [set(POOLS[n]) for n in ("novel-colour", "novel-type", "novel-both")]
    assert len(train) == 8 and [len(p) for p in parts] == [4, 4, 2]
    assert set(POOLS["novel"]) == set().union(*parts)
    assert not train & set(POOLS["novel"])  # no novel pair ever occurs in training
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    train_types, train_colours = {t for t, _ in train}, {c for _, c in train}
    assert all(t in train_types and c not in train_colours for t, c in parts[0])  # new colours
    assert all(t not in train_types and c in train_colours for t, c in parts[1])  # a new type
    assert all(t not in train_types and c not in train_colours for t, c in parts[2])  # both


@pytest.mark.parametrize("split", list(SPLITS))
def test_levels_follow_their_split(split):
    env = gym.make(split_env_id(split)).unwrapped
    preset, targets = SPLITS[split], set(POOLS["train"])
    pool = set(POOLS[preset["distractors"]])
    for seed in range(30):
        env.reset(seed=seed)
        objects = _objects(env)
        assert len(objects) == 1 + preset["num_distractors"]
        assert env.target in targets and objects.count(env.target) == 1  # the mission names exactly one object
        assert env.mission == f"pick up the {env.target[1]} {env.target[0]}"
        distractors = list(objects)
        distractors.remove(env.target)
        assert all(d in pool and d != env.target for d in distractors)


def test_every_registered_id_passes_gymnasium_env_checker():
    assert family_of(BABYAI_IDS[0]).name == "babyai" and len(BABYAI_IDS) == len(SPLITS)
    for env_id in BABYAI_IDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_env(gym.make(env_id).unwrapped, skip_render_check=True)


def test_seeds_reproduce_levels_and_heldout_level_seeds_differ_from_training_ones():
    def level(env_id: str, seed: int) -> tuple:
        env = gym.make(env_id).unwrapped
        obs, _ = env.reset(seed=seed)
        return env.mission, env.agent_pos, env.agent_dir, env.grid.encode().tobytes(), obs["image"].tobytes()

    train, known = split_env_id("train"), split_env_id("known")
    assert level(train, 7) == level(train, 7)
    assert level(train, 7) != level(train, 8)
    # same env seed, same level number: the train split builds it from an even level seed, known from an odd one
    same = sum(level(train, s)[3] == level(known, s)[3] for s in range(20))
    assert same == 0
    env = gym.make(train).unwrapped
    env.reset(seed=3)
    second_episode = (env.reset()[0]["image"].tobytes(), env.grid.encode().tobytes())
    env.reset(seed=3)
    assert (env.reset()[0]["image"].tobytes(), env.grid.encode().tobytes()) == second_episode


def _face_object(env: ObjectPickingEnv, obj) -> None:
    """Put the agent next to ``obj``, facing it."""
    x, y = obj.cur_pos
    for d, (dx, dy) in enumerate([(1, 0), (0, 1), (-1, 0), (0, -1)]):
        cell = (x - dx, y - dy)
        if env.grid.get(*cell) is None:
            env.agent_pos, env.agent_dir = np.array(cell), d
            return
    raise AssertionError("no free cell next to the object")


def _find(env: ObjectPickingEnv, want_target: bool):
    for o in env.grid.grid:
        if o is not None and o.type in ("ball", "box", "key") and ((o.type, o.color) == env.target) == want_target:
            return o
    raise AssertionError("no such object")


def test_wrong_pickup_ends_the_episode_with_zero_and_the_target_pays_the_step_discounted_reward():
    env = gym.make(split_env_id("train")).unwrapped
    env.reset(seed=0)
    _face_object(env, _find(env, want_target=False))
    _, reward, terminated, truncated, info = env.step(PICKUP)
    assert terminated and not truncated and reward == 0.0 and info["is_success"] is False

    env.reset(seed=0)
    env.step(LEFT)
    _face_object(env, _find(env, want_target=True))
    _, reward, terminated, _, info = env.step(PICKUP)
    assert terminated and info["is_success"] is True
    assert reward == pytest.approx(1 - 0.9 * 2 / env.max_steps)


def test_truncation_reports_failure_and_missions_tokenise():
    env = ObjectPickingEnv(max_steps=3)
    env.reset(seed=0)
    for _ in range(2):
        assert env.step(LEFT)[2:4] == (False, False)
    _, reward, terminated, truncated, info = env.step(LEFT)
    assert truncated and not terminated and reward == 0 and info["is_success"] is False
    ids = tokenize_mission("pick up the red ball")
    assert [MISSION_VOCAB[i] for i in ids] == ["pick", "up", "the", "red", "ball"]
    with pytest.raises(ValueError, match="vocabulary"):
        tokenize_mission("pick up the red dragon")


def test_constructor_arguments_are_validated_with_a_sentence():
    with pytest.raises(ValueError, match="num_distractors must be in"):
        ObjectPickingEnv(room_size=4, num_distractors=3)
    with pytest.raises(ValueError, match="types are ball, box, key"):
        ObjectPickingEnv(distractors=[("ball", "pink")])
    with pytest.raises(ValueError, match="other than its own"):
        ObjectPickingEnv(targets=[("ball", "red")], distractors=[("ball", "red")])
    env = ObjectPickingEnv(room_size=9, num_distractors=10, distractors=POOLS["novel-both"])
    env.reset(seed=1)
    assert len(_objects(env)) == 11 and isinstance(Ball("red"), Ball) and Key  # custom rooms and pools work


def test_train_a2c_and_evaluate_every_split_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    code = main([
        "train", "--env", split_env_id("train"), "--policy", "rims", "--algo", "a2c", "--total-timesteps", "512",
        "--n-envs", "4", "--run-dir", str(run), "--wandb", "disabled", "--no-progress",
        "--set", "eval.episodes=4", "--set", "rim.input_set=grid",
    ])  # fmt: skip
    assert code == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "all", "--episodes", "6"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {split} |" in out for split in SPLITS)
    table = json.loads((run / "splits.json").read_text())["results"]
    assert [r["split"] for r in table] == list(SPLITS)
    for r in table:
        assert r["episodes"] == 6 and 0 <= r["ci_low"] <= r["success_rate"] <= r["ci_high"] <= 1
    assert (run / "splits.csv").read_text().splitlines()[0].startswith("split,env,episodes,successes")
    assert main(["evaluate", str(run), "--split", "novel", "--episodes", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [r["split"] for r in record["results"]] == ["novel"]
    assert len(json.loads((run / "splits.json").read_text())["results"]) == len(SPLITS)  # one row per split kept


def test_split_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["evaluate", str(tmp_path / "missing"), "--split", "novel"])
    assert err.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_an_interrupted_a2c_run_resumes_to_the_same_end(tmp_path):
    """SIGINT partway through a RecurrentA2C run on object picking: a checkpoint, then resume() finishes the run
    with one progress row per logged step, the update counter continuing, and the env state restored."""
    import os
    import signal

    from stable_baselines3.common.callbacks import BaseCallback

    from rims_rl.agents.training import ALGORITHMS, TrainingInterrupted, resume, train
    from rims_rl.config import CONFIG_DIR, resolve_config

    class InterruptAt(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps == 512:
                os.kill(os.getpid(), signal.SIGINT)
            return True

    flags = {"policy": "lstm", "algo": "a2c", "seed": 1, "wandb.mode": "disabled", "total_timesteps": 1024, "n_envs": 4,
             "a2c.n_steps": 8, "eval.freq": 0, "eval.episodes": 2}  # fmt: skip
    cfg = resolve_config(split_env_id("train"), CONFIG_DIR / "babyai.yaml", flags=flags)
    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg, tmp_path, callbacks=[InterruptAt()])
    assert stop.value.checkpoint is not None and 512 <= stop.value.timesteps < 1024
    result = resume(tmp_path)
    assert result.timesteps == 1024 and result.resumed_from == stop.value.timesteps
    model = ALGORITHMS["a2c"].load(tmp_path / "model.zip")
    assert model.iterations == 1024 // 32
    lines = (tmp_path / "progress.csv").read_text().splitlines()
    column = lines[0].split(",").index("time/total_timesteps")
    steps = [int(line.split(",")[column]) for line in lines[1:]]
    assert steps == [1024]  # one row per 32 rollouts of 32 steps, counted over the run, resumed or not


@pytest.mark.parametrize("policy", ["RIMMultiInputPolicy", "MultiInputLstmPolicy"])
def test_compact_dict_minibatches_give_the_same_update_as_padded_ones(policy):
    """One PPO update with the compact dict buffer (grid and mission unpadded: the extractor runs on real samples
    only) equals the update with sb3-contrib's padded dict buffer."""
    from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer

    from rims_rl.agents.buffers import CompactRecurrentDictRolloutBuffer
    from rims_rl.agents.ppo import RecurrentPPO
    from rims_rl.envs import make_env

    kwargs = dict(lstm_hidden_size=16) if "Lstm" in policy else dict(num_units=3, unit_size=8, k_active=2)
    params = []
    for compact in (True, False):
        env = make_env(split_env_id("train"), n_envs=2, seed=0)
        model = RecurrentPPO(policy, env, n_steps=64, batch_size=48, n_epochs=1, seed=0, policy_kwargs=kwargs)
        assert isinstance(model.rollout_buffer, CompactRecurrentDictRolloutBuffer)
        if not compact:
            old = model.rollout_buffer
            model.rollout_buffer = RecurrentDictRolloutBuffer(
                model.n_steps, model.observation_space, model.action_space, old.hidden_state_shape, "cpu",
                gamma=model.gamma, gae_lambda=model.gae_lambda, n_envs=model.n_envs,
            )  # fmt: skip
        model.learn(128)
        params.append(th.nn.utils.parameters_to_vector(model.policy.parameters()).detach())
        env.close()
    assert th.allclose(params[0], params[1], atol=1e-6, rtol=1e-5)
