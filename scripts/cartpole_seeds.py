"""How often RIM-PPO and LSTM-PPO solve CartPoleNoVel-v1 with the shipped config, over seeds.

    python scripts/cartpole_seeds.py [--seeds 0 1 2 3] [--out runs/cartpole_seeds]

Trains each policy on each seed with ``configs/classic.yaml`` (what ``rims-rl train`` runs), resumably (a seed whose
run directory is finished is read, not retrained), and prints a markdown table: the env step at which the periodic
evaluation (20 greedy episodes) first reached 475, or the best evaluation if it never did, and the wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rims_rl.agents.training import train
from rims_rl.config import CONFIG_DIR, resolve_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--policies", nargs="+", default=["rims", "lstm"])
    parser.add_argument("--out", type=Path, default=Path("runs/cartpole_seeds"))
    args = parser.parse_args()
    print("| policy | seed | solved at (env steps) | best evaluation | seconds |\n| --- | --- | --- | --- | --- |")
    solved: dict[str, int] = {}
    for policy in args.policies:
        for seed in args.seeds:
            run_dir = args.out / f"{policy}-s{seed}"
            meta_file = run_dir / "run.json"
            if not (meta_file.is_file() and json.loads(meta_file.read_text())["status"] == "finished"):
                flags = {"policy": policy, "seed": seed, "wandb.mode": "disabled"}
                train(resolve_config("CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", flags=flags), run_dir)
            evals = np.load(run_dir / "evaluations.npz")
            means = [float(r.mean()) for r in evals["results"]]
            at = next((int(t) for t, m in zip(evals["timesteps"], means, strict=True) if m >= 475), None)
            solved[policy] = solved.get(policy, 0) + (at is not None)
            seconds = json.loads(meta_file.read_text()).get("seconds")
            print(f"| {policy} | {seed} | {at if at is not None else 'not solved'} | {max(means):.0f} | {seconds} |")
    for policy, count in solved.items():
        print(f"{policy}: solved {count} of {len(args.seeds)} seeds within 100k steps")


if __name__ == "__main__":
    main()
