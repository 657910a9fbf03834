"""``rims-rl train | config | envs``: train an agent into a run directory (or resume one), show configs and envs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rims_rl.cli.common import UsageError, check_device, signal_exit_code
from rims_rl.config import ABLATIONS, CONFIG_DIR, DEFAULT_CONFIG, TrainConfig, describe_fields, resolve_config

_RESUME_KEEPS = ("device", "no_progress", "resume")  # the only train options that go with --resume


def _family_config(env_id: str) -> Path | None:
    from rims_rl.envs import family_of

    family = family_of(env_id)
    if family is None:
        return None
    path = CONFIG_DIR / family.config_name
    if not path.is_file():
        raise UsageError(f"config file {path} for env family '{family.name}' is missing (pass --config FILE)")
    return path


def _probe_spaces(env_id: str, packages: list[str]) -> tuple[Any, Any]:
    """The observation and action spaces of one copy of ``env_id``, as training sees them (with the wrappers of
    ``make_env``)."""
    import gymnasium as gym

    from rims_rl.envs import UnsupportedSpaceError, make_env

    try:
        env = make_env(env_id, n_envs=1, seed=0, vec_env="dummy", gym_packages=packages)
    except UnsupportedSpaceError as err:
        raise UsageError(f"{env_id}: {err}") from None
    except (gym.error.Error, ValueError, ImportError) as err:
        raise UsageError(f"cannot make env {env_id}: {str(err).strip().splitlines()[0]}") from None
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def _resolve(args: argparse.Namespace, flags: dict[str, Any]) -> tuple[TrainConfig, str]:
    """The config of ``args`` and comment lines saying how it was chosen (``rims-rl config`` prints them)."""
    from rims_rl.envs import check_env_id, family_of

    packages = list(getattr(args, "gym_packages", None) or [])
    check_env_id(args.env, packages)
    if packages:
        flags = {**flags, "gym_packages": packages}
    family = family_of(args.env)
    if family is not None and family.command != "train":
        raise UsageError(f"{args.env} ({family.name}) is trained with `rims-rl {family.command}`, not train")
    if family is not None:
        family_file = _family_config(args.env)
        cfg = resolve_config(args.env, family_file, args.config, flags, args.set)
        return cfg, f"# {args.env}: env family '{family.name}', config {family_file}"
    from rims_rl.agents.spaces import describe_choice, space_kinds

    observation_space, action_space = _probe_spaces(args.env, packages)
    kinds = space_kinds(observation_space, action_space)
    cfg = resolve_config(args.env, DEFAULT_CONFIG, args.config, flags, args.set, kinds)
    return cfg, describe_choice(args.env, str(DEFAULT_CONFIG), observation_space, action_space)


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


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        return _resume(args)
    if args.env is None:
        raise UsageError("the following arguments are required: --env (or --resume RUN_DIR)")
    cfg, _ = _resolve(args, _train_flags(args))
    check_device(cfg.device)
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

    from rims_rl.agents.checkpoints import RunInUse, RunLock
    from rims_rl.agents.training import ConfigRejected, prepare, train

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
    from rims_rl.agents.training import RunRejected, load_run, resume

    try:
        cfg, _ = load_run(run_dir)
    except RunRejected as err:
        raise UsageError(str(err)) from None
    check_device(args.device or cfg.device)
    print(f"resuming {cfg.policy} ({cfg.algo}) on {cfg.env} in {run_dir}")
    return _training(lambda: resume(run_dir, device=args.device, progress_bar=not args.no_progress), run_dir)


def _training(run: Callable[[], Any], run_dir: Path) -> int:
    """Run ``train``/``resume`` and turn its outcome into output lines and an exit code."""
    from rims_rl.agents.training import RunRejected, TrainingDiverged, TrainingInterrupted

    try:
        result = run()
    except RunRejected as err:
        raise UsageError(str(err)) from None
    except TrainingInterrupted as stop:
        print(f"rims-rl: {stop}; resume with: rims-rl train --resume {run_dir}", file=sys.stderr)
        return signal_exit_code(stop.signal_name)
    except TrainingDiverged as err:
        from rims_rl.agents.checkpoints import latest_checkpoint

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


def cmd_envs(args: argparse.Namespace) -> int:
    from rims_rl.envs import FAMILIES

    if args.family and args.family not in FAMILIES:
        raise UsageError(f"unknown env family '{args.family}' (families: {', '.join(FAMILIES)})")
    families = [FAMILIES[args.family]] if args.family else list(FAMILIES.values())
    for family in families:
        print(f"{family.name}: {family.description} (configs/{family.config_name})")
        for env_id in family.ids:
            print(f"  {env_id}")
    if not args.family:
        print("any other gymnasium id (or module:EnvId, --gym-packages PKG): configs/default.yaml, by its spaces")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    if args.keys:
        for key, default, help_text in describe_fields():
            print(f"{key:32} {default!r:>14}  {help_text}")
        return 0
    cfg, how = _resolve(args, _train_flags(args))
    print(how)
    print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
    return 0


def _add_config_args(p: argparse.ArgumentParser, env_default: str | None) -> None:
    p.add_argument(
        "--env", default=env_default,
        help="gymnasium env id: the project's (rims-rl envs), any registered id, or module:EnvId",
    )  # fmt: skip
    p.add_argument(
        "--gym-packages", nargs="+", default=[], metavar="PKG",
        help="packages to import first, so that the env ids they register can be used (rl-zoo's flag)",
    )  # fmt: skip
    p.add_argument("--policy", choices=["rims", "lstm"], help="recurrent core: RIM or the LSTM baseline")
    p.add_argument(
        "--algo",
        choices=["ppo", "a2c"],
        help="learning algorithm: RecurrentPPO or RecurrentA2C (default from the config)",
    )
    p.add_argument(
        "--config", type=Path, help="YAML file overriding the env family's config (configs/default.yaml for others)"
    )
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


def add_parsers(sub: Any) -> None:
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

    p = sub.add_parser("envs", help="list the env families and ids", description="List env families and ids.")
    p.add_argument("--family", help="only this family")
    p.set_defaults(func=cmd_envs)

    p = sub.add_parser("config", help="print the resolved config", description="Print the resolved configuration.")
    _add_config_args(p, env_default="CartPoleNoVel-v1")
    p.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")
    p.set_defaults(func=cmd_config)
