"""Per-step RIM activations: recorded during training (W&B, saved masks) and played back by ``rims-rl activations``."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from rims_rl.agents.ppo import RecurrentPPO
from rims_rl.agents.training import train
from rims_rl.cli import main
from rims_rl.config import CONFIG_DIR, ConfigError, resolve_config
from rims_rl.tracking import RIMActivationCallback, activation_heatmap, read_activations, read_wandb_history

N_ENVS, N_STEPS, K, K_ACTIVE = 4, 32, 4, 2


class FirstRollout(BaseCallback):
    """Keeps what the policy saw in the first rollout: its weights, initial states, observations and starts."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = self.states = None
        self.obs: list[th.Tensor] = []
        self.starts: list[th.Tensor] = []

    def _on_rollout_start(self) -> None:
        if self.weights is None:
            self.weights = copy.deepcopy(self.model.policy.state_dict())
            self.states = copy.deepcopy(self.model._last_lstm_states)

    def _on_step(self) -> bool:
        if len(self.obs) < N_STEPS:
            self.obs.append(self.locals["obs_tensor"].clone())
            self.starts.append(self.locals["episode_starts"].clone())
        return True


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, FirstRollout]:
    run_dir = tmp_path_factory.mktemp("act") / "rims"
    cfg = resolve_config(
        "CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml",
        overrides=["policy=rims", "total_timesteps=512", f"n_envs={N_ENVS}", f"ppo.n_steps={N_STEPS}",
                   "ppo.batch_size=64", "ppo.n_epochs=1", "eval.episodes=2", "eval.stop_at=null", "wandb.mode=offline",
                   f"rim.num_units={K}", f"rim.k_active={K_ACTIVE}", "rim.unit_size=16",
                   "activations.save_every=1", "activations.heatmap_env=1"],
    )  # fmt: skip
    probe = FirstRollout()
    train(cfg, run_dir, callbacks=[probe])
    return run_dir, probe


def _progress_steps(run_dir: Path) -> dict[int, dict[str, str]]:
    with open(run_dir / "progress.csv", newline="") as f:
        return {int(float(row["time/total_timesteps"])): row for row in csv.DictReader(f)}


