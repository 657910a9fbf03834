"""Speed of the RIM core against LSTM baselines, measured in one run on this machine.

    python scripts/benchmark_core.py [--repeats 7] [--device cpu] [--train-steps 8192]

Prints medians over interleaved repeats, and RIM/LSTM ratios, each the median over repeats of the ratio within a
repeat (targets from the core issue in brackets):

(a) one step, batch 64, forward + backward: RIM(512 -> K=6 x H=100, k_active=4) vs ``nn.LSTMCell(512, 600)``  [<= 1.3]
(b) a 128-step sequence, batch 8, forward + backward: the same RIM vs ``nn.LSTM(512, 600)``                   [<= 1.5]
(c) RecurrentPPO training throughput (env steps/s) on CartPoleNoVel-v1 with ``configs/classic.yaml``:
    RIM policy vs the project's LSTM policy                                                              [>= 0.9]
    and, for reference, sb3-contrib's stock ``MlpLstmPolicy`` (per-step loop) with the same settings.

Then the kernels one step runs (torch.profiler on the CPU: ATen operators that call no other, and the C++ loop's
fused kernels, ``rims_rl::*``): each is a launch on a GPU. The RIM is counted as it runs here (fused CPU kernels) and
with ATen operators only (``rim_fast.FUSED_KERNELS = False``: what it runs on a GPU).

Backward uses a fixed random gradient of the outputs (a dense upstream gradient, as in training).
Like the ``rims-rl`` command, it first makes malloc keep freed memory (:mod:`rims_rl.allocator`; both models gain);
``RIMS_RL_MALLOC=default`` measures without.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from rims_rl import RIM
from rims_rl.allocator import keep_freed_memory


def timed(fn: Callable[[], None], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(
    fns: dict[str, Callable[[], None]], repeats: int, device: str, warmup: int = 2
) -> tuple[dict[str, float], float]:
    """Median time of each function over ``repeats`` interleaved rounds, and the median over rounds of the first
    function's time over the second's (paired within a round, so a slow spell of the machine cancels out)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    first, second = times.values()
    return {name: statistics.median(ts) for name, ts in times.items()}, paired_ratio(first, second)


def paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def core_benchmarks(repeats: int, device: str) -> dict[str, dict[str, float]]:
    """(a) and (b) of the module docstring, printed; returns ``{"a": {"rim": s, "lstm": s, "ratio": r}, "b": ...}``."""
    torch.manual_seed(0)
    rim = RIM(512, num_units=6, unit_size=100, k_active=4).to(device)
    cell = nn.LSTMCell(512, 600).to(device)
    lstm = nn.LSTM(512, 600).to(device)

    x1 = torch.randn(64, 512, device=device)
    g1 = torch.randn(64, 600, device=device)

    def rim_step() -> None:
        out, _, _ = rim(x1.unsqueeze(0))
        out[0].backward(g1)

    def cell_step() -> None:
        h, _ = cell(x1)
        h.backward(g1)

    xs = torch.randn(128, 8, 512, device=device)
    gs = torch.randn(128, 8, 600, device=device)

    def rim_seq() -> None:
        out, _, _ = rim(xs)
        out.backward(gs)

    def lstm_seq() -> None:
        out, _ = lstm(xs)
        out.backward(gs)

    step, step_ratio = interleaved_medians({"rim": rim_step, "lstm": cell_step}, repeats * 5, device)
    seq, seq_ratio = interleaved_medians({"rim": rim_seq, "lstm": lstm_seq}, repeats * 3, device)
    print(f"(a) one step, batch 64, fwd+bwd:  RIM {step['rim'] * 1e3:7.2f} ms   LSTMCell {step['lstm'] * 1e3:7.2f} ms"
          f"   ratio {step_ratio:.2f}  [target <= 1.3]")  # fmt: skip
    print(f"(b) 128 steps, batch 8, fwd+bwd:  RIM {seq['rim'] * 1e3:7.1f} ms   nn.LSTM  {seq['lstm'] * 1e3:7.1f} ms"
          f"   ratio {seq_ratio:.2f}  [target <= 1.5]")  # fmt: skip
    return {"a": {**step, "ratio": step_ratio}, "b": {**seq, "ratio": seq_ratio}}


# Operators that only make tensor metadata (views, allocations): no kernel, no launch on a GPU.
_NO_KERNEL = {
    "aten::" + name for name in (
        "as_strided", "view", "_unsafe_view", "_reshape_alias", "reshape", "resolve_conj", "resolve_neg", "alias",
        "detach", "empty", "empty_strided", "empty_like", "expand", "transpose", "t", "permute", "select", "slice",
        "narrow", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "contiguous", "lift_fresh",
    )
}  # fmt: skip


def leaf_ops(fn: Callable[[], None]) -> int:
    """Kernels ``fn`` runs (torch.profiler on the CPU): the C++ loop's fused kernels (``rims_rl::*``) and the ATen
    operators that compute (not a view or an allocation) and call no other such operator; on a GPU each is a
    launch."""
    from torch.profiler import ProfilerActivity, profile

    def computes(e) -> bool:
        return e.name.startswith("rims_rl::") or (e.name.startswith("aten::") and e.name not in _NO_KERNEL)

    def has_kernel(e) -> bool:
        return computes(e) or any(has_kernel(c) for c in e.cpu_children)

    fn()  # warm-up (the C++ loop's build, allocator)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if computes(e) and not any(has_kernel(c) for c in e.cpu_children))


