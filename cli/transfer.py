"""``rims-rl transfer``: Atari transfer (Rusu et al. 2016), one cell or a protocol's matrix."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rims_rl.cli.common import UsageError, check_device, load_run, signal_exit_code


def cmd_transfer(args: argparse.Namespace) -> int:
    from rims_rl.agents.training import ConfigRejected, TrainingDiverged, TrainingInterrupted
    from rims_rl.agents.transfer_suite import TransferRejected, game_id

    if args.protocol is None and (args.source is None or args.target is None):
        raise UsageError("give --source GAME and --target GAME for one cell, or --protocol rusu2016 for the matrix")
    if args.protocol is None and (args.sources or args.targets):
        raise UsageError("--sources/--targets choose games of a --protocol; for one cell give --source and --target")
    if args.protocol is not None and (args.source or args.target):
        raise UsageError("--protocol runs its own sources and targets: drop --source/--target (or use --sources ...)")
    settings = _settings(args)
    try:
        settings.config(game_id("Pong"), settings.budget.seeds[0], settings.budget.total_timesteps)  # a bad --set
        if args.protocol is not None:
            return _protocol(args, settings)
        return _cell(args, settings)
    except (TransferRejected, ConfigRejected) as err:
        raise UsageError(str(err)) from None
    except TrainingDiverged as err:
        raise UsageError(f"{err} (its run directory keeps the last good checkpoint; try a lower --set "
                         "ppo.learning_rate=...)") from None  # fmt: skip
    except TrainingInterrupted as stop:
        print(f"rims-rl: {stop}; run the same command again to continue (finished runs and cells are skipped)",
              file=sys.stderr)  # fmt: skip
        return signal_exit_code(stop.signal_name)


def _settings(args: argparse.Namespace) -> Any:
    """The budget (a preset, overridden by the flags given) and the settings of every run, checked."""
    from rims_rl.agents.transfer_suite import DEFAULT_BUDGET, PRESETS, Budget, TransferSettings

    preset = PRESETS[args.preset] if args.preset else DEFAULT_BUDGET
    total = args.total_timesteps if args.total_timesteps is not None else preset.total_timesteps
    source_steps = args.source_timesteps if args.source_timesteps is not None else (
        total if args.total_timesteps is not None and args.preset is None else preset.source_timesteps
    )  # fmt: skip
    seeds = tuple(args.seeds) if args.seeds else preset.seeds
    for name, value in (("--total-timesteps", total), ("--source-timesteps", source_steps)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds must be distinct non-negative integers, got {' '.join(map(str, seeds))}")
    if args.random_episodes < 1:
        raise UsageError(f"--random-episodes must be >= 1, got {args.random_episodes}")
    if args.device is not None:
        check_device(args.device)
    budget = Budget(total, source_steps, seeds, (*preset.overrides, *(args.set or ())))
    return TransferSettings(
        root=Path(args.out), policy=args.policy, mode=args.mode, budget=budget, device=args.device,
        wandb_mode=args.wandb, baseline=args.baseline, random_episodes=args.random_episodes,
        progress_bar=not args.no_progress,
    )  # fmt: skip


def _protocol(args: argparse.Namespace, settings: Any) -> int:
    """Every source x target cell of the protocol, then the matrix and the summary."""
    from rims_rl.agents.transfer_suite import PROTOCOLS, game_id, run_protocol

    sources, targets = PROTOCOLS[args.protocol]
    sources = [game_id(g) for g in (args.sources or sources)]
    targets = [game_id(g) for g in (args.targets or targets)]
    budget = settings.budget
    print(f"transfer protocol {args.protocol} ({args.policy}, {args.mode}): {len(sources)} sources x "
          f"{len(targets)} targets, {budget.total_timesteps} steps per run, seeds "
          f"{' '.join(map(str, budget.seeds))} -> {args.out}")  # fmt: skip
    _, _, files = run_protocol(settings, sources, targets)
    print(Path(settings.root / args.policy / args.mode / "matrix.md").read_text(), end="")
    print(Path(settings.root / f"summary_{args.mode}.md").read_text(), end="")
    print("wrote " + ", ".join(map(str, files)))
    return 0


def _cell(args: argparse.Namespace, settings: Any) -> int:
    """One cell: the source is a game (trained here) or a trained run of the same policy."""
    from rims_rl.agents.transfer_suite import game_id, game_name, run_cell

    source_run = None
    source_path = Path(args.source)
    if source_path.is_dir() or source_path.suffix == ".zip":
        if not source_path.exists():
            raise UsageError(f"--source {source_path} does not exist")
        cfg_src, _ = load_run(source_path if source_path.is_dir() else source_path.parent)
        if cfg_src.policy != args.policy:
            raise UsageError(f"--source {source_path} trained a {cfg_src.policy} policy, not --policy {args.policy}")
        source_run, source = source_path, game_id(cfg_src.env)
    else:
        source = game_id(args.source)
    target = game_id(args.target)
    if game_name(source) == game_name(target):
        raise UsageError(f"--source and --target are the same game ({game_name(source)})")
    run_cell(settings, source, target, source_run=source_run)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "transfer",
        help="Atari transfer: fine-tune a source game's agent on a target game, score against from-scratch",
        description="Atari feature transfer (Rusu et al. 2016): one cell (--source, --target) or a protocol's matrix.",
    )
    p.add_argument("--source", help="source game (Pong or PongNoFrameskip-v4), or a trained run directory / model.zip")
    p.add_argument("--target", help="target game")
    p.add_argument("--protocol", choices=["rusu2016"], help="every source x target of the protocol, and the matrix")
    p.add_argument("--sources", nargs="+", metavar="GAME", help="with --protocol: only these sources")
    p.add_argument("--targets", nargs="+", metavar="GAME", help="with --protocol: only these targets")
    p.add_argument("--policy", choices=["rims", "lstm"], required=True, help="recurrent core of every run")
    p.add_argument(
        "--mode", choices=["finetune-all", "finetune-head", "frozen-features"], default="finetune-all",
        help="what trains on the target: everything (default), only the fresh output layers, all but the CNN",
    )  # fmt: skip
    p.add_argument("--preset", choices=["paper", "smoke"], help="budgets and seeds: paper (10M steps, seeds 0 1 2), "
                   "smoke (2048 steps, seed 0); flags given override it")  # fmt: skip
    p.add_argument("--total-timesteps", type=int, metavar="N", help="env steps per target run (default 1000000)")
    p.add_argument("--source-timesteps", type=int, metavar="N", help="env steps per source run (default: as target)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help="seeds (default 0)")
    p.add_argument(
        "--baseline", choices=["random", "zero"], default="random",
        help="score areas above the target's random-agent score (default) or above 0 (Rusu et al.'s plain ratio)",
    )  # fmt: skip
    p.add_argument("--random-episodes", type=int, default=10, metavar="N", help="episodes for the random score")
    p.add_argument("--out", default="runs/transfer", help="root of the runs and reports (default runs/transfer)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run (repeatable)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="W&B mode (default offline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_transfer)
