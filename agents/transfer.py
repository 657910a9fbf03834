"""Feature transfer between Atari games (Rusu et al. 2016's protocol, RIM paper App. C.12.1).

**Weights.** A target model starts from a source run's policy weights (:func:`load_source_weights`): the CNN, the
recurrent core (RIM or LSTM) and the MLP layers are copied; the two output layers (``action_net``, ``value_net``)
start fresh. Games have different action sets (Pong's 6 actions are not Alien's 18, and action 3 means different
things in two games with the same count), so no action head is carried over; the value head is reset too, because
the value of a state in the source game says nothing about the target's returns. What then trains is the
``transfer.mode``:

=====================  ==========================================================================================
``finetune-all``       every weight (Rusu et al.'s "fine-tune the whole model" baseline)
``finetune-head``      only the fresh output layers; CNN, core and MLP stay the source's (their "output layer")
``frozen-features``    everything but the CNN, which stays the source's
=====================  ==========================================================================================

Frozen weights have ``requires_grad = False`` (Adam never sees a gradient for them); :func:`freeze` is applied again
when a run resumes, since checkpoints store weights, not flags.

**Scores.** Performance is the area under the training curve (``reports.area_under_curve``: the average
of ``rollout/ep_rew_mean``, the mean score of the last 100 finished training episodes, over the target's budget),
not the final score. The transfer score (:func:`transfer_score`) is that area for the fine-tuned model relative to
the area of a model of the same kind trained from scratch on the target with the same budget and seed, both measured
above a reference score ``baseline``::

    score = 100 * (AUC(fine-tuned) - baseline) / (AUC(scratch) - baseline)

100 means no gain, above 100 positive transfer, below 100 negative transfer. With ``baseline = 0`` this is Rusu et
al.'s ratio of areas; the transfer command uses the target's random-agent score (measured with the same
preprocessing, whole games) so that the ratio keeps its meaning on games whose scores are negative (Boxing) or far
from zero for a random agent. It is undefined (NaN) when the scratch model's area is not above the baseline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import load_from_zip_file

from rims_rl.agents.reports import area_under_curve

__all__ = [
    "HEAD_PREFIXES",
    "TransferError",
    "freeze",
    "load_source_weights",
    "random_score",
    "score_from_areas",
    "source_model_file",
    "transfer_score",
    "window_areas",
]

HEAD_PREFIXES = ("action_net.", "value_net.", "log_std")
"""Parameters that are never carried over from the source: the output layers."""


class TransferError(ValueError):
    """A source that cannot be loaded into the target model (one line, for the CLI)."""


def source_model_file(source: str | Path) -> Path:
    """The model file of a source: a run directory (its ``model.zip``) or a ``.zip`` file.

    :raises TransferError: if there is none.
    """
    path = Path(source)
    if path.is_dir():
        path = path / "model.zip"
    if not path.is_file():
        raise TransferError(f"transfer source {source} has no model (a finished run directory or a model .zip)")
    return path


def load_source_weights(model: BaseAlgorithm, source: str | Path) -> list[str]:
    """Copy the source's policy weights into ``model``'s policy, all but the output layers; the names copied.

    :raises TransferError: if the source's network differs from the target's (another core, other sizes).
    """
    path = source_model_file(source)
    try:
        _, params, _ = load_from_zip_file(path, device="cpu", load_data=False)
    except Exception as err:
        raise TransferError(f"cannot read {path}: {type(err).__name__}: {err}"[:300]) from None
    source_state = (params or {}).get("policy")
    if source_state is None:
        raise TransferError(f"{path} holds no policy weights")
    target_state = model.policy.state_dict()
    carried = [k for k in target_state if not k.startswith(HEAD_PREFIXES)]
    missing = [k for k in carried if k not in source_state]
    if missing:
        raise TransferError(
            f"{path} is not a network of the target's kind: it has no {missing[0]} "
            "(transfer between runs of the same policy and sizes)"
        )
    for key in carried:
        if source_state[key].shape != target_state[key].shape:
            raise TransferError(
                f"{path} does not fit the target network: {key} is {tuple(source_state[key].shape)} there, "
                f"{tuple(target_state[key].shape)} here (transfer between runs of the same policy and sizes)"
            )
    with th.no_grad():
        for key in carried:
            target_state[key].copy_(source_state[key])
    return carried


def freeze(model: BaseAlgorithm, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode`` (see the module docstring); the names of the frozen parameters."""
    if mode not in ("finetune-all", "finetune-head", "frozen-features"):
        raise ValueError(f"transfer mode {mode!r}: valid are finetune-all, finetune-head, frozen-features")
    frozen = []
    for name, param in model.policy.named_parameters():
        if mode == "finetune-head":
            trainable = name.startswith(HEAD_PREFIXES)
        elif mode == "frozen-features":
            trainable = "features_extractor." not in name
        else:
            trainable = True
        param.requires_grad_(trainable)
        if not trainable:
            frozen.append(name)
    return frozen


