"""BabyAI object picking with known and novel distractors (paper §4.2.2, App. C.8-C.9), on MiniGrid.

The paper trains an A2C agent to pick up the object its mission names among distractors and evaluates it with
distractors never seen in training; it does not list its distractor sets. This module defines them (below), makes
them constructor arguments, and registers the splits as gymnasium ids (``rims-rl envs --family babyai``).

Distractor pools (an object is a ``(type, colour)`` pair; MiniGrid has the pickable types ball, box and key and the
colours red, green, blue, purple, yellow and grey):

================  ============================  ================================================
pool              types x colours               pairs
================  ============================  ================================================
``train``         {ball, key} x {red, green,    8: targets (every split) and training distractors
                  blue, purple}
``novel-colour``  {ball, key} x {yellow, grey}  4: known types in colours never seen
``novel-type``    {box} x {red, green, blue,    4: a type never seen, in known colours
                  purple}
``novel-both``    {box} x {yellow, grey}        2: new type and new colour
``novel``         the three above               10: no pair of it occurs in training
================  ============================  ================================================

Level seeds: every episode draws a level number ``n`` from the env's random stream (seeded by ``reset(seed=...)``)
and builds the room from the level seed ``2 n`` (``level_seeds="train"``) or ``2 n + 1`` (``"heldout"``), so
evaluation splits never replay a training level seed, whatever seeds the envs are given.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from minigrid.core.constants import COLOR_NAMES, COLOR_TO_IDX, OBJECT_TO_IDX
from minigrid.core.grid import Grid
from minigrid.core.mission import MissionSpace
from minigrid.core.world_object import Ball, Box, Key, WorldObj
from minigrid.minigrid_env import MiniGridEnv

__all__ = [
    "BABYAI_IDS",
    "MISSION_LENGTH",
    "MISSION_VOCAB",
    "POOLS",
    "SPLITS",
    "ObjectPickingEnv",
    "register_babyai",
    "split_env_id",
    "split_of",
    "tokenize_mission",
]

Pair = tuple[str, str]
"""An object kind: ``(type, colour)``, e.g. ``("ball", "red")``."""

TRAIN_TYPES = ("ball", "key")
TRAIN_COLOURS = ("red", "green", "blue", "purple")
NOVEL_TYPES = ("box",)
NOVEL_COLOURS = ("yellow", "grey")


def _pairs(types: Iterable[str], colours: Iterable[str]) -> tuple[Pair, ...]:
    return tuple(itertools.product(types, colours))


POOLS: dict[str, tuple[Pair, ...]] = {
    "train": _pairs(TRAIN_TYPES, TRAIN_COLOURS),
    "novel-colour": _pairs(TRAIN_TYPES, NOVEL_COLOURS),
    "novel-type": _pairs(NOVEL_TYPES, TRAIN_COLOURS),
    "novel-both": _pairs(NOVEL_TYPES, NOVEL_COLOURS),
}
POOLS["novel"] = POOLS["novel-colour"] + POOLS["novel-type"] + POOLS["novel-both"]
"""The distractor pools of the module docstring, by name."""

_OBJECTS: dict[str, type[WorldObj]] = {"ball": Ball, "box": Box, "key": Key}

# Missions are "pick up the <colour> <type>": a closed vocabulary, tokenised to fixed-length id arrays (0 = padding).
MISSION_VOCAB: tuple[str, ...] = ("<pad>", "pick", "up", "the", *COLOR_NAMES, *_OBJECTS)
MISSION_LENGTH = 5
_TOKEN = {word: i for i, word in enumerate(MISSION_VOCAB)}


def tokenize_mission(mission: str, length: int = MISSION_LENGTH) -> np.ndarray:
    """Word ids of ``mission`` (``int64``, padded with 0 to ``length``); ValueError on an unknown word."""
    words = mission.lower().split()
    unknown = [w for w in words if w not in _TOKEN]
    if unknown or len(words) > length:
        raise ValueError(f"mission {mission!r} is not in the vocabulary {MISSION_VOCAB} or is over {length} words")
    ids = np.zeros(length, dtype=np.int64)
    ids[: len(words)] = [_TOKEN[w] for w in words]
    return ids


def _check_pool(name: str, pool: Sequence[Pair]) -> tuple[Pair, ...]:
    pool = tuple((str(t), str(c)) for t, c in pool)
    if not pool:
        raise ValueError(f"{name} must hold at least one (type, colour) pair")
    for kind, colour in pool:
        if kind not in _OBJECTS or colour not in COLOR_NAMES:
            valid = f"types are {', '.join(_OBJECTS)}, colours {', '.join(COLOR_NAMES)}"
            raise ValueError(f"{name} holds ({kind!r}, {colour!r}): {valid}")
    return pool


class ObjectPickingEnv(MiniGridEnv):
    """
    ## Description

    One room with a target object and distractors, all at random free cells, and the agent at a random cell facing
    a random direction. The mission names the target by colour and type; every distractor differs from the target
    in colour or type (or both), so the mission names exactly one object. The agent sees a 7x7 egocentric view
    (it does not see through walls). Picking up the target solves the episode; picking up anything else ends it.

    The pools decide which objects may appear: ``targets`` (the target's pool) and ``distractors`` (the
    distractors' pool, minus the target's own pair), see the module docstring.

    ## Mission Space

    "pick up the {colour} {type}", with (type, colour) drawn from ``targets``.

    ## Action Space

    | Num | Name    | Action            |
    |-----|---------|-------------------|
    | 0   | left    | Turn left         |
    | 1   | right   | Turn right        |
    | 2   | forward | Move forward      |
    | 3   | pickup  | Pick up an object |
    | 4   | drop    | Unused            |
    | 5   | toggle  | Unused            |
    | 6   | done    | Unused            |

    ## Observation Encoding

    A ``Dict`` ready for SB3's multi-input policies:

    - ``image``: ``uint8 (7, 7, 3)``, MiniGrid's encoding of the view: per cell ``(OBJECT_IDX, COLOR_IDX, STATE)``
      (``minigrid.core.constants``). Its bounds are the largest codes, not 255, so SB3 does not take it for a
      picture (no transposition, no division by 255).
    - ``mission``: ``int64 (5,)``, the mission's word ids in :data:`MISSION_VOCAB`, 0-padded
      (:func:`tokenize_mission`). ``env.unwrapped.mission`` keeps the text.

    ## Rewards

    ``1 - 0.9 * (step_count / max_steps)`` for picking up the target, 0 otherwise (so a return > 0 is a success).

    ## Termination

    The episode ends when the agent picks up any object (the target: success; another: failure, reward 0), or is
    truncated at ``max_steps`` (default ``5 * room_size**2``). The last step's ``info["is_success"]`` says whether
    the target was picked up (SB3 logs it as ``rollout/success_rate`` and ``eval/success_rate``).

    ## Registered Configurations

    See :data:`SPLITS` (``rims-rl envs --family babyai``): room 6x6 (4x4 free cells), targets from the ``train``
    pool in every split.

    - ``BabyAI-ObjectPicking-Train-v0``: 2 distractors from ``train``, training level seeds.
    - ``BabyAI-ObjectPicking-Known-v0``: as Train, held-out level seeds.
    - ``BabyAI-ObjectPicking-Novel-v0``: 2 distractors from ``novel``; ``-NovelColour-v0``, ``-NovelType-v0``,
      ``-NovelBoth-v0``: from one of its parts.
    - ``BabyAI-ObjectPicking-KnownHard-v0``, ``-NovelHard-v0``: 4 distractors (twice training's), held-out seeds.

    :param room_size: side of the room including its walls (>= 4; the defaults are the Train split's).
    :param num_distractors: distractors per level (>= 0; at most the free cells minus the target and the agent).
    :param targets: the pool the target is drawn from (a sequence of ``(type, colour)`` pairs).
    :param distractors: the pool distractors are drawn from, with replacement, never the target's pair.
    :param level_seeds: ``"train"`` (even level seeds) or ``"heldout"`` (odd ones).
    :param max_steps: steps before truncation (default ``5 * room_size**2``).
    :param kwargs: further :class:`~minigrid.minigrid_env.MiniGridEnv` arguments (``render_mode``, ...).
    """

    def __init__(
        self,
        room_size: int = 6,
        num_distractors: int = 2,
        targets: Sequence[Pair] = POOLS["train"],
        distractors: Sequence[Pair] = POOLS["train"],
        level_seeds: Literal["train", "heldout"] = "train",
        max_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        if room_size < 4:
            raise ValueError(f"room_size must be >= 4 (walls included), got {room_size}")
        free = (room_size - 2) ** 2
        if not 0 <= num_distractors <= free - 2:
            raise ValueError(
                f"num_distractors must be in [0, {free - 2}] for room_size={room_size}, got {num_distractors}"
            )
        if level_seeds not in ("train", "heldout"):
            raise ValueError(f"level_seeds must be 'train' or 'heldout', got {level_seeds!r}")
        self.targets = _check_pool("targets", targets)
        self.distractors = _check_pool("distractors", distractors)
        if num_distractors and any(all(d == t for d in self.distractors) for t in self.targets):
            raise ValueError("every target needs a distractor pair other than its own in the distractors pool")
        self.room_size, self.num_distractors, self.level_seeds = room_size, num_distractors, level_seeds
        self.target: Pair | None = None
        target_colours = sorted({c for _, c in self.targets})
        target_types = sorted({t for t, _ in self.targets})
        super().__init__(
            mission_space=MissionSpace(self._gen_mission, ordered_placeholders=[target_colours, target_types]),
            width=room_size,
            height=room_size,
            max_steps=max_steps if max_steps is not None else 5 * room_size**2,
            see_through_walls=False,
            agent_view_size=7,
            **kwargs,
        )
        high = np.zeros((7, 7, 3), dtype=np.uint8)
        high[..., 0], high[..., 1], high[..., 2] = max(OBJECT_TO_IDX.values()), max(COLOR_TO_IDX.values()), 2
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, high, dtype=np.uint8),
                "mission": spaces.Box(0, len(MISSION_VOCAB) - 1, (MISSION_LENGTH,), dtype=np.int64),
            }
        )

    @staticmethod
    def _gen_mission(colour: str, kind: str) -> str:
        return f"pick up the {colour} {kind}"

    def _gen_grid(self, width: int, height: int) -> None:
        level = int(self.np_random.integers(2**30))  # this episode's level number, from the env's stream
        episode_rng = self.np_random
        self.np_random = np.random.default_rng(2 * level + (self.level_seeds == "heldout"))
        try:
            self._build_level(width, height)
        finally:
            self.np_random = episode_rng

    def _build_level(self, width: int, height: int) -> None:
        self.grid = Grid(width, height)
        self.grid.wall_rect(0, 0, width, height)
        kind, colour = self.target = self.targets[self._rand_int(0, len(self.targets))]
        self.place_obj(_OBJECTS[kind](colour))
        allowed = [pair for pair in self.distractors if pair != self.target]
        for _ in range(self.num_distractors):
            d_kind, d_colour = allowed[self._rand_int(0, len(allowed))]
            self.place_obj(_OBJECTS[d_kind](d_colour))
        self.place_agent()
        self.mission = self._gen_mission(colour, kind)

    def gen_obs(self) -> dict[str, np.ndarray]:  # type: ignore[override]
        obs = super().gen_obs()
        return {"image": obs["image"], "mission": tokenize_mission(obs["mission"])}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:  # type: ignore[override]
        obs, reward, terminated, truncated, info = super().step(action)
        success = False
        if self.carrying is not None:
            success = (self.carrying.type, self.carrying.color) == self.target
            reward = self._reward() if success else 0.0
            terminated = True
        if terminated or truncated:  # SB3 reads it at every episode end (rollout/success_rate, eval/success_rate)
            info["is_success"] = success
        return obs, float(reward), terminated, truncated, info


# --------------------------------------------------------------------------------------------------------------------
_PREFIX = "BabyAI-ObjectPicking"
_ROOM, _N, _HARD = 6, 2, 4  # registered room side (walls included), distractors in training and in the hard splits

SPLITS: dict[str, dict[str, Any]] = {
    "train": dict(distractors="train", num_distractors=_N, level_seeds="train"),
    "known": dict(distractors="train", num_distractors=_N, level_seeds="heldout"),
    "novel": dict(distractors="novel", num_distractors=_N, level_seeds="heldout"),
    "novel-colour": dict(distractors="novel-colour", num_distractors=_N, level_seeds="heldout"),
    "novel-type": dict(distractors="novel-type", num_distractors=_N, level_seeds="heldout"),
    "novel-both": dict(distractors="novel-both", num_distractors=_N, level_seeds="heldout"),
    "known-hard": dict(distractors="train", num_distractors=_HARD, level_seeds="heldout"),
    "novel-hard": dict(distractors="novel", num_distractors=_HARD, level_seeds="heldout"),
}
"""The registered splits: distractor pool name, distractors per level and level seeds (targets: ``train``)."""


def split_env_id(split: str) -> str:
    """``"novel-colour"`` -> ``"BabyAI-ObjectPicking-NovelColour-v0"``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: valid splits are {', '.join(SPLITS)}")
    return f"{_PREFIX}-{''.join(part.capitalize() for part in split.split('-'))}-v0"


BABYAI_IDS: tuple[str, ...] = tuple(split_env_id(s) for s in SPLITS)
"""Every registered object-picking id, one per split."""


def register_babyai() -> None:
    """Register :data:`BABYAI_IDS` with gymnasium (idempotent)."""
    for split, preset in SPLITS.items():
        env_id = split_env_id(split)
        if env_id in gym.registry:
            continue
        kwargs = dict(preset, room_size=_ROOM, targets=POOLS["train"], distractors=POOLS[preset["distractors"]])
        gym.register(env_id, entry_point="rims_rl.envs.babyai:ObjectPickingEnv", kwargs=kwargs)


def split_of(env_id: str) -> str | None:
    """The split name of a registered object-picking id (None for any other id)."""
    return next((s for s in SPLITS if split_env_id(s) == env_id), None)
