"""Atari 2600 games (every ROM that ships with ale-py), with the DeepMind preprocessing, behind SB3's ``VecEnv``.

Env ids
-------
The gymnasium ids that ale-py registers: the 62 ``<Game>NoFrameskip-v4`` ids and the 104 ``ALE/<Game>-v5`` ids
(``rims-rl envs --family atari``). The id chooses the ROM and the variant; the preprocessing below is the same for
both:

==========================  ========================================  ==========================================
                            ``<Game>NoFrameskip-v4``                  ``ALE/<Game>-v5``
==========================  ========================================  ==========================================
sticky actions              none (``repeat_action_probability=0``)    25% (``repeat_action_probability=0.25``)
action set                  the game's minimal set                    the game's minimal set
episode limit               108,000 frames (30 minutes of play)       108,000 frames
==========================  ========================================  ==========================================

The v4 ids are those of the DQN/PPO literature (the paper's runs); v5 follows Machado et al. (2018).

Preprocessing (Mnih et al. 2015; the settings of SB3's ``AtariWrapper`` and ikostrikov's PPO)
----------------------------------------------------------------------------------------------
- **no-op reset**: a random number (1..30) of no-op actions after each reset;
- **frame skip 4** with the max over the last two frames (flicker), the action repeated on each frame;
- **fire on reset** in games that need FIRE to start (the game's action set has FIRE);
- **84x84 greyscale**, uint8, **4-frame stack**, channels first: observations are ``uint8 (4, 84, 84)``;
- for learning only, both switchable: **life loss ends the episode** (``terminal_on_life_loss``; the game goes on,
  the agent's recurrent state and value bootstrap are cut, as DeepMind's ``EpisodicLifeEnv``) and **rewards
  clipped** to their sign (``clip_reward``).

Scores: the episode that is logged (``info["episode"]``, SB3's ``rollout/ep_rew_mean``) and evaluated is always the
whole game (all lives) with unclipped rewards, whatever the two learning switches say.

Two implementations with the same semantics (a test checks they agree):

- :class:`AtariVecEnv`, the default (``vec_env: ale`` or ``auto``): ale-py's C++ vector environment
  (``ale_py.vector_env.AtariVectorEnv``), which emulates and preprocesses all copies in native threads. It runs
  ~2-4x faster than the usual Python path on a 2-core machine (``scripts/benchmark_atari.py``).
- :func:`make_atari_wrapped` (``vec_env: dummy`` or ``subproc``): gymnasium envs with SB3's Atari wrappers in a
  ``DummyVecEnv``/``SubprocVecEnv``, then ``VecFrameStack`` and ``VecTransposeImage`` — the usual SB3 path, for
  users who need per-env gymnasium wrappers (``wrapper_class``).

In both, ``info["episode"]`` reports ``r`` (the game's unclipped score, all lives) and ``l`` (its length in agent
steps, i.e. frames / 4); with ``make_atari_env`` SB3's Monitor would count emulator frames instead.

One difference remains between them: after a life loss, SB3's ``EpisodicLifeEnv`` takes one no-op step (and
``FireResetEnv`` presses FIRE) where ale-py's vector env simply continues the game.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np
from stable_baselines3.common.atari_wrappers import (
    ClipRewardEnv,
    EpisodicLifeEnv,
    FireResetEnv,
    MaxAndSkipEnv,
    NoopResetEnv,
    WarpFrame,
)
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import (
    DummyVecEnv,
    SubprocVecEnv,
    VecEnv,
    VecFrameStack,
    VecTransposeImage,
)
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

gym.register_envs(ale_py)

__all__ = [
    "ATARI_IDS",
    "ATARI_V4_IDS",
    "ATARI_V5_IDS",
    "AtariSettings",
    "AtariVecEnv",
    "is_atari",
    "make_atari_wrapped",
]

ATARI_V4_IDS: tuple[str, ...] = tuple(
    sorted(i for i in gym.registry if i.endswith("NoFrameskip-v4") and "-ram" not in i)
)
"""The 62 ``<Game>NoFrameskip-v4`` ids."""

ATARI_V5_IDS: tuple[str, ...] = tuple(
    sorted(i for i in gym.registry if i.startswith("ALE/") and i.endswith("-v5") and "-ram" not in i)
)
"""The ``ALE/<Game>-v5`` ids (104 with ale-py 0.12: every ROM but the four two-player-only games)."""

ATARI_IDS = ATARI_V4_IDS + ATARI_V5_IDS


def is_atari(env_id: str) -> bool:
    """True for the Atari ids this module handles."""
    return env_id in ATARI_IDS


@dataclass(frozen=True)
class AtariSettings:
    """The preprocessing of the Atari envs (module docstring). Defaults: the DeepMind settings used in training.

    :param terminal_on_life_loss: end the learning episode on each life lost (the logged score is still the game's).
    :param clip_reward: give the learner the sign of each reward (the logged score is still unclipped).
    :param noop_max: at most this many no-op actions after a reset (0: none).
    :param frame_skip: emulator frames per agent step (max-pooled over the last two).
    :param frame_stack: frames stacked in each observation.
    :param screen_size: observations are ``screen_size x screen_size`` greyscale.
    :param fire_reset: press FIRE after a reset in games that have it.
    """

    terminal_on_life_loss: bool = True
    clip_reward: bool = True
    noop_max: int = 30
    frame_skip: int = 4
    frame_stack: int = 4
    screen_size: int = 84
    fire_reset: bool = True

    def full_games(self) -> AtariSettings:
        """These settings for evaluation: episodes are whole games and rewards are unclipped."""
        return AtariSettings(**{**self.__dict__, "terminal_on_life_loss": False, "clip_reward": False})


def _spec_kwargs(env_id: str) -> dict[str, Any]:
    if not is_atari(env_id):
        raise ValueError(f"{env_id!r} is not an Atari id (`rims-rl envs --family atari` lists them)")
    return dict(gym.spec(env_id).kwargs)


class AtariVecEnv(VecEnv):
    """``n_envs`` copies of an Atari game in ale-py's native vector env, as an SB3 ``VecEnv``.

    Each copy is reset automatically at the end of its game; like SB3's ``VecEnv``, the step that ends an episode
    returns the first observation of the next one and puts the last one in ``info["terminal_observation"]``.
    ``info["episode"]`` (``r``: game score, ``l``: agent steps, ``t``: seconds since creation) marks the end of a
    game, as SB3's ``Monitor`` does, so ``evaluate_policy`` and the rollout statistics use whole-game scores.
    ``info["lives"]`` is the number of lives left.

    :param env_id: an Atari id (``DemonAttackNoFrameskip-v4``, ``ALE/Pong-v5``, ...).
    :param n_envs: number of copies; copy ``i`` is seeded ``seed + i``.
    :param settings: the preprocessing (defaults: DeepMind's, for training).
    :param num_threads: native threads stepping the copies (0: one per core).
    """

    def __init__(
        self,
        env_id: str,
        n_envs: int = 8,
        seed: int | None = None,
        settings: AtariSettings | None = None,
        num_threads: int = 0,
    ) -> None:
        from ale_py.vector_env import AtariVectorEnv

        spec = _spec_kwargs(env_id)
        self.env_id = env_id
        self.settings = settings = settings or AtariSettings()
        self._ale = AtariVectorEnv(
            spec["game"],
            n_envs,
            num_threads=num_threads,
            max_num_frames_per_episode=spec.get("max_num_frames_per_episode", 108_000),
            repeat_action_probability=spec.get("repeat_action_probability", 0.0),
            full_action_space=spec.get("full_action_space", False),
            autoreset_mode="SameStep",
            img_height=settings.screen_size,
            img_width=settings.screen_size,
            grayscale=True,
            stack_num=settings.frame_stack,
            frameskip=settings.frame_skip,
            maxpool=True,
            noop_max=settings.noop_max,
            episodic_life=False,  # ale-py's option resets the whole game on a life loss: we signal it ourselves
            life_loss_info=False,
            reward_clipping=False,  # clipped here, so that the score stays unclipped
            use_fire_reset=settings.fire_reset,
        )
        super().__init__(n_envs, self._ale.single_observation_space, self._ale.single_action_space)
        self._actions: np.ndarray | None = None
        self._score = np.zeros(n_envs, dtype=np.float64)
        self._length = np.zeros(n_envs, dtype=np.int64)
        self._lives = np.zeros(n_envs, dtype=np.int64)
        self._start = time.time()
        if seed is not None:
            self.seed(seed)

    # --- VecEnv --------------------------------------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        seeds = self._seeds
        seed: Any = None if any(s is None for s in seeds) else np.asarray(seeds, dtype=np.int64)
        obs, info = self._ale.reset(seed=seed)
        self._reset_seeds()
        self._score[:] = 0.0
        self._length[:] = 0
        self._lives[:] = info["lives"]
        self.reset_infos = [{"lives": int(lives)} for lives in info["lives"]]
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)

    def step_wait(self) -> VecEnvStepReturn:
        assert self._actions is not None, "step_async must be called before step_wait"
        obs, raw, terminated, truncated, info = self._ale.step(self._actions)
        self._actions = None
        raw = raw.astype(np.float64)
        self._score += raw
        self._length += 1
        game_over = terminated | truncated
        lives = info["lives"].astype(np.int64)
        # As DeepMind's EpisodicLifeEnv: a life lost, with lives left (when a game ends, ``lives`` is the new game's).
        life_lost = ~game_over & (lives < self._lives) & (lives > 0)
        self._lives = lives
        dones = game_over | life_lost if self.settings.terminal_on_life_loss else game_over
        rewards = np.sign(raw) if self.settings.clip_reward else raw

        infos: list[dict[str, Any]] = [{"lives": int(n)} for n in lives]
        for i in np.flatnonzero(dones):
            infos[i]["terminal_observation"] = info["final_obs"][i] if game_over[i] else obs[i]
            infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            if game_over[i]:
                infos[i]["episode"] = {
                    "r": float(self._score[i]),
                    "l": int(self._length[i]),
                    "t": round(time.time() - self._start, 6),
                }
                self._score[i] = 0.0
                self._length[i] = 0
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self._ale.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        n = len(self._get_indices(indices))
        if attr_name == "render_mode":
            return [None] * n
        if hasattr(self, attr_name):
            return [getattr(self, attr_name)] * n
        raise AttributeError(f"AtariVecEnv has no attribute {attr_name!r}")

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(f"AtariVecEnv copies run in native code; attribute {attr_name!r} cannot be set")

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **kwargs: Any) -> list:
        raise AttributeError(
            f"AtariVecEnv copies run in native code and have no method {method_name!r}; "
            "use vec_env: dummy for gymnasium envs"
        )

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        # The episode statistics SB3's Monitor would give are in ``info["episode"]`` (see the class docstring).
        return [wrapper_class is Monitor] * len(self._get_indices(indices))


def make_atari_wrapped(
    env_id: str,
    n_envs: int = 8,
    seed: int | None = None,
    settings: AtariSettings | None = None,
    vec_env: str = "dummy",
    wrapper_class: Callable[[gym.Env], gym.Env] | None = None,
) -> VecEnv:
    """The same game as :class:`AtariVecEnv` through gymnasium wrappers (SB3's ``make_atari_env`` path).

    Each copy is SB3's ``AtariWrapper`` stack with its ``Monitor`` placed after the frame skip and before the
    life-loss and clipping wrappers, so that ``info["episode"]`` has the same meaning as in :class:`AtariVecEnv`
    (whole game, unclipped score, length in agent steps): ``NoopResetEnv``, ``MaxAndSkipEnv``, ``Monitor``,
    ``EpisodicLifeEnv``, ``FireResetEnv``, ``WarpFrame``, ``ClipRewardEnv``, then ``wrapper_class`` if given. The
    copies run in a ``DummyVecEnv`` or ``SubprocVecEnv``, then ``VecFrameStack`` and ``VecTransposeImage`` give
    ``uint8 (frame_stack, 84, 84)`` observations as the native path does.
    """
    spec = _spec_kwargs(env_id)
    settings = settings or AtariSettings()
    if not settings.fire_reset:
        raise ValueError("make_atari_wrapped always presses FIRE on reset where the game has it (fire_reset=True)")
    make_kwargs = {"frameskip": 1} if spec.get("frameskip", 1) != 1 else {}  # v5 skips inside the env: we skip here

    def make(rank: int) -> Callable[[], gym.Env]:
        def thunk() -> gym.Env:
            env: gym.Env = gym.make(env_id, **make_kwargs)
            if settings.noop_max > 0:
                env = NoopResetEnv(env, noop_max=settings.noop_max)
            if settings.frame_skip > 1:
                env = MaxAndSkipEnv(env, skip=settings.frame_skip)
            env = Monitor(env)
            if settings.terminal_on_life_loss:
                env = EpisodicLifeEnv(env)
            if "FIRE" in env.unwrapped.get_action_meanings():  # type: ignore[attr-defined]
                env = FireResetEnv(env)
            env = WarpFrame(env, width=settings.screen_size, height=settings.screen_size)
            if settings.clip_reward:
                env = ClipRewardEnv(env)
            if wrapper_class is not None:
                env = wrapper_class(env)
            if seed is not None:
                env.action_space.seed(seed + rank)
            return env

        return thunk

    fns = [make(i) for i in range(n_envs)]
    venv: VecEnv = SubprocVecEnv(fns) if vec_env == "subproc" else DummyVecEnv(fns)
    if seed is not None:
        venv.seed(seed)
    return VecTransposeImage(VecFrameStack(venv, n_stack=settings.frame_stack))