def window_areas(
    finetuned: tuple[np.ndarray, np.ndarray],
    scratch: tuple[np.ndarray, np.ndarray],
    *,
    start: float | None = None,
    end: float | None = None,
) -> tuple[float, float]:
    """The two curves' areas (averages) over one window of env steps, ``[start, end]``.

    By default the window runs from the first step at which both curves have a value (the rolling score exists once
    an episode has finished) to the last step of the shorter run, so both cover the same part of the same budget.
    Returns ``(nan, nan)`` if either curve is empty or the window is.
    """
    ft_steps, ft_values = (np.asarray(a, dtype=float) for a in finetuned)
    sc_steps, sc_values = (np.asarray(a, dtype=float) for a in scratch)
    if not len(ft_steps) or not len(sc_steps):
        return math.nan, math.nan
    lo = max(ft_steps[0], sc_steps[0]) if start is None else float(start)
    hi = min(ft_steps[-1], sc_steps[-1]) if end is None else float(end)
    if hi < lo:
        return math.nan, math.nan
    return (
        area_under_curve(ft_steps, ft_values, start=lo, end=hi),
        area_under_curve(sc_steps, sc_values, start=lo, end=hi),
    )


def transfer_score(
    finetuned: tuple[np.ndarray, np.ndarray],
    scratch: tuple[np.ndarray, np.ndarray],
    *,
    baseline: float = 0.0,
    start: float | None = None,
    end: float | None = None,
) -> float:
    """The transfer score in percent (see the module docstring), over the window of :func:`window_areas`.

    :param finetuned: ``(steps, values)`` of the fine-tuned model's training curve on the target.
    :param scratch: the same for the model trained from scratch.
    :param baseline: the reference score both areas are measured above (0: Rusu et al.'s plain ratio).
    :returns: ``100 * (AUC_ft - baseline) / (AUC_scratch - baseline)``; NaN if either curve is empty, the window is
        empty, or the scratch area is not above the baseline.
    """
    return score_from_areas(*window_areas(finetuned, scratch, start=start, end=end), baseline=baseline)


def score_from_areas(auc_finetuned: float, auc_scratch: float, *, baseline: float = 0.0) -> float:
    """``100 * (auc_finetuned - baseline) / (auc_scratch - baseline)``, NaN where it is undefined."""
    if not (math.isfinite(auc_finetuned) and math.isfinite(auc_scratch)) or auc_scratch - baseline <= 0:
        return math.nan
    return 100.0 * (auc_finetuned - baseline) / (auc_scratch - baseline)


def random_score(env_id: str, *, episodes: int = 10, seed: int = 0, atari: Any | None = None) -> float:
    """Mean whole-game, unclipped score of uniformly random actions on ``env_id`` (the transfer score's baseline)."""
    from rims_rl.envs import AtariSettings, make_env

    settings = (atari or AtariSettings()).full_games()
    n_envs = min(episodes, 8)
    env = make_env(env_id, n_envs=n_envs, seed=seed, atari=settings)
    rng = np.random.default_rng(seed)
    scores: list[float] = []
    try:
        env.reset()
        while len(scores) < episodes:
            actions = rng.integers(0, env.action_space.n, size=n_envs)
            _, _, dones, infos = env.step(actions)
            for done, info in zip(dones, infos, strict=True):
                if done and "episode" in info:
                    scores.append(float(info["episode"]["r"]))
    finally:
        env.close()
    return float(np.mean(scores[:episodes]))
