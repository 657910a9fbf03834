"""Partially observable classic control: the velocities are hidden, so a policy needs memory.

The same variants as rl-baselines3-zoo's ``MaskVelocityWrapper``: the observation keeps its shape and bounds, and
the velocity entries are set to zero at every step.

## CartPoleNoVel-v1

### Description
Gymnasium's ``CartPole-v1`` (balance a pole on a cart) with the cart velocity and the pole angular velocity hidden.

### Observation Space
``Box(4,)``: cart position, 0, pole angle, 0.

### Action Space, Rewards, Termination
As ``CartPole-v1``: push left or right; +1 per step; the pole falls past 12 degrees, the cart leaves the track, or
500 steps pass (truncation). Solved at a mean return of 475 (``reward_threshold``).

## PendulumNoVel-v1

### Description
Gymnasium's ``Pendulum-v1`` (swing a pendulum up and keep it upright) with the angular velocity hidden.

### Observation Space
``Box(3,)``: cos(theta), sin(theta), 0.

### Action Space, Rewards, Termination
As ``Pendulum-v1``: a torque in [-2, 2]; reward ``-(theta^2 + 0.1 thetadot^2 + 0.001 torque^2)``; truncated after
200 steps.

## Registered Configurations
``CartPoleNoVel-v1``, ``PendulumNoVel-v1`` (registered when :mod:`rims_rl.envs` is imported).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control import CartPoleEnv, PendulumEnv

__all__ = ["CLASSIC_IDS", "MaskVelocityWrapper", "register_classic"]


class MaskVelocityWrapper(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Zeroes the observation entries at ``indices`` (the velocities), keeping the observation space."""

    def __init__(self, env: gym.Env, indices: Sequence[int]) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, indices=tuple(indices))
        gym.ObservationWrapper.__init__(self, env)
        self.mask = np.ones(env.observation_space.shape, dtype=env.observation_space.dtype)
        self.mask[list(indices)] = 0

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation * self.mask


def _cartpole_no_vel(**kwargs: Any) -> gym.Env:
    return MaskVelocityWrapper(CartPoleEnv(**kwargs), indices=(1, 3))


def _pendulum_no_vel(**kwargs: Any) -> gym.Env:
    return MaskVelocityWrapper(PendulumEnv(**kwargs), indices=(2,))


CLASSIC_IDS = ("CartPoleNoVel-v1", "PendulumNoVel-v1")


def register_classic() -> None:
    """Register the NoVel ids with gymnasium (idempotent)."""
    if "CartPoleNoVel-v1" not in gym.registry:
        gym.register("CartPoleNoVel-v1", entry_point=_cartpole_no_vel, max_episode_steps=500, reward_threshold=475.0)
    if "PendulumNoVel-v1" not in gym.registry:
        gym.register("PendulumNoVel-v1", entry_point=_pendulum_no_vel, max_episode_steps=200)
