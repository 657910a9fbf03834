"""``rims-rl evaluate | activations | compare``: play a trained agent, draw its RIM activations, compare runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rims_rl.cli.common import UsageError, check_device, load_model, load_obs_stats, load_run


def cmd_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    from rims_rl.cli.imitation import evaluate_perturb, is_imitation_run

    if is_imitation_run(run_dir):
        return evaluate_perturb(args, run_dir)
    if args.perturb is not None:
        raise UsageError(f"--perturb evaluates Half-Cheetah imitation runs (rims-rl imitate); {run_dir} is not one")
    cfg, model_file = load_run(run_dir)
    if args.split is not None:
        return _evaluate_splits(args, run_dir, cfg, model_file)
    env_id = args.env or cfg.env
    from rims_rl.envs import check_env_id

    check_env_id(env_id, cfg.gym_packages)
    episodes = args.episodes if args.episodes is not None else cfg.eval.episodes
    deterministic = args.deterministic if args.deterministic is not None else cfg.eval.deterministic
    if episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {episodes}")
    check_device(args.device)

    from rims_rl.agents.evaluation import EVAL_SEED_OFFSET, evaluate
    from rims_rl.agents.training import atari_settings

    model = load_model(model_file, args.device, cfg.algo)
    obs_stats = load_obs_stats(cfg, model_file)
    seed = args.seed if args.seed is not None else cfg.seed + EVAL_SEED_OFFSET
    dropped = tuple(sorted(set(args.drop_unit or ())))
    rim = getattr(model.policy, "lstm_actor", None)
    if dropped:
        from rims_rl.rim import RIM

        if not isinstance(rim, RIM):
            raise UsageError(f"--drop-unit needs a RIM policy; {run_dir} trained a {cfg.policy} policy")
        if any(not 0 <= j < rim.num_units for j in dropped):
            raise UsageError(f"--drop-unit takes unit indices in [0, {rim.num_units - 1}], got {list(dropped)}")

    def run() -> Any:
        return evaluate(
            model, env_id, episodes=episodes, deterministic=deterministic, seed=seed,
            efference_copy=cfg.efference_copy, atari=atari_settings(cfg), obs_stats=obs_stats,
        )  # fmt: skip

    result = run()
    record: dict[str, Any] = {"model": str(model_file), "seed": seed, **result.to_dict()}
    if dropped:  # the same episodes (seeds) without the dropped units, beside the intact policy's
        rim.dropped_units = dropped
        ablated = run()
        rim.dropped_units = ()
        record["dropped_units"] = list(dropped)
        record["with_dropped_units"] = ablated.to_dict()
    with open(run_dir / "evaluations.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if args.json:
        print(json.dumps(record))
    else:
        print(f"model: {model_file}")
        print(result.summary())
        if dropped:
            units = ", ".join(map(str, dropped))
            print(f"without unit{'s' if len(dropped) > 1 else ''} {units}: {ablated.summary()} "
                  f"(change {ablated.mean_return - result.mean_return:+.2f})")  # fmt: skip
    return 0


def _evaluate_splits(args: argparse.Namespace, run_dir: Path, cfg: Any, model_file: Path) -> int:
    """``rims-rl evaluate RUN_DIR --split NAME|all``: success rates on object-picking splits, as a table."""
    from rims_rl.envs.babyai import SPLITS, split_of

    if split_of(cfg.env) is None:
        raise UsageError(f"--split evaluates BabyAI object-picking runs; {run_dir} trained on {cfg.env}")
    if args.env or args.drop_unit:
        raise UsageError("--split chooses the envs itself: drop --env/--drop-unit")
    names = [s.strip() for s in args.split.split(",") if s.strip()]
    if names == ["all"]:
        names = list(SPLITS)
    unknown = [n for n in names if n not in SPLITS]
    if unknown or not names:
        raise UsageError(f"unknown split '{(unknown or [args.split])[0]}': valid splits are {', '.join(SPLITS)}, all")
    episodes = args.episodes if args.episodes is not None else cfg.eval.episodes
    if episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {episodes}")
    deterministic = args.deterministic if args.deterministic is not None else cfg.eval.deterministic
    check_device(args.device)

    from rims_rl.agents.evaluation import EVAL_SEED_OFFSET, evaluate_splits, format_split_table, write_split_table

    model = load_model(model_file, args.device, cfg.algo)
    seed = args.seed if args.seed is not None else cfg.seed + EVAL_SEED_OFFSET
    results = evaluate_splits(model, names, episodes=episodes, deterministic=deterministic, seed=seed)
    meta = {"model": str(model_file), "seed": seed, "deterministic": deterministic}
    files = write_split_table(results, run_dir, meta)
    if args.json:
        print(json.dumps({**meta, "results": [r.to_dict() for r in results]}))
    else:
        mode = "deterministic" if deterministic else "sampled"
        print(f"model: {model_file} ({cfg.policy}, {cfg.algo}); {mode} actions, env seed {seed}")
        print(format_split_table(results))
        print("-> " + ", ".join(map(str, files)))
    return 0


def cmd_activations(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    cfg, model_file = load_run(run_dir)
    if cfg.policy != "rims":
        raise UsageError(f"activations need a RIM policy; {run_dir} trained a {cfg.policy} policy")
    env_id = args.env or cfg.env
    from rims_rl.envs import check_env_id

    check_env_id(env_id, cfg.gym_packages)
    if args.episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {args.episodes}")
    if args.max_frames < 0:
        raise UsageError(f"--max-frames must be >= 0, got {args.max_frames}")
    check_device(args.device)

    from rims_rl.agents.activations import play_episodes, write_episode, write_summary
    from rims_rl.agents.evaluation import EVAL_SEED_OFFSET
    from rims_rl.agents.training import atari_settings

    model = load_model(model_file, args.device, cfg.algo)
    seed = args.seed if args.seed is not None else cfg.seed + EVAL_SEED_OFFSET
    deterministic = args.deterministic if args.deterministic is not None else cfg.eval.deterministic
    episodes = play_episodes(
        model, env_id, args.episodes, seed=seed, deterministic=deterministic,
        efference_copy=cfg.efference_copy, atari=atari_settings(cfg), max_frames=args.max_frames,
        obs_stats=load_obs_stats(cfg, model_file),
    )  # fmt: skip
    out = Path(args.out) if args.out else run_dir / "analysis" / env_id.replace("/", "_")
    written: list[Path] = []
    for i, ep in enumerate(episodes):
        written += write_episode(ep, out, i, env_id)
        summary = ep.summary()
        rates = " ".join(f"{r:.2f}" for r in summary["activation_rate"])
        print(f"episode {i}: return {summary['return']:g}, {summary['length']} steps, "
              f"unit activation rates [{rates}], winner changes {summary['winner_change_rate']:.2f}/step")  # fmt: skip
    meta = {"run_dir": str(run_dir), "model": str(model_file), "env": env_id, "seed": seed,
            "deterministic": deterministic}  # fmt: skip
    written += write_summary(episodes, out, meta)
    mode = args.wandb or cfg.wandb.mode
    if mode != "disabled":
        from rims_rl.tracking import log_activation_files

        if log_activation_files(written, cfg, run_dir, mode=mode, env_id=env_id) is None:
            print("rims-rl: warning: W&B did not start; the files are in the run directory only", file=sys.stderr)
    print(f"wrote {len(written)} files to {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rims_rl.agents.reports import compare, find_runs

    missing = [p for p in args.runs if not Path(p).exists()]
    if missing:
        raise UsageError(f"{missing[0]} does not exist (give run directories or folders holding them)")
    runs = find_runs(args.runs)
    if not runs:
        raise UsageError(f"no run directories (config.yaml + progress.csv) in {' '.join(map(str, args.runs))}")
    try:
        summaries, files, skipped = compare(runs, Path(args.out), metric=args.metric)
    except ValueError as err:
        raise UsageError(f"{err} (choose another --metric, e.g. rollout/ep_rew_mean or eval/mean_reward)") from None
    for run_dir in skipped:
        print(f"rims-rl: warning: {run_dir} has no '{args.metric}': left out", file=sys.stderr)
    print(Path(args.out, "summary.md").read_text(), end="")
    print(f"{len(runs) - len(skipped)} runs in {len(summaries)} groups -> " + ", ".join(map(str, files)))
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="play full episodes with a trained agent", description="Evaluate a run.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by rims-rl train")
    p.add_argument("--env", help="env id to evaluate on (default: the run's)")
    p.add_argument("--episodes", type=int, metavar="N", help="episodes (default: the run's eval.episodes)")
    p.add_argument(
        "--deterministic", action=argparse.BooleanOptionalAction, default=None,
        help="greedy or sampled (--no-deterministic) actions (default: the run's eval.deterministic)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, help="env seed (default: the run's seed + 10000, disjoint from training)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--drop-unit", type=int, action="append", metavar="J",
        help="RIM ablation: also evaluate with unit J removed (never active, state zero); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--split", metavar="NAME",
        help="BabyAI object picking: evaluate on these splits (comma-separated names, or all): success rate with "
        "its 95%% interval per split, written to RUN_DIR/splits.json and splits.csv",
    )  # fmt: skip
    p.add_argument(
        "--perturb", metavar="SPEC",
        help="Half-Cheetah imitation runs: none, joints (the perturbed preset) or joints:SCALE, comma-separated; "
        "mean +- std return per setting, written to RUN_DIR/perturb.json (default none)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "compare", help="learning curves and scores of runs, grouped by env and policy (local files only)",
        description="Compare runs: learning curves (mean and 95%% bootstrap band over seeds) and a score table.",
    )  # fmt: skip
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or folders holding them")
    p.add_argument("--out", default="runs/compare", help="where to write the PNG and tables (default runs/compare)")
    p.add_argument(
        "--metric", default="rollout/ep_rew_mean", help="a progress.csv column (default rollout/ep_rew_mean)"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "activations",
        help="play episodes with a RIM agent and draw its unit activations",
        description="Play episodes with a trained RIM policy; write activation heatmaps (and GIFs for image envs).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by rims-rl train (RIM policy)")
    p.add_argument("--episodes", type=int, default=1, metavar="N", help="episodes to play (default 1)")
    p.add_argument("--env", help="env id to play (default: the run's)")
    p.add_argument("--seed", type=int, help="env seed (default: the run's seed + 10000, disjoint from training)")
    p.add_argument(
        "--deterministic", action=argparse.BooleanOptionalAction, default=None,
        help="greedy or sampled (--no-deterministic) actions (default: the run's eval.deterministic)",
    )  # fmt: skip
    p.add_argument("--max-frames", type=int, default=500, metavar="N", help="GIF frames per episode (default 500)")
    p.add_argument("--out", help="output directory (default RUN_DIR/analysis/<env>)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="W&B mode (default: the run's)")
    p.set_defaults(func=cmd_activations)
