"""Logging: SB3's scalars to a local CSV and to Weights & Biases (offline by default), and RIM activations.

* :func:`start_wandb` opens a W&B run in the run directory (``mode="offline"`` needs no account or network). If
  W&B cannot start (no network for ``online``, a bad key, ...), it logs one warning and returns None: training
  goes on with local logging.
* :class:`WandbOutputFormat` is an SB3 ``KVWriter``: everything SB3 records (``rollout/ep_rew_mean``,
  ``train/value_loss``, ...) reaches W&B with the env step as the W&B step, without tensorboard.
* :class:`RIMActivationCallback` reads the activation mask and null attention the policy's RIM computed at each
  rollout step (no extra forward pass) and records per rollout, with the env step as the W&B step:

  ==========================================  ===============================================================
  ``rim/activation_rate/unit_<j>``             fraction of the rollout's steps (all envs) unit j was active
  ``rim/null_attention/unit_<j>``              unit j's mean attention on the null input (high = ignores input)
  ``rim/winner_change_rate``                   fraction of steps whose winner set differs from the step before
                                               (same env, same episode)
  ``rim/heatmap``                              image, units (rows) x steps (columns) of one env; red ticks on top
                                               mark episode starts (W&B only, every ``heatmap_every`` rollouts)
  ==========================================  ===============================================================

  and, every ``save_every`` rollouts, every step's masks to ``activations/rollout_<step>.npz`` in the run directory,
  read back with :func:`read_activations`.
* :func:`read_wandb_history` reads the history rows of an offline W&B run directory (``wandb/offline-run-*``)
  without a server, e.g. to check what a run logged before ``wandb sync``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Image, KVWriter

__all__ = [
    "RIMActivationCallback",
    "RolloutActivations",
    "WandbOutputFormat",
    "activation_heatmap",
    "finish_wandb",
    "log_activation_files",
    "read_activations",
    "read_wandb_history",
    "start_wandb",
]

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


def log_activation_files(paths: list[Path], cfg: Any, run_dir: Path, *, mode: str, env_id: str) -> Any | None:
    """Send ``rims-rl activations`` output to W&B: a run of ``job_type="activations"`` in the training run's group,
    with ``activations/episode_<i>`` images (PNG) and ``activations/episode_<i>_video`` (GIF). None if W&B fails."""
    run = start_wandb(
        mode,
        run_dir,
        {**cfg.model_dump(), "analysis_env": env_id},
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        group=cfg.wandb.group or cfg.env,
        job_type="activations",
        tags=[cfg.policy, "activations", *cfg.wandb.tags],
        name=f"{run_dir.name}-activations",
    )
    if run is None:
        return None
    import wandb

    data: dict[str, Any] = {}
    for path in paths:
        if path.suffix == ".png":
            data[f"activations/{path.stem}"] = wandb.Image(str(path))
        elif path.suffix == ".gif":
            data[f"activations/{path.stem}_video"] = wandb.Video(str(path), format="gif")
    run.log(data)
    finish_wandb(run)
    return run


def finish_wandb(run: Any, exit_code: int | None = None, wait_s: float = 60.0) -> None:
    """``run.finish(exit_code)``; for an offline run, then wait (up to ``wait_s``) until its run file holds its exit
    record. W&B's service process writes the file after ``finish()`` returns: on a loaded machine (CI beside two
    training jobs) a reader right after the command (:func:`read_wandb_history`, ``wandb sync``) found no history
    rows yet, twice. Waiting here makes a finished command's run directory complete."""
    offline = bool(getattr(run, "offline", False))
    path = Path(run.dir).parent / f"run-{run.id}.wandb" if offline else None
    run.finish(exit_code=exit_code)
    if path is None:
        return
    deadline = time.monotonic() + wait_s
    while not _wandb_file_closed(path):
        if time.monotonic() > deadline:
            log.warning("W&B had not finished writing %s after %.0f s", path, wait_s)
            return
        time.sleep(0.1)


