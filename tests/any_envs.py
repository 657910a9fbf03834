"""Small gymnasium envs outside the project's families, for tests/test_any_env.py (registered on import).

- ``TinyImage-v0``: 16x16 RGB uint8 frames (under the Nature CNN's 36 pixels); the frame's colour at the first step
  says which of 3 actions is rewarded for the rest of the episode (a memory task).
- ``TinyDict-v0``: ``Dict(position: Box(2,), cue: Discrete(3))`` observations, ``MultiDiscrete([3, 2])`` actions.
- ``TinyText-v0``, ``TinyGraph-v0``: a ``Text`` and a ``Graph`` observation space, which the policies cannot read.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

_LENGTH = 16


class _Cued(gym.Env):
    """A cue (0-2) shown at the first step; reward 1 for each later step whose action is the cue."""

    def __init__(self, action_space: spaces.Space) -> None:
        self.action_space = action_space
        self.cue = 0
        self.t = 0

    def _obs(self) -> Any:
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(3)), 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        first = int(np.asarray(action).ravel()[0])
        reward = float(self.t > 0 and first == self.cue)
        self.t += 1
        return self._obs(), reward, False, self.t >= _LENGTH, {}


class TinyImageEnv(_Cued):
    def __init__(self) -> None:
        super().__init__(spaces.Discrete(3))
        self.observation_space = spaces.Box(0, 255, (16, 16, 3), dtype=np.uint8)

    def _obs(self) -> np.ndarray:
        frame = np.zeros((16, 16, 3), dtype=np.uint8)
        if self.t == 0:
            frame[..., self.cue] = 255
        return frame


class TinyDictEnv(_Cued):
    def __init__(self) -> None:
        super().__init__(spaces.MultiDiscrete([3, 2]))
        self.observation_space = spaces.Dict(
            {"position": spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), "cue": spaces.Discrete(3)}
        )

    def _obs(self) -> dict[str, Any]:
        position = np.array([self.t / _LENGTH, 0.0], dtype=np.float32)
        return {"position": position, "cue": self.cue if self.t == 0 else 0}


class TinyTextEnv(_Cued):
    def __init__(self) -> None:
        super().__init__(spaces.Discrete(3))
        self.observation_space = spaces.Text(8)

    def _obs(self) -> str:
        return str(self.cue)


class TinyGraphEnv(_Cued):
    def __init__(self) -> None:
        super().__init__(spaces.Discrete(3))
        self.observation_space = spaces.Graph(spaces.Box(0, 1, (2,)), None)

    def _obs(self) -> Any:
        return self.observation_space.sample()


for _name, _cls in {"TinyImage-v0": TinyImageEnv, "TinyDict-v0": TinyDictEnv, "TinyText-v0": TinyTextEnv,
                    "TinyGraph-v0": TinyGraphEnv}.items():  # fmt: skip
    if _name not in gym.registry:
        gym.register(_name, entry_point=f"{__name__}:{_cls.__name__}")