def test_offline_wandb_run_holds_heatmaps_and_rates_at_the_env_steps(run):
    run_dir, _ = run
    (offline,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    rows = [r for r in read_wandb_history(offline) if "rim/activation_rate/unit_0" in r]
    progress = _progress_steps(run_dir)
    assert [r["_step"] for r in rows] == sorted(progress) == list(range(N_ENVS * N_STEPS, 513, N_ENVS * N_STEPS))
    for row in rows:
        csv_row = progress[row["_step"]]
        rates = [row[f"rim/activation_rate/unit_{j}"] for j in range(K)]
        assert rates == pytest.approx([float(csv_row[f"rim/activation_rate/unit_{j}"]) for j in range(K)])
        assert sum(rates) == pytest.approx(K_ACTIVE)  # exactly k_active winners at every step
        nulls = [row[f"rim/null_attention/unit_{j}"] for j in range(K)]
        assert all(0.0 < v < 1.0 for v in nulls)
        assert 0.0 <= row["rim/winner_change_rate"] <= 1.0
        image = row["rim/heatmap"]
        assert image["_type"] == "image-file" and image["width"] == (512 // N_STEPS) * N_STEPS
        assert image["height"] == 4 + 10 * K
        assert (offline / "files" / image["path"]).is_file()
    assert "rim/heatmap" not in next(iter(progress.values()))  # images go to W&B only


def test_saved_masks_equal_what_the_rim_computes_for_the_same_observations(run):
    run_dir, probe = run
    rollouts = read_activations(run_dir)
    assert [r.step for r in rollouts] == list(range(0, 512, N_ENVS * N_STEPS))
    first = rollouts[0]
    assert first.mask.shape == (N_STEPS, N_ENVS, K) and first.mask.dtype == bool
    assert (first.mask.sum(axis=-1) == K_ACTIVE).all()

    model = RecurrentPPO.load(run_dir / "model.zip", device="cpu")
    policy = model.policy
    policy.load_state_dict(probe.weights)  # the weights that played the first rollout
    policy.set_training_mode(False)
    obs = th.stack(probe.obs)  # (T, E, obs)
    starts = th.stack(probe.starts)  # (T, E)
    with th.no_grad():  # the whole rollout in one sequence call, not the step-by-step path that recorded it
        features = policy.extract_features(obs.reshape(N_STEPS * N_ENVS, -1))
        if not policy.share_features_extractor:
            features = features[0]
        rim = policy.rim_actor
        x = features.reshape(N_STEPS, N_ENVS, policy.input_set_size, rim.input_size)
        h0, c0 = probe.states.pi
        _, _, info = rim(x, (h0[0], c0[0]), episode_starts=starts)
    assert np.array_equal(info.activation_mask.numpy(), first.mask)
    saved_null = first.null_attention.astype(np.float32)  # stored as float16: half an ulp at 0.5 is 2.4e-4
    np.testing.assert_allclose(info.null_attention.numpy(), saved_null, atol=5e-4)
    assert np.array_equal(starts.numpy() > 0.5, first.episode_start)
    assert first.episode_start[0].all()  # the first step of training starts every env's episode


def test_heatmap_draws_units_as_rows_and_episode_starts_as_ticks():
    mask = np.zeros((8, 3), dtype=bool)
    mask[:, 1] = True
    mask[5, 2] = True
    starts = np.zeros(8, dtype=bool)
    starts[[0, 5]] = True
    image = activation_heatmap(mask, starts, width=16, row=10)
    assert image.shape == (4 + 30, 16, 3) and image.dtype == np.uint8
    active, inactive, red = (253, 231, 37), (68, 1, 84), (230, 30, 30)
    assert tuple(image[4 + 15, 0]) == active and tuple(image[4 + 5, 0]) == inactive  # unit 1 on, unit 0 off
    assert tuple(image[4 + 25, 10]) == active and tuple(image[4 + 25, 12]) == inactive  # unit 2 only at step 5
    assert tuple(image[0, 0]) == red and tuple(image[0, 10]) == red and tuple(image[0, 2]) != red


def test_resumed_run_drops_masks_saved_after_its_checkpoint(tmp_path):
    for step in (0, 512, 1024):
        np.savez_compressed(tmp_path / f"rollout_{step:012d}.npz", step=step)
    RIMActivationCallback(save_every=1, save_dir=tmp_path, keep_until=512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollout_000000000000.npz"]


def test_heatmap_env_must_be_a_training_env():
    with pytest.raises(ConfigError, match=r"activations.heatmap_env=4 .* 4 training envs \(valid: 0..3\)"):
        resolve_config(
            "CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", overrides=["n_envs=4", "activations.heatmap_env=4"]
        )


def test_activations_command_writes_heatmaps_and_a_summary(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "analysis"
    assert main(["activations", str(run_dir), "--episodes", "2", "--out", str(out), "--wandb", "disabled"]) == 0
    printed = capsys.readouterr().out
    assert "episode 1: return" in printed and "unit activation rates" in printed
    assert (out / "episode_000.png").stat().st_size > 0 and (out / "episode_001.png").is_file()
    assert not list(out.glob("*.gif"))  # vector observations: no frames
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["episodes"]) == 2
    with np.load(out / "episodes.npz") as data:
        for i, ep in enumerate(summary["episodes"]):
            mask = data[f"mask_{i}"]
            assert mask.shape == (ep["length"], K) and (mask.sum(axis=1) == K_ACTIVE).all()
            assert ep["return"] == pytest.approx(float(data[f"reward_{i}"].sum()))


def test_activations_command_refuses_an_lstm_run(tmp_path, capsys):
    run_dir = tmp_path / "lstm"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("policy: lstm\n")
    (run_dir / "model.zip").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["activations", str(run_dir)])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"rims-rl: error: activations need a RIM policy; {run_dir} trained a lstm policy"
    )


def test_activations_command_logs_its_figures_to_wandb(run, tmp_path):
    run_dir, _ = run
    before = set((run_dir / "wandb").glob("offline-run-*"))
    out = tmp_path / "analysis"
    assert main(["activations", str(run_dir), "--out", str(out), "--wandb", "offline"]) == 0
    (new,) = set((run_dir / "wandb").glob("offline-run-*")) - before
    # complete when the command returns (tracking.finish_wandb waits for W&B's service to write the exit record)
    (row,) = read_wandb_history(new)
    image = row["activations/episode_000"]
    assert image["_type"] == "image-file" and (new / "files" / image["path"]).is_file()
