"""One-shot device check for a machine with an NVIDIA GPU: agreement with the CPU, speed, training, resume.

    python scripts/device_check.py [--device cuda] [--quick] [--out runs/device_check]

Needs only the README's setup (``make install``; a CUDA build of torch on the GPU machine) and takes a few minutes.
Prints one table and writes it to ``OUT/device_check.md`` and ``OUT/device_check.json``:

1. **Agreement**: the RIM (6 x 16, k_active 4, episode starts inside the sequence) on ``--device`` against the
   readable reference loop (:func:`rims_rl.rim.reference_forward`) on the CPU: outputs, final states and the
   gradients of every parameter and of the input, for the LSTM and the GRU cell; with one input vector per step
   through the C++ loop and through the Python loop, one of the resets to a given state (``start_states``, as the
   policies' packed minibatches), and with a 3-element input set (the Python loop; the C++ loop takes one vector).
   Passes when every value is within ``--atol`` + ``--rtol`` x the largest reference value of its tensor (float32
   kernels of another device sum in another order), the activation masks agree and the C++ rows ran the C++ loop.
2. **Speed**: ``scripts/benchmark_core.py``'s (a) one step, batch 64 and (b) a 128-step sequence, batch 8, forward
   and backward, RIM (512 -> 6 x 100, k_active 4) against ``nn.LSTMCell``/``nn.LSTM(512, 600)`` (cuDNN on a GPU).
3. **Training**: RecurrentPPO with ``configs/atari.yaml`` on DemonAttack for a few updates with ``--device``, RIM and
   LSTM: env steps per second of the updates (the final evaluation is one whole game, not timed).
4. **Resume across devices**: a CartPoleNoVel-v1 run trained on ``--device`` and stopped after its first checkpoint
   is resumed on the CPU, and one trained on the CPU is resumed on ``--device``; both must finish with the steps of
   an uninterrupted run. (The stop is made by marking the finished run interrupted and removing its last checkpoint:
   what resume then sees is what a Ctrl-C after the first checkpoint leaves.)

With ``--device cpu`` every part runs on the CPU (what CI tests: the same code paths, a CPU-vs-CPU agreement);
``--quick`` shrinks the repeats and the training. Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark_core, run from anywhere

from benchmark_core import core_benchmarks

from rims_rl import rim_fast
from rims_rl.rim import RIM, reference_forward

Row = dict[str, Any]


def _compare(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> tuple[float, float]:
    """The largest absolute difference and the bound it must stay under."""
    diff = (got.detach().double().cpu() - ref.detach().double()).abs().max().item()
    return diff, atol + rtol * ref.detach().abs().max().item()


def _run_rim(
    rim: RIM,
    x: torch.Tensor,
    starts: torch.Tensor,
    start_states: tuple[torch.Tensor, torch.Tensor] | None,
    g: torch.Tensor,
    reference: bool,
) -> dict[str, Any]:
    x = x.clone().requires_grad_(True)
    rim.zero_grad()
    forward = reference_forward if reference else RIM.forward
    out, (h, c), info = forward(rim, x, None, starts, start_states)
    ((out * g).sum() + h.sum() + c.sum()).backward()
    grads = {name: p.grad.detach().clone() for name, p in rim.named_parameters() if p.grad is not None}
    return {"output": out, "h": h, "c": c, "mask": info.activation_mask, "grads": grads, "input grad": x.grad}


def agreement(device: str, atol: float, rtol: float) -> list[Row]:
    """Part 1: every (cell, loop, input) on ``device`` against the reference loop on the CPU."""
    rows: list[Row] = []
    previous, native_forward = rim_fast.NATIVE_LOOP, rim_fast._native_forward
    native_calls = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        native_calls.append(1)
        return native_forward(*args, **kwargs)

    rim_fast._native_forward = counted  # (the C++ rows must have run the C++ loop)
    try:
        for cell in ("lstm", "gru"):
            for loop, N in (("C++", 1), ("Python", 1), ("Python", 3)):
                torch.manual_seed(0)
                rim = RIM(24, num_units=6, unit_size=16, k_active=4, cell=cell, dropout=0.0)
                L, B = 20, 5
                x = torch.randn(L, B, N, 24)
                starts = torch.zeros(L, B)
                starts[7, 1] = starts[13, 3] = 1.0
                start_states = None
                if N == 1:  # sample 1 restarts at step 7 from a given state (sample 3 at 13 from zeros)
                    start_states = (torch.zeros(L, B, 96), torch.zeros(L, B, 96))
                    start_states[0][7, 1], start_states[1][7, 1] = torch.randn(2, 96)
                g = torch.randn(L, B, 6 * 16)
                ref = _run_rim(rim, x, starts, start_states, g, reference=True)
                rim_fast.NATIVE_LOOP = loop == "C++"
                moved = copy.deepcopy(rim).to(device)
                on = [t.to(device) for t in start_states] if start_states is not None else None
                native_calls.clear()
                start = time.perf_counter()
                what = f"RIM {cell}, {loop} loop, {'one vector' if N == 1 else f'a set of {N}'}"
                try:
                    got = _run_rim(moved, x.to(device), starts.to(device), on, g.to(device), reference=False)
                except RuntimeError as err:  # e.g. the C++ loop cannot be built here
                    rows.append(_row("agreement", what, False, str(err).splitlines()[0]))
                    continue
                worst, failed = 0.0, []
                for key in ("output", "h", "c", "input grad"):
                    diff, bound = _compare(key, got[key], ref[key], atol, rtol)
                    worst = max(worst, diff)
                    failed += [key] if diff > bound else []
                for name, grad in ref["grads"].items():
                    diff, bound = _compare(name, got["grads"][name], grad, atol, rtol)
                    worst = max(worst, diff)
                    failed += [name] if diff > bound else []
                masks_equal = bool(torch.equal(got["mask"].cpu(), ref["mask"]))
                failed += [] if masks_equal else ["activation mask"]
                if (loop == "C++") != bool(native_calls):
                    failed += [f"the C++ loop {'did not run' if loop == 'C++' else 'ran'}"]
                figure = f"max |diff| {worst:.1e} over outputs, states, {len(ref['grads']) + 1} gradients"
                if failed:
                    figure += f"; over the bound: {', '.join(failed[:4])}"
                detail = f"{figure} ({(time.perf_counter() - start) * 1e3:.0f} ms)"
                rows.append(_row("agreement", f"{what} vs CPU reference", not failed, detail))
    finally:
        rim_fast.NATIVE_LOOP = previous
        rim_fast._native_forward = native_forward
    return rows


def speed(device: str, repeats: int) -> list[Row]:
    """Part 2: benchmark_core's (a) and (b) on ``device``."""
    result = core_benchmarks(repeats, device)
    rows = []
    for key, label, baseline in (("a", "(a) one step, batch 64", "LSTMCell"), ("b", "(b) 128 steps, batch 8", "LSTM")):
        r = result[key]
        detail = f"RIM {r['rim'] * 1e3:.2f} ms, {baseline} {r['lstm'] * 1e3:.2f} ms, RIM/{baseline} {r['ratio']:.2f}"
        rows.append(_row("speed", label, True, detail, ratio=r["ratio"]))
    return rows


