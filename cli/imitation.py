"""``rims-rl expert | demos | imitate | imitation-table`` and ``evaluate --perturb``: the Half-Cheetah imitation
experiment (paper App. C.7, Table 6).

    rims-rl expert --env HalfCheetah-v5 --total-timesteps 300000        # SAC on the state (ships as experts/)
    rims-rl demos --episodes 20 --out demos/cheetah.npz                 # the shipped expert, rendered at 64x64
    rims-rl imitate --demos demos/cheetah.npz --policy rims             # BC, truncated BPTT, RIM 6x100 k_A 3
    rims-rl evaluate runs/imitation/rims-s0-... --perturb none,joints   # returns without and with joint noise
    rims-rl imitation-table runs/imitation                              # the Table-6-shaped table
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rims_rl.cli.common import UsageError, check_device, signal_exit_code
from rims_rl.config import SHIPPED_EXPERT, resolve_imitation_config

DEFAULT_EXPERT = SHIPPED_EXPERT


def is_imitation_run(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("kind") == "imitation"
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------------
def cmd_expert(args: argparse.Namespace) -> int:
    from rims_rl.agents.experts import ExpertSettings, train_expert

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "checkpoint.zip").is_file() or not (run_dir / "expert.json").is_file():
            raise UsageError(f"{run_dir} holds no expert checkpoint (checkpoint.zip and expert.json)")
        saved = json.loads((run_dir / "expert.json").read_text())["settings"]
        settings = ExpertSettings(**{**saved, "device": args.device or saved["device"]})
        if args.total_timesteps:
            settings.total_timesteps = args.total_timesteps
    else:
        from rims_rl.envs import check_env_id

        check_env_id(args.env)
        if args.total_timesteps < 1:
            raise UsageError(f"--total-timesteps must be >= 1, got {args.total_timesteps}")
        settings = ExpertSettings(
            env=args.env, total_timesteps=args.total_timesteps, seed=args.seed, device=args.device or "auto"
        )
        run_dir = Path(args.run_dir or f"runs/experts/{args.env}-s{args.seed}")
        if (run_dir / "expert.json").exists() and not args.overwrite:
            raise UsageError(f"{run_dir} already holds an expert (--resume {run_dir} continues it, or --overwrite)")
    check_device(settings.device)
    import gymnasium as gym
    from gymnasium import spaces

    if not isinstance(gym.make(settings.env).action_space, spaces.Box):
        raise UsageError(f"SAC needs continuous actions; {settings.env} has discrete ones")
    print(f"training a SAC expert on {settings.env} for {settings.total_timesteps} steps -> {run_dir}")
    summary = train_expert(settings, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    print(
        f"{summary['timesteps']} steps ({summary['steps_per_second']:.0f} steps/s); deterministic return "
        f"{summary['return_mean']:.0f} +- {summary['return_std']:.0f} over {summary['episodes']} episodes"
    )
    print(f"expert policy: {run_dir / 'expert.pt'}  (rims-rl demos --expert {run_dir / 'expert.pt'})")
    if not summary["finished"]:
        print(f"rims-rl: stopped early; continue with: rims-rl expert --resume {run_dir}", file=sys.stderr)
        return 130
    return 0


def cmd_demos(args: argparse.Namespace) -> int:
    from rims_rl.agents.imitation import record_demos

    expert = Path(args.expert)
    if not (expert.is_file() or (expert / "expert.pt").is_file()):
        raise UsageError(f"no expert at {expert}: pass a .pt file or run directory from `rims-rl expert`")
    if args.episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {args.episodes}")
    if args.size < 16:
        raise UsageError(f"--size must be >= 16 pixels, got {args.size}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists (use --overwrite or another --out)")

    def progress(done: int, ret: float) -> None:
        print(f"episode {done}/{args.episodes}: return {ret:.0f}", file=sys.stderr)

    demos = record_demos(
        expert, args.episodes, seed=args.seed, size=args.size, max_steps=args.max_steps, progress=progress
    )
    demos.save(out)
    size_mb = out.stat().st_size / 2**20
    raw_mb = demos.frames.nbytes / 2**20
    print(
        f"{demos.episodes} episodes, {len(demos.actions)} steps, expert return {demos.episode_returns.mean():.0f} "
        f"+- {demos.episode_returns.std():.0f} -> {out} ({size_mb:.1f} MiB; frames {raw_mb:.0f} MiB raw)"
    )
    if demos.meta.get("interrupted"):
        print("rims-rl: interrupted; the finished episodes are saved", file=sys.stderr)
        return 130
    return 0


def cmd_imitate(args: argparse.Namespace) -> int:
    from rims_rl.agents.callbacks import GracefulStop
    from rims_rl.agents.imitation import ImitationInterrupted, evaluate_pixel_policy, record_perturb, train_imitation

    if args.resume:
        import yaml

        from rims_rl.config import ImitationConfig

        run_dir = Path(args.resume)
        if not (run_dir / "checkpoint.pt").is_file() or not is_imitation_run(run_dir):
            raise UsageError(f"{run_dir} is not an imitation run with a checkpoint (checkpoint.pt)")
        cfg = ImitationConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
        if args.device:
            cfg.device = args.device
    else:
        flags: dict[str, Any] = {
            k: v
            for k, v in {
                "demos": args.demos, "policy": args.policy, "epochs": args.epochs, "seed": args.seed,
                "device": args.device, "wandb.mode": args.wandb,
            }.items()
            if v is not None
        }  # fmt: skip
        cfg = resolve_imitation_config(args.config, flags, args.set)
        if not cfg.demos:
            raise UsageError("--demos FILE is required (record one with `rims-rl demos`)")
        if not Path(cfg.demos).is_file():
            raise UsageError(f"demonstrations file {cfg.demos} does not exist (record one with `rims-rl demos`)")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        tag = f"-k{cfg.rim.k_active}" if cfg.policy == "rims" else ""
        run_dir = Path(args.run_dir or f"runs/imitation/{cfg.policy}{tag}-s{cfg.seed}-{stamp}")
        if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
            raise UsageError(f"run directory {run_dir} is not empty (--resume it, --overwrite, or another --run-dir)")
    check_device(cfg.device)
    stop = GracefulStop()
    stop.install()

    def on_epoch(row: dict[str, Any]) -> None:
        played = row.get("dagger_return", math.nan)
        dagger = f", DAgger round {row['dagger_round']} played {played:.0f}" if not math.isnan(played) else ""
        print(
            f"epoch {row['epoch']}/{cfg.total_epochs}{dagger}: train loss {row['train_loss']:.4f}, "
            f"val loss {row['val_loss']:.4f}, gradient norm {row['grad_norm']:.2f} (max {row['grad_norm_max']:.1f}), "
            f"{row['seqs_per_s']:.1f} seqs/s ({row['steps_per_s']:.0f} steps/s)",
            file=sys.stderr,
        )

    d = cfg.dagger
    rounds = f", then DAgger: {d.rounds} rounds x ({d.episodes} episodes, {d.epochs} epochs)" if d.rounds else ""
    print(f"behaviour cloning {cfg.policy} on {cfg.demos} for {cfg.epochs} epochs{rounds} -> {run_dir}")
    try:
        info = train_imitation(cfg, run_dir, resume=bool(args.resume), stop=stop, on_epoch=on_epoch)
    except ImitationInterrupted as err:
        print(f"rims-rl: {err}; resume with: rims-rl imitate --resume {run_dir}", file=sys.stderr)
        return signal_exit_code(err.signal_name)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    finally:
        stop.uninstall()
    final = info.get("final", {})
    print(f"final train loss {final.get('train_loss', float('nan')):.4f}, val loss {final.get('val_loss', 0):.4f}")
    if cfg.eval_episodes:
        from rims_rl.agents.imitation import load_imitation_run

        _, policy = load_imitation_run(run_dir, cfg.device)
        results = [
            evaluate_pixel_policy(
                policy, perturb=p, episodes=cfg.eval_episodes, seed=cfg.seed + 10_000, max_steps=cfg.eval_max_steps
            )
            for p in ("none", "joints")
        ]
        record_perturb(run_dir, results)
        for r in results:
            print(describe_result(r))
    print(f"run directory: {run_dir}  (rims-rl evaluate {run_dir} --perturb none,joints)")
    return 0


def describe_result(r: Any) -> str:
    """One line per evaluation: the return and, for a RIM, how often each unit was active."""
    line = f"{r.perturb}: return {r.mean_return:.1f} +- {r.std_return:.1f} over {r.episodes} episodes"
    if r.unit_activity is not None:
        line += "; units active " + " ".join(f"{a:.2f}" for a in r.unit_activity) + " of the steps"
    return line


def evaluate_perturb(args: argparse.Namespace, run_dir: Path) -> int:
    """``rims-rl evaluate RUN_DIR [--perturb SPEC[,SPEC]]`` on an imitation run."""
    from rims_rl.agents.imitation import evaluate_pixel_policy, load_imitation_run, record_perturb
    from rims_rl.envs.cheetah import parse_perturb

    if args.env or args.split or args.drop_unit:
        raise UsageError("imitation runs are evaluated on the pixel Half-Cheetah: use --perturb, not --env/--split")
    specs = [s.strip() for s in (args.perturb or "none").split(",") if s.strip()]
    for spec in specs:
        try:
            parse_perturb(spec)
        except ValueError as err:
            raise UsageError(str(err)) from None
    episodes = args.episodes if args.episodes is not None else 5
    if episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {episodes}")
    check_device(args.device)
    try:
        cfg, policy = load_imitation_run(run_dir, args.device)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise UsageError(f"cannot load the imitation run {run_dir}: {err}") from None
    seed = args.seed if args.seed is not None else cfg.seed + 10_000
    results = [
        evaluate_pixel_policy(policy, perturb=s, episodes=episodes, seed=seed, max_steps=cfg.eval_max_steps)
        for s in specs
    ]
    path = record_perturb(run_dir, results)
    if args.json:
        print(json.dumps([r.to_dict() for r in results]))
    else:
        for r in results:
            print(describe_result(r))
        print(f"-> {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
def cmd_imitation_table(args: argparse.Namespace) -> int:
    from rims_rl.agents.reports import imitation_groups, imitation_table, plot_imitation
    from rims_rl.envs.cheetah import parse_perturb

    specs = ["none"] + [s.strip() for item in args.perturbed for s in item.split(",") if s.strip() and s != "none"]
    for spec in specs:
        try:
            parse_perturb(spec)
        except ValueError as err:
            raise UsageError(str(err)) from None
    runs: list[Path] = []
    for root in map(Path, args.runs):
        if not root.exists():
            raise UsageError(f"{root} does not exist")
        candidates = [root] if (root / "run.json").is_file() else sorted(p.parent for p in root.rglob("run.json"))
        runs += [p for p in candidates if is_imitation_run(p) and (p / "perturb.json").is_file()]
    if not runs:
        raise UsageError(
            f"no evaluated imitation runs in {' '.join(args.runs)} (evaluate them with --perturb none,joints first)"
        )
    try:
        groups = imitation_groups(runs)
    except ValueError as err:
        raise UsageError(str(err)) from None
    table = imitation_table(groups, specs)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        print(f"-> {args.out}")
    if args.figure:
        print(f"-> {plot_imitation(groups, specs, Path(args.figure))}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "expert", help="train a SAC expert on a state-based MuJoCo env (imitation demonstrations)",
        description="Train SAC (stable-baselines3, rl-zoo's HalfCheetah settings) on the true state.",
    )  # fmt: skip
    p.add_argument("--env", default="HalfCheetah-v5", help="gymnasium id with continuous actions (HalfCheetah-v5)")
    p.add_argument("--total-timesteps", type=int, default=300_000, metavar="N", help="env steps (default 300000)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--run-dir", help="where to write it (default runs/experts/<env>-s<seed>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped expert run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing expert run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_expert)

    p = sub.add_parser(
        "demos", help="record an expert's episodes as frames, actions and rewards",
        description="Play the expert on the true state in the pixel Half-Cheetah; save frames, actions, rewards.",
    )  # fmt: skip
    p.add_argument("--expert", default=str(DEFAULT_EXPERT), help="expert .pt or run directory (default: shipped)")
    p.add_argument("--episodes", type=int, default=20, metavar="N", help="episodes to record (default 20)")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="episode i is seeded S + i (default 0)")
    p.add_argument("--size", type=int, default=64, metavar="PX", help="frame size in pixels (default 64)")
    p.add_argument("--max-steps", type=int, metavar="N", help="cut episodes at N steps (default: whole, 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_demos)

    p = sub.add_parser(
        "imitate", help="behaviour cloning from pixel demonstrations (RIM, LSTM or GRU)",
        description="Train a recurrent pixel policy on demonstrations with truncated BPTT, then evaluate it "
        "without and with joint perturbations.",
    )  # fmt: skip
    p.add_argument("--demos", help="demonstrations file from rims-rl demos")
    p.add_argument("--policy", choices=["rims", "lstm", "gru"], help="recurrent core (default rims)")
    p.add_argument("--config", type=Path, help="YAML file overriding configs/cheetah.yaml")
    p.add_argument("--epochs", type=int, metavar="N", help="passes over the training episodes")
    p.add_argument("--seed", type=int, metavar="S", help="random seed")
    p.add_argument("--device", help="auto (GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="W&B mode (default offline)")
    p.add_argument("--run-dir", help="run directory (default runs/imitation/<policy>-s<seed>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest epoch")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty run directory")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any imitation config key, e.g. --set rim.k_active=6 --set seq_len=100 (repeatable)",
    )  # fmt: skip
    p.set_defaults(func=cmd_imitate)

    p = sub.add_parser(
        "imitation-table", help="Table 6: imitation returns without and with perturbation, per method",
        description="The Table-6-shaped table of evaluated imitation runs: per method and perturbation the mean over "
        "seeds with its 95% interval, then every seed's mean.",
    )  # fmt: skip
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="imitation run directories, or folders holding them")
    p.add_argument("--perturbed", nargs="+", default=["joints"], metavar="SPEC",
                   help="perturbations shown beside `none`, e.g. joints joints:0.5 (default joints)")  # fmt: skip
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.add_argument("--figure", help="also plot return against the perturbation scale to this image file")
    p.set_defaults(func=cmd_imitation_table)