def _wandb_file_closed(path: Path) -> bool:
    """Whether the offline run file ends with its exit record (W&B writes it last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        records = _wandb_records(path)
    except (OSError, ValueError):  # not created yet, or its header not written yet
        return False
    if not records:
        return False
    record = pb.Record()
    record.ParseFromString(records[-1])
    return record.WhichOneof("record_type") == "exit"


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
            elif isinstance(value, Image):
                data[key] = self._image(key, value)
        if data:
            self.run.log(data, step=int(step))

    @staticmethod
    def _image(key: str, image: Image) -> Any:
        import wandb

        array = image.image.numpy() if isinstance(image.image, th.Tensor) else np.asarray(image.image)
        if image.dataformats == "CHW":
            array = array.transpose(1, 2, 0)
        caption = HEATMAP_CAPTION if key == HEATMAP_KEY else None
        return wandb.Image(array, caption=caption)

    def close(self) -> None:
        pass


HEATMAP_KEY = "rim/heatmap"
HEATMAP_CAPTION = "units (rows, unit 0 on top) x steps (columns); bright = active; red ticks: episode starts"

_ACTIVE = np.array([253, 231, 37], dtype=np.uint8)  # viridis' ends: active units bright, inactive dark
_INACTIVE = np.array([68, 1, 84], dtype=np.uint8)
_START = np.array([230, 30, 30], dtype=np.uint8)
_BACKGROUND = np.array([255, 255, 255], dtype=np.uint8)


def activation_heatmap(mask: np.ndarray, episode_start: np.ndarray, *, width: int = 512, row: int = 10) -> np.ndarray:
    """An RGB image (uint8, HWC) of one env's activations: units as rows, steps as columns.

    :param mask: ``(T, K)`` bool, True where unit k was active at step t.
    :param episode_start: ``(T,)`` bool, True where step t is the first of an episode; drawn as red ticks in a strip
        above the units (so no activation is hidden).
    :param width: target width in pixels; each step gets ``max(1, width // T)`` columns.
    :param row: pixel rows per unit (the last one a white separator).
    """
    mask = np.asarray(mask, dtype=bool)
    steps = mask.shape[0]
    px = max(1, width // max(steps, 1))
    cells = np.where(mask.T[:, :, None], _ACTIVE, _INACTIVE)  # (K, T, 3)
    body = np.repeat(np.repeat(cells, row, axis=0), px, axis=1)
    body[row - 1 : -1 : row] = _BACKGROUND  # a 1-pixel line between units
    strip = np.broadcast_to(_BACKGROUND, (4, steps * px, 3)).copy()
    starts = np.repeat(np.asarray(episode_start, dtype=bool), px)
    strip[:, starts] = _START
    return np.concatenate([strip, body], axis=0)


class RolloutActivations(NamedTuple):
    """Every step of one rollout, as saved by :class:`RIMActivationCallback` (``T`` steps, ``E`` envs, ``K`` units).

    :param step: env steps done before the rollout (``num_timesteps`` at its start); step t of env e is env step
        ``step + t * E + e + 1`` in SB3's count.
    :param mask: ``(T, E, K)`` bool, the RIM's activation mask.
    :param null_attention: ``(T, E, K)`` float16, each unit's attention on the null input (mean over heads).
    :param episode_start: ``(T, E)`` bool, True where the step is the first of an episode (the RIM's state was reset).
    """

    step: int
    mask: np.ndarray
    null_attention: np.ndarray
    episode_start: np.ndarray


ACTIVATIONS_DIR = "activations"


def read_activations(run_dir: str | Path) -> list[RolloutActivations]:
    """The per-step activations a training run saved (``activations.save_every > 0``), oldest rollout first.

    Files are ``RUN_DIR/activations/rollout_<step>.npz`` (NumPy compressed: ``mask``, ``null_attention``,
    ``episode_start``, ``step``); an unreadable file (a run killed while writing it) is skipped.
    """
    out = []
    for path in sorted(Path(run_dir, ACTIVATIONS_DIR).glob("rollout_*.npz")):
        try:
            with np.load(path) as data:
                out.append(
                    RolloutActivations(int(data["step"]), data["mask"], data["null_attention"], data["episode_start"])
                )
        except (OSError, ValueError, KeyError) as err:
            log.warning("skipping %s: %s", path, err)
    return sorted(out, key=lambda r: r.step)


class RIMActivationCallback(BaseCallback):
    """Per-step activations of the actor's RIM during training, summarised per rollout (see the module docstring).

    At every rollout step, the policy's :attr:`~rims_rl.policies.RIMPolicy.rim_info` holds the actor RIM's
    activation mask ``(1, n_envs, K)`` and input attention for that step, from the forward pass that chose the
    actions: the callback only keeps references to them (no copy, no extra forward pass) and does the work once per
    rollout. It must come before callbacks that run the policy on other envs (evaluation) in the callback list.

    :param heatmap_every: a ``rim/heatmap`` image every N rollouts (0: never); images go to the logger as SB3
        :class:`~stable_baselines3.common.logger.Image` values, which only :class:`WandbOutputFormat` writes.
    :param heatmap_env: the env whose steps the heatmap shows.
    :param save_every: save the rollout's masks to ``save_dir`` every N rollouts (0: never).
    :param keep_until: a resumed run: saved rollouts from at or after this env step (written by a process that died
        after its last checkpoint) are deleted first; the resumed run writes them again.
    """

    def __init__(
        self,
        *,
        heatmap_every: int = 0,
        heatmap_env: int = 0,
        save_every: int = 0,
        save_dir: str | Path | None = None,
        keep_until: int | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if save_every and save_dir is None:
            raise ValueError("save_every > 0 needs save_dir, the directory to write the masks to")
        self.heatmap_every = heatmap_every
        self.heatmap_env = heatmap_env
        self.save_every = save_every
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self._start_step = 0
        self._masks: list[th.Tensor] = []
        self._null: list[th.Tensor] = []
        self._starts: list[th.Tensor] = []
        if keep_until is not None and self.save_dir is not None and self.save_dir.is_dir():
            for path in self.save_dir.glob("rollout_*.npz"):
                if int(path.stem.removeprefix("rollout_")) >= keep_until:
                    path.unlink()

    def _on_rollout_start(self) -> None:
        self._masks.clear()
        self._null.clear()
        self._starts.clear()
        self._start_step = self.num_timesteps

    def _on_step(self) -> bool:
        info = getattr(self.model.policy, "rim_info", None)
        if info is not None:
            self._masks.append(info.activation_mask[-1])
            self._null.append(info.input_attention[-1, ..., 0])
            self._starts.append(self.locals["episode_starts"])
        return True

    def _on_rollout_end(self) -> None:
        if not self._masks:
            return
        masks = th.stack(self._masks)  # (T, n_envs, K)
        null = th.stack(self._null)
        starts = th.stack(self._starts).reshape(masks.shape[:2]) > 0.5
        self.on_rollout_masks(masks, null, starts)

    @property
    def rollouts(self) -> int:
        """The number of the rollout in progress or just collected (1, 2, ...), from the env step where it began, so
        the ``*_every`` cadence continues across a resume."""
        return self._start_step // (self.model.n_steps * self.model.n_envs) + 1

    def on_rollout_masks(self, masks: th.Tensor, null_attention: th.Tensor, episode_start: th.Tensor) -> None:
        """Record one rollout: ``masks`` ``(T, n_envs, K)`` bool, ``null_attention`` the same shape, float,
        ``episode_start`` ``(T, n_envs)`` bool."""
        rates = masks.float().mean(dim=(0, 1)).tolist()
        nulls = null_attention.float().mean(dim=(0, 1)).tolist()
        for j, (rate, null) in enumerate(zip(rates, nulls, strict=True)):
            self.logger.record(f"rim/activation_rate/unit_{j}", rate)
            self.logger.record(f"rim/null_attention/unit_{j}", null)
        if masks.shape[0] > 1:
            changed = (masks[1:] != masks[:-1]).any(dim=-1)  # (T-1, n_envs)
            same_episode = ~episode_start[1:]
            if bool(same_episode.any()):
                rate = changed[same_episode].float().mean().item()
                self.logger.record("rim/winner_change_rate", rate)
        if self.heatmap_every and self.rollouts % self.heatmap_every == 0:
            env = min(self.heatmap_env, masks.shape[1] - 1)
            image = activation_heatmap(masks[:, env].cpu().numpy(), episode_start[:, env].cpu().numpy())
            self.logger.record(HEATMAP_KEY, Image(image, "HWC"), exclude=("stdout", "log", "json", "csv"))
        if self.save_every and self.rollouts % self.save_every == 0:
            self._save(masks, null_attention, episode_start)

    def _save(self, masks: th.Tensor, null_attention: th.Tensor, episode_start: th.Tensor) -> None:
        assert self.save_dir is not None
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"rollout_{self._start_step:012d}.npz"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                step=np.int64(self._start_step),
                mask=masks.cpu().numpy(),
                null_attention=null_attention.cpu().numpy().astype(np.float16),
                episode_start=episode_start.cpu().numpy(),
            )
        tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------------
# Offline W&B run files. W&B writes a run's records to ``run-<id>.wandb``: a LevelDB-style log (32 KiB blocks of
# chunks, each ``crc32 (4 bytes) | length (2) | type (1: whole, 2: first, 3: middle, 4: last)``, after a 7-byte
# ``:W&B`` file header) of protobuf ``Record`` messages. wandb ships the protobuf classes but, since 0.19, no
# reader for the file.
_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")


def _wandb_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no :W&B header)")
    records, parts, pos = [], b"", 7
    while pos + _CHUNK_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # block trailer padding
            pos += left
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        pos += _CHUNK_HEADER.size
        if pos + length > len(data) or kind not in (1, 2, 3, 4):
            break  # a torn end (the process was killed while writing): keep what came before
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        else:
            records.append(parts + chunk)
    return records


def read_wandb_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The history rows (``run.log`` calls) of an offline W&B run, in order, without a server.

    :param run_dir: a ``wandb/offline-run-*`` directory (or its ``run-<id>.wandb`` file).
    :returns: one dict per logged step: ``{"_step": env step, key: value, ...}``; values are decoded from JSON;
        media (``rim/heatmap``) are dicts with ``_type``, ``path`` (relative to ``run_dir/files``), ``width`` and
        ``height``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(run_dir)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"no run-*.wandb file in {path}")
        path = files[0]
    rows = []
    for chunk in _wandb_records(path):
        record = pb.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            value = json.loads(item.value_json)
            keys = list(item.nested_key) or [item.key]
            target = row
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = value
        if record.history.HasField("step"):
            row["_step"] = int(record.history.step.num)
        rows.append(row)
    return rows
