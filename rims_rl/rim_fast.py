"""The fast machinery behind :class:`rims_rl.rim.RIM`: the same function as :meth:`RIM.step <rims_rl.rim.RIM.step>`
over a whole sequence, computed fast (the tests check every path here against :func:`rims_rl.rim.reference_forward`).

What does not depend on the recurrent state (the input keys and values; with input attention off, the whole input
side of the dynamics; for a single input vector and a few long sequences, the products of keys with the query weights
and of values with the input-to-gate weights; for a single input vector smaller than the keys and values, those
weights with the key and value projections folded in) is computed once for all steps; the per-step loop only does
what depends on the state (:func:`_vector_input_path` picks by sizes). All per-unit weights carry a leading unit axis
and are applied with batched matmuls over it: there is no Python loop over units. Under autograd the loop is a single
node with a hand-written backward through time (:class:`_RIMSequence`), which computes each weight gradient once from
all steps. Attention dropout masks are drawn for the whole sequence before the loop. For a single input vector (the
reinforcement-learning configurations), the loop and its backward run in C++ (``csrc/rim_loop.cpp``, built on first
use; see :data:`NATIVE_LOOP`): the same ATen ops in the same order, except on the CPU, where each step's element-wise
parts and its small weight products run as kernels of the loop's own (:data:`FUSED_KERNELS`); the Python loop here
is their fallback.
:func:`run_together` can run several RIMs' C++ loops at once on two threads (:data:`PARALLEL_LOOPS`).

Layout inside the loop: unit-major, ``(K, B, H)``, so that per-unit weights apply with one ``bmm``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["NATIVE_LOOP", "VECTOR_INPUT_PATH", "release_buffers", "run_together", "select_winners", "sequence"]

RIM = nn.Module  # a rims_rl.rim.RIM (not imported: that module imports this one)
Result = tuple[Tensor, tuple[Tensor, Tensor], Tensor, Tensor]
"""``output (L, B, K*H)``, ``(h_n, c_n)``, activation mask ``(L, B, K)``, input attention ``(L, B, K, N+1)``."""


def sequence(
    rim: RIM,
    input: Tensor,
    state: tuple[Tensor, Tensor] | None,
    episode_starts: Tensor | None,
    start_states: tuple[Tensor, Tensor] | None = None,
) -> Result:
    """:meth:`RIM.forward <rims_rl.rim.RIM.forward>`'s results (its docstring), the mask and attention unpacked."""
    return _run(rim, _prepare(rim, input, state, episode_starts, start_states))


def select_winners(on_input: Tensor, log_odds: Tensor, k_active: int, dim: int) -> Tensor:
    """The indices of the ``k_active`` winners along ``dim`` (the unit axis): the units with the most attention on
    the input (the least on the null element, §2.3), ``on_input``. Exact ties, which the attention averaged over
    heads reaches once its softmax saturates (each head's weight rounds to 0 or 1), go to the unit with the larger
    ``log_odds``, the mean over heads of the log-odds of attending to the input rather than the null element
    (which does not saturate), and then to the lower unit index. ``torch.topk`` leaves the order of ties
    unspecified, so without this the choice depends on the implementation: on a trained Half-Cheetah clone the C++
    loop and the reference step picked different winners, and in closed loop the same units won at every step.
    Two stable sorts, so the order is exactly (on_input desc, log_odds desc, index asc)."""
    by_odds = torch.sort(log_odds, dim=dim, descending=True, stable=True).indices
    order = torch.sort(on_input.gather(dim, by_odds), dim=dim, descending=True, stable=True).indices
    return by_odds.gather(dim, order.narrow(dim, 0, k_active))


def _run(rim: RIM, call: _Call) -> Result:
    """The loop on a prepared call, and its results in the documented layouts."""
    cfg, keys, values, gates_x, h0, c0, keep, weights = call[:8]
    if torch.is_grad_enabled():
        loop = _RIMSequence.apply(cfg, keys, values, gates_x, h0, c0, keep, *weights)
    elif cfg.native:
        loop = _native_forward(cfg, keys, values, h0, c0, keep, weights, False, _projections(call))[:5]
    else:
        loop = _run_loop(cfg, keys, values, gates_x, h0, c0, keep, weights)
    return _finish(rim, call, *loop)


def _prepare(
    rim: RIM,
    input: Tensor,
    state: tuple[Tensor, Tensor] | None,
    episode_starts: Tensor | None,
    start_states: tuple[Tensor, Tensor] | None = None,
) -> _Call:
    """Check the arguments and do the step-independent work (see :meth:`RIM.forward <rims_rl.rim.RIM.forward>`)."""
    x = input
    if x.dim() == 3:
        x = x.unsqueeze(2)
    if x.dim() != 4 or x.shape[-1] != rim.input_size:
        raise ValueError(
            f"input must have shape (L, B, D) or (L, B, N, D) with D={rim.input_size}, got {tuple(input.shape)}"
        )
    L, B, N, _ = x.shape
    K, H = rim.num_units, rim.unit_size
    if state is None:
        h0, c0 = rim.initial_state(B, x.device)
    else:
        h0, c0 = state
        if h0.shape != (B, K * H) or c0.shape != (B, K * H):
            raise ValueError(
                f"state must be a pair of (B, K*H) = ({B}, {K * H}) tensors, "
                f"got {tuple(h0.shape)} and {tuple(c0.shape)}"
            )
    # Unit-major layout (K, B, H) inside the loop, so per-unit weights apply with one bmm.
    h0 = h0.reshape(B, K, H).transpose(0, 1)
    c0 = c0.reshape(B, K, H).transpose(0, 1) if rim.cell == "lstm" else None

    keep = None
    if episode_starts is not None:
        keep = (1.0 - episode_starts.reshape(L, B).to(x.dtype)).view(L, 1, B, 1)
    starts = _start_states(rim, start_states, keep, L, B)

    # ---- Step-independent work, once for the whole sequence (§2.3: keys and values of the input set) -----
    Hi, dk = rim.input_heads, rim.input_key_size
    dv = rim.input_value_size // Hi
    G = rim.weight_ih.shape[-1]
    weights = (
        rim.query_weight, rim.query_bias, rim.weight_ih, rim.bias_ih, rim.weight_hh, rim.bias_hh,
        rim.comm_qkv, rim.comm_out, rim.comm_out_bias,
    )  # fmt: skip
    keys = values = gates_x = None
    mode = "none" if not rim.input_attention else ("vector" if N == 1 else "set")
    loop_mode, loop_dk = mode, dk
    path = _vector_input_path(L, B, x.shape[-1], H, dk, dv, G) if mode == "vector" else None
    if path == "folded":
        # Keys and values are linear in x (no bias), so the key projection folds into the query weights and the
        # value projection into the input-to-gate weights (see _fold_input); the loop then reads x itself.
        keys = values = x.expand(L, B, Hi, x.shape[-1])
        weights = (*_fold_input(rim, x.shape[-1]), *weights[3:])
        loop_mode, loop_dk = "vector", x.shape[-1]
    elif mode == "none":
        # Every unit reads the mean of the input values (uniform attention over the real elements); the read
        # does not depend on the state, so the input side of the dynamics is computed for all steps at once.
        gates_x = torch.einsum("lbv,kvg->lkbg", rim.input_value(x).mean(dim=2), rim.weight_ih) + rim.bias_ih
    else:
        assert rim.input_key is not None
        values = rim.input_value(x)  # (L, B, N, Hi*dv); the null element's value is zero and is left out
        keys = rim.input_key(x) * (1.0 / math.sqrt(dk))
        if mode == "vector":
            keys, values = keys.view(L, B, Hi, dk), values.view(L, B, Hi, dv)
            if path == "projected":
                loop_mode = "projected"
        else:
            keys = keys.view(L, B, N, Hi, dk).permute(0, 1, 3, 4, 2)  # (L, B, Hi, dk, N)
            values = values.view(L, B, N, Hi, dv).transpose(2, 3)  # (L, B, Hi, N, dv)

    dropped = tuple(sorted(set(rim.dropped_units)))
    if dropped:
        if any(not 0 <= j < K for j in dropped):
            raise ValueError(f"dropped_units must be unit indices in [0, {K}), got {rim.dropped_units}")
        if torch.is_grad_enabled():
            raise ValueError("dropped_units is a test-time ablation: run the RIM under torch.no_grad()")
    masks = _DropoutMasks(None, None)
    if rim.training and rim.dropout > 0:
        masks = _draw_dropout_masks(rim, loop_mode, L, B, N, x)
    cfg = _LoopConfig(
        mode=loop_mode, cell=rim.cell, k_active=rim.k_active, dropout=masks, heads=Hi, key_size=loop_dk,
        comm_heads=rim.comm_heads, comm_key_size=rim.comm_key_size, comm_value_size=rim.comm_value_size,
        communication=rim.communication, dropped=dropped, start_states=starts,
    )  # fmt: skip
    if loop_mode in ("vector", "projected") and not dropped and _native() is not None:
        cfg = cfg._replace(native=True)
    return _Call(cfg, keys, values, gates_x, h0, c0, keep, weights, x, mode)


