"""Sizes are checked before anything is allocated (``rims_rl.agents.sizes``): the estimate counts what training
holds, without allocating it, and a run over the memory available is refused in one line."""

from __future__ import annotations

import gymnasium as gym
import pytest

from rims_rl.agents.sizes import MAX_ENVS, ResourceError, check_env_count, check_memory, estimate_memory
from rims_rl.config import CONFIG_DIR, resolve_config
from rims_rl.rim import RIM


def cartpole(**overrides):
    return resolve_config(
        "CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", overrides=[f"{k}={v}" for k, v in overrides.items()]
    )


def test_the_estimate_counts_the_model_and_the_rollout_buffer():
    cfg = cartpole()
    space = gym.spaces.Box(-1, 1, (2,))
    parts = estimate_memory(cfg, space)
    rim = RIM(512, 6, 32, 5, **cfg.rim.rim_kwargs())
    assert parts["model"] == 4 * 4 * 2 * sum(p.numel() for p in rim.parameters())  # 2 cores (separate critic)
    assert parts["rollout buffer"] == 4 * 16 * 32 * (2 + 4 * 6 * 32 + 8)
    assert sum(parts.values()) < 100e6  # the shipped config: tens of MB
    big = estimate_memory(cartpole(**{"rim.num_units": 2000, "rim.k_active": 4}), space)
    assert big["attention"] == 4 * 512 * 2000**2 * 4 and sum(big.values()) > 10e9


def test_a_run_over_the_memory_available_is_refused_with_the_estimate():
    cfg = cartpole()
    check_memory(cfg, gym.spaces.Box(-1, 1, (2,)), available=1 << 40)
    with pytest.raises(ResourceError, match=r"this run needs an estimated .* more than the 1.0 MB available"):
        check_memory(cfg, gym.spaces.Box(-1, 1, (2,)), available=1_000_000)


def test_more_env_copies_than_one_process_steps_are_refused_before_any_is_made():
    check_env_count(cartpole(n_envs=MAX_ENVS))
    with pytest.raises(
        ResourceError, match=f"n_envs=100000 is more env copies than one process steps .at most {MAX_ENVS}"
    ):
        check_env_count(cartpole(n_envs=100000))


def test_counting_parameters_allocates_nothing():
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    parts = estimate_memory(cartpole(**{"rim.num_units": 100000, "rim.k_active": 4}))
    assert parts["model"] > 100e9  # 100,000 units: over 100 GB if they were allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # the process grew < 100 MB
