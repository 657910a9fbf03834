"""``rims-rl transfer``: transfer cells and the Rusu et al. (2016) matrix, resumable, from local run directories.

A **cell** (source game, target game, policy, mode) trains, for each seed: the source model (or takes a given source
run), a model of the same kind from scratch on the target, and the source's weights fine-tuned on the target
(:mod:`~rims_rl.agents.transfer`), all with the Atari config (``configs/atari.yaml``) and the ``--set`` overrides,
the same budget and the same seed. Its transfer score is :func:`~rims_rl.agents.transfer.transfer_score` per seed
(fine-tuned and scratch runs of the same seed paired), reported as mean and standard deviation over seeds, above
the target's random-agent score (``baseline="random"``, measured once and cached) or above zero (``"zero"``).

Layout under the output root (default ``runs/transfer``); every run is a normal run directory
(``rims-rl evaluate``, ``rims-rl compare`` and ``rims-rl train --resume`` work on it)::

    <root>/random_scores.json                           random-agent scores of the targets
    <root>/<policy>/source/<Game>/s<seed>/              source runs
    <root>/<policy>/scratch/<Game>/s<seed>/             from-scratch runs on the targets
    <root>/<policy>/<mode>/<Source>-to-<Target>/s<seed>/  fine-tuned runs
    <root>/<policy>/<mode>/<Source>-to-<Target>/cell.json the cell's areas and scores
    <root>/<policy>/<mode>/matrix.{csv,md,png}           the protocol's matrix (targets x sources)
    <root>/summary_<mode>.md                             positive / negative transfer counts per policy

Everything resumes: a cell whose ``cell.json`` matches the settings is skipped, a finished run is reused (a source
or scratch run serves every cell that needs it), an interrupted one continues from its newest checkpoint, and a
run another process is training is waited for (so W&B sweep agents can share a root on a shared filesystem).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rims_rl.agents.reports import load_curve
from rims_rl.agents.transfer import random_score, score_from_areas, source_model_file, window_areas
from rims_rl.config import CONFIG_DIR, TrainConfig, resolve_config

__all__ = [
    "PRESETS",
    "PROTOCOLS",
    "Budget",
    "CellResult",
    "TransferRejected",
    "TransferSettings",
    "game_id",
    "run_cell",
    "run_protocol",
    "write_matrix",
]

log = logging.getLogger(__name__)

PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "rusu2016": (
        ("Pong", "Riverraid", "Seaquest"),
        ("Alien", "Asterix", "Boxing", "Centipede", "Gopher", "Hero", "Jamesbond", "Krull", "Robotank",
         "RoadRunner", "StarGunner", "WizardOfWor"),
    ),
}  # fmt: skip
"""Sources and targets of each protocol (RIM paper App. C.12.1, after Rusu et al. 2016)."""

METRIC = "rollout/ep_rew_mean"


@dataclass(frozen=True)
class Budget:
    """Env steps per run, seeds, and config overrides shared by every run of a transfer experiment."""

    total_timesteps: int
    source_timesteps: int
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()


PRESETS: dict[str, Budget] = {
    # 10M agent steps (40M frames) per run, 3 seeds: the Atari config's budget, for GPU machines
    "paper": Budget(10_000_000, 10_000_000, (0, 1, 2)),
    # a few thousand steps with 2 envs x 256 steps (so whole games end within a run): checks the pipeline
    "smoke": Budget(
        2048, 2048, (0,),
        ("n_envs=2", "ppo.n_steps=256", "ppo.batch_size=256", "eval.episodes=1", "checkpoint.every_minutes=0"),
    ),
}  # fmt: skip
DEFAULT_BUDGET = Budget(1_000_000, 1_000_000, (0,))


class TransferRejected(ValueError):
    """Settings or a run directory the transfer command cannot use (one line, for the CLI)."""


def game_id(name: str) -> str:
    """``Pong`` or ``PongNoFrameskip-v4`` -> ``PongNoFrameskip-v4`` (a v4 Atari id).

    :raises TransferRejected: if it is not an Atari game.
    """
    from rims_rl.envs.atari import ATARI_V4_IDS

    env_id = name if name.endswith("NoFrameskip-v4") else f"{name}NoFrameskip-v4"
    if env_id not in ATARI_V4_IDS:
        raise TransferRejected(
            f"'{name}' is not an Atari game (give a name such as Pong or an id such as PongNoFrameskip-v4; "
            "rims-rl envs --family atari lists them)"
        )
    return env_id


def game_name(env_id: str) -> str:
    return env_id.removesuffix("NoFrameskip-v4")


@dataclass
class TransferSettings:
    """What every cell of one ``rims-rl transfer`` call shares."""

    root: Path
    policy: str
    mode: str = "finetune-all"
    budget: Budget = DEFAULT_BUDGET
    device: str | None = None
    wandb_mode: str | None = None
    baseline: str = "random"
    random_episodes: int = 10
    progress_bar: bool = False

    def config(self, env_id: str, seed: int, total: int, source: Path | None = None) -> TrainConfig:
        flags: dict[str, Any] = {"policy": self.policy, "seed": seed, "total_timesteps": total}
        if self.device is not None:
            flags["device"] = self.device
        if self.wandb_mode is not None:
            flags["wandb.mode"] = self.wandb_mode
        if source is not None:
            flags.update({"transfer.source": str(source), "transfer.mode": self.mode})
        return resolve_config(env_id, CONFIG_DIR / "atari.yaml", None, flags, list(self.budget.overrides))

    def key(self) -> dict[str, Any]:
        """What a finished cell must have been computed with to be skipped."""
        b = self.budget
        return {"policy": self.policy, "mode": self.mode, "total_timesteps": b.total_timesteps,
                "source_timesteps": b.source_timesteps, "seeds": list(b.seeds), "overrides": list(b.overrides),
                "baseline": self.baseline}  # fmt: skip


@dataclass
class CellResult:
    """One (source, target) cell: per-seed areas and transfer scores."""

    source: str
    target: str
    policy: str
    mode: str
    seeds: list[int]
    baseline: float
    auc_finetuned: list[float]
    auc_scratch: list[float]
    scores: list[float]
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        finite = [s for s in self.scores if math.isfinite(s)]
        return float(np.mean(finite)) if finite else math.nan

    @property
    def std(self) -> float:
        finite = [s for s in self.scores if math.isfinite(s)]
        return float(np.std(finite)) if len(finite) > 1 else 0.0 if finite else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (an undefined score is ``null``)."""
        return _json_safe({
            "source": self.source, "target": self.target, "policy": self.policy, "mode": self.mode,
            "seeds": self.seeds, "baseline": self.baseline, "auc_finetuned": self.auc_finetuned,
            "auc_scratch": self.auc_scratch, "scores": self.scores, "mean": self.mean, "std": self.std,
            "seconds": self.seconds, "settings": self.settings,
        })  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellResult:
        keys = ("source", "target", "policy", "mode", "seeds", "baseline", "auc_finetuned", "auc_scratch",
                "scores", "seconds", "settings")  # fmt: skip
        cell = cls(**{k: data[k] for k in keys})
        for name in ("auc_finetuned", "auc_scratch", "scores"):
            setattr(cell, name, [math.nan if v is None else float(v) for v in getattr(cell, name)])
        cell.baseline = math.nan if cell.baseline is None else float(cell.baseline)
        return cell

    def line(self) -> str:
        scores = ", ".join(f"{s:.0f}%" if math.isfinite(s) else "n/a" for s in self.scores)
        return (f"{self.source} -> {self.target} ({self.policy}, {self.mode}): transfer "
                f"{_pct(self.mean, self.std)} over seeds {self.seeds} [{scores}]")  # fmt: skip


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _pct(mean: float, std: float) -> str:
    return "n/a" if not math.isfinite(mean) else f"{mean:.0f}% ± {std:.0f}"