def _start_states(
    rim: RIM, start_states: tuple[Tensor, Tensor] | None, keep: Tensor | None, L: int, B: int
) -> tuple[Tensor, Tensor | None] | None:
    """``start_states`` (see :meth:`RIM.forward <rims_rl.rim.RIM.forward>`) in the loop's layout ``(L, K, B, H)``,
    zero where no sample resets (so a reset step computes ``h * keep + start``, and the others are unchanged)."""
    if start_states is None:
        return None
    K, H = rim.num_units, rim.unit_size
    if keep is None:
        raise ValueError("start_states needs episode_starts: they are the states the samples take where it is set")
    if len(start_states) != 2 or any(s.shape != (L, B, K * H) for s in start_states):
        shapes = [tuple(s.shape) for s in start_states]
        raise ValueError(f"start_states must be a pair of (L, B, K*H) = ({L}, {B}, {K * H}) tensors, got {shapes}")
    if torch.is_grad_enabled() and any(s.requires_grad for s in start_states):
        raise ValueError("start_states take no gradient: pass them detached (or run under torch.no_grad())")
    reset = 1.0 - keep  # (L, 1, B, 1)
    h, c = ((s.reshape(L, B, K, H).transpose(1, 2) * reset).contiguous() for s in start_states)
    return h, c if rim.cell == "lstm" else None


def _finish(
    rim: RIM, call: _Call, outputs: Tensor, h_n: Tensor, c_n: Tensor | None, masks: Tensor, attention: Tensor | None
) -> Result:
    """The loop's results in the documented layouts (see :meth:`RIM.forward <rims_rl.rim.RIM.forward>`)."""
    x, mode = call.x, call.mode
    L, B, N, _ = x.shape
    K, H = rim.num_units, rim.unit_size
    output = outputs.permute(0, 2, 1, 3).reshape(L, B, K * H)
    h_n = h_n.transpose(0, 1).reshape(B, K * H)
    c_n = c_n.transpose(0, 1).reshape(B, K * H) if c_n is not None else torch.zeros_like(h_n)
    if mode == "none":
        input_attention = torch.cat([x.new_zeros(L, B, K, 1), x.new_full((L, B, K, N), 1.0 / N)], dim=-1)
    elif mode == "vector":
        on_input = attention.transpose(1, 2)  # (L, B, K)
        input_attention = torch.stack([1.0 - on_input, on_input], dim=-1)
    else:
        input_attention = attention.transpose(1, 2)
    return output, (h_n, c_n), masks.transpose(1, 2), input_attention


# ====================================================================================================================
# The sequence loop and its hand-written backward (back-propagation through time)
# ====================================================================================================================
class _Call(NamedTuple):
    """One RIM call, prepared for the loop (:func:`_prepare`)."""

    cfg: _LoopConfig
    keys: Tensor | None
    values: Tensor | None
    gates_x: Tensor | None
    h0: Tensor
    c0: Tensor | None
    keep: Tensor | None
    weights: tuple[Tensor | None, ...]
    x: Tensor  # the input, (L, B, N, D)
    mode: str  # what the input attention is: "vector", "set" or "none" (cfg.mode: how the loop computes it)


def _projections(call: _Call) -> _VectorProjections | None:
    if call.cfg.mode != "projected":
        return None
    assert call.keys is not None and call.values is not None
    return _vector_projections(call.keys, call.values, call.weights, _by_head(call.cfg, call.keys))


class _LoopConfig(NamedTuple):
    mode: str  # "vector" (N = 1), "projected" (N = 1 via _VectorProjections), "set" (N > 1), "none" (no input attn)
    cell: str
    k_active: int
    dropout: _DropoutMasks  # its masks are None in eval mode or with dropout 0
    heads: int
    key_size: int
    comm_heads: int
    comm_key_size: int
    comm_value_size: int
    communication: bool
    dropped: tuple[int, ...] = ()  # test-time ablation (no-grad path only): never active, state zero
    start_states: tuple[Tensor, Tensor | None] | None = None  # the states reset samples take (_start_states)
    native: bool = False  # the loop runs in C++ (_native_forward, _native_backward)


class _DropoutMasks(NamedTuple):
    """Attention dropout (0, or ``1 / (1 - p)`` to keep the expected read) for every step of a sequence, drawn
    before the loop in one call each: the loop then draws no random numbers, so it gives the same results in Python
    and in C++, and several loops can run at once on threads (:func:`run_together`) and stay reproducible."""

    input: Tensor | None  # on the input attention's read: (L, K, B, Hi) for one vector, (L, B, Hi, K, N) for a set
    comm: Tensor | None  # on the communication attention: (L, B*Hc, K queries, K keys)


def _draw_dropout_masks(rim: RIM, mode: str, L: int, B: int, N: int, like: Tensor) -> _DropoutMasks:
    K, Hi, Hc = rim.num_units, rim.input_heads, rim.comm_heads
    keep = 1.0 - rim.dropout

    def draw(*shape: int) -> Tensor:
        return like.new_empty(shape).bernoulli_(keep).div_(keep)

    read = None
    if mode in ("vector", "projected"):
        read = draw(L, K, B, Hi)
    elif mode == "set":
        read = draw(L, B, Hi, K, N)
    return _DropoutMasks(read, draw(L, B * Hc, K, K) if rim.communication else None)


class _VectorProjections(NamedTuple):
    """Input attention over a single input vector (N = 1), with the step-independent work done for all steps.

    With one element per head, unit ``k``'s score for head ``h`` is ``q_kh . key_h`` with ``q = h_k W_q + b_q``,
    which is ``h_k (W_q,h key_h) + b_q,h . key_h``; and what it feeds its gates is ``sum_h p_kh value_h W_ih,h``.
    ``W_q,h key_h`` and ``value_h W_ih,h`` do not depend on the state, so they are computed for all steps in one
    batched product each; a step is then two small products (a unit's state against its ``Hi`` score columns, its
    ``Hi`` attention weights against its ``Hi`` gate rows) instead of reading the full query and input-to-gate
    weights (``K x 4H x 4H`` floats at the paper's sizes) once per step. Same function, summed in another order.
    """

    score_weight: Tensor  # (L, K*B, H, Hi): W_q,h key_h per unit, sample and head; by head: (Hi, L, B, K, H)
    score_bias: Tensor  # (L, K*B, 1, Hi): b_q,h . key_h
    gates: Tensor  # (L, K*B, Hi, G): value_h W_ih,h, G = n_gates * H; by head: (Hi, L, B, K, G)
    gate_bias: Tensor  # (K*B, 1, G): b_ih for every sample


VECTOR_INPUT_PATH: str | None = None
"""How a single input vector (N = 1) is attended: None (default) decides by the sizes (:func:`_vector_input_path`);
"per-step", "projected" or "folded" forces it (tests check every path against the reference)."""


def _vector_input_path(L: int, B: int, D: int, H: int, dk: int, dv: int, G: int) -> str:
    """Three ways to compute the same input attention over one vector (per unit and head):

    * "per-step": per step, queries ``h W_q`` (``H x dk``) against the keys, and the read values through ``W_ih``
      (``dv x G``);
    * "folded" (:func:`_fold_input`): the keys' and values' projections folded into those weights, so a step
      works on the input itself (``H x D`` and ``D x G``); it pays for small inputs (``D`` below the key and value
      sizes), as the 2 observation numbers of CartPoleNoVel;
    * "projected" (:class:`_VectorProjections`): as many products as "per-step", in one batched product for all
      steps instead of one per step; it pays when the per-step weights it stops reading are large against what it
      reads instead (``B x (G + H)``): long sequences of few samples, as PPO minibatches of a few 128-step
      sequences on Atari (measured against "per-step" for the Atari sizes, Python loop: 1.17x at B = 2, 1.05x at
      B = 4, 0.93x at B = 8; C++ loop: 1.29x, 1.23x, 0.97x).
    """
    if VECTOR_INPUT_PATH is not None:
        return VECTOR_INPUT_PATH
    if L > 1 and D * (H + G) < dk * H + dv * G:  # (one step does not pay for folding the weights)
        return "folded"
    if L > 1 and dv * G + H * dk >= 12 * B * (G + H):
        return "projected"
    return "per-step"


def _merge_state_weights(cfg: _LoopConfig, weights: tuple[Tensor | None, ...]) -> tuple[Tensor, Tensor]:
    """``[W_q | W_hh]`` ``(K, H, Hi*dk + G)`` and its bias (``b_ih`` of an LSTM, ``b_hh`` of a GRU): a unit's queries
    and the recurrent input of its gates in one product of its state (modes "vector" and "set")."""
    wq, bq, _, bih, whh, bhh = weights[:6]
    assert wq is not None and bq is not None and whh is not None
    bias = bih if cfg.cell == "lstm" else bhh
    assert bias is not None
    return torch.cat([wq, whh], dim=-1), torch.cat([bq, bias], dim=-1)


