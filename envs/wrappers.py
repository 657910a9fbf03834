"""Observation wrappers shared by all env families."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["EfferenceCopy"]


class EfferenceCopy(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Joins the agent's previous action and reward to its observation (an *efference copy*, paper App. C.3).

    The observation becomes ``[obs, previous action, previous reward]``: a discrete action as a one-hot vector, a
    continuous action as is; both zero at the first step of an episode. The paper reports that giving the previous
    action and reward to the RIM improved its Atari results. Only flat ``Box`` observations are supported.

    :param env: an env with a flat ``Box`` observation space and a ``Discrete`` or ``Box`` action space.
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)
        obs_space, act_space = env.observation_space, env.action_space
        if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(f"EfferenceCopy needs a flat Box observation space, got {obs_space}")
        if isinstance(act_space, spaces.Discrete):
            self._action_size = int(act_space.n)
            act_low, act_high = np.zeros(self._action_size), np.ones(self._action_size)
        elif isinstance(act_space, spaces.Box):
            self._action_size = int(np.prod(act_space.shape))
            act_low, act_high = act_space.low.ravel(), act_space.high.ravel()
        else:
            raise ValueError(f"EfferenceCopy needs a Discrete or Box action space, got {act_space}")
        low = np.concatenate([obs_space.low, act_low, [-np.inf]]).astype(np.float32)
        high = np.concatenate([obs_space.high, act_high, [np.inf]]).astype(np.float32)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)

    def _join(self, obs: np.ndarray, action: Any, reward: float) -> np.ndarray:
        copy = np.zeros(self._action_size + 1, dtype=np.float32)
        if action is not None:
            if isinstance(self.env.action_space, spaces.Discrete):
                copy[int(action)] = 1.0
            else:
                copy[: self._action_size] = np.asarray(action, dtype=np.float32).ravel()
        copy[-1] = reward
        return np.concatenate([np.asarray(obs, dtype=np.float32), copy])

    def reset(self, **kwargs: Any):  # type: ignore[override]
        obs, info = self.env.reset(**kwargs)
        return self._join(obs, None, 0.0), info

    def step(self, action: Any):  # type: ignore[override]
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._join(obs, action, float(reward)), reward, terminated, truncated, info
