"""Learning curves from run directories: mean episode score (``rollout/ep_rew_mean``) against env steps.

    python scripts/plot_learning.py runs/learning/DemonAttack-rims-s0 runs/learning/DemonAttack-lstm-s0 \\
        --out docs/demon_attack_learning.png

Reads each run's ``progress.csv`` and ``run.json`` (no network). ``rollout/ep_rew_mean`` is SB3's mean over the last
100 finished episodes; on Atari an episode is a whole game with its unclipped score (``envs/atari.py``). Runs of the
same env and policy are drawn in the same colour. Prints the last value of each curve.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def read_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    steps, scores = [], []
    with open(run_dir / "progress.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("rollout/ep_rew_mean"):
                steps.append(int(float(row["time/total_timesteps"])))
                scores.append(float(row["rollout/ep_rew_mean"]))
    return steps, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--title", help="figure title (default: the env ids)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours: dict[str, str] = {}
    envs = set()
    for run_dir in args.run_dirs:
        try:
            meta = json.loads((run_dir / "run.json").read_text())
            steps, scores = read_curve(run_dir)
        except (OSError, ValueError, KeyError) as err:
            print(f"plot_learning: error: {run_dir} is not a readable run directory ({err})", file=sys.stderr)
            return 2
        if not steps:
            print(f"plot_learning: {run_dir} has no finished episode yet; skipped", file=sys.stderr)
            continue
        label = f"{meta['policy']} (seed {meta['seed']})"
        envs.add(meta["env"])
        colour = colours.setdefault(meta["policy"], f"C{len(colours)}")
        ax.plot(steps, scores, color=colour, label=label)
        print(f"{run_dir}: {meta['env']} {meta['policy']} seed {meta['seed']}: "
              f"ep_rew_mean {scores[-1]:.1f} at {steps[-1]} steps")  # fmt: skip
    ax.set_xlabel("env steps (agent steps; Atari frames = 4 x steps)")
    ax.set_ylabel("mean episode score (last 100 episodes)")
    ax.set_title(args.title or ", ".join(sorted(envs)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
