"""Throughput of the Half-Cheetah imitation pieces, measured in one run (medians of --repeats):

* frames rendered per second by the pixel env (64x64, tracking camera), with MuJoCo's default shadows and
  reflections and with them off (the project's setting), stepping random actions;
* behaviour-cloning training sequences per second (one sequence = ``seq_len`` steps of one episode, forward +
  backward + Adam step) for the paper's sizes: RIM 6 units x 100, k_active 3, against a GRU of 600 (and LSTM 600).

    python scripts/benchmark_imitation.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch as th

import rims_rl.envs  # noqa: F401
from rims_rl.agents.imitation import PixelPolicy, _masked_mse
from rims_rl.config import ImitationConfig
from rims_rl.envs.cheetah import make_pixel_cheetah


def render_fps(shadows: bool, steps: int) -> float:
    import mujoco

    env = make_pixel_cheetah()
    flags = env._renderer._renderer.scene.flags
    flags[mujoco.mjtRndFlag.mjRND_SHADOW] = shadows
    flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = shadows
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, 6))
    env.close()
    return steps / (time.perf_counter() - start)


def bc_seqs_per_second(policy: str, device: str, seq_len: int, batch: int, updates: int) -> float:
    cfg = ImitationConfig(policy=policy, seq_len=seq_len, batch_size=batch, device=device)
    net = PixelPolicy(cfg, size=64, frame_stack=4, action_dim=6).to(device)
    opt = th.optim.Adam(net.parameters(), lr=1e-3)
    obs = th.randint(0, 256, (seq_len, batch, 64, 64, 12), dtype=th.uint8, device=device)
    target = th.rand(seq_len, batch, 6, device=device) * 2 - 1
    valid = th.ones(seq_len, batch, device=device)

    def update() -> None:
        pred, _, _ = net(obs)
        loss = _masked_mse(pred, target, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()

    update()  # warm-up
    if device.startswith("cuda"):
        th.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(updates):
        update()
    if device.startswith("cuda"):
        th.cuda.synchronize()
    return updates * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--render-steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--updates", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every variant alike
        results.setdefault("render fps, shadows+reflections on", []).append(render_fps(True, args.render_steps // 4))
        results.setdefault("render fps, off (project setting)", []).append(render_fps(False, args.render_steps))
        for policy in ("rims", "gru", "lstm"):
            value = bc_seqs_per_second(policy, args.device, args.seq_len, args.batch, args.updates)
            results.setdefault(f"BC seqs/s {policy}", []).append(value)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"device {args.device}, torch threads {th.get_num_threads()}, {args.repeats} repeats (medians)")
    for key, value in med.items():
        print(f"{key:40s} {value:9.1f}")
    on, off = med["render fps, shadows+reflections on"], med["render fps, off (project setting)"]
    print(f"{'render speed-up, off / on':40s} {off / on:9.2f}")
    print(f"{'BC RIM / GRU (seqs/s ratio)':40s} {med['BC seqs/s rims'] / med['BC seqs/s gru']:9.2f}")
    print(f"{'BC RIM / LSTM (seqs/s ratio)':40s} {med['BC seqs/s rims'] / med['BC seqs/s lstm']:9.2f}")
    print(f"(one sequence = {args.seq_len} steps of 64x64x12 frames; batch {args.batch})")


if __name__ == "__main__":
    main()
