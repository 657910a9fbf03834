"""Sizes checked before anything is allocated: a run whose envs or model cannot fit is refused in one line.

A mistyped size (``--n-envs 100000``, ``--set rim.num_units=100000``) would otherwise build for minutes to hours and
grow until the machine swaps, before training a step. :func:`check_env_count` runs before any env is made,
:func:`check_memory` after the training envs exist (their observation space sizes the rollout buffer) and before
the model is built. The estimate is a lower bound of what training holds, so a refusal is never a false alarm:

- the recurrent core's parameters (built on PyTorch's ``meta`` device: counted, never allocated), one core per
  actor and critic when ``network.recurrent_critic`` is ``separate``, four copies (weights, gradients and Adam's two
  moments);
- the rollout buffer: ``n_steps x n_envs`` observations (float32) and recurrent states (hidden and cell, actor and
  critic);
- the RIM's communication attention over a minibatch: ``batch_size x num_units^2 x comm_heads`` scores.
"""

from __future__ import annotations

import os

import gymnasium as gym
import torch

from rims_rl.config import TrainConfig

__all__ = ["MAX_ENVS", "ResourceError", "available_memory", "check_env_count", "check_memory", "estimate_memory"]

MAX_ENVS = 4096
"""The most env copies one training process steps (each is stepped in turn by the vectorised env)."""

_FEATURES = 512  # the core's input size assumed by the estimate (the Nature CNN's output; others are smaller)


class ResourceError(ValueError):
    """A run that cannot fit this machine (one line: what, the estimate, and what is available)."""


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable`` of /proc/meminfo, else the physical total)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _core_parameters(cfg: TrainConfig) -> int:
    """Parameters of one recurrent core of ``cfg``, counted on the meta device."""
    with torch.device("meta"):
        if cfg.policy == "rims":
            from rims_rl.rim import RIM

            rim = cfg.rim
            core = RIM(_FEATURES, rim.num_units, rim.unit_size, rim.k_active, cell=rim.cell, **rim.rim_kwargs())
        else:
            core = torch.nn.LSTM(_FEATURES, cfg.lstm.hidden_size)
    return sum(p.numel() for p in core.parameters())


def _state_size(cfg: TrainConfig) -> int:
    return cfg.rim.num_units * cfg.rim.unit_size if cfg.policy == "rims" else cfg.lstm.hidden_size


def estimate_memory(cfg: TrainConfig, observation_space: gym.Space | None = None) -> dict[str, float]:
    """Bytes training ``cfg`` holds at least, by part (module docstring); ``observation_space`` sizes the buffer."""
    cores = 2 if cfg.network.recurrent_critic == "separate" else 1
    parts = {"model": 4.0 * 4 * cores * _core_parameters(cfg)}
    n_steps = cfg.algo_settings.n_steps
    obs = gym.spaces.flatdim(observation_space) if observation_space is not None else 0
    parts["rollout buffer"] = 4.0 * n_steps * cfg.n_envs * (obs + 4 * _state_size(cfg) + 8)
    if cfg.policy == "rims" and cfg.rim.communication:
        batch = cfg.ppo.batch_size if cfg.algo == "ppo" else n_steps * cfg.n_envs
        parts["attention"] = 4.0 * batch * cfg.rim.num_units**2 * cfg.rim.comm_heads
    return parts


def _describe(parts: dict[str, float]) -> str:
    return f"an estimated {_gb(sum(parts.values()))} ({', '.join(f'{k} {_gb(v)}' for k, v in parts.items() if v)})"


def check_env_count(cfg: TrainConfig) -> None:
    """Refuse more than :data:`MAX_ENVS` env copies, before any is made.

    :raises ResourceError: with the estimated memory of the rollout buffer and model.
    """
    if cfg.n_envs > MAX_ENVS:
        raise ResourceError(
            f"n_envs={cfg.n_envs} is more env copies than one process steps (at most {MAX_ENVS}; they would need "
            f"{_describe(estimate_memory(cfg))} before the observations); use fewer"
        )


def check_memory(cfg: TrainConfig, observation_space: gym.Space, available: int | None = None) -> None:
    """Refuse a run whose estimated memory (module docstring) is over the memory available now.

    :raises ResourceError: naming the estimate, its parts and what is available.
    """
    parts = estimate_memory(cfg, observation_space)
    available = available_memory() if available is None else available
    if sum(parts.values()) > available:
        sizes = f"n_envs={cfg.n_envs}, {cfg.algo}.n_steps={cfg.algo_settings.n_steps}"
        if cfg.policy == "rims":
            sizes += f", rim.num_units={cfg.rim.num_units}, rim.unit_size={cfg.rim.unit_size}"
        else:
            sizes += f", lstm.hidden_size={cfg.lstm.hidden_size}"
        raise ResourceError(
            f"this run needs {_describe(parts)}, more than the {_gb(available)} available ({sizes}); use smaller sizes"
        )
