"""``rims-rl copying``: the paper's copying task (§4.1.1, Table 1; App. C.5, Table 5) for a RIM, an LSTM or a GRU.

rims-rl copying --model rims                                  # 6 x 100, k_A 4: train at span 50, test at 200
rims-rl copying --model lstm --hidden-size 600 --seed 1
rims-rl copying --model rims --num-units 5 --k-active 3 --ablation no_communication   # a Table 5 row
rims-rl copying --resume runs/copying/rims-k4-s0-...          # continue a stopped run
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rims_rl.cli.common import UsageError, check_device, signal_exit_code
from rims_rl.config import ABLATIONS, CopyingConfig, resolve_copying_config


def default_run_dir(cfg: CopyingConfig) -> Path:
    """``runs/copying/<model>[-K<k>k<a>][-ablations]-s<seed>-<time>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    shape = f"-K{cfg.rim.num_units}k{cfg.rim.k_active}" if cfg.model == "rims" else f"-{cfg.hidden_size}"
    variant = "".join(f"-{a}" for a in cfg.ablations)
    return Path("runs") / "copying" / f"{cfg.model}{shape}{variant}-s{cfg.seed}-{stamp}"


def _config(args: argparse.Namespace) -> tuple[CopyingConfig, Path]:
    """The config and run directory of a new run (checked) or of the run ``--resume`` names."""
    if args.resume:
        import yaml

        keep, unset = ("resume", "device", "updates", "func", "command"), (None, False, [])
        given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k not in keep and v not in unset]
        if given:
            raise UsageError(
                f"--resume continues a run with its saved config (only --updates and --device may change): drop "
                f"{', '.join(given)}"
            )
        run_dir = Path(args.resume)
        meta = run_dir / "run.json"
        kind = json.loads(meta.read_text()).get("kind") if meta.is_file() else None
        if kind != "copying" or not (run_dir / "checkpoint.pt").is_file():
            raise UsageError(f"{run_dir} is not a copying run with a checkpoint (checkpoint.pt)")
        cfg = CopyingConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
        if args.device:
            cfg.device = args.device
        if args.updates is not None:  # a longer (or shorter) budget: train on to it
            cfg.updates = args.updates
        return cfg, run_dir
    names = ("model", "hidden_size", "train_span", "test_span", "updates", "batch_size", "seed", "device")
    flags: dict[str, Any] = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    flags.update({f"rim.{k}": getattr(args, k) for k in ("num_units", "unit_size", "k_active")
                  if getattr(args, k) is not None})  # fmt: skip
    if args.ablation:
        flags["ablations"] = list(dict.fromkeys(args.ablation))
    if args.wandb:
        flags["wandb.mode"] = args.wandb
    cfg = resolve_copying_config(args.config, flags, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file, not a directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            raise UsageError(f"run directory {run_dir} is not empty (--resume it, --overwrite, or another --run-dir)")
        if not (run_dir / "run.json").is_file():
            raise UsageError(f"{run_dir} is not a rims-rl run directory: --overwrite only replaces run directories")
    return cfg, run_dir


def cmd_copying(args: argparse.Namespace) -> int:
    from rims_rl.agents.callbacks import GracefulStop
    from rims_rl.agents.copying import CopyingInterrupted, train_copying

    cfg, run_dir = _config(args)
    check_device(cfg.device)
    if args.overwrite and not args.resume and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)

    def on_eval(row: dict[str, float]) -> None:
        print(
            f"update {row['updates']}/{cfg.updates}: span {cfg.train_span} CE {row['train/ce']:.4f} copy acc "
            f"{row['train/copy_accuracy']:.3f} | span {cfg.test_span} CE {row['test/ce']:.4f} copy acc "
            f"{row['test/copy_accuracy']:.3f} ({row['seconds']:.0f}s)",
            file=sys.stderr,
        )

    verb = "resuming" if args.resume else "training"
    print(f"{verb} {cfg.model} on the copying task (span {cfg.train_span}, test {cfg.test_span}) -> {run_dir}")
    stop = GracefulStop()
    stop.install()
    try:
        info = train_copying(cfg, run_dir, resume=bool(args.resume), stop=stop, on_eval=on_eval)
    except CopyingInterrupted as err:
        print(f"rims-rl: {err}; resume with: rims-rl copying --resume {run_dir}", file=sys.stderr)
        return signal_exit_code(err.signal_name)
    except FloatingPointError as err:
        raise UsageError(f"training diverged: {err} (the last checkpoint is kept; try a lower learning_rate)") from None
    finally:
        stop.uninstall()
    final = info.get("final", {})
    for name, span in (("train", cfg.train_span), ("test", cfg.test_span)):
        print(f"span {span}: CE {final[f'{name}/ce']:.4f}, copy CE {final[f'{name}/copy_ce']:.4f}, "
              f"copy accuracy {final[f'{name}/copy_accuracy']:.3f}")  # fmt: skip
    print(f"run directory: {run_dir}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "copying", help="the copying task: train at one blank span, test at a longer one (RIM, LSTM or GRU)",
        description="The paper's copying task (Table 1, Table 5): 10 digits, a span of blanks, the indicator, then "
        "the digits to output. Adam 1e-3; evaluated at the training and the test span.",
    )  # fmt: skip
    p.add_argument("--model", choices=["rims", "lstm", "gru"], help="recurrent core (default rims)")
    p.add_argument("--num-units", type=int, metavar="K", help="RIM: number of units k_T (default 6)")
    p.add_argument("--unit-size", type=int, metavar="H", help="RIM: units' hidden size (default 100)")
    p.add_argument("--k-active", type=int, metavar="K_A", help="RIM: units active per step (default 4)")
    p.add_argument("--hidden-size", type=int, metavar="N", help="LSTM/GRU: hidden units (default 600)")
    p.add_argument(
        "--ablation", action="append", choices=ABLATIONS, metavar="NAME",
        help=f"RIM ablation preset, repeatable: {', '.join(ABLATIONS)}",
    )  # fmt: skip
    p.add_argument("--train-span", type=int, metavar="T", help="blank span of training sequences (default 50)")
    p.add_argument("--test-span", type=int, metavar="T", help="blank span of test sequences (default 200)")
    p.add_argument("--updates", type=int, metavar="N", help="updates (batches) to train for (default 30000)")
    p.add_argument("--batch-size", type=int, metavar="N", help="sequences per update (default 64)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed (default 0)")
    p.add_argument("--device", help="auto (GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--config", type=Path, help="YAML file of copying config keys")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any copying config key, e.g. --set eval_every=500 --set rim.dropout=0 (repeatable)",
    )  # fmt: skip
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="W&B mode (default offline)")
    p.add_argument("--run-dir", help="run directory (default runs/copying/<model>...-s<seed>-<time>)")
    p.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue a run from its checkpoint (with --updates N: train on to N updates, e.g. a finished run)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty run directory")
    p.set_defaults(func=cmd_copying)
