"""DAgger's data step for the pixel Half-Cheetah (Ross, Gordon & Bagnell, 2011): the clone drives, the expert labels.

Behaviour cloning trains only on the states the expert visits; once the clone acts, its small errors take it to
states no demonstration shows, and they compound. DAgger plays the clone in the env, asks the expert (acting on the
true state, ``info["state"]``) what it would have done at every visited step, and adds those steps to the training
set. Not in the paper (App. C.7 is plain behaviour cloning): :mod:`rims_rl.agents.imitation` runs it only when
``dagger.rounds`` > 0, after the behaviour-cloning epochs.

This module knows envs and the expert, not the policy: the caller passes ``act``, which holds the recurrent state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch as th

__all__ = ["Played", "play_and_label"]


@dataclass
class Played:
    """Episodes played by :func:`play_and_label`, in the layout of demonstrations (episodes one after another)."""

    frames: np.ndarray  # (N, S, S, 3) uint8: the newest frame seen before each action
    actions: np.ndarray  # (N, A) float32: the expert's action at each step (the label)
    rewards: np.ndarray  # (N,): the reward of the action executed
    states: np.ndarray  # (N, state dim): the true state the expert labelled
    episode_lengths: np.ndarray  # (E,)
    episode_returns: np.ndarray  # (E,): the return of the executed (mixed) actions


def play_and_label(
    act: Callable[[np.ndarray, np.ndarray], np.ndarray],
    expert_path: str | Path,
    *,
    episodes: int,
    beta: float,
    seed: int,
    size: int = 64,
    frame_stack: int = 4,
    camera: str = "track",
    max_steps: int | None = None,
    check: Callable[[], None] | None = None,
) -> Played:
    """Play ``episodes`` episodes of the pixel env side by side (env ``i`` reset with ``seed + i``).

    At each step ``act(obs, starts)`` gives the clone's actions for the ``(B, S, S, 3 * frame_stack)`` uint8
    observations (``starts``: True on each episode's first step, where the caller resets its recurrent state); each
    env executes the expert's action with probability ``beta`` (drawn from a generator seeded by ``seed``) and the
    clone's otherwise. Every step is labelled with the expert's deterministic action on the true state. ``check`` is
    called once per step (to raise when a stop was requested).
    """
    from rims_rl.agents.experts import load_expert
    from rims_rl.envs.cheetah import make_pixel_cheetah

    # Building the actor draws initial weights: fork the RNG so the caller's stream (a resumed run's) stays as it was.
    with th.random.fork_rng(devices=[]):
        expert = load_expert(expert_path)
    kwargs = {"max_episode_steps": max_steps} if max_steps else {}
    envs = [make_pixel_cheetah(size=size, frame_stack=frame_stack, camera=camera, **kwargs) for _ in range(episodes)]
    rng = np.random.default_rng(seed)
    records: list[dict[str, list]] = [{"f": [], "a": [], "r": [], "s": []} for _ in envs]
    try:
        first = [env.reset(seed=seed + i) for i, env in enumerate(envs)]
        obs = np.stack([o for o, _ in first])
        states = np.stack([info["state"] for _, info in first])
        running = np.ones(len(envs), bool)
        starts = np.ones(len(envs), bool)
        while running.any():
            if check is not None:
                check()
            clone = act(obs, starts)
            with th.no_grad():
                labels, _ = expert.predict(states, deterministic=True)
            use_expert = rng.random(len(envs)) < beta
            for i in np.flatnonzero(running):
                rec = records[i]
                rec["f"].append(obs[i, ..., -3:].copy())  # obs and states are overwritten in place below
                rec["s"].append(states[i].copy())
                rec["a"].append(labels[i])
                action = labels[i] if use_expert[i] else clone[i]
                o, reward, terminated, truncated, info = envs[i].step(np.clip(action, -1.0, 1.0))
                rec["r"].append(reward)
                obs[i], states[i] = o, info["state"]
                running[i] = not (terminated or truncated)
            starts[:] = False
    finally:
        for env in envs:
            env.close()
    return Played(
        frames=np.stack([f for rec in records for f in rec["f"]]).astype(np.uint8),
        actions=np.stack([a for rec in records for a in rec["a"]]).astype(np.float32),
        rewards=np.asarray([r for rec in records for r in rec["r"]], np.float32),
        states=np.stack([s for rec in records for s in rec["s"]]).astype(np.float32),
        episode_lengths=np.asarray([len(rec["r"]) for rec in records], np.int64),
        episode_returns=np.asarray([float(np.sum(rec["r"])) for rec in records], np.float64),
    )
