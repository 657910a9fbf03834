"""The copying task (paper §4.1.1, Table 1; App. C.5, Table 5): remember 10 digits over a span of blanks.

Formulation. The paper's text ("10 random digits (from 0-8), then a span of zeros of some length, followed by a
special indicator 9") leaves choices open; rims-rl follows the authors' data generator (``copying_data.py`` in their
repository), which makes them:

- tokens: ``0`` blank, ``1``-``8`` digits, ``9`` the indicator (digits are drawn from 1-8, not 0-8: a digit 0 could
  not be told from a blank);
- a sequence of span ``T`` has ``T + 20`` steps: 10 digits drawn uniformly from 1-8, ``T - 1`` blanks, the
  indicator, then 10 blanks during which the model must output the digits. The last digit is read ``T`` steps
  before the first one must be written. (``digits`` other than 10 give a smaller or larger task of the same shape:
  the CI test copies 3);
- targets: blank (0) at every step but the last 10, which are the 10 digits in order;
- the loss is the cross-entropy at every step, averaged over the ``T + 20`` steps (the paper's Table 1 and 5 report
  this, "CE"); :func:`copying_metrics` also reports it on the 10 copy steps alone, and the share of digits (and of
  whole sequences) copied right (argmax);
- inputs are one-hot vectors of the token (10 numbers). A blank is token 0, so it has its own one-hot vector and,
  through the input key projection, its own key. ``blank_input="zeros"`` feeds blanks as zero vectors instead (the
  paper's "span of zeros" read literally): their key equals the null element's (no bias), so every unit's attention
  on the input ties with the null at 1/2 and the winners of a blank step follow from the unit order alone (top-k
  of equal values). The authors embedded tokens with a learned table (blank included) before the RIM: equivalent to
  the one-hot input, whose first linear maps are the RIM's key and value projections;
- each update draws a fresh batch of sequences (the authors drew a new set of 12,800 each epoch of 200 updates) and
  starts from a zero state (the authors carried the state from batch to batch, across unrelated sequences).

Model (:class:`CopyingModel`): the one-hot inputs go straight into the recurrent core (a :class:`~rims_rl.rim.RIM`,
or ``nn.LSTM``/``nn.GRU`` with ``hidden_size`` units: the paper's LSTM has 600, as the RIM's 6 x 100), and a linear
layer maps its output at every step to the 10 token logits. Adam, learning rate 1e-3 (App. C.5), gradient norm
clipped at 1 (the authors' ``--clip``).

A run (:func:`train_copying`) writes ``config.yaml``, ``run.json``, ``progress.csv`` (one row per evaluation:
cross-entropy, copy cross-entropy and copy accuracy at the training and the test span, on fixed seeded test
sequences), ``checkpoint.pt`` (model, optimizer, RNG states, history: ``rims-rl copying --resume``), ``model.pt``,
``activations.png`` (the RIM activation mask over one test sequence, the paper's Figure 2) and the W&B run.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import yaml
from torch import nn
from torch.nn import functional as F

from rims_rl.config import CopyingConfig
from rims_rl.rim import RIM, RIMInfo

__all__ = [
    "BLANK",
    "INDICATOR",
    "N_DIGITS",
    "N_TOKENS",
    "CopyingInterrupted",
    "CopyingModel",
    "activation_figure",
    "copying_batch",
    "copying_metrics",
    "load_copying_run",
    "train_copying",
]

BLANK, INDICATOR = 0, 9
N_TOKENS = 10
"""Token ids 0-9: 0 blank, 1-8 digits, 9 the indicator."""
N_DIGITS = 10
"""Digits to copy per sequence."""
METRICS = ("ce", "copy_ce", "copy_accuracy", "sequence_accuracy")


def copying_batch(
    batch_size: int, span: int, rng: np.random.Generator, blank_input: str = "token", digits: int = N_DIGITS
) -> tuple[th.Tensor, th.Tensor]:
    """``batch_size`` sequences of span ``span`` (module docstring; ``digits`` to copy, 10 in the paper).

    :return: ``inputs`` ``(span + 2 * digits, batch_size, 10)`` float one-hot (blank rows all zero with
        ``blank_input="zeros"``) and ``targets`` ``(span + 2 * digits, batch_size)`` long token ids.
    """
    if span < 1 or digits < 1:
        raise ValueError(f"span and digits must be >= 1, got span={span}, digits={digits}")
    drawn = rng.integers(1, 9, size=(batch_size, digits))
    tokens = np.zeros((batch_size, span + 2 * digits), dtype=np.int64)
    tokens[:, :digits] = drawn
    tokens[:, digits + span - 1] = INDICATOR
    targets = np.zeros_like(tokens)
    targets[:, -digits:] = drawn
    inputs = F.one_hot(th.from_numpy(tokens).T, N_TOKENS).float()
    if blank_input == "zeros":
        inputs[..., BLANK] = 0.0
    elif blank_input != "token":
        raise ValueError(f"blank_input must be 'token' or 'zeros', got {blank_input!r}")
    return inputs, th.from_numpy(targets).T.contiguous()


class CopyingModel(nn.Module):
    """One-hot tokens -> recurrent core -> linear layer to the 10 token logits, at every step.

    Inputs: ``(L, B, 10)``. Outputs: logits ``(L, B, 10)`` and the RIM's :class:`~rims_rl.rim.RIMInfo` (None for the
    LSTM and GRU).
    """

    def __init__(self, cfg: CopyingConfig) -> None:
        super().__init__()
        self.kind = cfg.model
        if cfg.model == "rims":
            rim = cfg.rim
            self.core: nn.Module = RIM(
                N_TOKENS, num_units=rim.num_units, unit_size=rim.unit_size, k_active=rim.k_active, cell=rim.cell,
                **rim.rim_kwargs(),
            )  # fmt: skip
            hidden = rim.num_units * rim.unit_size
        else:
            self.core = (nn.LSTM if cfg.model == "lstm" else nn.GRU)(N_TOKENS, cfg.hidden_size)
            hidden = cfg.hidden_size
        self.decoder = nn.Linear(hidden, N_TOKENS)

    def forward(self, inputs: th.Tensor) -> tuple[th.Tensor, RIMInfo | None]:
        if isinstance(self.core, RIM):
            output, _, info = self.core(inputs)
            return self.decoder(output), info
        output, _ = self.core(inputs)
        return self.decoder(output), None


def copying_metrics(logits: th.Tensor, targets: th.Tensor, digits: int = N_DIGITS) -> dict[str, float]:
    """Cross-entropy over all steps (``ce``) and the ``digits`` copy steps (``copy_ce``), the share of digits copied
    right (``copy_accuracy``) and of sequences copied whole (``sequence_accuracy``)."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    right = logits[-digits:].argmax(dim=-1) == targets[-digits:]
    return {
        "ce": float(ce.mean()),
        "copy_ce": float(ce[-digits:].mean()),
        "copy_accuracy": float(right.float().mean()),
        "sequence_accuracy": float(right.all(dim=0).float().mean()),
    }


