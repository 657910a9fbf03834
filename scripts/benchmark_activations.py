"""The cost of recording RIM activations during training, measured through ``rims_rl.agents.training.train``.

    python scripts/benchmark_activations.py [--env DemonAttackNoFrameskip-v4] [--repeats 5] [--rollouts 3]

Trains the same config (the env family's YAML, W&B offline) with activation recording off, on with the defaults
(per-rollout rates, null attention, winner changes, a heatmap image to W&B every rollout), and on with every step's
masks also saved to the run directory (``activations.save_every=1``), interleaved ``--repeats`` times. Throughput is
env steps per second of ``model.learn`` (the final evaluation is left out). Prints the median of each mode and the
median over repeats of the ratio to "off" measured in the same repeat [target: >= 0.95].
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

MODES = {
    "off": ["activations.record=false"],
    "on (default: rates + heatmap)": [],
    "on + masks saved every rollout": ["activations.save_every=1"],
}


def main() -> None:
    from rims_rl.agents.training import train
    from rims_rl.cli.train import _family_config
    from rims_rl.config import resolve_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="DemonAttackNoFrameskip-v4", help="env id (its family's config is used)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians are reported)")
    parser.add_argument("--rollouts", type=int, default=3, help="rollouts (and updates) per training run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")

    def config(extra: list[str]):
        base = resolve_config(args.env, _family_config(args.env), overrides=["policy=rims"])
        steps = base.n_envs * base.ppo.n_steps * args.rollouts
        overrides = ["policy=rims", f"total_timesteps={steps}", f"device={args.device}", "wandb.mode=offline",
                     "eval.episodes=1", "eval.freq=0", "eval.stop_at=null", *extra]  # fmt: skip
        return resolve_config(args.env, _family_config(args.env), overrides=overrides)

    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode, extra in MODES.items():
                cfg = config(extra)
                result = train(cfg, Path(tmp) / f"{repeat}-{len(rates[mode])}-{extra}", handle_signals=False)
                rates[mode].append(result.timesteps / result.seconds)
                print(f"  repeat {repeat}: {mode:32} {rates[mode][-1]:8.0f} steps/s", flush=True)
    cfg = config([])
    print(f"{args.env}, RIM, {cfg.n_envs} envs x {cfg.ppo.n_steps} steps x {args.rollouts} rollouts, "
          f"median of {args.repeats}:")  # fmt: skip
    off = rates["off"]
    for mode, values in rates.items():
        ratio = statistics.median(v / o for v, o in zip(values, off, strict=True))
        print(f"  {mode:32} {statistics.median(values):8.0f} steps/s   {ratio:5.3f}x off  [target >= 0.95]")


if __name__ == "__main__":
    main()