def training(device: str, out: Path, quick: bool) -> list[Row]:
    """Part 3: a few RecurrentPPO updates on DemonAttack with ``device``, RIM and LSTM."""
    from rims_rl.agents.training import train
    from rims_rl.config import CONFIG_DIR, resolve_config

    rows = []
    n_steps, updates = (16, 2) if quick else (128, 4)
    for policy in ("rims", "lstm"):
        overrides = [f"ppo.n_steps={n_steps}", f"ppo.batch_size={8 * n_steps // 4}", "eval.episodes=1",
                     "checkpoint.every_minutes=0", "activations.heatmap_every=0"]  # fmt: skip
        flags = {"policy": policy, "device": device, "wandb.mode": "disabled", "total_timesteps": 8 * n_steps * updates}
        cfg = resolve_config("DemonAttackNoFrameskip-v4", CONFIG_DIR / "atari.yaml", None, flags, overrides)
        result = train(cfg, out / f"train-{policy}", progress_bar=False)
        detail = f"{result.steps_per_second:.0f} env steps/s over {result.timesteps} steps ({updates} updates)"
        rows.append(
            _row(
                "training",
                f"DemonAttack RecurrentPPO, {policy}",
                True,
                detail,
                steps_per_second=result.steps_per_second,
            )
        )
    rims, lstm = rows[0]["steps_per_second"], rows[1]["steps_per_second"]
    rows.append(_row("training", "DemonAttack RIM/LSTM steps/s", True, f"{rims / lstm:.2f}", ratio=rims / lstm))
    return rows