def evaluate_spans(model: CopyingModel, cfg: CopyingConfig, chunk: int = 256) -> dict[str, float]:
    """:func:`copying_metrics` at the training and the test span (``train/...``, ``test/...``), on
    ``cfg.eval_sequences`` sequences drawn from a fixed seed (the same sequences at every evaluation)."""
    model.eval()
    out: dict[str, float] = {}
    for name, span in (("train", cfg.train_span), ("test", cfg.test_span)):
        rng = np.random.default_rng(cfg.seed + 1_000_003 + span)
        sums = dict.fromkeys(METRICS, 0.0)
        done = 0
        with th.no_grad():
            while done < cfg.eval_sequences:
                n = min(chunk, cfg.eval_sequences - done)
                inputs, targets = copying_batch(n, span, rng, cfg.blank_input, cfg.digits)
                logits, _ = model(inputs.to(_device_of(model)))
                for key, value in copying_metrics(logits, targets.to(logits.device), cfg.digits).items():
                    sums[key] += value * n
                done += n
        out.update({f"{name}/{key}": value / done for key, value in sums.items()})
    model.train()
    return out


def _device_of(model: nn.Module) -> th.device:
    return next(model.parameters()).device


class CopyingInterrupted(Exception):
    """Training stopped by a signal; finished evaluations are in the checkpoint (resume with ``--resume``)."""

    def __init__(self, run_dir: Path, updates: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} after {updates} updates")
        self.run_dir, self.updates, self.signal_name = run_dir, updates, signal_name


