"""RIM vs LSTM on BabyAI object picking, with A2C and PPO: train on the Train split, evaluate on every split.

    python scripts/babyai_splits.py [--algos a2c ppo] [--seeds 0 1 2] [--a2c-timesteps 600000] [--ppo-timesteps 400000]
        [--jobs 2] [--out runs/babyai_splits]

Trains each (algorithm, policy, seed) with ``configs/babyai.yaml`` (what ``rims-rl train --env
BabyAI-ObjectPicking-Train-v0 --policy P --algo A --seed S`` runs), for ``--a2c-timesteps`` / ``--ppo-timesteps``
env steps; resumably: a finished run is read, not retrained, an interrupted one continues from its checkpoint, so
the script can be stopped (Ctrl-C) and started again. Each run is evaluated on every split (``rims-rl evaluate RUN
--split all``: sampled actions, env seeds disjoint from training, held-out level seeds; an evaluated run is read,
not replayed). ``--jobs N`` trains N runs at once in separate processes, one torch thread each (a run's results
depend on its thread count, so they are the same whatever ``--jobs``).

Writes to ``OUT``: ``table.md`` (success rate per split: mean +- std over seeds and the 95% interval of the pooled
episodes, per algorithm and policy, beside the paper's claim), ``results.json``, and ``compare_<algo>/`` (``rims-rl
compare`` of the runs: ``learning_curves.png`` of ``rollout/success_rate``, ``summary.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
from _jobs import run_jobs  # scripts/_jobs.py

PAPER = {"known": "RIM ~1.0, LSTM lower", "novel": "RIM < 1.0, above LSTM"}


def _train(run_dir: Path, algo: str, policy: str, seed: int, total: int) -> None:
    """Train the run into ``run_dir``, or resume it, or nothing if it is finished."""
    from rims_rl.agents.checkpoints import RunLock
    from rims_rl.agents.training import RunRejected, resume, train
    from rims_rl.config import CONFIG_DIR, resolve_config
    from rims_rl.envs.babyai import split_env_id

    meta = run_dir / "run.json"
    status = json.loads(meta.read_text()).get("status") if meta.is_file() else None
    if status == "finished":
        return
    if status is not None:
        RunLock.check(run_dir)  # RunInUse if another process is training it: never retrained under it below
        try:
            resume(run_dir)
            return
        except RunRejected:
            pass  # nothing to resume from: train it again
    flags = {"policy": policy, "algo": algo, "seed": seed, "total_timesteps": total, "wandb.mode": "disabled"}
    cfg = resolve_config(split_env_id("train"), CONFIG_DIR / "babyai.yaml", flags=flags)
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run without a checkpoint: nothing to keep
    train(cfg, run_dir)


def run_one(run_dir: str, algo: str, policy: str, seed: int, total: int, episodes: int) -> list[dict] | None:
    """Train (or resume) one run and evaluate it on every split; returns ``splits.json``'s rows (None if a signal
    stopped the training: the run is checkpointed, and the next call resumes it)."""
    import torch

    torch.set_num_threads(1)
    from rims_rl.agents.evaluation import EVAL_SEED_OFFSET, evaluate_splits, write_split_table
    from rims_rl.agents.training import ALGORITHMS, TrainingInterrupted
    from rims_rl.envs.babyai import SPLITS

    path = Path(run_dir)
    try:
        _train(path, algo, policy, seed, total)
    except TrainingInterrupted:
        return None
    splits = path / "splits.json"
    if splits.is_file():
        rows = json.loads(splits.read_text())["results"]
        if {r["split"] for r in rows} == set(SPLITS) and all(r["episodes"] == episodes for r in rows):
            return rows
    model = ALGORITHMS[algo].load(path / "model.zip", device="cpu")
    results = evaluate_splits(model, list(SPLITS), episodes=episodes, seed=seed + EVAL_SEED_OFFSET)
    write_split_table(results, path, {"model": str(path / "model.zip"), "seed": seed + EVAL_SEED_OFFSET})
    return json.loads(splits.read_text())["results"]


def _cell(rows: list[dict]) -> str:
    """mean +- std of the seeds' success rates, and the Wilson 95% interval of all their episodes pooled."""
    from rims_rl.agents.evaluation import wilson_interval

    rates = [r["success_rate"] for r in rows]
    low, high = wilson_interval(sum(r["successes"] for r in rows), sum(r["episodes"] for r in rows))
    return f"{np.mean(rates):.3f} +- {np.std(rates):.3f} [{low:.2f}, {high:.2f}]"


def table(results: dict[tuple[str, str], list[list[dict]]], seeds: list[int], episodes: int) -> str:
    from rims_rl.envs.babyai import SPLITS

    keys = sorted(results)
    lines = ["| split | " + " | ".join(f"{p.upper() if p == 'lstm' else 'RIM'}-{a.upper()}" for a, p in keys)
             + " | paper (§4.2.2, Fig. 5) |", "|" + "---|" * (len(keys) + 2)]  # fmt: skip
    for split in SPLITS:
        cells = [_cell([next(r for r in run if r["split"] == split) for run in results[k]]) for k in keys]
        lines.append(f"| {split} | " + " | ".join(cells) + f" | {PAPER.get(split, '')} |")
    pooled = episodes * len(seeds)
    note = (
        f"success rate, mean +- std over seeds {' '.join(map(str, seeds))} [95% Wilson interval of the {pooled} "
        f"pooled episodes]; {episodes} sampled-action episodes per split and run"
    )
    return "\n".join(lines) + f"\n\n{note}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["a2c", "ppo"], choices=["a2c", "ppo"])
    parser.add_argument("--policies", nargs="+", default=["rims", "lstm"], choices=["rims", "lstm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--a2c-timesteps", type=int, default=600_000, help="env steps per A2C run (default 600000)")
    parser.add_argument("--ppo-timesteps", type=int, default=400_000, help="env steps per PPO run (default 400000)")
    parser.add_argument("--episodes", type=int, default=200, help="evaluation episodes per split and run")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs trained at once (default: cores)")
    parser.add_argument("--out", type=Path, default=Path("runs/babyai_splits"))
    args = parser.parse_args()
    budget = {"a2c": args.a2c_timesteps, "ppo": args.ppo_timesteps}
    runs = {
        (a, p, s): (str(args.out / f"{a}-{p}-s{s}"), a, p, s, budget[a], args.episodes)
        for a in args.algos
        for s in args.seeds
        for p in args.policies
    }
    results: dict[tuple[str, str], list[list[dict]]] = {}
    from rims_rl.agents.checkpoints import RunInUse

    try:
        finished = run_jobs(run_one, runs, args.jobs)
    except RunInUse as err:
        raise SystemExit(f"babyai_splits: {err} (another babyai_splits on the same --out?)") from None
    for (algo, policy, seed), rows in finished.items():
        results.setdefault((algo, policy), []).append(rows)
        scores = ", ".join(f"{r['split']} {r['success_rate']:.3f}" for r in rows)
        print(f"{algo} {policy} seed {seed}: {scores}")
    from rims_rl.agents.reports import compare

    for algo in args.algos:
        dirs = [args.out / f"{algo}-{p}-s{s}" for p in args.policies for s in args.seeds]
        compare(dirs, args.out / f"compare_{algo}", metric="rollout/success_rate")
    text = table(results, args.seeds, args.episodes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({f"{a}-{p}": r for (a, p), r in results.items()}, indent=1))
    print(text, end="")


if __name__ == "__main__":
    main()