def _stopped_run(device: str, run_dir: Path) -> Path:
    """A CartPoleNoVel-v1 run trained on ``device``, left as a stop after its first checkpoint leaves it."""
    from rims_rl.agents.training import train
    from rims_rl.config import CONFIG_DIR, resolve_config

    overrides = ["total_timesteps=1024", "n_envs=4", "ppo.n_steps=64", "ppo.batch_size=128", "ppo.n_epochs=1",
                 "checkpoint.every_steps=512", "checkpoint.every_minutes=0", "eval.episodes=2",
                 "wandb.mode=disabled", f"device={device}"]  # fmt: skip
    train(resolve_config("CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml", overrides=overrides), run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(dict(meta, status="interrupted")))
    shutil.rmtree(run_dir / "checkpoints" / "ckpt_1024_steps")
    return run_dir


def resume_across(device: str, out: Path) -> list[Row]:
    """Part 4: a ``device`` run resumed on the CPU, and a CPU run resumed on ``device``."""
    from rims_rl.agents.training import resume

    rows = []
    for trained, resumed in ((device, "cpu"), ("cpu", device)):
        run_dir = _stopped_run(trained, out / f"resume-{trained.replace(':', '')}-to-{resumed.replace(':', '')}")
        try:
            result = resume(run_dir, device=resumed, progress_bar=False)
            ok = result.resumed_from == 512 and result.timesteps == 1024
            detail = f"resumed at {result.resumed_from}, finished at {result.timesteps} steps"
        except Exception as err:
            ok, detail = False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        rows.append(_row("resume", f"trained on {trained}, resumed on {resumed}", ok, detail))
    return rows


def _row(part: str, check: str, ok: bool, detail: str, **figures: float) -> Row:
    return {"part": part, "check": check, "ok": ok, "detail": detail, **figures}


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| part | check | result | figures |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['part']} | {r['check']} | {'ok' if r['ok'] else 'FAIL'} | {r['detail']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda", help="the device to check (default cuda; cpu runs every part on the CPU)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a shorter training (CI)")
    parser.add_argument("--out", type=Path, default=Path("runs/device_check"), help="where the table and runs go")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the agreement checks")
    parser.add_argument("--rtol", type=float, default=1e-4, help="tolerance relative to a tensor's largest value")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"device_check: --device {args.device}, but torch {torch.__version__} sees no CUDA device", file=sys.stderr
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    header = (f"device_check: {args.device} ({name}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads, {'quick' if args.quick else 'full'}")  # fmt: skip
    print(header, flush=True)
    started = time.perf_counter()
    rows = agreement(args.device, args.atol, args.rtol)
    rows += speed(args.device, 1 if args.quick else 7)
    with tempfile.TemporaryDirectory(dir=args.out) as scratch:
        os.environ.setdefault("WANDB_SILENT", "true")
        rows += training(args.device, Path(scratch), args.quick)
        rows += resume_across(args.device, Path(scratch))
    text = table(rows, header + f"; {time.perf_counter() - started:.0f} s")
    print("\n" + text)
    (args.out / "device_check.md").write_text(text)
    (args.out / "device_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
