"""Logging: SB3's scalars to a local CSV and to Weights & Biases (offline by default), and RIM activations.

* :func:`start_wandb` opens a W&B run in the run directory (``mode="offline"`` needs no account or network). If
  W&B cannot start (no network for ``online``, a bad key, ...), it logs one warning and returns None: training
  goes on with local logging.
* :class:`WandbOutputFormat` is an SB3 ``KVWriter``: everything SB3 records (``rollout/ep_rew_mean``,
  ``train/value_loss``, ...) reaches W&B with the env step as the W&B step, without tensorboard.
* :class:`RIMActivationCallback` reads the activation mask the policy's RIM computed at each rollout step (no extra
  forward pass) and records, per rollout, each unit's activation rate ``rim/activation_rate/unit_<j>`` and mean
  null attention ``rim/null_attention/unit_<j>``. Richer activation logging (per-step heatmaps, saved masks) can
  build on it: subclass it and override :meth:`RIMActivationCallback.on_rollout_masks`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter

__all__ = ["RIMActivationCallback", "WandbOutputFormat", "start_wandb"]

log = logging.getLogger(__name__)


def start_wandb(
    mode: str,
    run_dir: Path,
    config: dict[str, Any],
    *,
    project: str,
    entity: str | None,
    group: str,
    job_type: str,
    tags: list[str],
    name: str,
    run_id: str | None = None,
) -> Any | None:
    """Open a W&B run writing under ``run_dir/wandb``; None if ``mode == "disabled"`` or W&B fails to start.

    Runs carry ``group`` (the env id), ``job_type`` (the policy) and tags, so a W&B workspace grouped by them plots
    RIM against LSTM side by side. With ``run_id`` (a resumed training run) the same W&B run continues: online, W&B
    resumes it; offline, each segment is its own ``offline-run-*`` directory with that id, and
    ``wandb sync --id RUN_ID <dirs>`` uploads them into one run in order.
    """
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        return wandb.init(
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            tags=tags,
            name=name,
            config=config,
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off", disable_git=True, save_code=False),
        )
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("W&B could not start (%s); continuing with local logging only", first_line)
        return None


class WandbOutputFormat(KVWriter):
    """SB3 logger output that sends scalar records to a W&B run, with the env step as the W&B step."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        data = {}
        for key, value in key_values.items():
            excluded = key_excluded.get(key) or ()
            if "wandb" in excluded:
                continue
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                data[key] = float(value)
            elif isinstance(value, th.Tensor) and value.numel() == 1:
                data[key] = value.item()
        if data:
            self.run.log(data, step=int(step))

    def close(self) -> None:
        pass


class RIMActivationCallback(BaseCallback):
    """Per rollout, each unit's activation rate and mean null attention, from the masks the RIM computed.

    At every rollout step, the policy's :attr:`~rims_rl.policies.RIMPolicy.rim_info` holds the actor RIM's
    activation mask ``(1, n_envs, K)`` and input attention for that step: the callback only accumulates them.
    """

    def __init__(self, verbose: int = 0) -> None:
        super().__init__(verbose)
        self._masks: list[th.Tensor] = []
        self._null: list[th.Tensor] = []

    def _on_rollout_start(self) -> None:
        self._masks.clear()
        self._null.clear()

    def _on_step(self) -> bool:
        info = getattr(self.model.policy, "rim_info", None)
        if info is not None:
            self._masks.append(info.activation_mask[-1])
            self._null.append(info.input_attention[-1, ..., 0])
        return True

    def _on_rollout_end(self) -> None:
        if not self._masks:
            return
        masks = th.stack(self._masks)  # (T, n_envs, K)
        null = th.stack(self._null)
        self.on_rollout_masks(masks, null)

    def on_rollout_masks(self, masks: th.Tensor, null_attention: th.Tensor) -> None:
        """Record the rollout's statistics; ``masks`` ``(T, n_envs, K)`` bool, ``null_attention`` same shape."""
        rates = masks.float().mean(dim=(0, 1)).tolist()
        nulls = null_attention.float().mean(dim=(0, 1)).tolist()
        for j, (rate, null) in enumerate(zip(rates, nulls, strict=True)):
            self.logger.record(f"rim/activation_rate/unit_{j}", rate)
            self.logger.record(f"rim/null_attention/unit_{j}", null)
