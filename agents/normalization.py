"""Observation and reward normalisation (``normalize_obs``, ``normalize_reward``): SB3's ``VecNormalize``.

Rewards are scaled for learning only, so a trained policy needs nothing at evaluation. Observations are scaled by a
running mean and standard deviation (rl-zoo's ``normalize: true``), which the policy then expects: the statistics
are saved beside the model, as SB3 and rl-zoo do (``vecnormalize.pkl``, readable with ``VecNormalize.load``), and
every place that plays a trained model (the final and periodic evaluations, ``rims-rl evaluate``, ``activations``)
applies them, frozen. A checkpoint keeps them in its env state (``state.pkl``), where they are read from for a run
that stopped before its ``model.zip``.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from pathlib import Path

from gymnasium import spaces
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecNormalize

__all__ = [
    "STATS_FILE",
    "ObsStats",
    "check_normalizable",
    "find_normalizer",
    "normalize",
    "read_stats",
    "write_stats",
]

STATS_FILE = "vecnormalize.pkl"
"""The observation statistics of a run, beside its ``model.zip`` (``VecNormalize.save``)."""


def check_normalizable(space: spaces.Space, env_id: str) -> None:
    """Observation normalisation applies to vectors of floats (images keep their own scaling in the CNN).

    :raises ValueError: one line saying what is wrong and what is valid.
    """
    if not (isinstance(space, spaces.Box) and space.dtype.kind == "f" and len(space.shape) == 1):
        raise ValueError(
            f"normalize_obs needs vector observations (a 1-d float Box); {env_id}'s are {_describe(space)}: "
            "set normalize_obs: false for image or dict observations"
        )


def _describe(space: spaces.Space) -> str:
    """A space in a few words (its repr prints a Box's whole bounds arrays)."""
    if isinstance(space, spaces.Box):
        return f"a Box of shape {space.shape} and dtype {space.dtype}"
    if isinstance(space, spaces.Dict):
        return "a Dict of " + ", ".join(f"{key}: {_describe(sub)}" for key, sub in space.spaces.items())
    return f"a {type(space).__name__}"


def normalize(env: VecEnv, *, obs: bool, reward: bool, gamma: float, training: bool = True) -> VecEnv:
    """``env`` wrapped in ``VecNormalize`` when either is asked for (``env`` itself otherwise). An evaluation env
    (``training=False``) never scales rewards and never updates its statistics: SB3's ``EvalCallback`` copies them
    from the training env before each evaluation."""
    if not (obs or reward):
        return env
    if training:
        return VecNormalize(env, norm_obs=obs, norm_reward=reward, gamma=gamma)
    return VecNormalize(env, norm_obs=obs, norm_reward=False, training=False)


@dataclass(frozen=True)
class ObsStats:
    """The observation statistics a policy was trained with, applied frozen to an env that plays it."""

    obs_rms: RunningMeanStd
    clip_obs: float
    epsilon: float

    @classmethod
    def of(cls, env: VecNormalize) -> ObsStats:
        return cls(copy.deepcopy(env.obs_rms), env.clip_obs, env.epsilon)

    def apply(self, env: VecEnv) -> VecNormalize:
        wrapped = VecNormalize(
            env, training=False, norm_obs=True, norm_reward=False, clip_obs=self.clip_obs, epsilon=self.epsilon
        )
        wrapped.obs_rms = copy.deepcopy(self.obs_rms)
        return wrapped


def find_normalizer(env: VecEnv) -> VecNormalize | None:
    """The ``VecNormalize`` layer of ``env`` that normalises observations, if any."""
    while isinstance(env, VecEnvWrapper):
        if isinstance(env, VecNormalize) and env.norm_obs:
            return env
        env = env.venv
    return None


def write_stats(normalizer: VecNormalize, directory: Path) -> Path:
    """``directory/vecnormalize.pkl`` (written whole or not at all): ``normalizer``'s statistics."""
    tmp = directory / (STATS_FILE + ".tmp")
    normalizer.save(str(tmp))
    path = directory / STATS_FILE
    tmp.replace(path)
    return path


def read_stats(model_file: Path) -> ObsStats | None:
    """The observation statistics saved with ``model_file``: ``vecnormalize.pkl`` beside it, or, for a
    checkpoint's model, the ``VecNormalize`` layer of the checkpoint's env state. None if there are none.

    :raises ValueError: if the file exists but cannot be read.
    """
    folder = model_file.parent
    try:
        if (folder / STATS_FILE).is_file():
            with open(folder / STATS_FILE, "rb") as f:
                saved = pickle.load(f)
            return ObsStats(saved.obs_rms, saved.clip_obs, saved.epsilon) if saved.norm_obs else None
        if (folder / "state.pkl").is_file():  # a checkpoint (agents/checkpoints.py: capture_env)
            with open(folder / "state.pkl", "rb") as f:
                env_state = pickle.load(f)["env"]
            for kind, blob in zip(env_state["kinds"], env_state["layers"], strict=False):
                if kind == "VecNormalize" and blob is not None:
                    attrs = pickle.loads(blob)
                    if attrs["norm_obs"]:
                        return ObsStats(attrs["obs_rms"], attrs["clip_obs"], attrs["epsilon"])
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, AttributeError) as err:
        raise ValueError(f"cannot read the observation statistics beside {model_file}: {err}") from None
    return None
