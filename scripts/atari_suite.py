"""The full Atari grid on one machine: every game x {rims, lstm} x seeds, resumable.

    python scripts/atari_suite.py --seeds 0 1 2 --device cuda              # all 62 NoFrameskip-v4 games
    python scripts/atari_suite.py --games Pong Breakout --policies rims    # a subset (short names or ids)
    python scripts/atari_suite.py --dry-run                                 # what would run, what is done

Each cell is one ``rims-rl train`` run (``configs/atari.yaml``) into ``<out>/<env id>/<policy>-s<seed>``; W&B groups
the runs by game (offline unless ``--wandb online``). A cell whose run directory says ``finished`` is skipped, so the
script can be stopped and started again; an unfinished cell (crashed, interrupted, killed) continues from its newest
checkpoint (``rims-rl train --resume``), or starts again if it has none.
Cells run one after another (one GPU machine per process); to spread the grid over many machines, use the W&B
sweep in ``configs/sweeps/atari.yaml`` (README, "Atari").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rims_rl.envs.atari import ATARI_V4_IDS

POLICIES = ("rims", "lstm")


@dataclass(frozen=True)
class Cell:
    env_id: str
    policy: str
    seed: int
    run_dir: Path

    @property
    def status(self) -> str:
        """``finished``, ``interrupted``, ``failed``, ``running`` (from ``run.json``), or ``todo``."""
        try:
            return str(json.loads((self.run_dir / "run.json").read_text()).get("status", "todo"))
        except (OSError, ValueError):
            return "todo"


def game_id(name: str) -> str:
    """``Pong``, ``PongNoFrameskip-v4`` or ``ALE/Pong-v5`` -> the env id; ValueError for an unknown game."""
    from rims_rl.envs.atari import is_atari

    if is_atari(name):
        return name
    candidate = f"{name}NoFrameskip-v4"
    if candidate in ATARI_V4_IDS:
        return candidate
    import difflib

    close = difflib.get_close_matches(candidate, ATARI_V4_IDS, n=3)
    hint = f" (did you mean {', '.join(c.removesuffix('NoFrameskip-v4') for c in close)}?)" if close else ""
    raise ValueError(f"unknown Atari game {name!r}{hint}")


def plan(out: Path, games: list[str], policies: list[str], seeds: list[int]) -> list[Cell]:
    """Every cell of the grid, in the order they run (game-major, so a game's comparison completes first)."""
    return [
        Cell(env_id, policy, seed, out / env_id / f"{policy}-s{seed}")
        for env_id in games
        for seed in seeds
        for policy in policies
    ]


def command(cell: Cell, args: argparse.Namespace) -> list[str]:
    from rims_rl.agents.checkpoints import latest_checkpoint

    if cell.status != "todo" and latest_checkpoint(cell.run_dir)[0] is not None:
        return [sys.executable, "-m", "rims_rl.cli", "train", "--resume", str(cell.run_dir), "--device", args.device,
                "--no-progress"]  # fmt: skip
    cmd = [
        sys.executable, "-m", "rims_rl.cli", "train", "--env", cell.env_id, "--policy", cell.policy,
        "--seed", str(cell.seed), "--run-dir", str(cell.run_dir), "--device", args.device, "--wandb", args.wandb,
        "--no-progress",
    ]  # fmt: skip
    if args.total_timesteps is not None:
        cmd += ["--total-timesteps", str(args.total_timesteps)]
    if cell.status != "todo":  # an unfinished run directory without a checkpoint: start the cell again
        cmd.append("--overwrite")
    for item in args.set or []:
        cmd += ["--set", item]
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", nargs="+", help="games (short names or ids; default: the 62 NoFrameskip-v4)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--total-timesteps", type=int, help="per run (default: configs/atari.yaml)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--wandb", choices=["offline", "online", "disabled"], default="offline")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run")
    parser.add_argument("--out", type=Path, default=Path("runs/atari-suite"), help="root of the run directories")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and each cell's status")
    args = parser.parse_args(argv)
    try:
        games = [game_id(g) for g in args.games] if args.games else list(ATARI_V4_IDS)
    except ValueError as err:
        print(f"atari_suite: error: {err}", file=sys.stderr)
        return 2

    cells = plan(args.out, games, args.policies, args.seeds)
    todo = [c for c in cells if c.status != "finished"]
    print(f"{len(cells)} runs, {len(cells) - len(todo)} finished, {len(todo)} to run")
    if args.dry_run:
        for cell in cells:
            print(f"  {cell.status:11} {cell.run_dir}")
        return 0
    for n, cell in enumerate(todo, 1):
        print(f"[{n}/{len(todo)}] {cell.env_id} {cell.policy} seed {cell.seed}", flush=True)
        try:
            rc = subprocess.call(command(cell, args))
        except KeyboardInterrupt:
            print("atari_suite: interrupted; run it again to continue with the unfinished runs", file=sys.stderr)
            return 130
        if rc in (130, 143):  # SIGINT / SIGTERM: the run saved a checkpoint
            print("atari_suite: interrupted; run it again to continue with the unfinished runs", file=sys.stderr)
            return 130
        if rc != 0:
            print(f"atari_suite: {cell.run_dir} failed (exit {rc}); going on", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
