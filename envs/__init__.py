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

from rims_rl.envs.atari import ATARI_IDS, AtariSettings, AtariVecEnv, is_atari, make_atari_wrapped
from rims_rl.envs.babyai import BABYAI_IDS, register_babyai
from rims_rl.envs.cheetah import CHEETAH_IDS, register_cheetah
from rims_rl.envs.classic import CLASSIC_IDS, register_classic
from rims_rl.envs.wrappers import EfferenceCopy

__all__ = [
    "FAMILIES",
    "VEC_ENVS",
    "AtariSettings",
    "Family",
    "UnknownEnvError",
    "check_env_id",
    "family_of",
    "make_env",
]

VEC_ENVS = ("auto", "ale", "dummy", "subproc")
"""Vectorisations: ``auto`` (ale for Atari, dummy otherwise), ``ale`` (ale-py's native vector env, Atari only),
``dummy`` (SB3's in-process DummyVecEnv), ``subproc`` (SB3's SubprocVecEnv, one process per copy)."""

register_classic()
register_babyai()
register_cheetah()


@dataclass(frozen=True)
class Family:
    """A group of env ids that share one config file."""

    name: str
    description: str
    ids: tuple[str, ...]
    command: str = "train"  # the rims-rl command that trains agents on these ids

    @property
    def config_name(self) -> str:
        return f"{self.name}.yaml"


FAMILIES: dict[str, Family] = {
    "classic": Family("classic", "partially observable classic control (velocities hidden)", CLASSIC_IDS),
    "atari": Family("atari", "every Atari 2600 game of ale-py, DeepMind preprocessing (envs/atari.py)", ATARI_IDS),
    "babyai": Family(
        "babyai", "object picking with known and novel distractors, one id per split (envs/babyai.py)", BABYAI_IDS
    ),
    "cheetah": Family(
        "cheetah",
        "Half-Cheetah from pixels, plain and with perturbed joints; trained by imitation (envs/cheetah.py)",
        CHEETAH_IDS,
        command="imitate",
    ),
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
    vec_env: str = "auto",
    env_kwargs: dict[str, Any] | None = None,
    efference_copy: bool = False,
    atari: AtariSettings | None = None,
) -> VecEnv:
    """A vectorised env whose ``info["episode"]`` reports each finished episode's return and length (SB3's
    ``Monitor``).

    :param env_id: a gymnasium id (the project's are registered on import).
    :param n_envs: number of copies; copy ``i`` is seeded ``seed + i``.
    :param vec_env: one of :data:`VEC_ENVS`.
    :param efference_copy: join the previous action and reward to the observation (:class:`EfferenceCopy`);
        vector observations only.
    :param atari: the preprocessing of Atari games (:class:`rims_rl.envs.atari.AtariSettings`; DeepMind's by default).
    :raises ValueError: a vectorisation or option this env does not support.
    """
    check_env_id(env_id)
    if vec_env not in VEC_ENVS:
        raise ValueError(f"vec_env={vec_env!r} is not one of {', '.join(VEC_ENVS)}")
    if is_atari(env_id):
        if efference_copy:
            raise ValueError("efference_copy joins the action and reward to vector observations, not Atari frames")
        if env_kwargs:
            raise ValueError("Atari envs take their options from the atari config section, not env_kwargs")
        if vec_env in ("auto", "ale"):
            return AtariVecEnv(env_id, n_envs=n_envs, seed=seed, settings=atari)
        return make_atari_wrapped(env_id, n_envs=n_envs, seed=seed, settings=atari, vec_env=vec_env)
    if vec_env == "ale":
        raise ValueError(f"vec_env=ale is for Atari games only; {env_id} takes auto, dummy or subproc")
    cls = SubprocVecEnv if vec_env == "subproc" else DummyVecEnv
    wrapper = EfferenceCopy if efference_copy else None
    return make_vec_env(env_id, n_envs=n_envs, seed=seed, vec_env_cls=cls, env_kwargs=env_kwargs, wrapper_class=wrapper)
