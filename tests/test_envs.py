"""The project's environments and wrappers."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rims_rl.envs import FAMILIES, EfferenceCopy, UnknownEnvError, check_env_id, make_env
from rims_rl.envs.classic import CLASSIC_IDS


@pytest.mark.filterwarnings("ignore:.*different from the unwrapped version")  # the masking wrapper is the env
@pytest.mark.parametrize("env_id", CLASSIC_IDS)
def test_novel_envs_pass_gymnasiums_checker(env_id):
    check_env(gym.make(env_id), skip_render_check=True)


@pytest.mark.parametrize("env_id, base, hidden", [("CartPoleNoVel-v1", "CartPole-v1", [1, 3]),
                                                 ("PendulumNoVel-v1", "Pendulum-v1", [2])])  # fmt: skip
def test_novel_envs_hide_exactly_the_velocities(env_id, base, hidden):
    masked, full = gym.make(env_id), gym.make(base)
    obs_m, _ = masked.reset(seed=3)
    obs_f, _ = full.reset(seed=3)
    for _ in range(5):
        action = full.action_space.sample()
        obs_m, *_ = masked.step(action)
        obs_f, *_ = full.step(action)
    assert np.all(obs_m[hidden] == 0)
    shown = [i for i in range(len(obs_f)) if i not in hidden]
    np.testing.assert_allclose(obs_m[shown], obs_f[shown])
    assert masked.spec.max_episode_steps == full.spec.max_episode_steps


def test_families_list_registered_ids():
    for family in FAMILIES.values():
        for env_id in family.ids:
            check_env_id(env_id)
    with pytest.raises(UnknownEnvError, match="did you mean CartPoleNoVel-v1"):
        check_env_id("CartPoleNoVel-v2")


@pytest.mark.filterwarnings("ignore:.*different from the unwrapped version", "ignore:.*infinity")
def test_efference_copy_joins_the_previous_action_and_reward():
    env = EfferenceCopy(gym.make("CartPoleNoVel-v1"))
    assert env.observation_space.shape == (4 + 2 + 1,)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs[4:], [0, 0, 0])
    obs, reward, *_ = env.step(1)
    np.testing.assert_array_equal(obs[4:], [0, 1, reward])
    check_env(EfferenceCopy(gym.make("PendulumNoVel-v1")), skip_render_check=True)
    vec = make_env("CartPoleNoVel-v1", n_envs=2, seed=0, efference_copy=True)
    assert vec.observation_space.shape == (7,)
