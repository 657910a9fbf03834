"""Training speed on the copying task (``rims-rl copying``) at the paper's shapes, RIM against LSTM, in one run.

    python scripts/benchmark_copying.py [--repeats 7] [--threads N] [--span 50] [--device cpu]

One update is what ``rims-rl copying`` does per batch: a batch of 64 span-50 sequences (70 steps) forward, the
cross-entropy, backward, gradient clipping and an Adam step. Models: the RIM of the copying experiment (K = 6 x
H = 100, k_A = 4, Table 3's attention sizes and dropout 0.1) against ``nn.LSTM(10, 600)`` and ``nn.GRU(10, 600)``,
each with its linear decoder. Prints the median time per update over interleaved repeats, updates per second, and
RIM/LSTM as the median of the ratios within a repeat (a slow spell of the machine cancels out).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rims_rl.agents.copying import CopyingModel, copying_batch
from rims_rl.allocator import keep_freed_memory
from rims_rl.config import CopyingConfig


def timed(fn: Callable[[], None], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--span", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs, targets = copying_batch(args.batch_size, args.span, np.random.default_rng(0))
    inputs, targets = inputs.to(args.device), targets.to(args.device)
    updates = {}
    for kind in ("rims", "lstm", "gru"):
        torch.manual_seed(0)
        model = CopyingModel(CopyingConfig(model=kind)).to(args.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def update(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            logits, _ = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        updates[kind] = update
    for fn in updates.values():  # warm-up (the RIM's C++ loop is built on its first call)
        fn()
        fn()
    times: dict[str, list[float]] = {kind: [] for kind in updates}
    for _ in range(args.repeats):
        for kind, fn in updates.items():
            times[kind].append(timed(fn, args.device))
    shape = f"batch {args.batch_size}, span {args.span} ({args.span + 20} steps)"
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {args.device}, {threads} threads; {shape}; {args.repeats} repeats")
    print("| model | ms / update | updates / s |\n| --- | --- | --- |")
    for kind in updates:
        t = statistics.median(times[kind])
        print(f"| {kind} | {1000 * t:.0f} | {1 / t:.2f} |")
    ratio = statistics.median(r / lstm for r, lstm in zip(times["rims"], times["lstm"], strict=True))
    print(f"RIM / LSTM time per update: {ratio:.2f}")


if __name__ == "__main__":
    main()