# ---- runs ------------------------------------------------------------------------------------------------------
def ensure_run(cfg: TrainConfig, run_dir: Path, settings: TransferSettings, wait_seconds: float = 30.0) -> str:
    """Make ``run_dir`` a finished run of ``cfg``: ``"reused"``, ``"resumed"`` or ``"trained"``.

    :raises TransferRejected: if ``run_dir`` holds a run of another config.
    """
    from rims_rl.agents.checkpoints import RunInUse, RunLock
    from rims_rl.agents.training import RunRejected, load_run, resume, train

    while True:
        try:
            RunLock.check(run_dir)
        except RunInUse as err:  # another process (a sweep agent) trains it: wait for it
            log.warning("%s; waiting for it", err)
            time.sleep(wait_seconds)
            continue
        if (run_dir / "run.json").is_file():
            try:
                old, meta = load_run(run_dir)
            except RunRejected as err:
                raise TransferRejected(str(err)) from None
            if old.model_dump() != cfg.model_dump():
                raise TransferRejected(f"{run_dir} holds a run with another config: remove it or choose another --out")
            if meta.get("status") == "finished":
                return "reused"
            try:
                resume(run_dir, device=settings.device, progress_bar=settings.progress_bar)
                return "resumed"
            except RunRejected as err:
                if "no whole checkpoint" not in str(err):
                    if "in use" in str(err):
                        continue
                    raise TransferRejected(str(err)) from None
            shutil.rmtree(run_dir)  # stopped before its first checkpoint: start it again
        try:
            train(cfg, run_dir, progress_bar=settings.progress_bar)
            return "trained"
        except RunRejected as err:
            if "in use" not in str(err):
                raise TransferRejected(str(err)) from None


