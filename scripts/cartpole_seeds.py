"""How often RIM-PPO and LSTM-PPO solve CartPoleNoVel-v1 with the shipped config (or a change to it), over seeds.

    python scripts/cartpole_seeds.py [--seeds 0 1 2 3] [--set ppo.ent_coef=0.01 ...] [--jobs 2] [--threads 1]
                                     [--out runs/cartpole_seeds]

Trains each policy on each seed with ``configs/classic.yaml`` (what ``rims-rl train`` runs) plus the ``--set``
overrides, resumably (a seed whose run directory is finished is read, not retrained), ``--jobs`` runs at a time with
``--threads`` torch threads each (a run is deterministic for a seed, machine and thread count), and prints a markdown
table: the env step at which the periodic evaluation (20 greedy episodes) first reached 475, or the best evaluation
if it never did, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _jobs import run_jobs  # scripts/_jobs.py


def run_one(policy: str, seed: int, overrides: list[str], threads: int, run_dir: Path) -> bool:
    """Train one run unless its directory holds a finished one; True when the run is finished."""
    import torch

    from rims_rl.agents.training import train
    from rims_rl.config import CONFIG_DIR, resolve_config

    meta_file = run_dir / "run.json"
    if meta_file.is_file() and json.loads(meta_file.read_text())["status"] == "finished":
        return True
    torch.set_num_threads(threads)
    flags = {"policy": policy, "seed": seed, "wandb.mode": "disabled"}
    cfg = resolve_config("CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", flags=flags, overrides=overrides)
    train(cfg, run_dir)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--policies", nargs="+", default=["rims", "lstm"])
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, as `rims-rl train --set`")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/cartpole_seeds"))
    args = parser.parse_args()
    runs = {
        (policy, seed): (policy, seed, args.overrides, args.threads, args.out / f"{policy}-s{seed}")
        for policy in args.policies
        for seed in args.seeds
    }
    run_jobs(run_one, runs, args.jobs)
    if args.overrides:
        print("config: configs/classic.yaml with " + " ".join(args.overrides))
    print("| policy | seed | solved at (env steps) | best evaluation | seconds |\n| --- | --- | --- | --- | --- |")
    solved: dict[str, int] = {}
    for policy, seed in runs:
        run_dir = args.out / f"{policy}-s{seed}"
        evals = np.load(run_dir / "evaluations.npz")
        means = [float(r.mean()) for r in evals["results"]]
        at = next((int(t) for t, m in zip(evals["timesteps"], means, strict=True) if m >= 475), None)
        solved[policy] = solved.get(policy, 0) + (at is not None)
        seconds = json.loads((run_dir / "run.json").read_text()).get("seconds")
        print(f"| {policy} | {seed} | {at if at is not None else 'not solved'} | {max(means):.0f} | {seconds} |")
    for policy, count in solved.items():
        print(f"{policy}: solved {count} of {len(args.seeds)} seeds within 100k steps")


if __name__ == "__main__":
    main()
