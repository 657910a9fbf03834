"""What every ``rims-rl`` subcommand shares: one-line errors, exit codes, device checks, reading run directories."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from rims_rl.config import TrainConfig

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(message: str) -> NoReturn:
    print(f"rims-rl: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def check_device(device: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device {device!r} is not valid: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA device(s) (use auto or cpu)")


def signal_exit_code(name: str) -> int:
    import signal

    return 128 + int(signal.Signals[name]) if name else EXIT_INTERRUPTED


def load_run(run_dir: Path) -> tuple[TrainConfig, Path]:
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
        from rims_rl.agents.checkpoints import latest_checkpoint

        checkpoint = latest_checkpoint(run_dir)[0]
        if checkpoint is None:
            raise UsageError(f"{run_dir} holds no model (no model.zip and no whole checkpoint in checkpoints/)")
        model_file = checkpoint.model_file
    return cfg, model_file


def load_obs_stats(cfg: TrainConfig, model_file: Path) -> Any:
    """The observation statistics saved with ``model_file`` (an ``ObsStats``) for a run trained with
    ``normalize_obs``; None for other runs."""
    if not cfg.normalize_obs:
        return None
    from rims_rl.agents.normalization import STATS_FILE, read_stats

    try:
        stats = read_stats(model_file)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if stats is None:
        raise UsageError(
            f"the run was trained with normalize_obs but {model_file.parent} holds no observation statistics "
            f"({STATS_FILE}): the model cannot be played without them"
        )
    return stats


def load_model(model_file: Path, device: str, algo: str = "ppo") -> Any:
    from rims_rl.agents.training import ALGORITHMS

    try:
        return ALGORITHMS[algo].load(model_file, device=device)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load the model {model_file}: {first}") from None
