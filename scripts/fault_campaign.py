"""Fault campaign: kill training runs at random moments, resume them, and check what survived.

    python scripts/fault_campaign.py                       # 12 kills on CartPoleNoVel-v1 (RIM), ~3 minutes on 2 cores
    python scripts/fault_campaign.py --kills 30 --policy lstm --seed 1
    python scripts/fault_campaign.py --env PongNoFrameskip-v4 --kills 6   # native ALE: episodes restart on resume

A reference run trains uninterrupted. Then, for each trial, the same command starts and is hit by SIGKILL, SIGTERM
or SIGINT at a random moment (up to three times per trial, resumes included): after a random number of logged
updates (0: during start-up or the first rollout) plus a random fraction of an update's time. ``rims-rl train
--resume`` then brings it to the end. Each trial reports: the signals, the env step the run resumed from each time,
the updates that had been logged after the last checkpoint (done again after the resume: the work lost), whether
the metrics file has exactly one row per update, and whether the metrics equal the reference run's (expected on
CPU when the env state is saved; for the native Atari env, episodes in progress restart, so only the bookkeeping
is checked).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
TIME_COLUMNS = ("time/fps", "time/time_elapsed")


def cli() -> list[str]:
    return [sys.executable, "-m", "rims_rl.cli"]


def train_args(args: argparse.Namespace) -> list[str]:
    return ["--env", args.env, "--policy", args.policy, "--total-timesteps", str(args.total_timesteps),
            "--n-envs", "4", "--set", "ppo.n_steps=64", "--set", "ppo.batch_size=128", "--set", "ppo.n_epochs=2",
            "--set", f"checkpoint.every_steps={args.checkpoint_every}", "--set", "checkpoint.keep=3",
            "--set", f"eval.freq={args.checkpoint_every}", "--set", "eval.episodes=2", "--seed", str(args.seed),
            "--wandb", "offline", "--no-progress"]  # fmt: skip


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "progress.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in csv.DictReader(f)]


def logged_steps(run_dir: Path) -> list[int]:
    try:
        with open(run_dir / "progress.csv", newline="") as f:
            rows = list(csv.reader(f))
    except OSError:
        return []
    if not rows or "time/total_timesteps" not in rows[0]:
        return []
    column = rows[0].index("time/total_timesteps")
    return [int(r[column]) for r in rows[1:] if len(r) == len(rows[0]) and r[column]]


def run_env() -> dict[str, str]:
    return dict(os.environ, WANDB_SILENT="true")


def trial(n: int, args: argparse.Namespace, root: Path, reference: list[dict[str, str]], update_time: float) -> dict:
    rng = random.Random(args.seed * 1000 + n)
    run_dir = root / f"trial{n}"
    kills = rng.randint(1, 3)
    record: dict = {"trial": n, "signals": [], "resumed_from": [], "redone_updates": 0, "restarts": 0}
    for k in range(kills + 1):
        if k == 0:
            cmd = [*cli(), "train", *train_args(args), "--run-dir", str(run_dir)]
        elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("ckpt_*_steps")):
            cmd = [*cli(), "train", "--resume", str(run_dir), "--no-progress"]
        else:  # killed before its first checkpoint: nothing to resume
            record["restarts"] += 1
            cmd = [*cli(), "train", *train_args(args), "--run-dir", str(run_dir), "--overwrite"]
        logged_before = logged_steps(run_dir)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
        if k < kills:
            target = rng.randint(0, len(reference) - 1)  # updates logged in this run before the signal
            while proc.poll() is None and len(logged_steps(run_dir)) < target:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0) * update_time)
            if proc.poll() is None:
                name = rng.choice(list(SIGNALS))
                proc.send_signal(SIGNALS[name])
                record["signals"].append(name)
        out, err = proc.communicate(timeout=3600)
        if "resumed at step" in out:
            step = int(out.split("resumed at step ")[1].split(";")[0])
            record["resumed_from"].append(step)
            record["redone_updates"] += sum(1 for s in logged_before if s > step)
        if k == kills or proc.returncode == 0:
            if proc.returncode != 0:
                record["error"] = (err.strip().splitlines() or ["?"])[-1]
            break
    meta = json.loads((run_dir / "run.json").read_text())
    rows = metrics(run_dir)
    steps = [int(r["time/total_timesteps"]) for r in rows]
    record["finished"] = meta.get("status") == "finished"
    record["one_row_per_update"] = steps == sorted(set(steps)) and len(steps) == len(reference)
    record["exact"] = rows == reference
    shutil.rmtree(run_dir / "wandb", ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="CartPoleNoVel-v1")
    parser.add_argument("--policy", choices=["rims", "lstm"], default="rims")
    parser.add_argument("--kills", type=int, default=12, help="trials (each with 1-3 signals)")
    parser.add_argument("--total-timesteps", type=int, default=8192)
    parser.add_argument("--checkpoint-every", type=int, default=1024, metavar="STEPS")
    parser.add_argument("--seed", type=int, default=0, help="seeds the training runs and the kill schedule")
    parser.add_argument("--out", type=Path, help="keep the run directories here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.kills < 1:
        print("fault_campaign: error: --kills must be >= 1", file=sys.stderr)
        return 2

    root = args.out or Path(tempfile.mkdtemp(prefix="fault-campaign-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ref = root / "reference"
    proc = subprocess.run([*cli(), "train", *train_args(args), "--run-dir", str(ref), "--overwrite"],
                          capture_output=True, text=True, env=run_env())  # fmt: skip
    if proc.returncode != 0:
        print(f"fault_campaign: the reference run failed: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    duration = time.perf_counter() - start
    reference = metrics(ref)
    print(f"reference: {args.env} {args.policy}, {args.total_timesteps} steps in {duration:.1f}s ({len(reference)} "
          f"updates, checkpoint every {args.checkpoint_every} steps)")  # fmt: skip
    print(f"{'trial':>5}  {'signals':28} {'resumed from':22} {'redone':>6}  {'finished':8} {'rows ok':7} exact")
    records = []
    for n in range(args.kills):
        r = trial(n, args, root, reference, duration / len(reference))
        records.append(r)
        print(f"{n:>5}  {','.join(r['signals']) or '-':28} {','.join(map(str, r['resumed_from'])) or '-':22} "
              f"{r['redone_updates']:>6}  {r['finished']!s:8} {r['one_row_per_update']!s:7} {r['exact']}"
              + (f"  ({r['restarts']} restart(s) before any checkpoint)" if r["restarts"] else "")
              + (f"  error: {r['error']}" if "error" in r else ""), flush=True)  # fmt: skip
    signals = sum(len(r["signals"]) for r in records)
    clean = sum(r["finished"] and r["one_row_per_update"] for r in records)
    exact = sum(r["exact"] for r in records)
    redone = sum(r["redone_updates"] for r in records)
    resumes = sum(len(r["resumed_from"]) for r in records)
    print(f"{signals} signals over {len(records)} trials: {resumes} resumes; {clean}/{len(records)} finished with one "
          f"row per update; {exact}/{len(records)} equal to the uninterrupted run; {redone} logged updates redone "
          f"after SIGKILL (work since the last checkpoint); {time.perf_counter() - start:.0f}s")  # fmt: skip
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if clean == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
