"""Any gymnasium env trains with ``rims-rl train --env ID`` (``configs/default.yaml``, chosen by its spaces), then
evaluates: a MiniGrid env and a BabyAI level with text missions, a vector env, a small-image env (``module:EnvId``),
a ``Dict`` env with multi-discrete actions (``--gym-packages``) and a continuous-action env, for both cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml

from rims_rl.cli import main
from rims_rl.envs import make_env

ROOT = Path(__file__).resolve().parent.parent

SHORT = ["--total-timesteps", "2048", "--n-envs", "4", "--no-progress",
         "--set", "ppo.n_steps=64", "--set", "ppo.batch_size=128", "--set", "ppo.n_epochs=2",
         "--set", "eval.episodes=2"]  # fmt: skip

ENVS = {  # case: (env arguments, the kind sections configs/default.yaml applies, the extractor)
    "minigrid": (["--env", "MiniGrid-MemoryS7-v0"], ["mission"], "GridMissionExtractor"),
    "babyai-level": (["--env", "BabyAI-GoToLocal-v0"], ["mission"], "GridMissionExtractor"),
    "vector": (["--env", "Acrobot-v1"], ["vector"], "FlattenExtractor"),
    "image": (["--env", "tests.any_envs:TinyImage-v0"], ["image"], "SmallImageCNN"),
    "dict": (["--env", "TinyDict-v0", "--gym-packages", "tests.any_envs"], ["dict"], "CombinedExtractor"),
    "continuous": (["--env", "Pendulum-v1"], ["vector", "continuous"], "FlattenExtractor"),
}


@pytest.mark.parametrize("policy", ["rims", "lstm"])
@pytest.mark.parametrize("case", list(ENVS))
def test_an_env_outside_the_families_trains_and_evaluates(case, policy, tmp_path, capsys):
    env_args, kinds, extractor = ENVS[case]
    run_dir = tmp_path / "run"
    wandb = "offline" if case == "minigrid" else "disabled"  # W&B offline for one case (it costs seconds)
    assert main(["train", *env_args, "--policy", policy, *SHORT, "--wandb", wandb, "--run-dir", str(run_dir)]) == 0
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["env"] == env_args[1] and cfg["gym_packages"] == env_args[3:]
    assert cfg["n_envs"] == 4 and cfg["network"]["recurrent_critic"] in ("separate", "shared")
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and meta["timesteps"] >= 2048
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--episodes", "2"]) == 0
    assert "over 2 episodes" in capsys.readouterr().out
    assert main(["config", *env_args, "--policy", policy]) == 0
    out = capsys.readouterr().out
    assert f"extractor: {extractor}" in out
    assert f"sections {', '.join(['default', *kinds, env_args[1]])}" in out
    if wandb == "offline":
        assert list(Path(meta["wandb"]["dir"]).glob("run-*.wandb"))
    if policy == "rims" and case in ("minigrid", "image"):
        out_dir = tmp_path / "activations"
        assert (
            main(["activations", str(run_dir), "--max-frames", "16", "--out", str(out_dir), "--wandb", "disabled"]) == 0
        )
        assert list(out_dir.glob("*.png"))


def test_compare_reads_runs_of_any_env(tmp_path, capsys):
    runs = tmp_path / "runs"
    for policy in ("rims", "lstm"):
        argv = ["train", "--env", "Acrobot-v1", "--policy", policy, *SHORT, "--wandb", "disabled"]
        assert main([*argv, "--run-dir", str(runs / policy)]) == 0
    assert main(["compare", str(runs), "--out", str(tmp_path / "compare")]) == 0
    assert list((tmp_path / "compare").glob("*.png"))


def test_the_kind_sections_of_default_yaml_are_applied_in_order(capsys):
    assert main(["config", "--env", "MiniGrid-MemoryS7-v0"]) == 0
    mission = yaml.safe_load(capsys.readouterr().out)
    assert mission["n_envs"] == 16 and mission["ppo"]["learning_rate"] == 1e-3  # the mission section
    assert main(["config", "--env", "Pendulum-v1", "--set", "ppo.ent_coef=0.02"]) == 0
    pendulum = yaml.safe_load(capsys.readouterr().out)
    assert pendulum["ppo"]["learning_rate"] == 3e-4 and pendulum["ppo"]["ent_coef"] == 0.02  # --set wins
    assert main(["config", "--env", "Acrobot-v1"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ppo"]["ent_coef"] == 0.01  # no continuous section
    assert main(["config", "--env", "CartPoleNoVel-v1"]) == 0
    assert "env family 'classic'" in capsys.readouterr().out  # a family config still wins


def test_a_user_config_section_named_by_the_env_id_applies(tmp_path, capsys):
    user = tmp_path / "mine.yaml"
    user.write_text("image:\n  n_envs: 3\nAcrobot-v1:\n  n_envs: 5\n  rim:\n    k_active: 2\n")
    assert main(["config", "--env", "Acrobot-v1", "--config", str(user)]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["n_envs"] == 5 and cfg["rim"]["k_active"] == 2


def test_minigrid_missions_become_word_ids_of_a_vocabulary_built_from_the_env():
    env = make_env("BabyAI-GoToLocal-v0", n_envs=2, seed=0)
    try:
        obs = env.reset()
        space = env.observation_space
        assert set(space.spaces) == {"image", "direction", "mission"}
        assert obs["mission"].shape == (2, 40) and obs["mission"].dtype == np.int64
        assert (obs["image"] <= space["image"].high).all() and space["image"].high.max() < 255  # codes, not pixels
        inner = env.envs[0]
        while not hasattr(inner, "vocabulary"):
            inner = inner.env
        words = [inner.vocabulary[i] for i in obs["mission"][0] if i]
        assert " ".join(words) == inner.unwrapped.mission.replace(",", "")
        expected = [inner.vocabulary.index(w) for w in ("go", "to", "the")] + [1] + [0] * 36  # 1: <unk>
        assert inner.tokens("go to the zebra").tolist() == expected
    finally:
        env.close()


def test_a_run_of_a_gym_package_env_resumes_in_a_new_process(tmp_path):
    from rims_rl.agents.training import train
    from rims_rl.config import DEFAULT_CONFIG, resolve_config

    overrides = ["policy=rims", "total_timesteps=1024", "n_envs=4", "ppo.n_steps=64", "ppo.batch_size=128",
                 "ppo.n_epochs=1", "checkpoint.every_steps=512", "wandb.mode=disabled",
                 "gym_packages=[tests.any_envs]"]  # fmt: skip
    run_dir = tmp_path / "run"
    train(resolve_config("TinyDict-v0", DEFAULT_CONFIG, overrides=overrides, kinds=("dict",)), run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(dict(meta, status="interrupted")))  # as if stopped at 512
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "ckpt_1024_steps")
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_SILENT="true")
    rims_rl = str(Path(sys.executable).with_name("rims-rl"))
    proc = subprocess.run([rims_rl, "train", "--resume", str(run_dir), "--no-progress"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "resumed at step 512" in proc.stdout


def test_subprocess_envs_import_the_gym_packages_again():
    env = make_env("TinyDict-v0", n_envs=2, seed=0, vec_env="subproc", gym_packages=["tests.any_envs"])
    try:
        obs = env.reset()
        assert obs["position"].shape == (2, 2)
    finally:
        env.close()
    assert "TinyDict-v0" in gym.registry


def test_small_images_read_as_a_set_of_positions_by_the_rim(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--env", "tests.any_envs:TinyImage-v0", "--policy", "rims", *SHORT, "--wandb", "disabled"]
    assert main([*argv, "--set", "rim.input_set=grid", "--run-dir", str(run_dir)]) == 0
    from rims_rl.agents.ppo import RecurrentPPO

    policy = RecurrentPPO.load(run_dir / "model.zip", device="cpu").policy
    extractor = policy.features_extractor
    assert type(extractor).__name__ == "NatureCNNGrid" and extractor.set_size == 16  # 16x16 -> a 4x4 map
    assert policy.input_set_size == 16
