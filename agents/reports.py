"""RIM-vs-LSTM comparison from local run directories (no network): learning curves over seeds and a score table.

``rims-rl compare RUN_DIR... --out DIR`` reads each run's ``config.yaml`` (env, policy, algo, seed),
``progress.csv`` (the metric against ``time/total_timesteps``) and ``eval.json`` (the final evaluation), groups the
runs by env and by policy, and writes:

* ``learning_curves.png``: one panel per env, one line per policy: the mean over seeds of the metric, with a 95%
  bootstrap confidence band for that mean (10,000 resamples of the seeds, a fixed RNG: the figure is reproducible);
  x is env steps. Each seed's curve is interpolated onto a common grid that stops at the shortest run of the group,
  so every point of the band averages the same seeds.
* ``summary.csv`` and ``summary.md``: per env and policy, the seeds, the final value of the curve, the area under
  the curve (:func:`area_under_curve`: the curve's average over training, Rusu et al. 2016's performance measure)
  and the final evaluation, each as mean and standard deviation over seeds.

The metric is ``rollout/ep_rew_mean`` by default (the training episodes' return, SB3's window of 100 episodes) or any
``progress.csv`` column, e.g. ``eval/mean_reward`` (periodic evaluations).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = [
    "PAPER_TABLE6",
    "GroupSummary",
    "ImitationGroup",
    "RunCurve",
    "area_under_curve",
    "bootstrap_band",
    "compare",
    "find_runs",
    "imitation_groups",
    "imitation_method",
    "imitation_table",
    "load_curve",
    "mean_curve",
    "plot_imitation",
]

STEP = "time/total_timesteps"


@dataclass
class RunCurve:
    """One run's metric against env steps, with what identifies it."""

    run_dir: Path
    env: str
    policy: str
    algo: str
    seed: int
    steps: np.ndarray
    values: np.ndarray
    final_eval: float | None = None


@dataclass
class GroupSummary:
    """One (env, policy) cell of the table: per-seed numbers and their mean and spread."""

    env: str
    policy: str
    seeds: list[int]
    final: list[float]
    auc: list[float]
    final_eval: list[float] = field(default_factory=list)
    steps: int = 0

    def row(self) -> dict[str, str]:
        return {
            "env": self.env,
            "policy": self.policy,
            "seeds": " ".join(map(str, self.seeds)),
            "steps": str(self.steps),
            "final": _mean_std(self.final),
            "auc": _mean_std(self.auc),
            "final_eval": _mean_std(self.final_eval),
        }


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def area_under_curve(
    steps: np.ndarray, values: np.ndarray, start: float | None = None, end: float | None = None
) -> float:
    """The average of a curve over env steps ``[start, end]`` (trapezoid rule, linear between logged points).

    This is the area under the curve divided by the width of the window, so it is in the metric's units and
    comparable between budgets: Rusu et al. (2016) measure performance as the area under the training curve. The
    window defaults to the curve's own first and last step; a curve shorter than the window is not extrapolated
    (the window is clipped to it). A single point is its own average.
    """
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.size == 0:
        raise ValueError("area_under_curve needs at least one point")
    lo = steps[0] if start is None else max(start, steps[0])
    hi = steps[-1] if end is None else min(end, steps[-1])
    if hi <= lo:
        return float(np.interp(lo, steps, values))
    inside = (steps > lo) & (steps < hi)
    xs = np.concatenate([[lo], steps[inside], [hi]])
    ys = np.interp(xs, steps, values)
    return float(np.sum((ys[1:] + ys[:-1]) * np.diff(xs)) / 2.0 / (hi - lo))