def _fold_input(rim: RIM, D: int) -> tuple[Tensor, Tensor, Tensor]:
    """Query and input-to-gate weights acting on the input vector itself (autograd carries their gradients back).

    With ``key_h = x W_k,h / sqrt(dk)`` and ``value_h = x W_v,h`` (no bias), unit ``k``'s score for head ``h`` is
    ``(h_k W_q,kh + b_q,kh) . key_h = (h_k A_kh + a_kh) . x`` with ``A_kh = W_q,kh W_k,h^T / sqrt(dk)`` (``H x D``),
    and its read ``p_kh value_h`` enters the gates as ``(p_kh x) M_kh`` with ``M_kh = W_v,h^T W_ih,kh``
    (``D x G``). Returns ``A`` ``(K, H, Hi*D)``, ``a`` ``(K, 1, Hi*D)`` and ``M`` ``(K, Hi*D, G)``.
    """
    assert rim.input_key is not None and rim.query_weight is not None and rim.query_bias is not None
    K, H, Hi, dk = rim.num_units, rim.unit_size, rim.input_heads, rim.input_key_size
    dv = rim.input_value_size // Hi
    G = rim.weight_ih.shape[-1]
    w_key = rim.input_key.weight.view(Hi, dk, D) * (1.0 / math.sqrt(dk))
    w_value = rim.input_value.weight.view(Hi, dv, D)
    A = torch.einsum("kjhe,hed->kjhd", rim.query_weight.view(K, H, Hi, dk), w_key).reshape(K, H, Hi * D)
    a = torch.einsum("khe,hed->khd", rim.query_bias.view(K, Hi, dk), w_key).reshape(K, 1, Hi * D)
    M = torch.einsum("hvd,khvg->khdg", w_value, rim.weight_ih.view(K, Hi, dv, G)).reshape(K, Hi * D, G)
    return A, a, M


def _vector_projections(
    keys: Tensor, values: Tensor, weights: tuple[Tensor | None, ...], by_head: bool = False
) -> _VectorProjections:
    """The projections in the per-step layouts the loops' batched products read, or ``by_head``: the score weights
    and gates in the layouts their einsums write, ``(Hi, L, B, K, .)``, for the fused C++ loop (:func:`_by_head`),
    which saves a copy of the whole sequence's projections (39 MB at batch 8 of ``benchmark_core.py`` (b)). The
    same numbers either way."""
    wq, bq, wih, bih = weights[:4]
    assert wq is not None and bq is not None and wih is not None and bih is not None
    L, B, Hi, dk = keys.shape
    dv = values.shape[-1]
    K, H, _ = wq.shape
    G = wih.shape[-1]
    if by_head:  # (.contiguous(): a no-op, as the einsums write these layouts)
        score_weight = torch.einsum("lbhe,kdhe->hlbkd", keys, wq.view(K, H, Hi, dk)).contiguous()
        gates = torch.einsum("lbhv,khvg->hlbkg", values, wih.view(K, Hi, dv, G)).contiguous()
    else:
        score_weight = torch.einsum("kdhe,lbhe->lkbdh", wq.view(K, H, Hi, dk), keys).reshape(L, K * B, H, Hi)
        gates = torch.einsum("lbhv,khvg->lkbhg", values, wih.view(K, Hi, dv, G)).reshape(L, K * B, Hi, G)
    score_bias = torch.einsum("khe,lbhe->lkbh", bq.view(K, Hi, dk), keys).reshape(L, K * B, 1, Hi)
    if by_head:  # (rows the fused kernels index: a copy where the einsum's layout is another, as for one step)
        score_bias = score_bias.contiguous()
    return _VectorProjections(score_weight, score_bias, gates, bih.expand(K, B, G).reshape(K * B, 1, G))


def _by_head(cfg: _LoopConfig, keys: Tensor) -> bool:
    """Whether the loop reads the projections by head (:func:`_vector_projections`): where the C++ loop runs its
    fused kernels (the CPU, float or double, :data:`FUSED_KERNELS`). Its other modes take either layout."""
    return cfg.native and FUSED_KERNELS and keys.device.type == "cpu" and keys.dtype in (torch.float32, torch.float64)


# One fused op each instead of three: grad * (1 - y^2) and grad * y * (1 - y) from the activation's output y; the
# "_into" forms write into grad_input= (a slice of a per-sequence gradient buffer).
_tanh_backward = torch.ops.aten.tanh_backward.default
_tanh_backward_into = torch.ops.aten.tanh_backward.grad_input
_sigmoid_backward_into = torch.ops.aten.sigmoid_backward.grad_input


class _Tape:
    """What the forward loop keeps for the backward: per-step tensors, and per-sequence buffers ``(K, L, B, .)``
    holding the inputs of each per-unit weight at every step (so each weight gradient is one product afterwards)."""

    def __init__(self, K: int, L: int, B: int, H: int, like: Tensor, read_size: int, comm_in: int | None) -> None:
        self.steps: list[dict[str, Any]] = []
        self.h_in = like.new_empty(K, L, B, H)  # the state entering each step (after resets)
        self.read = like.new_empty(K, L, B, read_size) if read_size else None  # what each unit read
        self.h1 = like.new_empty(K, L, B, H) if comm_in else None  # the state entering communication
        self.rc = like.new_empty(K, L, B, comm_in) if comm_in else None  # what each unit read from the others