def _curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    curve = load_curve(run_dir, METRIC)
    return (curve.steps, curve.values) if curve is not None else (np.empty(0), np.empty(0))


def _seconds(run_dir: Path) -> float:
    meta = json.loads((run_dir / "run.json").read_text())
    return float(meta.get("seconds", math.nan))


def baseline_score(settings: TransferSettings, target: str, cfg: TrainConfig) -> float:
    """The target's reference score: 0, or its random-agent score (cached in ``<root>/random_scores.json``)."""
    if settings.baseline == "zero":
        return 0.0
    from rims_rl.agents.training import atari_settings

    path = settings.root / "random_scores.json"
    scores = json.loads(path.read_text()) if path.is_file() else {}
    entry = scores.get(target)
    if entry is None or entry.get("episodes") != settings.random_episodes:
        value = random_score(target, episodes=settings.random_episodes, atari=atari_settings(cfg))
        scores[target] = entry = {"score": value, "episodes": settings.random_episodes}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    return float(entry["score"])


def run_cell(
    settings: TransferSettings,
    source: str,
    target: str,
    *,
    source_run: Path | None = None,
    report: Callable[[str], None] = print,
) -> CellResult:
    """Compute (or reuse) one cell; see the module docstring.

    :param source: the source game (an Atari id).
    :param source_run: a trained source run to fine-tune from for every seed (default: train one per seed).
    """
    target_name, source_name = game_name(target), game_name(source)
    cell_dir = settings.root / settings.policy / settings.mode / f"{source_name}-to-{target_name}"
    key = {**settings.key(), "source_run": str(source_run) if source_run else None}
    cell_file = cell_dir / "cell.json"
    if cell_file.is_file():
        data = json.loads(cell_file.read_text())
        if data.get("settings") == key:
            cell = CellResult.from_dict(data)
            report(f"skipped (finished): {cell.line()}")
            return cell
    budget = settings.budget
    auc_ft, auc_sc, scores = [], [], []
    seconds: dict[str, float] = {"source": 0.0, "scratch": 0.0, "finetuned": 0.0}
    baseline = math.nan
    for seed in budget.seeds:
        if source_run is None:
            src_dir = settings.root / settings.policy / "source" / source_name / f"s{seed}"
            src_cfg = settings.config(source, seed, budget.source_timesteps)
            report(f"[{source_name} s{seed}] source: {ensure_run(src_cfg, src_dir, settings)}")
            seconds["source"] += _seconds(src_dir)
            src_model = source_model_file(src_dir)
        else:
            src_model = source_model_file(source_run)
        sc_dir = settings.root / settings.policy / "scratch" / target_name / f"s{seed}"
        sc_cfg = settings.config(target, seed, budget.total_timesteps)
        report(f"[{target_name} s{seed}] from scratch: {ensure_run(sc_cfg, sc_dir, settings)}")
        ft_dir = cell_dir / f"s{seed}"
        ft_cfg = settings.config(target, seed, budget.total_timesteps, source=src_model.resolve())
        report(f"[{source_name} -> {target_name} s{seed}] {settings.mode}: {ensure_run(ft_cfg, ft_dir, settings)}")
        seconds["scratch"] += _seconds(sc_dir)
        seconds["finetuned"] += _seconds(ft_dir)
        if math.isnan(baseline):
            baseline = baseline_score(settings, target, sc_cfg)
        ft_area, sc_area = window_areas(_curve(ft_dir), _curve(sc_dir))  # NaN: no episode finished in the budget
        auc_ft.append(ft_area)
        auc_sc.append(sc_area)
        scores.append(score_from_areas(ft_area, sc_area, baseline=baseline))
    cell = CellResult(
        source=source_name, target=target_name, policy=settings.policy, mode=settings.mode, seeds=list(budget.seeds),
        baseline=baseline, auc_finetuned=auc_ft, auc_scratch=auc_sc, scores=scores,
        seconds={k: round(v, 1) for k, v in seconds.items()}, settings=key,
    )  # fmt: skip
    cell_dir.mkdir(parents=True, exist_ok=True)
    tmp = cell_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(cell.to_dict(), indent=2) + "\n")
    tmp.replace(cell_file)
    report(cell.line())
    return cell