class _State:
    """What a checkpoint holds, besides the model and the optimizer."""

    def __init__(self, cfg: CopyingConfig) -> None:
        self.updates = 0
        self.history: list[dict[str, float]] = []
        self.rng = np.random.default_rng(cfg.seed)
        self.seconds = 0.0

    def save(self, path: Path, model: nn.Module, optimizer: th.optim.Optimizer) -> None:
        tmp = path.with_suffix(".tmp")
        th.save(
            {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "updates": self.updates,
                "history": self.history, "numpy_rng": self.rng.bit_generator.state, "torch_rng": th.get_rng_state(),
                "seconds": self.seconds,
            },
            tmp,
        )  # fmt: skip
        tmp.replace(path)

    def load(self, path: Path, model: nn.Module, optimizer: th.optim.Optimizer) -> None:
        ckpt = th.load(path, map_location=_device_of(model), weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        self.updates, self.history, self.seconds = ckpt["updates"], ckpt["history"], ckpt["seconds"]
        self.rng.bit_generator.state = ckpt["numpy_rng"]
        th.set_rng_state(ckpt["torch_rng"])


def _write_progress(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def _start_run(cfg: CopyingConfig, run_dir: Path, resume: bool) -> tuple[dict[str, Any], Any]:
    """run.json and the W&B run (continued on resume)."""
    from rims_rl.agents.training import _write_json
    from rims_rl.tracking import start_wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = json.loads((run_dir / "run.json").read_text()) if resume else {}
    # written on resume too: a resume may change the budget (updates)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    info.update(kind="copying", status="running", model=cfg.model)
    tags = [cfg.model, "copying", *cfg.ablations] + ([f"k_active={cfg.rim.k_active}"] if cfg.model == "rims" else [])
    wandb_run = start_wandb(
        cfg.wandb.mode, run_dir, cfg.model_dump(), project=cfg.wandb.project, entity=cfg.wandb.entity,
        group=cfg.wandb.group or f"copying-T{cfg.train_span}", job_type=cfg.model, tags=tags + cfg.wandb.tags,
        name=run_dir.name, run_id=info.get("wandb_id"),
    )  # fmt: skip
    if wandb_run is not None:
        info["wandb_id"] = wandb_run.id
    _write_json(run_dir / "run.json", info)
    return info, wandb_run


def _device(name: str) -> th.device:
    return th.device("cuda" if name == "auto" and th.cuda.is_available() else "cpu" if name == "auto" else name)


def train_copying(
    cfg: CopyingConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    stop: Any | None = None,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) a model on the copying task into ``run_dir`` (module docstring).

    Every ``cfg.eval_every`` updates: an evaluation at both spans, a ``progress.csv`` row, a checkpoint. ``stop`` is
    an object with a ``requested`` attribute (``callbacks.GracefulStop``): when set, the update in progress
    finishes, a checkpoint is written and :class:`CopyingInterrupted` is raised; a resumed run continues with the same
    evaluation steps. Returns ``run.json``'s content.
    """
    from rims_rl.agents.training import _write_json
    from rims_rl.tracking import finish_wandb

    th.manual_seed(cfg.seed)
    model = CopyingModel(cfg).to(_device(cfg.device))
    optimizer = th.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    state = _State(cfg)
    if resume:
        state.load(run_dir / "checkpoint.pt", model, optimizer)
    info, wandb_run = _start_run(cfg, run_dir, resume)
    info["parameters"] = sum(p.numel() for p in model.core.parameters())
    try:
        while state.updates < cfg.updates:
            state.seconds += _train_block(model, optimizer, cfg, state, stop, run_dir)
            row = {"updates": state.updates, "seconds": round(state.seconds, 1), **evaluate_spans(model, cfg)}
            state.history.append(row)
            state.save(run_dir / "checkpoint.pt", model, optimizer)
            _write_progress(run_dir / "progress.csv", state.history)
            if wandb_run is not None:
                wandb_run.log({f"copying/{k}": v for k, v in row.items() if k != "updates"}, step=state.updates)
            if on_eval is not None:
                on_eval(row)
        th.save({"model": model.state_dict(), "config": cfg.model_dump()}, run_dir / "model.pt")
        if cfg.model == "rims":
            activation_figure(model, cfg, run_dir / "activations.png")
        info.update(status="finished", updates=state.updates, final=state.history[-1] if state.history else {})
    except CopyingInterrupted:
        info.update(status="interrupted", updates=state.updates)
        raise
    finally:
        _write_json(run_dir / "run.json", info)
        if wandb_run is not None:  # a stopped run does not wait long for a W&B service that Ctrl-C took down
            finish_wandb(wandb_run, wait_s=60.0 if info.get("status") == "finished" else 5.0)
    return info


def _train_block(
    model: CopyingModel, optimizer: th.optim.Optimizer, cfg: CopyingConfig, state: _State, stop: Any, run_dir: Path
) -> float:
    """The updates up to the next multiple of ``cfg.eval_every`` (or the end of the budget); returns the seconds
    they took. On a stop request, checkpoints the updates done so far and raises :class:`CopyingInterrupted`."""
    device = _device_of(model)
    start = time.perf_counter()
    end = min(cfg.updates, (state.updates // cfg.eval_every + 1) * cfg.eval_every)
    while state.updates < end:
        if stop is not None and stop.requested:
            state.seconds += time.perf_counter() - start
            state.save(run_dir / "checkpoint.pt", model, optimizer)
            raise CopyingInterrupted(run_dir, state.updates, getattr(stop, "signal_name", "a signal"))
        inputs, targets = copying_batch(cfg.batch_size, cfg.train_span, state.rng, cfg.blank_input, cfg.digits)
        logits, _ = model(inputs.to(device))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss is {float(loss)} at update {state.updates + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        state.updates += 1
    return time.perf_counter() - start


def load_copying_run(run_dir: str | Path, device: str = "cpu") -> tuple[CopyingConfig, CopyingModel]:
    """The config and the final (else the newest checkpointed) model of a copying run."""
    run_dir = Path(run_dir)
    cfg = CopyingConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    model = CopyingModel(cfg).to(_device(device))
    path = run_dir / "model.pt" if (run_dir / "model.pt").is_file() else run_dir / "checkpoint.pt"
    model.load_state_dict(th.load(path, map_location=_device_of(model), weights_only=False)["model"])
    return cfg, model.eval()


def activation_figure(model: CopyingModel, cfg: CopyingConfig, path: Path, span: int | None = None) -> Path:
    """The RIM activation mask over one test sequence (the paper's Figure 2): units x steps, active in black, with
    the digit, blank and copy phases marked; the mask is also saved beside it (``.npz``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span = cfg.test_span if span is None else span
    inputs, _ = copying_batch(1, span, np.random.default_rng(cfg.seed + 7), cfg.blank_input, cfg.digits)
    model.eval()
    with th.no_grad():
        _, info = model(inputs.to(_device_of(model)))
    if info is None:
        raise ValueError("the activation figure needs a RIM model")
    mask = info.activation_mask[:, 0].cpu().numpy().T  # (K, L)
    np.savez_compressed(path.with_suffix(".npz"), mask=mask, tokens=inputs[:, 0].argmax(-1).numpy(), span=span)
    fig, ax = plt.subplots(figsize=(min(18, 3 + mask.shape[1] / 14), 0.35 * mask.shape[0] + 1.4))
    ax.imshow(mask, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    n = cfg.digits
    for x in (n - 0.5, n + span - 1.5, n + span - 0.5):
        ax.axvline(x, color="tab:red", linewidth=1)
    ax.set_yticks(range(mask.shape[0]), [f"unit {j}" for j in range(mask.shape[0])])
    ax.set_xlabel(f"step (digits 0-{n - 1}, blanks, indicator at {n + span - 1}, copy from {n + span})")
    ax.set_title(f"RIM activation mask on a span-{span} sequence (black: active; k_A={cfg.rim.k_active} of "
                 f"{cfg.rim.num_units})", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