def kernel_counts() -> dict[str, dict[str, float]]:
    """Kernels (:func:`leaf_ops`) of one step (batch 64) and of a 128-step sequence per step (batch 8), forward
    and backward: the RIM with its fused CPU kernels, the RIM with ATen operators only (as on a GPU), and
    ``nn.LSTMCell``/``nn.LSTM``; printed."""
    from rims_rl import rim_fast

    torch.manual_seed(0)
    rim, cell, lstm = RIM(512, num_units=6, unit_size=100, k_active=4), nn.LSTMCell(512, 600), nn.LSTM(512, 600)
    x1, xs = torch.randn(1, 64, 512), torch.randn(128, 8, 512)
    counts: dict[str, dict[str, float]] = {}
    for name, forward, fused in (
        ("RIM step", lambda: rim(x1)[0], True),
        ("RIM step, ATen", lambda: rim(x1)[0], False),
        ("LSTMCell step", lambda: cell(x1[0])[0], True),
        ("RIM sequence", lambda: rim(xs)[0], True),
        ("RIM sequence, ATen", lambda: rim(xs)[0], False),
        ("LSTM sequence", lambda: lstm(xs)[0], True),
    ):
        steps = 128 if "sequence" in name else 1
        before, rim_fast.FUSED_KERNELS = rim_fast.FUSED_KERNELS, fused
        try:
            fwd = leaf_ops(lambda f=forward: f())
            both = leaf_ops(lambda f=forward: f().sum().backward())
        finally:
            rim_fast.FUSED_KERNELS = before
        counts[name] = {"forward": fwd / steps, "backward": (both - fwd) / steps}
    print("kernels per step (CPU profiler: computing ATen ops and fused rims_rl:: kernels), forward / backward "
          "(incl. the loss sum); 'ATen': without the fused CPU kernels, as on a GPU:")  # fmt: skip
    for name, c in counts.items():
        print(f"      {name:20} {c['forward']:7.1f} / {c['backward']:7.1f}")
    return counts


def training_benchmark(repeats: int, device: str, steps: int) -> None:
    from sb3_contrib.ppo_recurrent.policies import MlpLstmPolicy as StockLstmPolicy

    from rims_rl.agents.training import build_model
    from rims_rl.config import CONFIG_DIR, resolve_config
    from rims_rl.envs import make_env

    def run(policy: str, stock: bool = False) -> Callable[[], float]:
        cfg = resolve_config(
            "CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", flags={"policy": policy, "device": device}
        )
        env = make_env(cfg.env, n_envs=cfg.n_envs, seed=0)
        model = build_model(cfg, env)
        if stock:  # the same settings with sb3-contrib's own policy class
            from rims_rl.agents.ppo import RecurrentPPO

            kwargs = dict(model.policy_kwargs)
            kwargs.pop("shared_critic_grad", None)
            model = RecurrentPPO(
                StockLstmPolicy, env, learning_rate=model.learning_rate, n_steps=model.n_steps,
                batch_size=model.batch_size, n_epochs=model.n_epochs, gamma=model.gamma,
                gae_lambda=model.gae_lambda, clip_range=model.clip_range, policy_kwargs=kwargs, seed=0, device=device,
            )  # fmt: skip
        model.learn(cfg.n_envs * cfg.ppo.n_steps)  # warm-up: one rollout and update

        def measure() -> float:
            start = time.perf_counter()
            model.learn(steps, reset_num_timesteps=False)
            return steps / (time.perf_counter() - start)

        return measure

    runners = {"rims": run("rims"), "lstm": run("lstm"), "lstm (sb3-contrib stock)": run("lstm", stock=True)}
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(repeats):  # the order reversed every other repeat: whoever runs first gains nothing
        for name, measure in list(runners.items())[:: 1 if i % 2 == 0 else -1]:
            rates[name].append(measure())
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"(c) RecurrentPPO on CartPoleNoVel-v1 (configs/classic.yaml), env steps/s, median of {repeats}:")
    for name, rate in med.items():
        print(f"      {name:26} {rate:8.0f}")
    stock = rates["lstm (sb3-contrib stock)"]
    print(f"    ratio RIM / LSTM {paired_ratio(rates['rims'], rates['lstm']):.2f}  [target >= 0.9];"
          f"  RIM / sb3-contrib stock LSTM {paired_ratio(rates['rims'], stock):.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (medians are reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--train-steps", type=int, default=8192, help="env steps per training measurement")
    parser.add_argument("--skip-training", action="store_true", help="only (a) and (b)")
    parser.add_argument("--aten", action="store_true", help="the RIM without the fused CPU kernels (the default)")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as the rims-rl command does: what training sees
    from rims_rl import rim_fast

    rim_fast.FUSED_KERNELS = not args.aten  # the fused CPU kernels (opt-in in the library; see FUSED_KERNELS)
    from rims_rl.policies import RIMPolicy

    RIMPolicy.pack_minibatches = True  # packed training minibatches (opt-in in the library; see pack_minibatches)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"malloc {'keeps freed memory (rims_rl.allocator)' if kept else 'as is'}")  # fmt: skip
    core_benchmarks(args.repeats, args.device)
    kernel_counts()
    if not args.skip_training:
        training_benchmark(max(4, args.repeats - 1), args.device, args.train_steps)


if __name__ == "__main__":
    main()
