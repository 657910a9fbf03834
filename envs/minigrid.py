"""MiniGrid and BabyAI envs with text missions, for the grid + mission extractor (any MiniGrid-style id).

MiniGrid's observations are ``Dict(image: (7, 7, 3) uint8 codes, direction: Discrete(4), mission: MissionSpace)``.
SB3 cannot take the mission (a string), and it takes the image, bounded by 255, for a picture to transpose and
divide by 255. :class:`MissionTokens` turns such an observation into one the policies read with
:class:`rims_rl.extractors.GridMissionExtractor`:

- ``image``: the same codes, bounded by MiniGrid's largest object, colour and state codes (so SB3 keeps them as
  integers; the extractor embeds each code);
- ``direction``: kept (SB3 one-hot encodes it; the extractor joins it to the mission encoding);
- ``mission``: the mission's words as ids in the env's vocabulary, 0-padded (or cut) to ``length`` words.

The vocabulary is built from the env, the same in every process (no state to save with a model): ``<pad>`` (0),
``<unk>`` (1), then the words of MiniGrid's and BabyAI's mission grammars (:data:`MINIGRID_WORDS`: every word of the
missions of all 186 MiniGrid 3.2 / BabyAI ids over 10 seeds each, plus every colour and object name), then the words
of the env's own ``MissionSpace`` that are not among them (its mission function applied to each combination of its
placeholders, up to 4,096), sorted. A word outside it reads as ``<unk>``; ``,`` and ``.`` separate words.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from minigrid.core.constants import COLOR_NAMES, OBJECT_TO_IDX

__all__ = ["MINIGRID_WORDS", "MISSION_TOKENS", "MissionTokens", "has_text_mission", "mission_vocabulary"]

MINIGRID_WORDS: tuple[str, ...] = tuple(
    sorted(
        {
            *"a after and at avoid behind door end fetch find from front get go goal hallway in lava left matching "
            "must near next object of on open opening pick put reach right room rooms square the then to traverse "
            "unlock up use you your".split(),
            *COLOR_NAMES,
            *OBJECT_TO_IDX,
        }
    )
)
"""The words of MiniGrid's and BabyAI's missions (module docstring)."""

MISSION_TOKENS = 40
"""Default mission length in words (BabyAI's longest missions have 37)."""

_MAX_ENUMERATED = 4096
_SPLIT = re.compile(r"[\s,.;]+")


def words_of(mission: str) -> list[str]:
    """The lower-case words of a mission (``,``, ``.`` and ``;`` separate words)."""
    return [w for w in _SPLIT.split(mission.lower()) if w]


def has_text_mission(space: gym.Space) -> bool:
    """A MiniGrid-style dict: an ``(H, W, 3)`` ``image`` Box and a text ``mission`` (``Text`` or ``MissionSpace``)."""
    if not isinstance(space, spaces.Dict) or not {"image", "mission"} <= set(space.spaces):
        return False
    image, mission = space["image"], space["mission"]
    text = isinstance(mission, spaces.Text) or type(mission).__name__.endswith("MissionSpace")
    return text and isinstance(image, spaces.Box) and len(image.shape) == 3 and image.shape[-1] == 3


def _env_words(env: gym.Env) -> set[str]:
    """The words of the missions an env's ``MissionSpace`` can generate (empty if it has none)."""
    space = getattr(env.unwrapped, "mission_space", None)
    func = getattr(space, "mission_func", None)
    if func is None:
        return set()
    placeholders = getattr(space, "ordered_placeholders", None) or []
    words: set[str] = set()
    try:
        for args in itertools.islice(itertools.product(*placeholders), _MAX_ENUMERATED):
            words.update(words_of(str(func(*args))))
    except Exception:
        return words
    return words


def mission_vocabulary(env: gym.Env) -> tuple[str, ...]:
    """The env's vocabulary (module docstring): ``("<pad>", "<unk>", *MINIGRID_WORDS, *its own words)``."""
    extra = sorted(_env_words(env) - set(MINIGRID_WORDS))
    return ("<pad>", "<unk>", *MINIGRID_WORDS, *extra)


class MissionTokens(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """A MiniGrid-style observation with its mission as word ids (module docstring).

    :param env: an env whose observation space :func:`has_text_mission` accepts.
    :param length: words kept per mission (longer missions are cut; default :data:`MISSION_TOKENS`).
    """

    def __init__(self, env: gym.Env, length: int = MISSION_TOKENS) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, length=length)
        gym.ObservationWrapper.__init__(self, env)
        if not has_text_mission(env.observation_space):
            raise ValueError(
                f"MissionTokens needs a dict with an (H, W, 3) image and a text mission, got {env.observation_space}"
            )
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length = length
        self._last: tuple[str, np.ndarray] = ("", np.zeros(length, dtype=np.int64))  # a mission lasts an episode
        self.vocabulary = mission_vocabulary(env)
        self._ids = {word: i for i, word in enumerate(self.vocabulary)}
        image = env.observation_space["image"]
        high = np.empty(image.shape, dtype=np.uint8)  # MiniGrid's codes: object, colour, state (a door's, or the
        high[..., 0] = max(OBJECT_TO_IDX.values())  # agent's direction in fully observed grids: 0-3)
        high[..., 1] = len(COLOR_NAMES) - 1
        high[..., 2] = 3
        new = {
            "image": spaces.Box(0, high, dtype=np.uint8),
            "mission": spaces.Box(0, len(self.vocabulary) - 1, (length,), dtype=np.int64),
        }
        for key, space in env.observation_space.spaces.items():
            if key not in new:
                new[key] = space
        self.observation_space = spaces.Dict(new)

    def tokens(self, mission: str) -> np.ndarray:
        """Word ids of ``mission`` (``int64 (length,)``, 0-padded; unknown words are ``<unk>``)."""
        ids = np.zeros(self.length, dtype=np.int64)
        words = words_of(mission)[: self.length]
        ids[: len(words)] = [self._ids.get(w, 1) for w in words]
        return ids

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        out = dict(observation)
        out["image"] = np.minimum(
            np.asarray(observation["image"], dtype=np.uint8), self.observation_space["image"].high
        )
        mission = str(observation["mission"])
        if mission != self._last[0]:
            self._last = (mission, self.tokens(mission))
        out["mission"] = self._last[1].copy()
        return out
