"""Evaluation of a trained recurrent policy: full episodes, returns as the environment's Monitor reports them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.evaluation import evaluate_policy

from envs import AtariSettings, make_env
from envs.atari import is_atari

__all__ = ["EVAL_N_ENVS", "EVAL_SEED_OFFSET", "EvalResult", "evaluate"]

EVAL_N_ENVS = 8
"""Evaluation plays at most this many environments in parallel."""

EVAL_SEED_OFFSET = 10_000
"""Evaluation envs are seeded ``seed + EVAL_SEED_OFFSET``, disjoint from training seeds ``seed .. seed + n_envs``."""


@dataclass
class EvalResult:
    """Returns of ``episodes`` full episodes of a policy."""

    env: str
    episodes: int
    deterministic: bool
    mean_return: float
    std_return: float
    returns: list[float] = field(repr=False)
    lengths: list[int] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        mode = "deterministic" if self.deterministic else "stochastic"
        return (
            f"{self.env}: mean return {self.mean_return:.2f} +- {self.std_return:.2f} "
            f"over {self.episodes} episodes ({mode})"
        )


def evaluate(
    model: BaseAlgorithm,
    env_id: str,
    episodes: int = 20,
    deterministic: bool = True,
    seed: int = EVAL_SEED_OFFSET,
    n_envs: int = EVAL_N_ENVS,
    efference_copy: bool = False,
    atari: AtariSettings | None = None,
) -> EvalResult:
    """Play ``episodes`` full episodes with ``model`` (recurrent state carried and reset at episode starts).

    :param n_envs: environments played in parallel (at most ``episodes``); SB3's ``evaluate_policy`` spreads the
        episodes evenly over them so that short episodes do not bias the mean.
    :param efference_copy: the policy was trained with :class:`envs.EfferenceCopy` observations.
    :param atari: the preprocessing the policy was trained with; evaluation always plays whole games (no episode
        end at a life lost) and reports unclipped scores.
    """
    if is_atari(env_id):
        atari = (atari or AtariSettings()).full_games()
    env = make_env(env_id, n_envs=min(episodes, n_envs), seed=seed, efference_copy=efference_copy, atari=atari)
    try:
        returns, lengths = evaluate_policy(
            model, env, n_eval_episodes=episodes, deterministic=deterministic, return_episode_rewards=True, warn=False
        )
    finally:
        env.close()
    returns_arr = np.asarray(returns, dtype=float)
    return EvalResult(
        env=env_id,
        episodes=len(returns),
        deterministic=deterministic,
        mean_return=float(returns_arr.mean()),
        std_return=float(returns_arr.std()) if len(returns_arr) > 1 else 0.0,
        returns=[float(r) for r in returns_arr],
        lengths=[int(n) for n in lengths],
    )