def _run_loop(
    cfg: _LoopConfig,
    keys: Tensor | None,
    values: Tensor | None,
    gates_x_all: Tensor | None,
    h: Tensor,
    c: Tensor | None,
    keep: Tensor | None,
    weights: tuple[Tensor | None, ...],
    tape: _Tape | None = None,
    proj: _VectorProjections | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """Run the RIM over a sequence (no autograd). With ``tape``, record what the backward pass needs.

    ``h``, ``c`` are ``(K, B, H)``. Returns outputs ``(L, K, B, H)``, ``h_n``, ``c_n``, activation masks
    ``(L, K, B)`` and the attention that decided them (vector: ``(L, K, B)`` on the input; set: ``(L, K, B, N+1)``;
    none: None).

    With input attention over a single vector (mode "vector") or a set, a unit's queries and its recurrent gate
    inputs are both products of its state: over several steps (or under the tape) they are computed by one product
    with ``[W_q | W_hh]``; a single step without gradient (a rollout) does not pay for concatenating the weights.
    """
    wq, bq, wih, bih, whh, bhh, wqkv, wout, bout = weights
    K, B, _ = h.shape
    L = (keys if keys is not None else gates_x_all).shape[0]  # type: ignore[union-attr]
    Hi, dk = cfg.heads, cfg.key_size
    lstm = cfg.cell == "lstm"
    mode = cfg.mode
    merged = mode in ("vector", "set") and (L > 1 or tape is not None)
    reset_steps = (keep != 1).flatten(1).any(1).tolist() if keep is not None else [False] * L
    no_winner = torch.zeros(K, B, dtype=torch.bool, device=h.device)
    h, c, alive, all_active = _drop_units(cfg.dropped, h, c)
    if mode == "projected" and proj is None:
        assert keys is not None and values is not None
        proj = _vector_projections(keys, values, weights)
    if merged:
        assert wq is not None
        dq = wq.shape[-1]
        w_h, b_h = _merge_state_weights(cfg, weights)
    zero = h.new_zeros(())  # the ignored addend of baddbmm(beta=0)
    outputs, masks, attentions = [], [], []
    for t in range(L):
        h, c, rec = _start_step(t, h, c, keep if reset_steps[t] else None, tape, lstm, cfg.start_states)

        # ---- 1-2. Input attention and selection (§2.3) ----------------------------------------------------------
        q = gx = gh = None
        if merged:
            hz = torch.baddbmm(b_h, h, w_h)  # (K, B, Hi*dk + G): queries | recurrent gate inputs (with bias)
            q = hz[..., :dq].view(K, B, Hi, dk)
            gh = hz[..., dq:]
        elif mode in ("vector", "set"):
            q = torch.baddbmm(bq, h, wq).view(K, B, Hi, dk)
        if mode == "none":
            assert gates_x_all is not None
            gx = gates_x_all[t]
            active = all_active
        else:
            assert keys is not None and values is not None
            read_out = tape.read[:, t] if tape is not None and tape.read is not None else None
            on_input, logits, attention, read, gx = _read_input(cfg, t, h, q, keys, values, proj, read_out, rec)
            attentions.append(attention)
            if merged and lstm:  # gates = b_ih + h W_hh + read W_ih
                gh = torch.baddbmm(gh, read, wih)
            elif mode != "projected":
                gx = torch.baddbmm(bih, read, wih)
            active = _select(cfg, on_input, logits, alive, all_active, no_winner)
        m = active.unsqueeze(-1)
        if tape is not None:
            rec["mf"] = m.to(h.dtype)

        # ---- 3. Independent dynamics (§2.1): all units computed, the losers' state kept exactly -----------------
        h1_out = tape.h1[:, t] if tape is not None and tape.h1 is not None else None
        h1, c = _cell(lstm, merged, gx, gh, h, c, m, whh, bhh, h1_out, rec)

        # ---- 4. Communication (§2.4): active units read all units; gated, squashed residual ---------------------
        if cfg.communication:
            rc_out = tape.rc[:, t] if tape is not None and tape.rc is not None else None
            h = _communicate(cfg, t, h1, m, wqkv, wout, bout, zero, rc_out, rec)
        else:
            h = h1
        outputs.append(h)
        masks.append(active)
        if tape is not None:
            tape.steps.append(rec)
    attention_out = torch.stack(attentions) if attentions else None
    return torch.stack(outputs), h, c, torch.stack(masks), attention_out


def _start_step(
    t: int,
    h: Tensor,
    c: Tensor | None,
    keep: Tensor | None,
    tape: _Tape | None,
    lstm: bool,
    start: tuple[Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Step ``t``'s state after episode starts (``keep``, given when some sequence restarts at ``t``: sb3-contrib's
    convention, the state is zeroed before the first step of an episode, or set to its row of the ``start`` states)
    and its record for the backward pass."""
    rec: dict[str, Any] = {}
    if keep is not None:
        h = h * keep[t] if start is None else torch.addcmul(start[0][t], h, keep[t])
        if c is not None:
            c = c * keep[t] if start is None or start[1] is None else torch.addcmul(start[1][t], c, keep[t])
        rec["reset"] = True
    if tape is not None:
        tape.h_in[:, t].copy_(h)
        rec["c"] = c
        if not lstm:
            rec["h"] = h
    return h, c, rec


def _drop_units(
    dropped: tuple[int, ...], h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """Units removed at test time (``RIM.dropped_units``): their state zeroed; returns ``h``, ``c``, the units'
    ``alive`` factor ``(K, 1, 1)`` (None when no unit is dropped) and the mask of units that may be active
    ``(K, B)``."""
    K, B, _ = h.shape
    all_active = torch.ones(K, B, dtype=torch.bool, device=h.device)
    if not dropped:
        return h, c, None, all_active
    alive = torch.ones(K, 1, 1, dtype=h.dtype, device=h.device)
    alive[list(dropped)] = 0.0
    return h * alive, (c * alive if c is not None else None), alive, all_active & (alive[..., 0] > 0)


def _read_input(
    cfg: _LoopConfig,
    t: int,
    h: Tensor,
    q: Tensor | None,
    keys: Tensor,
    values: Tensor,
    proj: _VectorProjections | None,
    read_out: Tensor | None,
    rec: dict[str, Any],
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Step ``t``'s input attention (§2.3, eq. 4) for the units' queries ``q`` ``(K, B, Hi, dk)``.

    Returns the attention on the input ``(K, B)`` (1 - the null element's), the scores it came from (set:
    ``(B, Hi, K, N)``; vector: ``(K, B, Hi)``), the attention to record (set: ``(K, B, N+1)``; vector: the attention
    on the input), what each unit read ``(K, B, Hi * dv)`` (the projected path: None) and, on the projected path
    only, the input-side gate pre-activations ``(K, B, G)``. What the backward needs goes in ``rec``.
    """
    K, B, H = h.shape
    drop_in = cfg.dropout[0]
    gx = read = None
    if cfg.mode == "set":
        assert q is not None
        scores = torch.matmul(q.permute(1, 2, 0, 3), keys[t])  # (B, Hi, K, N)
        a = torch.softmax(F.pad(scores, (1, 0)), dim=-1)  # the null score, 0, in column 0
        attention = a.mean(1).transpose(0, 1)  # (K, B, N+1)
        on_input = 1.0 - attention[..., 0]  # as the reference computes it, so ties round alike
        a_read = a[..., 1:]
        if drop_in is not None:
            rec["drop_in"] = drop_in[t]
            a_read = a_read * rec["drop_in"]
        r = torch.matmul(a_read, values[t]).permute(2, 0, 1, 3)  # (K, B, Hi, dv)
        read = (read_out.view(r.shape).copy_(r) if read_out is not None else r).reshape(K, B, -1)
        rec.update(q=q, a=a, a_read=a_read)
        return on_input, scores, attention, read, gx
    # N = 1: softmax over {null, x} where the null score is exactly 0, so the weight on x is sigmoid(score).
    if cfg.mode == "projected":  # through the step-independent projections (see _VectorProjections)
        assert proj is not None
        hb = h.reshape(K * B, 1, H)
        score = torch.baddbmm(proj.score_bias[t], hb, proj.score_weight[t]).view(K, B, cfg.heads)
    else:
        assert q is not None
        score = (q * keys[t]).sum(-1)  # (K, B, Hi)
    p = torch.sigmoid(score)
    on_input = p.mean(-1)  # (K, B) = 1 - null attention
    p_read = p
    if drop_in is not None:
        rec["drop_in"] = drop_in[t]
        p_read = p * rec["drop_in"]
    if cfg.mode == "projected":
        assert proj is not None
        gx = torch.baddbmm(proj.gate_bias, p_read.view(K * B, 1, cfg.heads), proj.gates[t]).view(K, B, -1)
    else:
        out = read_out.view(K, B, cfg.heads, -1) if read_out is not None else None
        read = torch.mul(p_read.unsqueeze(-1), values[t], out=out).view(K, B, -1)
    rec.update(p=p, p_read=p_read)
    return on_input, score, on_input, read, gx


def _select(
    cfg: _LoopConfig, on_input: Tensor, scores: Tensor, alive: Tensor | None, all_active: Tensor, no_winner: Tensor
) -> Tensor:
    """The activation mask ``(K, B)``: the ``k_active`` units with the least attention on the null element (§2.3),
    ties broken by :func:`select_winners`; dropped units (``alive`` 0) never win (the others may fill their place)."""
    if cfg.k_active == on_input.shape[0]:
        return all_active
    if alive is not None:
        on_input = on_input.masked_fill(alive[..., 0] == 0, -math.inf)
    # the log-odds of reading the input (the null score is 0), averaged over heads
    log_odds = torch.logsumexp(scores, -1).mean(1).t() if cfg.mode == "set" else scores.mean(-1)
    winners = select_winners(on_input, log_odds, cfg.k_active, 0)  # (k_A, B)
    active = no_winner.scatter(0, winners, True)
    if alive is not None:  # fewer units left than k_A: the dropped ones still stay inactive
        active = active & all_active
    return active


def _cell(
    lstm: bool,
    merged: bool,
    gx: Tensor | None,
    gh: Tensor | None,
    h: Tensor,
    c: Tensor | None,
    m: Tensor,
    whh: Tensor | None,
    bhh: Tensor | None,
    h1_out: Tensor | None,
    rec: dict[str, Any],
) -> tuple[Tensor, Tensor | None]:
    """§2.1: every unit's LSTM/GRU update from its input-side (``gx``) and, when ``merged``, state-side (``gh``)
    gate pre-activations; the units outside the mask ``m`` ``(K, B, 1)`` keep their state exactly."""
    H = h.shape[-1]
    if lstm:
        assert c is not None
        gates = gh if merged else torch.baddbmm(gx, h, whh)
        ifo = torch.sigmoid(gates[..., : 3 * H])
        g = torch.tanh(gates[..., 3 * H :])
        i, f, o = ifo.split(H, dim=-1)
        c_new = torch.addcmul(f * c, i, g)
        tanh_c = torch.tanh(c_new)
        h1 = torch.where(m, o * tanh_c, h, out=h1_out)
        rec.update(ifo=ifo, g=g, tanh_c=tanh_c)
        return h1, torch.where(m, c_new, c)
    assert gx is not None
    if not merged:
        gh = torch.baddbmm(bhh, h, whh)
    assert gh is not None
    rz = torch.sigmoid(gx[..., : 2 * H] + gh[..., : 2 * H])
    r, z = rz.split(H, dim=-1)
    gh_n = gh[..., 2 * H :]
    n = torch.tanh(torch.addcmul(gx[..., 2 * H :], r, gh_n))
    h1 = torch.where(m, torch.addcmul(n, z, h - n), h, out=h1_out)  # (1 - z) * n + z * h
    rec.update(rz=rz, n=n, gh_n=gh_n)
    return h1, c


def _communicate(
    cfg: _LoopConfig,
    t: int,
    h1: Tensor,
    m: Tensor,
    wqkv: Tensor,
    wout: Tensor,
    bout: Tensor,
    zero: Tensor,
    rc_out: Tensor | None,
    rec: dict[str, Any],
) -> Tensor:
    """§2.4 (eq. 5-8): the active units (mask ``m``) read all units' states through multi-head attention and add the
    gated, squashed result to their state; the others keep ``h1``."""
    K, B, H = h1.shape
    Hc, ck, cv = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
    drop_c = cfg.dropout[1]
    qkv = torch.bmm(h1, wqkv).view(K, B * Hc, 2 * ck + cv).transpose(0, 1)  # (B*Hc, K, 2ck+cv)
    q2, k2, v2 = qkv.split((ck, ck, cv), dim=-1)
    # Scores key-major, (B*Hc, K keys, K queries), normalised over dim 1: softmax over a size-K last dim is
    # ~3x slower on CPU.
    ac_t = torch.softmax(torch.baddbmm(zero, k2, q2.transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(ck)), dim=1)
    ac_read = ac_t.transpose(1, 2)  # (B*Hc, K queries, K keys)
    if drop_c is not None:
        rec["drop_c"] = drop_c[t]
        ac_read = ac_read * rec["drop_c"]
    rc4 = torch.bmm(ac_read, v2).view(B, Hc, K, cv).permute(2, 0, 1, 3)
    rc = rc_out if rc_out is not None else h1.new_empty(K, B, Hc * cv)
    rc.view(K, B, Hc, cv).copy_(rc4)
    pre = torch.baddbmm(bout, rc, wout)
    update = torch.tanh(pre[..., :H])
    gate = torch.sigmoid(pre[..., H:])
    rec.update(q2=q2, k2=k2, v2=v2, ac_t=ac_t, ac_read=ac_read, update=update, gate=gate)
    return torch.where(m, torch.addcmul(h1, gate, update), h1)


class _RIMSequence(torch.autograd.Function):
    """The RIM loop as one autograd node with a hand-written backward through time.

    Per-step autograd would record ~40 small ops per step and compute every weight gradient once per step (a
    product contracted over the batch only, memory-bound for small batches). Here the backward loop computes only
    the activation gradients per step, written into per-sequence buffers ``(K, L, B, .)``; each weight gradient is
    then one batched matmul over all steps, as fused RNN kernels do. Tests check it against a naive autograd
    reference.
    """

    @staticmethod
    def forward(ctx, cfg, keys, values, gates_x_all, h0, c0, keep, *weights):  # type: ignore[override]
        K, B, H = h0.shape
        L = (keys if keys is not None else gates_x_all).shape[0]
        proj = _vector_projections(keys, values, weights, _by_head(cfg, keys)) if cfg.mode == "projected" else None
        if cfg.native:
            outputs, h_n, c_n, masks, attention, tape = _native_forward(
                cfg, keys, values, h0, c0, keep, weights, True, proj
            )
        else:
            read_size = values.shape[-1] * cfg.heads if cfg.mode in ("vector", "set") else 0
            comm_in = cfg.comm_heads * cfg.comm_value_size if cfg.communication else None
            tape = _Tape(K, L, B, H, h0, read_size, comm_in)
            outputs, h_n, c_n, masks, attention = _run_loop(
                cfg, keys, values, gates_x_all, h0, c0, keep, weights, tape, proj
            )
        ctx.cfg, ctx.tape, ctx.keep, ctx.proj = cfg, tape, keep, proj
        ctx.state_grad = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]  # whether h0, c0 want a gradient
        wq, bq, wih, _, whh, _, wqkv, wout, _ = weights  # the other biases are not needed to go back
        ctx.save_for_backward(keys, values, wq, bq, wih, whh, wqkv, wout)
        ctx.mark_non_differentiable(masks)
        if attention is not None:
            ctx.mark_non_differentiable(attention)
        ctx.set_materialize_grads(False)
        return outputs, h_n, c_n, masks, attention

    @staticmethod
    @once_differentiable
    def backward(ctx, d_outputs, d_hn, d_cn, _d_masks, _d_attention):  # type: ignore[override]
        return _sequence_backward(ctx, ctx.saved_tensors, d_outputs, d_hn, d_cn)


def _sequence_backward(
    ctx: Any,
    saved: tuple[Tensor | None, ...],
    d_outputs: Tensor | None,
    d_hn: Tensor | None,
    d_cn: Tensor | None,
    loop_grads: tuple[Any, ...] | None = None,
) -> tuple[Tensor | None, ...]:
    """The gradients of :class:`_RIMSequence`'s inputs. ``ctx`` holds what its forward kept (cfg, tape, keep,
    proj, and ``state_grad``: whether the state entering the sequence wants a gradient; None for it where not),
    ``saved`` its saved tensors; ``loop_grads``, where given, the result of the per-step part
    (:func:`_native_backward`), else it is computed here."""
    cfg: _LoopConfig = ctx.cfg
    tape = ctx.tape  # _Tape, or _NativeTape from the C++ loop
    keys, values, wq, bq, wih, whh, _, _ = saved
    K, L, B, _ = tape.h_in.shape
    G = whh.shape[-1]
    Hi, dk = cfg.heads, cfg.key_size
    lstm = cfg.cell == "lstm"
    mode = cfg.mode
    with_queries = mode in ("vector", "set")  # their gradient rows are [queries | recurrent gate inputs]
    dq = wq.shape[-1] if with_queries else 0
    wih_t = wih.transpose(1, 2)
    if cfg.native:
        if loop_grads is None:
            loop_grads = _native_backward(ctx, saved, d_outputs, d_hn, d_cn)
        dh, dc, d_hz, d_gx, d_s_all, d_pre_all, d_qkv_all, d_read_all = loop_grads
        d_keys: list[Tensor] = []
        d_values: list[Tensor] = []
        drop_in = cfg.dropout.input
        p_read_all = (tape.p * drop_in if drop_in is not None else tape.p).transpose(0, 1)  # (K, L, B, Hi)
    else:
        dh, dc, d_hz, d_gx, d_s_all, d_pre_all, d_qkv_all, d_read_all, d_keys, d_values = _backward_loop(
            ctx, saved, d_outputs, d_hn, d_cn
        )
        p_read_all = (
            torch.stack([rec["p_read"] for rec in tape.steps], dim=1) if mode in ("vector", "projected") else None
        )

    # ---- Weight gradients, each one batched product over all steps -------------------------------------------
    def rows(x: Tensor) -> Tensor:  # (K, L, B, n) -> (K, L*B, n)
        return x.reshape(K, L * B, x.shape[-1])

    h_in = rows(tape.h_in)
    d_gx_rows = d_hz.view(K, L * B, dq + G)[..., dq:] if lstm else d_gx.view(K, L * B, G)
    d_w_h = torch.bmm(h_in.transpose(1, 2), d_hz.view(K, L * B, -1))
    d_b_h = d_hz.sum((1, 2)).unsqueeze(1)
    d_wq = d_bq = d_wih = d_bih = d_bhh = None
    if with_queries:
        d_wq, d_whh = d_w_h.split((dq, G), dim=-1)
        d_bq, d_b_hh = d_b_h.split((dq, G), dim=-1)
    else:
        d_whh, d_b_hh = d_w_h, d_b_h
    if lstm:
        d_bih = d_b_hh if with_queries else None  # none/projected modes: b_ih reaches the gates outside the loop
    else:
        d_bhh = d_b_hh
        if with_queries:
            d_bih = d_gx.sum((1, 2)).unsqueeze(1)
    if with_queries:
        assert tape.read is not None
        d_wih = torch.bmm(rows(tape.read).transpose(1, 2), d_gx_rows)
    d_wqkv = d_wout = d_bout = None
    if cfg.communication:
        assert tape.h1 is not None and tape.rc is not None and d_pre_all is not None and d_qkv_all is not None
        d_wqkv = torch.bmm(rows(tape.h1).transpose(1, 2), rows(d_qkv_all))
        d_wout = torch.bmm(rows(tape.rc).transpose(1, 2), rows(d_pre_all))
        d_bout = d_pre_all.sum((1, 2)).unsqueeze(1)

    d_keys_all = d_values_all = d_gates_all = None
    if mode == "none":
        d_gates_all = d_gx.transpose(0, 1)  # (L, K, B, G)
    elif mode == "set":
        d_keys_all = torch.stack(d_keys[::-1])
        d_values_all = torch.stack(d_values[::-1])
    else:  # N = 1: keys and values gradients for all steps at once, (K, L, B, .) summed over the units
        assert d_s_all is not None
        dv = values.shape[-1]
        assert p_read_all is not None
        p_read = p_read_all.unsqueeze(-1)  # (K, L, B, Hi, 1)
        if d_read_all is not None:  # the loop's (mode "vector"), (L, K, B, Hi*dv)
            d_read = d_read_all.view(L, K, B, Hi, dv).transpose(0, 1)
        else:
            d_read = torch.bmm(d_gx_rows, wih_t).view(K, L, B, Hi, dv)
        d_values_all = (d_read * p_read).sum(0)  # (L, B, Hi, dv)
        q = torch.baddbmm(bq, h_in, wq).view(K, L, B, Hi, dk)
        d_s = d_s_all.unsqueeze(-1)  # (K, L, B, Hi, 1)
        d_keys_all = (d_s * q).sum(0)  # (L, B, Hi, dk)
        if mode == "projected":  # the query and input-to-gate weights were only used through the projections
            read = (p_read * values.unsqueeze(0)).reshape(K, L * B, Hi * dv)
            d_wih = torch.bmm(read.transpose(1, 2), d_gx_rows)
            d_bih = d_gx_rows.sum(1, keepdim=True)
            d_q = (d_s * keys.unsqueeze(0)).view(K, L * B, Hi * dk)
            d_wq = torch.bmm(h_in.transpose(1, 2), d_q)
            d_bq = d_q.sum(1, keepdim=True)
    return (
        None, d_keys_all, d_values_all, d_gates_all, dh, dc, None,
        d_wq, d_bq, d_wih, d_bih, d_whh, d_bhh, d_wqkv, d_wout, d_bout,
    )  # fmt: skip


def _backward_loop(
    ctx: Any, saved: tuple[Tensor | None, ...], d_outputs: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None
) -> tuple[Any, ...]:
    """The per-step part of :meth:`_RIMSequence.backward` in Python: the gradients of every step's per-unit products
    (written into per-sequence buffers ``(K, L, B, .)``) and of the state entering the sequence. The reference for
    the C++ transcription (``_native_backward``)."""
    cfg: _LoopConfig = ctx.cfg
    tape: _Tape = ctx.tape
    steps = tape.steps
    keys, values, wq, _, wih, whh, wqkv, wout = saved
    proj: _VectorProjections | None = ctx.proj
    K, L, B, H = tape.h_in.shape
    G = whh.shape[-1]
    Hi, dk = cfg.heads, cfg.key_size
    Hc, ck, cv = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
    lstm = cfg.cell == "lstm"
    mode = cfg.mode
    with_queries = mode in ("vector", "set")  # their gradient rows are [queries | recurrent gate inputs]
    dq = wq.shape[-1] if with_queries else 0
    like = tape.h_in[:, 0]
    new = like.new_empty
    dh = d_hn if d_hn is not None else torch.zeros_like(like)
    dc = (d_cn if d_cn is not None else torch.zeros_like(like)) if lstm else None
    zero = like.new_zeros(())
    scale = 1.0 / math.sqrt(ck)
    # Gradients of the per-unit products' outputs at every step, (K, L, B, .):
    # d_hz: [queries | recurrent gate inputs] (vector and set modes) or the recurrent gate inputs; d_gx: the input
    # side of the gates (the same tensor for an LSTM); d_s: the input-attention scores (N = 1).
    d_hz = new(K, L, B, dq + G)
    d_gh = d_hz[..., dq:]
    d_gx = d_gh if lstm else new(K, L, B, G)
    d_s_all = new(K, L, B, Hi) if mode in ("vector", "projected") else None
    d_pre_all = new(K, L, B, 2 * H) if cfg.communication else None
    d_qkv_all = new(K, L, B, Hc * (2 * ck + cv)) if cfg.communication else None
    # mode "vector": the gradient of what each unit read, (L, K, B, Hi*dv), kept for the values' gradient
    d_read_all = new(L, K, B, wih.shape[1]) if mode == "vector" else None
    w_h_t = (torch.cat([wq, whh], dim=-1) if with_queries else whh).transpose(1, 2)
    wih_t = wih.transpose(1, 2)
    d_keys, d_values = [], []  # set mode: per step, in reverse time order

    for t in reversed(range(L)):
        rec = steps[t]
        if d_outputs is not None:
            dh = dh + d_outputs[t]
        mf = rec["mf"]  # (K, B, 1), 1.0 for the active units

        # ---- 4. communication -------------------------------------------------------------------------------
        if cfg.communication:
            assert d_pre_all is not None and d_qkv_all is not None
            update, gate = rec["update"], rec["gate"]
            dh_active = dh * mf
            d_pre = d_pre_all[:, t]
            _tanh_backward_into(dh_active * gate, update, grad_input=d_pre[..., :H])
            _sigmoid_backward_into(dh_active * update, gate, grad_input=d_pre[..., H:])
            d_rc = torch.bmm(d_pre, wout.transpose(1, 2)).view(K, B * Hc, cv).transpose(0, 1)  # (B*Hc, K, cv)
            d_ac = torch.bmm(d_rc, rec["v2"].transpose(1, 2))  # (B*Hc, K queries, K keys)
            d_v2 = torch.bmm(rec["ac_read"].transpose(1, 2), d_rc)
            if "drop_c" in rec:
                d_ac = d_ac * rec["drop_c"]
            d_scores_t = torch._softmax_backward_data(d_ac.transpose(1, 2), rec["ac_t"], 1, d_ac.dtype)
            d_q2 = torch.baddbmm(zero, d_scores_t.transpose(1, 2), rec["k2"], beta=0.0, alpha=scale)
            d_k2 = torch.baddbmm(zero, d_scores_t, rec["q2"], beta=0.0, alpha=scale)
            d_qkv = d_qkv_all[:, t]
            d_qkv.view(K, B, Hc, -1).copy_(torch.cat([d_q2, d_k2, d_v2], dim=-1).view(B, Hc, K, -1).permute(2, 0, 1, 3))
            dh1 = torch.baddbmm(dh, d_qkv, wqkv.transpose(1, 2))  # residual + through q, k, v
        else:
            dh1 = dh

        # ---- 3. dynamics ---------------------------------------------------------------------------------
        dh1_active = dh1 * mf
        if lstm:
            assert dc is not None
            ifo, g, tanh_c = rec["ifo"], rec["g"], rec["tanh_c"]
            i, f, o = ifo.split(H, dim=-1)
            dc_active = dc * mf
            dc_new = _tanh_backward(dh1_active * o, tanh_c).add_(dc_active)
            d_gates = d_gh[:, t]
            _sigmoid_backward_into(dc_new * g, i, grad_input=d_gates[..., :H])
            _sigmoid_backward_into(dc_new * rec["c"], f, grad_input=d_gates[..., H : 2 * H])
            _sigmoid_backward_into(dh1_active * tanh_c, o, grad_input=d_gates[..., 2 * H : 3 * H])
            _tanh_backward_into(dc_new * i, g, grad_input=d_gates[..., 3 * H :])
            dc = torch.addcmul(dc - dc_active, dc_new, f)
            dh_prev = dh1 - dh1_active
        else:
            rz, n, gh_n = rec["rz"], rec["n"], rec["gh_n"]
            r, z = rz.split(H, dim=-1)
            dgx, dgh = d_gx[:, t], d_gh[:, t]
            d_n = _tanh_backward_into(
                torch.addcmul(dh1_active, dh1_active, z, value=-1.0), n, grad_input=dgx[..., 2 * H :]
            )
            _sigmoid_backward_into(d_n * gh_n, r, grad_input=dgx[..., :H])
            _sigmoid_backward_into(dh1_active * (rec["h"] - n), z, grad_input=dgx[..., H : 2 * H])
            dgh[..., : 2 * H].copy_(dgx[..., : 2 * H])
            torch.mul(d_n, r, out=dgh[..., 2 * H :])
            dh_prev = torch.addcmul(dh1 - dh1_active, dh1_active, z)

        # ---- 1. input attention -----------------------------------------------------------------------------
        # (dh_prev: the gradient through this step's uses of its state, not needed at the first step where the
        # state entering the sequence wants none)
        through_state = t > 0 or ctx.state_grad
        if mode == "projected":
            # Through the step-independent projections; their own gradients are formed after the loop.
            assert proj is not None and d_s_all is not None
            if through_state:
                dh_prev = torch.baddbmm(dh_prev, d_gh[:, t], w_h_t)
            d_p = torch.bmm(d_gx[:, t].reshape(K * B, 1, G), proj.gates[t].transpose(1, 2)).view(K, B, Hi)
            if "drop_in" in rec:
                d_p = d_p * rec["drop_in"]
            d_s = _sigmoid_backward_into(d_p, rec["p"], grad_input=d_s_all[:, t])  # (K, B, Hi), score gradients
            if through_state:
                dh_prev = torch.baddbmm(
                    dh_prev.view(K * B, 1, H), d_s.reshape(K * B, 1, Hi), proj.score_weight[t].transpose(1, 2)
                ).view(K, B, H)
        elif with_queries:
            kept = d_read_all[t] if d_read_all is not None else None
            d_read = torch.bmm(d_gx[:, t], wih_t, out=kept)  # (K, B, Hi*dv)
            d_q = d_hz[:, t, :, :dq].view(K, B, Hi, dk)
            if mode == "vector":
                assert d_s_all is not None
                d_p = (d_read.view(K, B, Hi, -1) * values[t]).sum(-1)  # (K, B, Hi)
                if "drop_in" in rec:
                    d_p = d_p * rec["drop_in"]
                d_s = _sigmoid_backward_into(d_p, rec["p"], grad_input=d_s_all[:, t])
                torch.mul(d_s.unsqueeze(-1), keys[t], out=d_q)
            else:
                a, a_read = rec["a"], rec["a_read"]  # (B, Hi, K, N+1), (B, Hi, K, N)
                d_read = d_read.view(K, B, Hi, -1).permute(1, 2, 0, 3)  # (B, Hi, K, dv)
                d_a = torch.matmul(d_read, values[t].transpose(-1, -2))  # (B, Hi, K, N)
                d_values.append(torch.matmul(a_read.transpose(-1, -2), d_read))  # (B, Hi, N, dv)
                if "drop_in" in rec:
                    d_a = d_a * rec["drop_in"]
                a_real = a[..., 1:]
                d_scores = a_real * (d_a - (d_a * a_real).sum(-1, keepdim=True))  # null column: no read
                q_b = rec["q"].permute(1, 2, 0, 3)  # (B, Hi, K, dk)
                d_q.copy_(torch.matmul(d_scores, keys[t].transpose(-1, -2)).permute(2, 0, 1, 3))
                d_keys.append(torch.matmul(q_b.transpose(-1, -2), d_scores))  # (B, Hi, dk, N)
            if through_state:
                dh_prev = torch.baddbmm(dh_prev, d_hz[:, t], w_h_t)  # through the queries and the gates
        elif through_state:
            dh_prev = torch.baddbmm(dh_prev, d_gh[:, t], w_h_t)

        if rec.get("reset"):
            dh_prev = dh_prev * ctx.keep[t]
            if dc is not None:
                dc = dc * ctx.keep[t]
        dh = dh_prev

    if not ctx.state_grad:
        dh = dc = None
    return dh, dc, d_hz, d_gx, d_s_all, d_pre_all, d_qkv_all, d_read_all, d_keys, d_values


# ====================================================================================================================
# The same loop in C++ (rims_rl/csrc/rim_loop.cpp)
# ====================================================================================================================
NATIVE_LOOP: bool | None = None
"""Whether the loop runs in C++ where it applies (input attention over a single vector, on any of its paths, with
or without attention dropout; not with the test-time ``dropped_units``): None (default) uses it when it builds, else
the Python loop after one warning; True requires it (a build failure raises); False never uses it. The environment
variable ``RIMS_RL_NATIVE=0`` makes the default False. The source is compiled once, on first use, by
:func:`torch.utils.cpp_extension.load` (a C++ compiler and ninja; ~50 s) and cached in a build directory of its own
(:func:`_build_directory`). The same results as the Python loop (the tests run every RIM test on both): with ATen
operators only, the same ops in the same order; on the CPU, with :data:`FUSED_KERNELS`, up to rounding. It saves the
interpreter's time between ~75 small ops per step, and on the CPU most of those ops. On the CPU it keeps its
per-sequence buffers of 1 MB or more (tape, outputs, gradients) between calls, up to 256 MB, and hands one out again
only once nothing holds it (:func:`release_buffers`)."""

FUSED_KERNELS: bool = os.environ.get("RIMS_RL_FUSED", "0") == "1"
"""Whether the C++ loop, on the CPU, runs the element-wise parts of a step (input attention, selection, the cell's
arithmetic, the communication attention among units, the gated residual) and their backward as fused kernels, one plain
loop each (``csrc/rim_loop.cpp``), rather than as ATen operators: per step of a sequence, ~9 kernels forward and ~8
backward instead of ~44 and ~40 (``scripts/benchmark_core.py``); and the per-step weight products (up to 256 samples, or
small weights) in a product of its own (``unit_mm``), which reads the weights two to three times as fast as ATen's
``bmm`` at 2 samples and takes 0.8-0.95x its time at 64 to 256, and for the gates, the residual and their gradients
computes only the active units' rows (the inactive units' are never read, or zero: the same numbers, bit for bit). Same
formulas, so the same values up to rounding (sums in another order; ``std::exp`` in the input attention's sigmoids and a
vectorised Cephes exp in the softmax among units and the LSTM cell's and residual's activations, against ATen's
vectorised ones); the tests bound the difference. Opt-in (the environment variable ``RIMS_RL_FUSED=1`` makes the default
True, for the ``rims-rl`` command). PPO follows the different rounding to a different run of the same seed, and across
seeds shows no harm (BabyAI, RIM, seeds 0-5: 4 of 6 reach 0.5 success within 250k steps either way, for each version of
the kernels; README, "The C++ loop"), but the default keeps the ATen operators' numbers, with which every documented
result and learning test was made. Other devices always take the ATen operators (each one kernel launch on a GPU), as
does the CPU while this is False."""

_native_state: dict[str, Any] = {}


def release_buffers() -> None:
    """Frees the per-sequence buffers the C++ loop keeps between calls on the CPU (``BufferPool`` in
    ``csrc/rim_loop.cpp``: buffers of 1 MB or more, up to 256 MB, each handed out again only once nothing holds it).
    glibc's malloc would otherwise give those blocks back to the system after each call and fault them in again page
    by page (without :mod:`rims_rl.allocator`'s setting: ~25,000 page faults, a fifth of a 128-step call's time at
    batch 8). Buffers still in use (outputs a caller keeps, a tape awaiting its backward) stay with their users."""
    module = _native_state.get("module")
    if module is not None:
        module.release_buffers()


def _cflags() -> tuple[str, ...]:
    """The C++ loop's compiler flags: ``-O3``; ``-fopenmp-simd`` for the fused kernels' ``omp simd`` loops (no
    OpenMP runtime); ``-fno-trapping-math``, without which GCC does not vectorise a loop whose float comparisons
    (the clamps of the kernels' ``exp``) it would have to turn into selects (nothing here reads floating-point
    exception flags; no value changes); AVX2 with FMA where torch itself runs AVX2 or AVX-512 kernels on this CPU;
    and where it runs AVX-512, AVX-512's 32 vector registers, with vectors kept at 256 bits
    (``-mprefer-vector-width=256``: the same loops, sums and numbers as the AVX2 build; the registers let the
    per-unit product hold 8 rows' sums by 3 vectors of columns, ``kRowBlock`` in ``csrc/rim_loop.cpp``). The build
    folder's key includes the flags, so a machine without them builds its own."""
    flags = ("-O3", "-fopenmp-simd", "-fno-trapping-math")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ("-mavx2", "-mfma")
    if capability == "AVX512":
        flags += ("-mavx512f", "-mavx512vl", "-mprefer-vector-width=256")
    return flags


def _native() -> Any | None:
    """The compiled loop, or None where it is not to be used or cannot be built (see :data:`NATIVE_LOOP`)."""
    wanted = NATIVE_LOOP if NATIVE_LOOP is not None else os.environ.get("RIMS_RL_NATIVE", "1") != "0"
    if not wanted:
        return None
    if "module" in _native_state:
        return _native_state["module"]
    if "error" not in _native_state:
        source = Path(__file__).with_name("csrc") / "rim_loop.cpp"
        notice = threading.Timer(
            2.0, lambda: print("rims_rl: compiling the RIM's C++ loop (once; cached afterwards)...", flush=True)
        )
        notice.daemon = True
        notice.start()
        try:
            from torch.utils import cpp_extension

            _put_ninja_on_path()
            build = _build_directory(source)
            with _build_lock(build):
                _native_state["module"] = cpp_extension.load(
                    "rims_rl_rim_loop",
                    [str(source)],
                    extra_cflags=list(_cflags()),
                    build_directory=str(build),
                    verbose=False,
                )
            return _native_state["module"]
        except Exception as exc:  # no compiler, no ninja, no headers: the Python loop computes the same
            lines = str(exc).strip().splitlines()
            _native_state["error"] = f"{type(exc).__name__}: {lines[-1] if lines else ''}"

            warnings.warn(
                f"rims_rl: could not build the RIM's C++ loop ({_native_state['error']}); using the Python loop "
                "(same results, slower). Set RIMS_RL_NATIVE=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
        finally:
            notice.cancel()
    if NATIVE_LOOP:
        raise RuntimeError(
            f"rims_rl.rim_fast.NATIVE_LOOP is True but the C++ loop could not be built: {_native_state['error']}"
        )
    return None


def _build_directory(source: Path) -> Path:
    """Where the C++ loop is built: ``<root>/rims_rl/rim_loop-<key>``, the root being ``TORCH_EXTENSIONS_DIR`` or
    torch's per-user cache (``~/.cache/torch_extensions``). The key hashes what the build depends on: the source
    (its text and its path, which the build file records), the compiler flags, the Python environment
    (``sys.prefix``: its torch headers) and the torch and CUDA versions. So two checkouts or virtual environments
    on one machine each keep their build, instead of rewriting torch's one shared ``rims_rl_rim_loop`` folder and
    rebuilding after each other; an edit of the source builds in a new folder (the old ones stay, ~1 MB each)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    root_dir = Path(root) if root else Path(get_default_build_root())
    key = hashlib.sha256()
    for part in (
        str(source.resolve()),
        sys.prefix,
        torch.__version__,
        str(torch.version.cuda),
        sys.version,
        *_cflags(),
    ):
        key.update(part.encode() + b"\0")
    key.update(source.read_bytes())
    build = root_dir / "rims_rl" / f"rim_loop-{key.hexdigest()[:16]}"
    build.mkdir(parents=True, exist_ok=True)
    return build


@contextlib.contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``build/build.flock`` around torch's load, so only one process builds at a
    time, and clear torch's own ``lock`` file left by a process killed while it compiled. torch marks a build in
    progress by creating ``lock`` and waits, forever, while it exists; a ``kill -9`` mid-compile leaves it, and
    every later process hung in ``cpp_extension.load``. The ``flock`` is released by the kernel when its holder
    dies, so a ``lock`` file found while holding it belongs to no live rims_rl build and is removed (with a
    warning). Where ``fcntl`` is missing (Windows), torch's lock alone is used."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(build / "build.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build / "lock"
            if stale.exists():
                warnings.warn(
                    f"rims_rl: removing {stale}, left by a build of the RIM's C++ loop that was killed",
                    RuntimeWarning,
                    stacklevel=4,
                )
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the one pip installed with the project is in the environment's
    ``bin``, which is not on PATH when its scripts are run without activating it (``.venv/bin/rims-rl``)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # the PyPI package: its binary's directory
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


class _NativeTape(NamedTuple):
    """What the C++ forward keeps for the backward (see rim_loop.cpp; empty tensors where a part is absent)."""

    h_in: Tensor  # (K, L, B, H), the state entering each step (after resets)
    read: Tensor  # (K, L, B, Hi*dv), what each unit read
    h1: Tensor  # (K, L, B, H), the state entering communication
    rc: Tensor  # (K, L, B, Hc*cv), what each unit read from the others
    c_in: Tensor  # (L, K, B, H), the LSTM cell state entering each step
    mf: Tensor  # (L, K, B, 1), 1.0 for the active units
    act: Tensor  # (L, K, B, G), the gate activations
    aux: Tensor  # (L, K, B, H), LSTM: tanh(c); GRU: W_hn h + b_hn
    p: Tensor  # (L, K, B, Hi), attention on the input per head
    qkv: Tensor  # (L, K, B, Hc*(2ck+cv)), communication queries, keys and values
    ac: Tensor  # (L, B*Hc, K, K), communication attention, key-major
    ug: Tensor  # (L, K, B, 2H), communication update and gate


def _native_forward(
    cfg: _LoopConfig,
    keys: Tensor,
    values: Tensor,
    h: Tensor,
    c: Tensor | None,
    keep: Tensor | None,
    weights: tuple[Tensor | None, ...],
    record: bool,
    proj: _VectorProjections | None = None,
    threads: int = 0,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, _NativeTape | None]:
    """:func:`_run_loop` in C++ for modes "vector" and "projected" (with ``proj``): outputs ``(L, K, B, H)``,
    ``h_n``, ``c_n``, masks ``(L, K, B)``, attention on the input ``(L, K, B)`` and, with ``record``, the tape."""
    L = keys.shape[0]
    lstm = cfg.cell == "lstm"
    reset_steps = (keep != 1).flatten(1).any(1).tolist() if keep is not None else [False] * L
    out = _native().forward(  # type: ignore[union-attr]
        keys, values, h, c, keep, reset_steps, *(cfg.start_states or (None, None)), *weights,
        *(proj[:] if proj is not None else (None,) * 4), *cfg.dropout,
        cfg.k_active, cfg.comm_heads, cfg.comm_key_size,
        cfg.comm_value_size, lstm, cfg.communication, record, L > 1, FUSED_KERNELS,
        threads,
    )  # fmt: skip
    outputs, h_n, c_n, masks, attention = out[:5]
    return outputs, h_n, c_n if lstm else None, masks, attention, _NativeTape(*out[5:]) if record else None


def _native_backward(
    ctx: Any,
    saved: tuple[Tensor | None, ...],
    d_outputs: Tensor | None,
    d_hn: Tensor | None,
    d_cn: Tensor | None,
    threads: int = 0,
) -> tuple[Any, ...]:
    """:func:`_backward_loop` in C++: ``dh_0``, ``dc_0`` and the per-sequence gradient buffers."""
    cfg: _LoopConfig = ctx.cfg
    tape: _NativeTape = ctx.tape
    keys, values, wq, _, wih, whh, wqkv, wout = saved
    L = keys.shape[0]
    keep = ctx.keep
    proj: _VectorProjections | None = ctx.proj
    reset_steps = (keep != 1).flatten(1).any(1).tolist() if keep is not None else [False] * L
    lstm = cfg.cell == "lstm"
    dh, dc, d_hz, d_gx, d_s, d_pre, d_qkv, d_read = _native().backward(  # type: ignore[union-attr]
        d_outputs, d_hn, d_cn, keys, values, keep, reset_steps, tape.h_in, tape.c_in, tape.mf, tape.act, tape.aux,
        tape.p, tape.qkv, tape.ac, tape.ug, wq, wih, whh, wqkv, wout,
        proj.score_weight if proj is not None else None, proj.gates if proj is not None else None,
        *cfg.dropout, cfg.comm_heads, cfg.comm_key_size,
        cfg.comm_value_size, lstm, cfg.communication, FUSED_KERNELS, ctx.state_grad,
        threads,
    )  # fmt: skip
    communication = cfg.communication
    state_grad = ctx.state_grad
    return (
        dh if state_grad else None, dc if lstm and state_grad else None, d_hz, None if lstm else d_gx, d_s,
        d_pre if communication else None, d_qkv if communication else None, None if proj is not None else d_read,
    )  # fmt: skip


# ====================================================================================================================
# Several RIMs at once (an actor's and a critic's): their C++ loops on two threads
# ====================================================================================================================
PARALLEL_LOOPS: bool = False
"""Whether :func:`run_together` runs the loops at once on two threads (each loop's operators then on one thread,
one loop per core) rather than one after the other (each on torch's threads). Off by default: with the fused CPU
kernels, RecurrentPPO on 2 cores measured parallel / one after the other 0.90 on DemonAttack and 0.98 on
CartPoleNoVel (``configs/``' settings; medians of the paired ratios of 6 and 8 repeats in alternating order, one
process); it paid (1.2-1.6x) while each step was ~100 ATen operators with the interpreter between them."""

_pool_state: dict[str, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    if "pool" not in _pool_state:
        _pool_state["pool"] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rims_rl")
    return _pool_state["pool"]


Call = (
    tuple[RIM, Tensor, tuple[Tensor, Tensor] | None, Tensor | None]
    | tuple[RIM, Tensor, tuple[Tensor, Tensor] | None, Tensor | None, tuple[Tensor, Tensor] | None]
)
"""``(rim, input, state, episode_starts)``, or with ``start_states`` after them: the arguments of one RIM call."""


def run_together(calls: Sequence[Call]) -> list[Result]:
    """``[rim(*args) for rim, *args in calls]`` (``args``: ``input, state, episode_starts`` and optionally
    ``start_states``), with the same results. With :data:`PARALLEL_LOOPS` (off by default: see there), the RIMs'
    loops run at once on two threads, forward and backward, where every one of them takes the C++ loop (which
    runs without the GIL) and torch may use more than one thread (``torch.get_num_threads()``), each loop's
    operators on one thread; otherwise the calls run one after the other."""
    prepared = [_prepare(*call) for call in calls]
    parallel = PARALLEL_LOOPS and len(prepared) > 1 and torch.get_num_threads() > 1
    if not parallel or not all(c.cfg.native for c in prepared):
        return [_run(rim, c) for (rim, *_), c in zip(calls, prepared, strict=False)]
    if torch.is_grad_enabled():
        flat: list[Any] = []
        for c in prepared:
            flat += [c.cfg, c.keys, c.values, c.h0, c.c0, c.keep, *c.weights]
        out = _RIMSequences.apply(len(prepared), *flat)
        loops = [out[5 * i : 5 * i + 5] for i in range(len(prepared))]
    else:
        futures = [
            _pool().submit(
                _native_forward, c.cfg, c.keys, c.values, c.h0, c.c0, c.keep, c.weights, False, _projections(c), 1
            )
            for c in prepared
        ]
        loops = [f.result()[:5] for f in futures]
    return [_finish(rim, c, *loop) for (rim, *_), c, loop in zip(calls, prepared, loops, strict=False)]


_ITEM = 15  # what _RIMSequences takes per sequence: cfg, keys, values, h0, c0, keep and the 9 weights


class _RIMSequences(torch.autograd.Function):
    """Several :class:`_RIMSequence` calls on the C++ loop as one autograd node, so their loops run at once on two
    threads in the backward pass too (the autograd engine runs a CPU graph's nodes one at a time). Each sequence's
    gradients are those of :class:`_RIMSequence` (:func:`_sequence_backward`)."""

    @staticmethod
    def forward(ctx, n, *flat):  # type: ignore[override]
        items = [flat[i * _ITEM : (i + 1) * _ITEM] for i in range(n)]
        projs, futures = [], []
        for cfg, keys, values, h0, c0, keep, *weights in items:
            proj = (
                _vector_projections(keys, values, tuple(weights), _by_head(cfg, keys))
                if cfg.mode == "projected"
                else None
            )
            projs.append(proj)
            futures.append(
                _pool().submit(_native_forward, cfg, keys, values, h0, c0, keep, tuple(weights), True, proj, 1)
            )
        ctx.subs, outs, fixed = [], [], []
        for i, ((cfg, keys, values, _, _, keep, *weights), proj, future) in enumerate(
            zip(items, projs, futures, strict=False)
        ):
            outputs, h_n, c_n, masks, attention, tape = future.result()
            wq, bq, wih, _, whh, _, wqkv, wout, _ = weights
            # (inputs kept on the context rather than with save_for_backward, which takes one node's worth)
            saved = (keys, values, wq, bq, wih, whh, wqkv, wout)
            state_grad = any(ctx.needs_input_grad[1 + i * _ITEM + j] for j in (3, 4))  # h0, c0
            ctx.subs.append(
                SimpleNamespace(cfg=cfg, tape=tape, keep=keep, proj=proj, saved=saved, state_grad=state_grad)
            )
            outs += [outputs, h_n, c_n, masks, attention]
            fixed += [masks, attention]
        ctx.mark_non_differentiable(*fixed)
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        subs = ctx.subs
        futures = [
            _pool().submit(_native_backward, sub, sub.saved, *grads[5 * i : 5 * i + 3], 1) for i, sub in enumerate(subs)
        ]
        result: list[Tensor | None] = [None]  # n
        for i, (sub, future) in enumerate(zip(subs, futures, strict=False)):
            g = _sequence_backward(sub, sub.saved, *grads[5 * i : 5 * i + 3], loop_grads=future.result())
            result += [g[0], g[1], g[2], g[4], g[5], g[6], *g[7:]]  # _RIMSequence's, less its gates_x (index 3)
        return tuple(result)
