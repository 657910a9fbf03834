"""``rims-rl``: train and evaluate RIM and LSTM agents.

    rims-rl train --env CartPoleNoVel-v1 --policy rims      # hyperparameters from configs/<family>.yaml
    rims-rl train --env DemonAttackNoFrameskip-v4 --policy lstm --device cuda   # any Atari game: configs/atari.yaml
    rims-rl train --resume runs/CartPoleNoVel-v1/rims-ppo-s0-...   # continue a stopped run from its last checkpoint
    rims-rl evaluate runs/CartPoleNoVel-v1/rims-ppo-s0-...   # full episodes with the final model
    rims-rl compare runs/CartPoleNoVel-v1 --out reports/cartpole   # RIM vs LSTM curves over seeds, score table
    rims-rl activations runs/CartPoleNoVel-v1/rims-ppo-s0-...   # play episodes, draw which units were active
    rims-rl transfer --protocol rusu2016 --policy rims --preset paper   # Atari transfer matrix (or one cell)
    rims-rl imitate --demos demos/cheetah.npz --policy rims   # Half-Cheetah from pixels (cli/imitation.py)
    rims-rl copying --model rims                              # the copying task (cli/copying.py)
    rims-rl envs                                              # the env families and ids the project provides
    rims-rl config --env CartPoleNoVel-v1                     # the resolved configuration, every key documented

Bad input (unknown env id, policy, config key, out-of-range value, missing or unusable run directory) gets one line
on stderr saying what is wrong and what is valid, and exit code 2; so does a training run that diverges (NaN or inf
in a loss or parameter), whose last good checkpoint is kept. The first Ctrl-C (SIGINT) or SIGTERM finishes the
current update, saves a checkpoint and exits with 128 + the signal number (130, 143), printing how to resume; a
second one exits at once.
"""

from __future__ import annotations

import logging
import sys

from rims_rl.cli.common import EXIT_INTERRUPTED, Parser, UsageError, fail
from rims_rl.config import ConfigError

__all__ = ["build_parser", "main"]


def build_parser() -> Parser:
    """The ``rims-rl`` parser: each subcommand's module adds its own."""
    from rims_rl import __version__
    from rims_rl.cli import copying, evaluate, imitation, train, transfer

    parser = Parser(prog="rims-rl", description="Train and evaluate RIM and LSTM agents with stable-baselines3.")
    parser.add_argument("--version", action="version", version=f"rims-rl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    train.add_parsers(sub)
    evaluate.add_parsers(sub)
    transfer.add_parser(sub)
    imitation.add_parsers(sub)
    copying.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="rims-rl: warning: %(message)s")
    args = build_parser().parse_args(argv)
    from rims_rl.allocator import keep_freed_memory
    from rims_rl.envs import UnknownEnvError

    keep_freed_memory()  # large per-update buffers are reused instead of faulted in again (see rims_rl.allocator)

    try:
        return int(args.func(args))
    except (UsageError, ConfigError, UnknownEnvError) as err:
        fail(str(err))
    except KeyboardInterrupt:
        print("rims-rl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
