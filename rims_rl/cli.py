"""``rims-rl``: train and evaluate RIM and LSTM agents.

    rims-rl train --env CartPoleNoVel-v1 --policy rims      # hyperparameters from configs/<family>.yaml
    rims-rl train --env DemonAttackNoFrameskip-v4 --policy lstm --device cuda   # any Atari game: configs/atari.yaml
    rims-rl train --resume runs/CartPoleNoVel-v1/rims-ppo-s0-...   # continue a stopped run from its last checkpoint
    rims-rl evaluate runs/CartPoleNoVel-v1/rims-ppo-s0-...   # full episodes with the final model
    rims-rl compare runs/CartPoleNoVel-v1 --out reports/cartpole   # RIM vs LSTM curves over seeds, score table
    rims-rl activations runs/CartPoleNoVel-v1/rims-ppo-s0-...   # play episodes, draw which units were active
    rims-rl transfer --protocol rusu2016 --policy rims --preset paper   # Atari transfer matrix (or one cell)
    rims-rl imitate --demos demos/cheetah.npz --policy rims   # Half-Cheetah from pixels (rims_rl/cli_imitation.py)
    rims-rl copying --model rims                              # the copying task (rims_rl/cli_copying.py)
    rims-rl envs                                              # the env families and ids the project provides
    rims-rl config --env CartPoleNoVel-v1                     # the resolved configuration, every key documented

Bad input (unknown env id, policy, config key, out-of-range value, missing or unusable run directory) gets one line
on stderr saying what is wrong and what is valid, and exit code 2; so does a training run that diverges (NaN or inf
in a loss or parameter), whose last good checkpoint is kept. The first Ctrl-C (SIGINT) or SIGTERM finishes the
current update, saves a checkpoint and exits with 128 + the signal number (130, 143), printing how to resume; a
second one exits at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from rims_rl.config import ABLATIONS, CONFIG_DIR, ConfigError, TrainConfig, describe_fields, resolve_config

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_RESUME_KEEPS = ("device", "no_progress", "resume")  # the only train options that go with --resume


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(message: str) -> NoReturn:
    print(f"rims-rl: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


# ----------------------------------------------------------------------------------------------------------------
def _family_config(env_id: str) -> Path | None:
    from envs import family_of

    family = family_of(env_id)
    if family is None:
        return None
    path = CONFIG_DIR / family.config_name
    if not path.is_file():
        raise UsageError(f"config file {path} for env family '{family.name}' is missing (pass --config FILE)")
    return path


def _resolve(args: argparse.Namespace, flags: dict[str, Any]) -> TrainConfig:
    from envs import check_env_id

    check_env_id(args.env)
    from envs import family_of

    family = family_of(args.env)
    if family is not None and family.command != "train":
        raise UsageError(f"{args.env} ({family.name}) is trained with `rims-rl {family.command}`, not train")
    family_file = _family_config(args.env)
    if family_file is None and args.config is None:
        raise UsageError(
            f"env '{args.env}' belongs to no rims-rl family, so there is no default config: pass --config FILE "
            "(`rims-rl envs` lists the families)"
        )
    return resolve_config(args.env, family_file, args.config, flags, args.set)


def _train_flags(args: argparse.Namespace) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    for name, key in (
        ("policy", "policy"),
        ("algo", "algo"),
        ("total_timesteps", "total_timesteps"),
        ("n_envs", "n_envs"),
        ("seed", "seed"),
        ("device", "device"),
        ("wandb", "wandb.mode"),
        ("ablation", "ablations"),
    ):
        value = getattr(args, name, None)
        if value is not None:
            flags[key] = sorted(set(value)) if name == "ablation" else value
    return flags


def _default_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    variant = "".join(f"-{a}" for a in cfg.ablations)
    return Path("runs") / cfg.env / f"{cfg.policy}{variant}-{cfg.algo}-s{cfg.seed}-{stamp}"


def _check_device(device: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device {device!r} is not valid: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA device(s) (use auto or cpu)")


def _signal_exit_code(name: str) -> int:
    import signal

    return 128 + int(signal.Signals[name]) if name else EXIT_INTERRUPTED


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        return _resume(args)
    if args.env is None:
        raise UsageError("the following arguments are required: --env (or --resume RUN_DIR)")
    cfg = _resolve(args, _train_flags(args))
    _check_device(cfg.device)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file, not a directory")
    replace = run_dir.exists() and any(run_dir.iterdir())
    if replace:
        if not args.overwrite:
            raise UsageError(
                f"run directory {run_dir} already exists and is not empty (use --resume {run_dir} to continue it, "
                "--overwrite to replace it, or another --run-dir)"
            )
        if not (run_dir / "config.yaml").is_file() and not (run_dir / "run.json").is_file():
            raise UsageError(f"{run_dir} is not a rims-rl run directory: --overwrite only replaces run directories")

    from agents.checkpoints import RunInUse, RunLock
    from agents.training import ConfigRejected, prepare, train

    if replace:
        try:
            RunLock.check(run_dir)
        except RunInUse as err:
            raise UsageError(f"{err}: it cannot be overwritten now") from None
    try:
        prepared = prepare(cfg)  # env and model first: a config the libraries reject fails before anything is written
    except ConfigRejected as err:
        raise UsageError(str(err)) from None
    if replace:
        import shutil

        shutil.rmtree(run_dir)
    print(f"training {cfg.policy} ({cfg.algo}) on {cfg.env} for {cfg.total_timesteps} steps -> {run_dir}")
    return _training(lambda: train(cfg, run_dir, progress_bar=not args.no_progress, prepared=prepared), run_dir)


def _resume(args: argparse.Namespace) -> int:
    given = [
        f"--{name.replace('_', '-')}"
        for name, value in vars(args).items()
        if name not in _RESUME_KEEPS and name not in ("command", "func") and value not in (None, False, [])
    ]
    if given:
        raise UsageError(
            f"--resume continues a run with its saved config: drop {', '.join(given)} (to change settings, start a "
            "new run)"
        )
    run_dir = Path(args.resume)
    from agents.training import RunRejected, load_run, resume

    try:
        cfg, _ = load_run(run_dir)
    except RunRejected as err:
        raise UsageError(str(err)) from None
    _check_device(args.device or cfg.device)
    print(f"resuming {cfg.policy} ({cfg.algo}) on {cfg.env} in {run_dir}")
    return _training(lambda: resume(run_dir, device=args.device, progress_bar=not args.no_progress), run_dir)


def _training(run: Callable[[], Any], run_dir: Path) -> int:
    """Run ``train``/``resume`` and turn its outcome into output lines and an exit code."""
    from agents.training import RunRejected, TrainingDiverged, TrainingInterrupted

    try:
        result = run()
    except RunRejected as err:
        raise UsageError(str(err)) from None
    except TrainingInterrupted as stop:
        print(f"rims-rl: {stop}; resume with: rims-rl train --resume {run_dir}", file=sys.stderr)
        return _signal_exit_code(stop.signal_name)
    except TrainingDiverged as err:
        from agents.checkpoints import latest_checkpoint

        good = latest_checkpoint(run_dir)[0]
        kept = f"the last good checkpoint is {good.path.name}" if good else "no checkpoint was written before it"
        raise UsageError(f"{err} ({kept}; try a lower ppo.learning_rate or ppo.max_grad_norm)") from None
    if result.resumed_from is not None:
        print(f"resumed at step {result.resumed_from}; ", end="")
    print(f"trained {result.timesteps} steps in {result.seconds:.0f}s ({result.steps_per_second:.0f} steps/s)")
    if result.final_eval is not None:
        print(f"evaluation: {result.final_eval.summary()}")
    print(f"run directory: {run_dir}  (rims-rl evaluate {run_dir})")
    return 0


# ----------------------------------------------------------------------------------------------------------------
def _load_run(run_dir: Path) -> tuple[TrainConfig, Path]:
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} does not exist")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UsageError(f"{run_dir} is not a rims-rl run directory (no config.yaml)")
    import yaml

    try:
        cfg = TrainConfig.model_validate(yaml.safe_load(config_file.read_text()))
    except Exception as err:
        raise UsageError(f"{config_file} is not a valid rims-rl config ({str(err).splitlines()[0]})") from None
    model_file = run_dir / "model.zip"
    if not model_file.is_file():
        from agents.checkpoints import latest_checkpoint

        checkpoint = latest_checkpoint(run_dir)[0]
        if checkpoint is None:
            raise UsageError(f"{run_dir} holds no model (no model.zip and no whole checkpoint in checkpoints/)")
        model_file = checkpoint.model_file
    return cfg, model_file


def _load_model(model_file: Path, device: str, algo: str = "ppo") -> Any:
    from agents.training import ALGORITHMS

    try:
        return ALGORITHMS[algo].load(model_file, device=device)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load the model {model_file}: {first}") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    from rims_rl.cli_imitation import evaluate_perturb, is_imitation_run

    if is_imitation_run(run_dir):
        return evaluate_perturb(args, run_dir)
    if args.perturb is not None:
        raise UsageError(f"--perturb evaluates Half-Cheetah imitation runs (rims-rl imitate); {run_dir} is not one")
    cfg, model_file = _load_run(run_dir)
    if args.split is not None:
        return _evaluate_splits(args, run_dir, cfg, model_file)
    env_id = args.env or cfg.env
    from envs import check_env_id

    check_env_id(env_id)
    episodes = args.episodes if args.episodes is not None else cfg.eval.episodes
    deterministic = args.deterministic if args.deterministic is not None else cfg.eval.deterministic
    if episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {episodes}")
    _check_device(args.device)

    from agents.evaluation import EVAL_SEED_OFFSET, evaluate
    from agents.training import atari_settings

    model = _load_model(model_file, args.device, cfg.algo)
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
            efference_copy=cfg.efference_copy, atari=atari_settings(cfg),
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
    from envs.babyai import SPLITS, split_of

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
    _check_device(args.device)

    from agents.evaluation import EVAL_SEED_OFFSET, evaluate_splits, format_split_table, write_split_table

    model = _load_model(model_file, args.device, cfg.algo)
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
    cfg, model_file = _load_run(run_dir)
    if cfg.policy != "rims":
        raise UsageError(f"activations need a RIM policy; {run_dir} trained a {cfg.policy} policy")
    env_id = args.env or cfg.env
    from envs import check_env_id

    check_env_id(env_id)
    if args.episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {args.episodes}")
    if args.max_frames < 0:
        raise UsageError(f"--max-frames must be >= 0, got {args.max_frames}")
    _check_device(args.device)

    from agents.activations import play_episodes, write_episode, write_summary
    from agents.evaluation import EVAL_SEED_OFFSET
    from agents.training import atari_settings

    model = _load_model(model_file, args.device, cfg.algo)
    seed = args.seed if args.seed is not None else cfg.seed + EVAL_SEED_OFFSET
    deterministic = args.deterministic if args.deterministic is not None else cfg.eval.deterministic
    episodes = play_episodes(
        model, env_id, args.episodes, seed=seed, deterministic=deterministic,
        efference_copy=cfg.efference_copy, atari=atari_settings(cfg), max_frames=args.max_frames,
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


def cmd_transfer(args: argparse.Namespace) -> int:
    from agents.transfer_suite import (
        DEFAULT_BUDGET,
        PRESETS,
        PROTOCOLS,
        Budget,
        TransferRejected,
        TransferSettings,
        game_id,
        game_name,
        run_cell,
        run_protocol,
    )  # fmt: skip

    if args.protocol is None and (args.source is None or args.target is None):
        raise UsageError("give --source GAME and --target GAME for one cell, or --protocol rusu2016 for the matrix")
    if args.protocol is None and (args.sources or args.targets):
        raise UsageError("--sources/--targets choose games of a --protocol; for one cell give --source and --target")
    if args.protocol is not None and (args.source or args.target):
        raise UsageError("--protocol runs its own sources and targets: drop --source/--target (or use --sources ...)")
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
        _check_device(args.device)
    budget = Budget(total, source_steps, seeds, (*preset.overrides, *(args.set or ())))
    settings = TransferSettings(
        root=Path(args.out), policy=args.policy, mode=args.mode, budget=budget, device=args.device,
        wandb_mode=args.wandb, baseline=args.baseline, random_episodes=args.random_episodes,
        progress_bar=not args.no_progress,
    )  # fmt: skip
    from agents.training import ConfigRejected, TrainingDiverged, TrainingInterrupted

    try:
        settings.config(game_id("Pong"), seeds[0], total)  # a bad --set fails here, before anything runs
        if args.protocol is not None:
            sources, targets = PROTOCOLS[args.protocol]
            sources = [game_id(g) for g in (args.sources or sources)]
            targets = [game_id(g) for g in (args.targets or targets)]
            seed_list = " ".join(map(str, seeds))
            print(f"transfer protocol {args.protocol} ({args.policy}, {args.mode}): {len(sources)} sources x "
                  f"{len(targets)} targets, {total} steps per run, seeds {seed_list} -> {args.out}")  # fmt: skip
            _, _, files = run_protocol(settings, sources, targets)
            print(Path(settings.root / args.policy / args.mode / "matrix.md").read_text(), end="")
            print(Path(settings.root / f"summary_{args.mode}.md").read_text(), end="")
            print("wrote " + ", ".join(map(str, files)))
            return 0
        source_run = None
        source_path = Path(args.source)
        if source_path.is_dir() or source_path.suffix == ".zip":
            if not source_path.exists():
                raise UsageError(f"--source {source_path} does not exist")
            cfg_src, _ = _load_run(source_path if source_path.is_dir() else source_path.parent)
            if cfg_src.policy != args.policy:
                raise UsageError(
                    f"--source {source_path} trained a {cfg_src.policy} policy, not --policy {args.policy}"
                )
            source_run, source = source_path, game_id(cfg_src.env)
        else:
            source = game_id(args.source)
        target = game_id(args.target)
        if game_name(source) == game_name(target):
            raise UsageError(f"--source and --target are the same game ({game_name(source)})")
        run_cell(settings, source, target, source_run=source_run)
        return 0
    except (TransferRejected, ConfigRejected) as err:
        raise UsageError(str(err)) from None
    except TrainingDiverged as err:
        raise UsageError(f"{err} (its run directory keeps the last good checkpoint; try a lower --set "
                         "ppo.learning_rate=...)") from None  # fmt: skip
    except TrainingInterrupted as stop:
        print(f"rims-rl: {stop}; run the same command again to continue (finished runs and cells are skipped)",
              file=sys.stderr)  # fmt: skip
        return _signal_exit_code(stop.signal_name)


def cmd_compare(args: argparse.Namespace) -> int:
    from agents.reports import compare, find_runs

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


# ----------------------------------------------------------------------------------------------------------------
def cmd_envs(args: argparse.Namespace) -> int:
    from envs import FAMILIES

    if args.family and args.family not in FAMILIES:
        raise UsageError(f"unknown env family '{args.family}' (families: {', '.join(FAMILIES)})")
    families = [FAMILIES[args.family]] if args.family else list(FAMILIES.values())
    for family in families:
        print(f"{family.name}: {family.description} (configs/{family.config_name})")
        for env_id in family.ids:
            print(f"  {env_id}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    if args.keys:
        for key, default, help_text in describe_fields():
            print(f"{key:32} {default!r:>14}  {help_text}")
        return 0
    cfg = _resolve(args, _train_flags(args))
    print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
    return 0


# ----------------------------------------------------------------------------------------------------------------
def _add_config_args(p: argparse.ArgumentParser, env_default: str | None) -> None:
    p.add_argument("--env", default=env_default, help="gymnasium env id (rims-rl envs)")
    p.add_argument("--policy", choices=["rims", "lstm"], help="recurrent core: RIM or the LSTM baseline")
    p.add_argument(
        "--algo",
        choices=["ppo", "a2c"],
        help="learning algorithm: RecurrentPPO or RecurrentA2C (default from the config)",
    )
    p.add_argument("--config", type=Path, help="YAML file overriding the env family's config")
    p.add_argument("--total-timesteps", type=int, metavar="N", help="env steps to train for")
    p.add_argument("--n-envs", type=int, metavar="N", help="parallel environments")
    p.add_argument("--seed", type=int, metavar="S", help="random seed")
    p.add_argument("--device", help="auto (GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="W&B mode (default offline)")
    p.add_argument(
        "--ablation", action="append", choices=list(ABLATIONS), metavar="NAME",
        help="RIM ablation preset (repeatable): " + "; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()),
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any config key, e.g. --set rim.k_active=5 --set ppo.learning_rate=1e-3 (repeatable)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rims-rl", description="Train and evaluate RIM and LSTM agents with stable-baselines3.")
    from rims_rl import __version__

    parser.add_argument("--version", action="version", version=f"rims-rl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("train", help="train an agent into a run directory", description="Train an agent.")
    _add_config_args(p, env_default=None)
    p.add_argument("--run-dir", help="run directory (default runs/<env>/<policy>-<algo>-s<seed>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue a stopped run from its newest checkpoint, with its saved config (only --device may change)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

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

    from rims_rl.cli_imitation import add_parsers

    add_parsers(sub)
    from rims_rl.cli_copying import add_parser as add_copying_parser

    add_copying_parser(sub)

    p = sub.add_parser("envs", help="list the env families and ids", description="List env families and ids.")
    p.add_argument("--family", help="only this family")
    p.set_defaults(func=cmd_envs)

    p = sub.add_parser("config", help="print the resolved config", description="Print the resolved configuration.")
    _add_config_args(p, env_default="CartPoleNoVel-v1")
    p.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="rims-rl: warning: %(message)s")
    args = build_parser().parse_args(argv)
    from envs import UnknownEnvError
    from rims_rl.allocator import keep_freed_memory

    keep_freed_memory()  # large per-update buffers are reused instead of faulted in again (see rims_rl.allocator)

    try:
        return int(args.func(args))
    except (UsageError, ConfigError, UnknownEnvError) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        print("rims-rl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
