"""Atari throughput, measured in one run on this machine: environments, then RecurrentPPO training.

    python scripts/benchmark_atari.py [--env DemonAttackNoFrameskip-v4] [--repeats 3] [--train-steps 3072]

Prints medians over interleaved repeats, and ratios as medians over repeats of the ratio within a repeat
(targets from the issues in brackets):

1. raw environment steps/s, 8 envs, random actions, DeepMind preprocessing:
   ale-py's native vector env (``rims_rl.envs.atari.AtariVecEnv``, the default) vs SB3's ``make_atari_env`` +
   ``VecFrameStack`` (the usual SB3 setup), and the project's wrapper path (``vec_env: dummy``).
2. RecurrentPPO training env steps/s with ``configs/atari.yaml`` (8 envs x 128 steps, 4 epochs, 4 minibatches):
   RIM policy vs the project's LSTM policy (same CNN, heads, PPO settings)                      [RIM/LSTM >= 0.9]
   and sb3-contrib's stock ``CnnLstmPolicy`` on ``make_atari_env`` + ``VecFrameStack`` with the same
   settings and architecture (LSTM 512 shared by actor and critic, linear heads)            [LSTM/stock >= 1.5]

Like the ``rims-rl`` command, it first makes malloc keep freed memory (:mod:`rims_rl.allocator`);
``RIMS_RL_MALLOC=default`` measures without.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from rims_rl.allocator import keep_freed_memory


def env_benchmark(env_id: str, repeats: int, seconds: float) -> None:
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    from rims_rl.envs.atari import AtariVecEnv, make_atari_wrapped

    builders = {
        "ale-py native (AtariVecEnv)": lambda: AtariVecEnv(env_id, n_envs=8, seed=0),
        "SB3 make_atari_env+VecFrameStack": lambda: VecFrameStack(make_atari_env(env_id, n_envs=8, seed=0), 4),
        "project wrapper path (dummy)": lambda: make_atari_wrapped(env_id, n_envs=8, seed=0),
    }
    envs = {name: build() for name, build in builders.items()}
    rng = np.random.default_rng(0)
    for env in envs.values():
        env.reset()
    rates: dict[str, list[float]] = {name: [] for name in envs}
    for _ in range(repeats):
        for name, env in envs.items():
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                env.step(rng.integers(0, env.action_space.n, size=8))
                n += 8
            rates[name].append(n / (time.perf_counter() - start))
    for env in envs.values():
        env.close()
    med = {name: statistics.median(r) for name, r in rates.items()}
    base = med["SB3 make_atari_env+VecFrameStack"]
    print(f"1. {env_id}, 8 envs, random actions: agent steps/s, median of {repeats} x {seconds:.0f}s")
    for name, rate in med.items():
        print(f"     {name:34} {rate:8.0f}   {rate / base:5.2f}x SB3")


def training_benchmark(env_id: str, repeats: int, steps: int, device: str) -> None:
    from sb3_contrib import RecurrentPPO as StockRecurrentPPO
    from sb3_contrib.ppo_recurrent.policies import CnnLstmPolicy as StockCnnLstmPolicy
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    from rims_rl.agents.training import prepare
    from rims_rl.config import CONFIG_DIR, resolve_config

    def config(policy: str):
        flags = {"policy": policy, "device": device, "wandb.mode": "disabled"}
        return resolve_config(env_id, CONFIG_DIR / "atari.yaml", flags=flags)

    def runner(model) -> Callable[[], float]:
        model.learn(model.n_envs * model.n_steps)  # warm-up: one rollout and update

        def measure() -> float:
            start = time.perf_counter()
            model.learn(steps, reset_num_timesteps=False)
            return steps / (time.perf_counter() - start)

        return measure

    models = {policy: prepare(config(policy)).model for policy in ("rims", "lstm")}
    cfg = config("lstm")
    ppo = cfg.ppo
    stock_env = VecFrameStack(make_atari_env(env_id, n_envs=cfg.n_envs, seed=0), 4)
    models["lstm (sb3-contrib stock)"] = StockRecurrentPPO(
        StockCnnLstmPolicy, stock_env, learning_rate=models["lstm"].learning_rate, n_steps=ppo.n_steps,
        batch_size=ppo.batch_size, n_epochs=ppo.n_epochs, gamma=ppo.gamma, gae_lambda=ppo.gae_lambda,
        clip_range=ppo.clip_range, ent_coef=ppo.ent_coef, vf_coef=ppo.vf_coef, max_grad_norm=ppo.max_grad_norm,
        policy_kwargs=dict(
            lstm_hidden_size=cfg.lstm.hidden_size, shared_lstm=True, enable_critic_lstm=False, net_arch=[],
            optimizer_kwargs=dict(eps=ppo.adam_eps),
        ),
        seed=0, device=device,
    )  # fmt: skip
    runners = {name: runner(model) for name, model in models.items()}
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(repeats):  # the order reversed every other repeat: whoever runs first gains nothing
        for name, measure in list(runners.items())[:: 1 if i % 2 == 0 else -1]:
            rates[name].append(measure())
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"2. RecurrentPPO on {env_id} (configs/atari.yaml), env steps/s, median of {repeats} x {steps} steps:")
    for name, rate in med.items():
        print(f"     {name:34} {rate:8.0f}")

    def paired(a: str, b: str) -> float:  # median over repeats of the ratio within a repeat
        return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

    print(f"   ratio RIM / LSTM {paired('rims', 'lstm'):.2f}  [target >= 0.9];"
          f"  LSTM / stock {paired('lstm', 'lstm (sb3-contrib stock)'):.2f}  [target >= 1.5];"
          f"  RIM / stock {paired('rims', 'lstm (sb3-contrib stock)'):.2f}")  # fmt: skip
    for model in models.values():
        model.env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="DemonAttackNoFrameskip-v4", help="an Atari id")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians are reported)")
    parser.add_argument("--env-seconds", type=float, default=5.0, help="seconds per environment measurement")
    parser.add_argument("--train-steps", type=int, default=3072, help="env steps per training measurement")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip-training", action="store_true", help="only the environments")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as the rims-rl command does: what training sees
    from rims_rl import rim_fast

    rim_fast.FUSED_KERNELS = True  # the fused CPU kernels (opt-in in the library; see FUSED_KERNELS)
    from rims_rl.policies import RIMPolicy

    RIMPolicy.pack_minibatches = True  # packed training minibatches (opt-in in the library; see pack_minibatches)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"malloc {'keeps freed memory (rims_rl.allocator)' if kept else 'as is'}")  # fmt: skip
    env_benchmark(args.env, args.repeats, args.env_seconds)
    if not args.skip_training:
        training_benchmark(args.env, args.repeats, args.train_steps, args.device)


if __name__ == "__main__":
    main()