# ---- the matrix ------------------------------------------------------------------------------------------------
def _counts(values: list[float]) -> dict[str, int]:
    return {
        "positive": sum(1 for v in values if math.isfinite(v) and v > 100.0),
        "negative": sum(1 for v in values if math.isfinite(v) and v < 100.0),
        "undefined": sum(1 for v in values if not math.isfinite(v)),
        "total": len(values),
    }


def write_matrix(
    cells: list[CellResult], out_dir: Path, sources: list[str], targets: list[str]
) -> tuple[dict[str, Any], list[Path]]:
    """Write ``matrix.csv``, ``matrix.md`` and ``matrix.png`` (targets x sources, mean score over seeds, and the
    mean over sources per target) to ``out_dir``; return the counts of positive and negative transfer and the files.

    Counts are per target game, on the mean over sources (the RIM paper's "positive transfer in 9 out of 12 target
    games"), and per (source, target) cell.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    by_pair = {(c.source, c.target): c for c in cells}
    src_names = [game_name(s) for s in sources]
    tgt_names = [game_name(t) for t in targets]
    grid = np.full((len(tgt_names), len(src_names)), np.nan)
    for i, t in enumerate(tgt_names):
        for j, s in enumerate(src_names):
            if (s, t) in by_pair:
                grid[i, j] = by_pair[(s, t)].mean
    per_target = [float(np.nanmean(row)) if np.isfinite(row).any() else math.nan for row in grid]
    counts = {"targets": _counts(per_target), "cells": _counts([v for v in grid.ravel()])}
    out_dir.mkdir(parents=True, exist_ok=True)

    csv_path = out_dir / "matrix.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["target", *src_names, "mean_over_sources"])
        for t, row, mean in zip(tgt_names, grid, per_target, strict=True):
            writer.writerow([t, *(f"{v:.2f}" if math.isfinite(v) else "" for v in row),
                             f"{mean:.2f}" if math.isfinite(mean) else ""])  # fmt: skip

    lines = ["| target | " + " | ".join(src_names) + " | mean |", "|---" * (len(src_names) + 2) + "|"]
    for t, mean in zip(tgt_names, per_target, strict=True):
        entries = []
        for s in src_names:
            c = by_pair.get((s, t))
            entries.append(_pct(c.mean, c.std) if c is not None else "-")
        lines.append(f"| {t} | " + " | ".join(entries) + f" | {_pct(mean, 0.0).split(' ±')[0]} |")
    tc = counts["targets"]
    lines += ["", "Transfer score: area under the fine-tuned training curve relative to from-scratch (100% = no gain), "
              "mean ± std over seeds.", f"Targets with positive transfer: {tc['positive']} of {tc['total']}; "
              f"negative: {tc['negative']}; undefined: {tc['undefined']}."]  # fmt: skip
    md_path = out_dir / "matrix.md"
    md_path.write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(3.5 + 1.3 * (len(src_names) + 1), 1.5 + 0.45 * len(tgt_names)))
    shown = np.column_stack([grid, per_target])
    finite = shown[np.isfinite(shown)]
    span = max(float(np.abs(finite - 100).max()) if finite.size else 50.0, 1.0)
    image = ax.imshow(shown, cmap="RdBu", norm=TwoSlopeNorm(100.0, 100.0 - span, 100.0 + span), aspect="auto")
    for (i, j), v in np.ndenumerate(shown):
        dark = math.isfinite(v) and abs(v - 100.0) > 0.6 * span
        ax.text(j, i, f"{v:.0f}" if math.isfinite(v) else "n/a", ha="center", va="center", fontsize=8,
                color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(range(len(src_names) + 1), [*src_names, "mean"])
    ax.set_yticks(range(len(tgt_names)), tgt_names)
    ax.set_xlabel("source game")
    ax.set_ylabel("target game")
    fig.colorbar(image, ax=ax, label="transfer score (%)\n100 = no gain; white: n/a")
    policy = cells[0].policy if cells else ""
    ax.set_title(f"{policy}: positive transfer on {tc['positive']} of {tc['total']} targets", fontsize=10)
    fig.tight_layout()
    png_path = out_dir / "matrix.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    (out_dir / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts, [csv_path, md_path, png_path]


def write_policy_summary(root: Path, mode: str) -> Path:
    """``<root>/summary_<mode>.md``: the counts of every policy whose matrix exists under ``root``."""
    lines = ["| policy | positive (targets) | negative | undefined | cells positive / total |", "|---|---|---|---|---|"]
    for counts_file in sorted(root.glob(f"*/{mode}/counts.json")):
        counts = json.loads(counts_file.read_text())
        t, c = counts["targets"], counts["cells"]
        lines.append(f"| {counts_file.parent.parent.name} | {t['positive']} of {t['total']} | {t['negative']} | "
                     f"{t['undefined']} | {c['positive']} / {c['total']} |")  # fmt: skip
    path = root / f"summary_{mode}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_protocol(
    settings: TransferSettings,
    sources: list[str],
    targets: list[str],
    report: Callable[[str], None] = print,
) -> tuple[list[CellResult], dict[str, Any], list[Path]]:
    """Every (source, target) cell (finished ones skipped), then the matrix and the per-policy summary."""
    cells = []
    for source in sources:
        for target in targets:
            cells.append(run_cell(settings, source, target, report=report))
    out_dir = settings.root / settings.policy / settings.mode
    counts, files = write_matrix(cells, out_dir, sources, targets)
    files.append(write_policy_summary(settings.root, settings.mode))
    return cells, counts, files
