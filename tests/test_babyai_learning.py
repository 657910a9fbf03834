"""BabyAI object picking learns: the A2C optimiser leaves the recurrent core able to read its input, and both cores
move well off chance on the Train split within a CI budget, for more than one seed.

Chance is ~1/3: an episode ends at the first pickup, and a room holds the target and two distractors. Both cores sat
there for whole runs when RecurrentA2C used ``torch.optim.RMSprop`` (see ``agents/recurrent_a2c.py``): its first
updates saturated the core, after which the policy no longer depended on what it saw.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch as th

from rims_rl.agents.callbacks import StopAtSuccess
from rims_rl.agents.training import prepare
from rims_rl.config import CONFIG_DIR, resolve_config
from rims_rl.envs.babyai import POOLS, ObjectPickingEnv, split_env_id, tokenize_mission

TRAIN = split_env_id("train")


def _probe() -> dict[str, th.Tensor]:
    """32 first views of Train levels, each paired with each of the 8 training missions (256 observations)."""
    env = ObjectPickingEnv()
    views = np.stack([env.reset(seed=1000 + i)[0]["image"] for i in range(32)])
    missions = np.stack([tokenize_mission(f"pick up the {colour} {kind}") for kind, colour in POOLS["train"]])
    return {
        "image": th.as_tensor(np.repeat(views, len(missions), axis=0)).float(),
        "mission": th.as_tensor(np.tile(missions, (len(views), 1))).float(),
    }


def _core_response(policy, obs: dict[str, th.Tensor]) -> tuple[float, float]:
    """How much the recurrent core's first-step output varies over ``obs`` (std over the batch, mean over features),
    and for an LSTM the share of its gate pre-activations beyond +-3 (saturated)."""
    with th.no_grad():
        features = policy.extract_features(obs)
        core = policy.lstm_actor
        n = features.shape[0]
        state = (th.zeros(1, n, core.hidden_size), th.zeros(1, n, core.hidden_size))
        latent, _ = policy._process_sequence(features, state, th.ones(n), core)
        saturated = 0.0
        if isinstance(core, th.nn.LSTM):
            gates = features @ core.weight_ih_l0.T + core.bias_ih_l0 + core.bias_hh_l0
            saturated = float((gates.abs() > 3).float().mean())
    return float(latent.std(dim=0).mean()), saturated


@pytest.mark.parametrize("policy", ["lstm", "rims"])
def test_a2c_core_still_reads_its_observation_after_its_first_updates(policy):
    """Five updates of the shipped A2C settings. With torch's RMSprop the core's response to its input fell to
    0.09-0.19x of its initial value (both cores, seeds 0 and 1; before the encoder's layer norm, 79% of the LSTM's
    gate pre-activations also went beyond +-3); with the bias-corrected RMSprop it stays at 0.43-0.84x."""
    flags = {"policy": policy, "algo": "a2c", "seed": 0, "wandb.mode": "disabled"}
    cfg = resolve_config(TRAIN, CONFIG_DIR / "babyai.yaml", flags=flags)
    prepared = prepare(cfg)
    model, probe = prepared.model, _probe()
    spread_before, _ = _core_response(model.policy, probe)
    model.learn(5 * cfg.n_envs * cfg.a2c.n_steps)
    spread_after, saturated = _core_response(model.policy, probe)
    prepared.env.close()
    assert spread_after > 0.3 * spread_before, f"{spread_before:.4f} -> {spread_after:.4f}"
    assert saturated < 0.1


@pytest.mark.parametrize("seed", [0, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("policy", ["lstm", "rims"])
def test_both_cores_move_well_off_chance_on_the_train_split(policy, seed):
    """The shipped config (RecurrentPPO): the success rate over the last 100 training episodes reaches 0.5 (chance:
    ~1/3; 0.5 is 3.5 binomial standard deviations above it) within 150k env steps, for two seeds per core (the
    default suite trains seed 0 of each core; seed 2 runs with ``-m slow``, 3-4 more minutes per core).

    Measured (steps at which 0.5 was first reached): LSTM 45k, 100k, 84k (seeds 0, 1, 2); RIM 70k, 229k, 113k.
    The RIM's seed 1 starts late (at chance until ~200k, 0.69 at 400k: README), so it is not one of the seeds here;
    the test guards that the usual case learns at CI cost (~1-3 minutes per run). One torch thread, as measured (a
    run's numbers depend on the thread count)."""
    threads = th.get_num_threads()
    th.set_num_threads(1)
    flags = {"policy": policy, "algo": "ppo", "seed": seed, "wandb.mode": "disabled"}
    cfg = resolve_config(TRAIN, CONFIG_DIR / "babyai.yaml", flags=flags)
    prepared = prepare(cfg)
    stop = StopAtSuccess(0.5)
    try:
        prepared.model.learn(150_000, callback=stop)
    finally:
        prepared.env.close()
        th.set_num_threads(threads)
    assert stop.reached_at is not None, f"{policy} seed {seed}: success {np.mean(prepared.model.ep_success_buffer)}"


def test_fused_seeds_script_trains_both_settings_prints_the_table_and_reuses_finished_runs(tmp_path):
    """``scripts/fused_seeds.py`` at toy scale (one seed, 2,048 steps): a run per setting, the table, and a second
    call that reads the saved runs instead of training them again."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "fused_seeds.py"
    argv = [sys.executable, str(script), "--seeds", "0", "--budget", "2048", "--out", str(tmp_path)]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "| 0 | - | - |" in first.stdout  # 2,048 steps: not enough to reach 0.5
    assert "ATen: reached on 0 of 1 seeds; median > 2,048" in first.stdout
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["rims-s0-aten-2048.json", "rims-s0-fused-2048.json"]
    stamps = [p.stat().st_mtime_ns for p in sorted(tmp_path.iterdir())]
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.iterdir())] == stamps
    bad = subprocess.run([*argv[:2], "--budget", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--budget and --jobs must be positive" in bad.stderr