def bootstrap_band(
    samples: np.ndarray, *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` percentile-bootstrap confidence interval of the mean over axis 0 (seeds), per column.

    With one seed the band is the curve itself (no spread can be estimated).
    """
    samples = np.asarray(samples, dtype=float)
    n = samples.shape[0]
    if n < 2:
        return samples[0].copy(), samples[0].copy()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    means = samples[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    return np.percentile(means, tail, axis=0), np.percentile(means, 100.0 - tail, axis=0)


def mean_curve(curves: list[RunCurve], points: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(grid, mean, low, high)``: the curves interpolated on a common grid (up to the shortest one), their mean
    and its 95% bootstrap band."""
    start = max(c.steps[0] for c in curves)
    end = min(c.steps[-1] for c in curves)
    grid = np.linspace(start, end, points) if end > start else np.array([end], dtype=float)
    stacked = np.stack([np.interp(grid, c.steps, c.values) for c in curves])
    low, high = bootstrap_band(stacked)
    return grid, stacked.mean(axis=0), low, high


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Run directories among ``paths``: each path is a run directory or a folder searched for them."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file() and (path / "progress.csv").is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p.parent for p in path.rglob("progress.csv") if (p.parent / "config.yaml").is_file())
    return list(dict.fromkeys(found))


def load_curve(run_dir: Path, metric: str) -> RunCurve | None:
    """The run's ``metric`` against env steps (rows without a value skipped); None if it never logged it."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    steps, values = [], []
    with open(run_dir / "progress.csv", newline="") as f:
        for row in csv.DictReader(f):
            value, step = row.get(metric), row.get(STEP)
            if value not in (None, "") and step not in (None, ""):
                steps.append(float(step))
                values.append(float(value))
    if not steps:
        return None
    order = np.argsort(steps, kind="stable")
    final_eval = None
    if (run_dir / "eval.json").is_file():
        final_eval = float(json.loads((run_dir / "eval.json").read_text())["mean_return"])
    return RunCurve(
        run_dir=run_dir,
        env=str(config["env"]),
        policy=str(config["policy"]),
        algo=str(config.get("algo", "ppo")),
        seed=int(config.get("seed", 0)),
        steps=np.asarray(steps)[order],
        values=np.asarray(values)[order],
        final_eval=final_eval,
    )


def _label(curve: RunCurve, algos: set[str]) -> str:
    return f"{curve.policy} ({curve.algo})" if len(algos) > 1 else curve.policy


def compare(
    run_dirs: list[Path], out: Path, *, metric: str = "rollout/ep_rew_mean"
) -> tuple[list[GroupSummary], list[Path], list[Path]]:
    """Write the figure and the tables of the module docstring to ``out``.

    :return: the summaries (one per env and policy), the files written, and the runs skipped (no such metric).
    :raises ValueError: if no run has the metric.
    """
    curves, skipped = [], []
    for run_dir in run_dirs:
        curve = load_curve(run_dir, metric)
        (curves if curve is not None else skipped).append(curve or run_dir)
    if not curves:
        raise ValueError(f"none of the {len(run_dirs)} runs logged '{metric}'")
    algos = {c.algo for c in curves}
    groups: dict[tuple[str, str], list[RunCurve]] = {}
    for curve in sorted(curves, key=lambda c: (c.env, c.policy, c.algo, c.seed)):
        groups.setdefault((curve.env, _label(curve, algos)), []).append(curve)

    summaries = []
    for (env, label), members in groups.items():
        summaries.append(
            GroupSummary(
                env=env,
                policy=label,
                seeds=[c.seed for c in members],
                final=[float(c.values[-1]) for c in members],
                auc=[area_under_curve(c.steps, c.values) for c in members],
                final_eval=[c.final_eval for c in members if c.final_eval is not None],
                steps=int(min(c.steps[-1] for c in members)),
            )
        )
    out.mkdir(parents=True, exist_ok=True)
    files = [_plot(groups, out / "learning_curves.png", metric), *_tables(summaries, out, metric)]
    return summaries, files, skipped


def _plot(groups: dict[tuple[str, str], list[RunCurve]], path: Path, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    envs = sorted({env for env, _ in groups})
    columns = min(len(envs), 3)
    rows = (len(envs) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.8 * rows), squeeze=False)
    colours = {"rims": "tab:red", "lstm": "tab:blue"}
    for ax, env in zip(axes.flat, envs, strict=False):
        for (group_env, label), members in groups.items():
            if group_env != env:
                continue
            grid, mean, low, high = mean_curve(members)
            colour = colours.get(label.split(" ")[0])
            ax.plot(grid, mean, label=f"{label} ({len(members)} seed{'s' if len(members) > 1 else ''})",
                    color=colour, linewidth=1.8)  # fmt: skip
            ax.fill_between(grid, low, high, color=colour, alpha=0.2, linewidth=0)
        ax.set_title(env)
        ax.set_xlabel("env steps")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 400k, not 400000 (whose labels run into each other)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    for ax in list(axes.flat)[len(envs) :]:
        ax.axis("off")
    fig.suptitle("mean over seeds, 95% bootstrap band", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _tables(summaries: list[GroupSummary], out: Path, metric: str) -> list[Path]:
    rows = [s.row() for s in summaries]
    header = list(rows[0])
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    names = {"final": f"final {metric}", "auc": "area under curve (average)", "final_eval": "final evaluation"}
    lines = ["| " + " | ".join(names.get(h, h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


# ================================================================================================================
# Imitation (paper Table 6): returns without and with perturbation, per method, over seeds
# ================================================================================================================
PAPER_TABLE6 = {  # method -> (unperturbed, perturbed) as "mean +- std" (the paper's Table 6)
    "LSTM": ("5400 +- 100", "2500 +- 300"),
    "RIMs (k_T=6, k_A=3)": ("5300 +- 200", "3800 +- 200"),
    "RIMs (k_T=6, k_A=6)": ("5500 +- 100", "2700 +- 400"),
}


@dataclass
class ImitationGroup:
    """One method's evaluated runs: ``returns[spec][seed]`` is the list of that seed's episode returns."""

    method: str
    returns: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    def seeds(self, specs: list[str]) -> list[int]:
        """The seeds evaluated under any of ``specs``."""
        return sorted({seed for spec in specs for seed in self.returns.get(spec, {})})

    def summary(self, spec: str) -> tuple[float, float, float, bool] | None:
        """``(mean, low, high, one_seed)``: the mean over seeds of each seed's mean return and its 95% interval (a
        bootstrap over seeds; with one seed, over that seed's episodes); None if no run was evaluated under ``spec``."""
        per_seed = self.returns.get(spec, {})
        if not per_seed:
            return None
        means = np.array([np.mean(r) for r in per_seed.values()])
        one_seed = len(means) == 1
        samples = np.asarray(next(iter(per_seed.values())), float) if one_seed else means
        low, high = bootstrap_band(samples[:, None])
        return float(means.mean()), float(low[0]), float(high[0]), one_seed

    def cell(self, spec: str) -> str:
        """``mean [low, high]`` of :meth:`summary`, the interval marked ``ep`` when it is over one seed's episodes."""
        summary = self.summary(spec)
        if summary is None:
            return "-"
        mean, low, high, one_seed = summary
        return f"{mean:.0f} [{low:.0f}, {high:.0f}{' ep' if one_seed else ''}]"


def imitation_method(cfg: Any) -> str:
    """The row name of an imitation run's config, as in the paper's Table 6."""
    if cfg.policy == "rims":
        return f"RIMs (k_T={cfg.rim.num_units}, k_A={cfg.rim.k_active})"
    return f"{cfg.policy.upper()} ({cfg.hidden_size})"


def imitation_groups(run_dirs: Iterable[Path]) -> list[ImitationGroup]:
    """Runs' ``perturb.json`` grouped by method (:func:`imitation_method`), each seed's returns per perturbation.
    Two runs of one method with the same seed (a rerun with other settings, say) raise ValueError instead of
    pooling their episodes as if they were one seed's."""
    from rims_rl.config import ImitationConfig

    groups: dict[str, ImitationGroup] = {}
    seen: dict[tuple[str, int], Path] = {}
    for run_dir in run_dirs:
        cfg = ImitationConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
        name = imitation_method(cfg)
        other = seen.setdefault((name, cfg.seed), run_dir)
        if other != run_dir:
            raise ValueError(f"{other} and {run_dir} are both {name} with seed {cfg.seed}: pass one of them")
        group = groups.setdefault(name, ImitationGroup(name))
        for spec, result in json.loads((run_dir / "perturb.json").read_text()).items():
            group.returns.setdefault(spec, {}).setdefault(cfg.seed, []).extend(result["returns"])
    return [groups[k] for k in sorted(groups)]


def imitation_table(groups: list[ImitationGroup], specs: list[str]) -> str:
    """Markdown: per method the seeds and, per perturbation spec, the mean over seeds with its 95% interval; then
    every seed's mean return; then the paper's Table 6."""
    head = "| method | seeds | " + " | ".join(specs) + " |"
    lines = [head, "|---" * (len(specs) + 2) + "|"]
    for g in groups:
        lines.append(f"| {g.method} | {len(g.seeds(specs))} | " + " | ".join(g.cell(s) for s in specs) + " |")
    lines += ["", "| method | seed | " + " | ".join(specs) + " |", "|---" * (len(specs) + 2) + "|"]
    for g in groups:
        for seed in g.seeds(specs):
            cells = []
            for spec in specs:
                r = g.returns.get(spec, {}).get(seed)
                cells.append(f"{np.mean(r):.0f} +- {np.std(r):.0f} ({len(r)})" if r else "-")
            lines.append(f"| {g.method} | {seed} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Means over seeds of each seed's mean return, 95% bootstrap interval over seeds (`ep`: one seed, interval "
        "over its episodes); per seed: mean +- std (episodes).",
        "Paper (Table 6, unperturbed / perturbed): "
        + "; ".join(f"{k} {u} / {p}" for k, (u, p) in PAPER_TABLE6.items()),
    ]
    return "\n".join(lines)


def plot_imitation(groups: list[ImitationGroup], specs: list[str], path: Path) -> Path:
    """Return against the joint-noise scale (``none`` is 0; a spec's scale is its joint-angle std in rad): one
    line per method, the mean over seeds with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rims_rl.envs.cheetah import parse_perturb

    scales = {spec: parse_perturb(spec).qpos_scale for spec in specs}
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for g in groups:
        xs, ys, errs = [], [], []
        for spec in sorted(specs, key=scales.get):
            summary = g.summary(spec)
            if summary is None:
                continue
            mean, low, high, _ = summary
            xs.append(scales[spec])
            ys.append(mean)
            errs.append((mean - low, high - mean))
        seeds = len(g.seeds(specs))
        ax.errorbar(xs, ys, yerr=np.array(errs).T, marker="o", capsize=3,
                    label=f"{g.method} ({seeds} seed{'s' if seeds > 1 else ''})")  # fmt: skip
    ax.set_xlabel("joint-angle noise std (rad), every 50 steps")
    ax.set_ylabel("return (1000 steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Half-Cheetah from pixels: mean over seeds, 95% interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
