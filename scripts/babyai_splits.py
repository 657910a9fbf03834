"""RIM-A2C vs LSTM-A2C on BabyAI object picking: train on the Train split, evaluate on every split, over seeds.

    python scripts/babyai_splits.py [--seeds 0 1 2] [--total-timesteps N] [--episodes 200] [--out runs/babyai_splits]

Trains each policy on each seed with ``configs/babyai.yaml`` (what ``rims-rl train --env
BabyAI-ObjectPicking-Train-v0 --algo a2c`` runs), resumably (a finished run is read, not retrained; an interrupted one
continues from its checkpoint), evaluates each run on every split (``rims-rl evaluate RUN --split all``: sampled
actions, env seeds disjoint from training, held-out level seeds), and prints a markdown table: success rate per split,
mean +- std over seeds, beside the paper's claim (§4.2.2: RIM near-perfect with known distractors, better than the
LSTM with novel ones). The table is also written to ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from rims_rl.agents.evaluation import EVAL_SEED_OFFSET, evaluate_splits, write_split_table
from rims_rl.agents.training import ALGORITHMS, RunRejected, resume, train
from rims_rl.config import CONFIG_DIR, resolve_config
from rims_rl.envs.babyai import SPLITS, split_env_id

PAPER = {"known": "RIM ~1.0, LSTM lower", "novel": "RIM < 1.0, above LSTM"}


def _trained(run_dir: Path, policy: str, seed: int, total: int | None) -> Path:
    meta = run_dir / "run.json"
    status = json.loads(meta.read_text()).get("status") if meta.is_file() else None
    if status == "finished":
        return run_dir / "model.zip"
    if status is not None:
        try:
            resume(run_dir)
            return run_dir / "model.zip"
        except RunRejected:
            pass  # nothing to resume from: train it again
    flags: dict = {"policy": policy, "seed": seed, "wandb.mode": "disabled"}
    if total is not None:
        flags["total_timesteps"] = total
    cfg = resolve_config(split_env_id("train"), CONFIG_DIR / "babyai.yaml", flags=flags)
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run without a checkpoint: nothing to keep
    train(cfg, run_dir)
    return run_dir / "model.zip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=["rims", "lstm"])
    parser.add_argument("--total-timesteps", type=int, help="env steps per run (default: configs/babyai.yaml's)")
    parser.add_argument("--episodes", type=int, default=200, help="evaluation episodes per split and run")
    parser.add_argument("--out", type=Path, default=Path("runs/babyai_splits"))
    args = parser.parse_args()
    rates: dict[str, dict[str, list[float]]] = {}
    for policy in args.policies:
        for seed in args.seeds:
            run_dir = args.out / f"{policy}-s{seed}"
            model_file = _trained(run_dir, policy, seed, args.total_timesteps)
            model = ALGORITHMS["a2c"].load(model_file, device="cpu")
            results = evaluate_splits(model, list(SPLITS), episodes=args.episodes, seed=seed + EVAL_SEED_OFFSET)
            write_split_table(results, run_dir, {"model": str(model_file), "seed": seed + EVAL_SEED_OFFSET})
            for r in results:
                rates.setdefault(policy, {}).setdefault(r.split, []).append(r.success_rate)
            print(f"{policy} seed {seed}: " + ", ".join(f"{r.split} {r.success_rate:.3f}" for r in results))
    header = "| split | " + " | ".join(f"{p} success rate" for p in rates) + " | paper (§4.2.2) |"
    lines = [header, "|" + "---|" * (len(rates) + 2)]
    for split in SPLITS:
        cells = [f"{np.mean(rates[p][split]):.3f} +- {np.std(rates[p][split]):.3f}" for p in rates]
        lines.append(f"| {split} | " + " | ".join(cells) + f" | {PAPER.get(split, '')} |")
    seeds = " ".join(map(str, args.seeds))
    note = f"mean +- std over seeds {seeds}; {args.episodes} sampled-action episodes per split and run"
    table = "\n".join(lines) + f"\n\n{note}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
