"""Evaluation of a trained recurrent policy: full episodes, returns as the environment's Monitor reports them."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.evaluation import evaluate_policy

from rims_rl.agents.normalization import ObsStats
from rims_rl.envs import AtariSettings, make_env
from rims_rl.envs.atari import is_atari

__all__ = [
    "EVAL_N_ENVS",
    "EVAL_SEED_OFFSET",
    "EvalResult",
    "SplitResult",
    "evaluate",
    "evaluate_splits",
    "format_split_table",
    "wilson_interval",
    "write_split_table",
]

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
    obs_stats: ObsStats | None = None,
) -> EvalResult:
    """Play ``episodes`` full episodes with ``model`` (recurrent state carried and reset at episode starts).

    :param n_envs: environments played in parallel (at most ``episodes``); SB3's ``evaluate_policy`` spreads the
        episodes evenly over them so that short episodes do not bias the mean.
    :param efference_copy: the policy was trained with :class:`envs.EfferenceCopy` observations.
    :param atari: the preprocessing the policy was trained with; evaluation always plays whole games (no episode
        end at a life lost) and reports unclipped scores.
    :param obs_stats: the observation statistics the policy was trained with (``normalize_obs``), applied frozen.
    """
    if is_atari(env_id):
        atari = (atari or AtariSettings()).full_games()
    env = make_env(env_id, n_envs=min(episodes, n_envs), seed=seed, efference_copy=efference_copy, atari=atari)
    if obs_stats is not None:
        env = obs_stats.apply(env)
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


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); sound at 0 and n successes too."""
    if n <= 0:
        raise ValueError(f"the interval needs at least one trial, got n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class SplitResult:
    """Success rate on one split of the object-picking task (a success is an episode with a return > 0)."""

    split: str
    env: str
    episodes: int
    successes: int
    success_rate: float
    ci_low: float
    ci_high: float
    mean_return: float
    std_return: float
    mean_length: float

    @classmethod
    def from_eval(cls, split: str, result: EvalResult) -> SplitResult:
        successes = int(sum(r > 0 for r in result.returns))
        low, high = wilson_interval(successes, result.episodes)
        return cls(
            split=split,
            env=result.env,
            episodes=result.episodes,
            successes=successes,
            success_rate=successes / result.episodes,
            ci_low=low,
            ci_high=high,
            mean_return=result.mean_return,
            std_return=result.std_return,
            mean_length=float(np.mean(result.lengths)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_splits(
    model: BaseAlgorithm,
    splits: list[str],
    episodes: int = 100,
    deterministic: bool = False,
    seed: int = EVAL_SEED_OFFSET,
) -> list[SplitResult]:
    """Play ``episodes`` episodes of each object-picking split (:data:`rims_rl.envs.babyai.SPLITS`) with ``model``.

    Every split is played from the same env seeds; the splits' level seeds keep held-out levels apart from training
    ones (see :mod:`rims_rl.envs.babyai`).
    """
    from rims_rl.envs.babyai import split_env_id

    out = []
    for split in splits:
        result = evaluate(model, split_env_id(split), episodes=episodes, deterministic=deterministic, seed=seed)
        out.append(SplitResult.from_eval(split, result))
    return out


def format_split_table(results: list[SplitResult]) -> str:
    """A Markdown table: split, success rate with its 95% interval, mean return, mean length, episodes."""
    lines = [
        "| split | success rate (95% CI) | mean return | mean length | episodes |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.split} | {r.success_rate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] | "
            f"{r.mean_return:.3f} +- {r.std_return:.3f} | {r.mean_length:.1f} | {r.episodes} |"
        )
    return "\n".join(lines)


def write_split_table(results: list[SplitResult], run_dir: Path, meta: dict[str, Any]) -> list[Path]:
    """Write ``splits.json`` (results and ``meta``: model, seed, deterministic) and ``splits.csv`` in ``run_dir``.

    A later evaluation of a split replaces that split's row; the other splits' rows are kept.
    """
    json_file, csv_file = Path(run_dir) / "splits.json", Path(run_dir) / "splits.csv"
    rows: dict[str, dict[str, Any]] = {}
    if json_file.is_file():
        try:
            rows = {r["split"]: r for r in json.loads(json_file.read_text()).get("results", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            rows = {}
    for r in results:
        rows[r.split] = {**r.to_dict(), **meta}
    ordered = list(rows.values())
    tmp = json_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"results": ordered}, indent=2) + "\n")
    tmp.replace(json_file)
    fields = list(ordered[0])
    tmp = csv_file.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(ordered)
    tmp.replace(csv_file)
    return [json_file, csv_file]
