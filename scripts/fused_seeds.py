"""Whether the C++ loop's fused CPU kernels (``rims_rl.rim_fast.FUSED_KERNELS``) change how well a RIM learns, over
seeds: BabyAI object picking (Train split, the shipped RecurrentPPO config), each seed with ATen operators and with
the fused kernels.

    python scripts/fused_seeds.py [--seeds 0 1 2 3 4 5] [--budget 250000] [--jobs 2] [--out runs/fused_seeds]

A run stops once the success rate of the last 100 training episodes reaches 0.5 (chance ~1/3) or at the budget. One
torch thread per run (a run is deterministic for a seed, machine and thread count). Each finished run is saved as a
JSON file and read, not retrained, on the next call; an interrupted run starts over. Prints a markdown table (the env
step at which 0.5 was reached, per seed) and, per setting, how many seeds reached it and the median step (a seed
that did not counting as the slowest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _jobs import run_jobs  # scripts/_jobs.py

THRESHOLD = 0.5


def run_one(seed: int, fused: bool, budget: int, out: Path) -> dict | None:
    """Train one run unless ``out`` holds it; its record, or None if interrupted."""
    if out.is_file():
        return json.loads(out.read_text())
    import numpy as np
    import torch

    from rims_rl import rim_fast
    from rims_rl.agents.callbacks import StopAtSuccess
    from rims_rl.agents.training import prepare
    from rims_rl.config import CONFIG_DIR, resolve_config
    from rims_rl.envs.babyai import split_env_id

    rim_fast.FUSED_KERNELS = fused
    torch.set_num_threads(1)
    flags = {"policy": "rims", "algo": "ppo", "seed": seed, "wandb.mode": "disabled"}
    cfg = resolve_config(split_env_id("train"), CONFIG_DIR / "babyai.yaml", flags=flags)
    prepared = prepare(cfg)
    stop = StopAtSuccess(THRESHOLD)
    try:
        prepared.model.learn(budget, callback=stop)
    except KeyboardInterrupt:
        return None
    finally:
        prepared.env.close()
    record = {"seed": seed, "fused": fused, "budget": budget, "reached_at": stop.reached_at,
              "final_success": float(np.mean(prepared.model.ep_success_buffer))}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--budget", type=int, default=250_000, help="env steps per run at most (default 250000)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/fused_seeds"))
    args = parser.parse_args()
    if args.budget <= 0 or args.jobs <= 0:
        parser.error("--budget and --jobs must be positive")
    settings = {"ATen": False, "fused": True}
    runs = {
        (name, seed): (seed, fused, args.budget, args.out / f"rims-s{seed}-{name.lower()}-{args.budget}.json")
        for seed in args.seeds
        for name, fused in settings.items()
    }
    records = run_jobs(run_one, runs, args.jobs)
    print(f"RIM, BabyAI Train, RecurrentPPO: env steps until success >= {THRESHOLD} (last 100 episodes), "
          f"at most {args.budget}")  # fmt: skip
    print("| seed | " + " | ".join(settings) + " |\n|---|" + "---|" * len(settings))
    for seed in args.seeds:
        cells = [records[(name, seed)]["reached_at"] for name in settings]
        print(f"| {seed} | " + " | ".join(f"{c:,}" if c is not None else "-" for c in cells) + " |")
    for name in settings:
        steps = [records[(name, seed)]["reached_at"] for seed in args.seeds]
        reached = [s for s in steps if s is not None]
        median = statistics.median(s if s is not None else float("inf") for s in steps)
        shown = f"{median:,.0f}" if median != float("inf") else f"> {args.budget:,}"
        print(f"{name}: reached on {len(reached)} of {len(steps)} seeds; median {shown}")


if __name__ == "__main__":
    main()
