"""Environments of rims-rl, grouped in families; importing this package registers the project's gymnasium ids.

Each family has a config file ``configs/<family>.yaml`` with its hyperparameters (rl-zoo style: a ``default``
section, then one section per env id). ``rims-rl envs`` lists the families and their ids.

Any other gymnasium env trains too (``configs/default.yaml``, chosen by its spaces): a registered id, gymnasium's
``module:EnvId`` form (the module is imported first, so its envs register), or an id registered by a package named
with ``gym_packages`` (rl-zoo's ``--gym-packages``). MiniGrid-style dicts with a text mission are given word ids
(:class:`rims_rl.envs.minigrid.MissionTokens`); :func:`check_spaces` refuses what the policies cannot read.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from rims_rl.envs.atari import ATARI_IDS, AtariSettings, AtariVecEnv, is_atari, make_atari_wrapped
from rims_rl.envs.babyai import BABYAI_IDS, register_babyai
from rims_rl.envs.cheetah import CHEETAH_IDS, register_cheetah
from rims_rl.envs.classic import CLASSIC_IDS, register_classic
from rims_rl.envs.minigrid import MissionTokens, has_text_mission
from rims_rl.envs.wrappers import EfferenceCopy

__all__ = [
    "FAMILIES",
    "VEC_ENVS",
    "AtariSettings",
    "Family",
    "UnknownEnvError",
    "UnsupportedSpaceError",
    "check_env_id",
    "check_spaces",
    "family_of",
    "import_gym_packages",
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


def import_gym_packages(packages: Sequence[str]) -> None:
    """Import each package (rl-zoo's ``--gym-packages``), so that the env ids it registers can be made.

    :raises UnknownEnvError: a package that cannot be imported (one line).
    """
    for name in packages:
        try:
            importlib.import_module(name)
        except Exception as err:
            raise UnknownEnvError(f"cannot import gym package '{name}': {type(err).__name__}: {err}") from None


def check_env_id(env_id: str, gym_packages: Sequence[str] = ()) -> None:
    """Raise :class:`UnknownEnvError` (with close matches) unless gymnasium can make ``env_id``.

    ``gym_packages`` are imported first (:func:`import_gym_packages`); an id of the form ``module:EnvId`` imports
    ``module`` (as ``gym.make`` does) and checks ``EnvId``.
    """
    import_gym_packages(gym_packages)
    module, sep, name = env_id.rpartition(":")
    if sep:
        if not module or not name:
            raise UnknownEnvError(f"env id '{env_id}' is not of the form module:EnvId")
        try:
            importlib.import_module(module)
        except Exception as err:
            raise UnknownEnvError(f"env id '{env_id}': cannot import module '{module}': {err}") from None
        env_id = name
    if env_id in gym.registry:
        return
    known = sorted({*gym.registry, *(i for f in FAMILIES.values() for i in f.ids)})
    close = difflib.get_close_matches(env_id, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `rims-rl envs` lists the project's ids"
    raise UnknownEnvError(f"unknown env id '{env_id}'{hint}")


class UnsupportedSpaceError(ValueError):
    """An observation or action space the policies cannot read (one line: the space and what is supported)."""


_LEAVES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
_SUPPORTED_OBS = (
    "Box (vectors, images), Discrete, MultiDiscrete, MultiBinary, a Dict of them, and MiniGrid-style dicts with a "
    "text mission"
)
_SUPPORTED_ACTIONS = "Discrete, MultiDiscrete, MultiBinary and Box"


def _space_name(space: gym.Space) -> str:
    return type(space).__name__


def check_spaces(observation_space: gym.Space, action_space: gym.Space) -> None:
    """Raise :class:`UnsupportedSpaceError` unless the policies can read the (wrapped) observation space and act in
    the action space (RecurrentPPO / RecurrentA2C with SB3's extractors)."""
    if isinstance(observation_space, gym.spaces.Dict):
        for key, sub in observation_space.spaces.items():
            if not isinstance(sub, _LEAVES):
                raise UnsupportedSpaceError(
                    f"observation key '{key}' is a {_space_name(sub)} space, which the policies cannot read "
                    f"(supported: {_SUPPORTED_OBS})"
                )
    elif not isinstance(observation_space, _LEAVES):
        raise UnsupportedSpaceError(
            f"the observation space is a {_space_name(observation_space)} space, which the policies cannot read "
            f"(supported: {_SUPPORTED_OBS})"
        )
    if not isinstance(action_space, _LEAVES):
        raise UnsupportedSpaceError(
            f"the action space is a {_space_name(action_space)} space (supported: {_SUPPORTED_ACTIONS})"
        )


def _wrap(env: gym.Env, efference_copy: bool = False) -> gym.Env:
    """Word ids for a text mission (MiniGrid), then the efference copy if asked for; the spaces are checked before
    they reach a vectorised env (:func:`check_spaces`)."""
    if has_text_mission(env.observation_space):
        env = MissionTokens(env)
    env = EfferenceCopy(env) if efference_copy else env
    try:
        check_spaces(env.observation_space, env.action_space)
    except UnsupportedSpaceError:
        env.close()
        raise
    return env


def _make_with_packages(env_id: str, packages: tuple[str, ...], **kwargs: Any) -> gym.Env:
    """``gym.make`` after importing ``packages`` (picklable, for worker processes)."""
    import_gym_packages(packages)
    try:
        return gym.make(env_id, **{"render_mode": "rgb_array", **kwargs})
    except TypeError:  # an env without render_mode (as SB3's make_vec_env)
        return gym.make(env_id, **kwargs)


def make_env(
    env_id: str,
    n_envs: int = 1,
    seed: int | None = None,
    vec_env: str = "auto",
    env_kwargs: dict[str, Any] | None = None,
    efference_copy: bool = False,
    atari: AtariSettings | None = None,
    gym_packages: Sequence[str] = (),
) -> VecEnv:
    """A vectorised env whose ``info["episode"]`` reports each finished episode's return and length (SB3's
    ``Monitor``). Text missions of MiniGrid-style envs become word ids
    (:class:`rims_rl.envs.minigrid.MissionTokens`).

    :param env_id: a gymnasium id (the project's are registered on import), or ``module:EnvId``.
    :param gym_packages: packages to import first, here and in each worker process of ``vec_env="subproc"``.
    :param n_envs: number of copies; copy ``i`` is seeded ``seed + i``.
    :param vec_env: one of :data:`VEC_ENVS`.
    :param efference_copy: join the previous action and reward to the observation (:class:`EfferenceCopy`);
        vector observations only.
    :param atari: the preprocessing of Atari games (:class:`rims_rl.envs.atari.AtariSettings`; DeepMind's by default).
    :raises ValueError: a vectorisation or option this env does not support.
    :raises UnsupportedSpaceError: spaces the policies cannot read (:func:`check_spaces`).
    """
    packages = tuple(gym_packages)
    check_env_id(env_id, packages)
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
    wrapper = functools.partial(_wrap, efference_copy=efference_copy)
    make: Any = functools.partial(_make_with_packages, env_id, packages) if packages else env_id
    with warnings.catch_warnings():  # SB3 asks every env for rgb_array rendering; one without it warns, harmlessly
        warnings.filterwarnings("ignore", message=".*not in the possible render_modes")
        return make_vec_env(
            make, n_envs=n_envs, seed=seed, vec_env_cls=cls, env_kwargs=env_kwargs, wrapper_class=wrapper
        )
