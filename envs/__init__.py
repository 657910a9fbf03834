"""Environments of rims-rl, grouped in families; importing this package registers the project's gymnasium ids.

Each family has a config file ``configs/<family>.yaml`` with its hyperparameters (rl-zoo style: a ``default``
section, then one section per env id). ``rims-rl envs`` lists the families and their ids.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from envs.classic import CLASSIC_IDS, register_classic
from envs.wrappers import EfferenceCopy

__all__ = ["FAMILIES", "Family", "UnknownEnvError", "check_env_id", "family_of", "make_env"]

register_classic()


@dataclass(frozen=True)
class Family:
    """A group of env ids that share one config file."""

    name: str
    description: str
    ids: tuple[str, ...]

    @property
    def config_name(self) -> str:
        return f"{self.name}.yaml"


FAMILIES: dict[str, Family] = {
    "classic": Family("classic", "partially observable classic control (velocities hidden)", CLASSIC_IDS),
}


class UnknownEnvError(ValueError):
    """An env id that gymnasium does not know, with close matches in the message."""


def family_of(env_id: str) -> Family | None:
    """The family an env id belongs to, or None."""
    for family in FAMILIES.values():
        if env_id in family.ids:
            return family
    return None


def check_env_id(env_id: str) -> None:
    """Raise :class:`UnknownEnvError` (with close matches) unless gymnasium can make ``env_id``."""
    if env_id in gym.registry:
        return
    known = sorted({*gym.registry, *(i for f in FAMILIES.values() for i in f.ids)})
    close = difflib.get_close_matches(env_id, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `rims-rl envs` lists the project's ids"
    raise UnknownEnvError(f"unknown env id '{env_id}'{hint}")


def make_env(
    env_id: str,
    n_envs: int = 1,
    seed: int | None = None,
    vec_env: str = "dummy",
    env_kwargs: dict[str, Any] | None = None,
    efference_copy: bool = False,
) -> VecEnv:
    """A vectorised env with SB3's ``Monitor`` on each copy (episode returns and lengths in ``info``).

    :param env_id: a gymnasium id (the project's are registered on import).
    :param n_envs: number of copies; copy ``i`` is seeded ``seed + i``.
    :param vec_env: ``"dummy"`` (in-process) or ``"subproc"`` (one process per copy).
    :param efference_copy: join the previous action and reward to the observation (:class:`EfferenceCopy`).
    """
    check_env_id(env_id)
    cls = SubprocVecEnv if vec_env == "subproc" else DummyVecEnv
    wrapper = EfferenceCopy if efference_copy else None
    return make_vec_env(env_id, n_envs=n_envs, seed=seed, vec_env_cls=cls, env_kwargs=env_kwargs, wrapper_class=wrapper)
