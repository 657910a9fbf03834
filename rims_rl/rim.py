"""Recurrent Independent Mechanisms (Goyal, Lamb et al., ICLR 2021, §2), in pure PyTorch.

One :class:`RIM` call runs a whole sequence. What does not depend on the recurrent state (the input keys and values;
with input attention off, the whole input side of the dynamics; for a single input vector and a few long sequences,
the products of keys with the query weights and of values with the input-to-gate weights) is computed once for all
steps; the per-step loop only does what depends on the state. All per-unit weights carry a leading unit axis and are
applied with batched matmuls over it: there is no Python loop over units. Under autograd the loop is a single node
with a hand-written backward through time (:class:`_RIMSequence`), which computes each weight gradient once from all
steps.

This module imports only torch: it can be used outside reinforcement learning.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["RIM", "RIMInfo"]

_CELLS = ("lstm", "gru")


class RIMInfo(NamedTuple):
    """What a :class:`RIM` call computed at every step, detached from the graph (for logging and analysis).

    :param activation_mask: ``(L, B, K)`` bool, True for the ``k_active`` units that won the input competition
        (§2.3) and were updated at that step.
    :param input_attention: ``(L, B, K, N+1)`` float, each unit's softmax attention over the input set averaged
        over heads; column 0 is the null element, so ``input_attention[..., 0]`` is the null attention that
        decides the winners (least null attention wins).
    """

    activation_mask: Tensor
    input_attention: Tensor

    @property
    def null_attention(self) -> Tensor:
        """``(L, B, K)`` attention on the null element, averaged over heads."""
        return self.input_attention[..., 0]


def _uniform_(tensor: Tensor, bound: float) -> Tensor:
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class RIM(nn.Module):
    r"""Recurrent Independent Mechanisms: ``num_units`` small recurrent cells that compete to read their input.

    At every step (paper §2):

    1. **Input attention** (§2.2-2.3, eq. 3-4). A null element of zeros is prepended to the input set. Keys and
       values come from shared projections without bias, so the null key and value are exactly zero. Each unit
       computes its own queries from its hidden state (per-unit weights), and attends over the ``N + 1`` elements
       with ``input_heads`` heads.
    2. **Selection** (§2.3). The ``k_active`` units with the *least* softmax attention on the null element,
       averaged over heads, are active. Exactly ``k_active`` units win per sample.
    3. **Independent dynamics** (§2.1, eq. 1-2). Active units update their own LSTM or GRU (per-unit weights) on
       what they read; inactive units keep ``h`` and ``c`` bit-for-bit. Gradient still flows through the kept
       state (nothing is detached).
    4. **Communication** (§2.4, eq. 5-8). Active units read every unit (active or not) with multi-head
       attention (per-unit query/key/value weights) and add the gated result to their state (residual
       connection); inactive units are unchanged.

    Defaults follow the paper's Table 3: input keys 64 per head, input values 4 x ``unit_size`` (all heads
    together), 4 input heads, communication keys and values 32 per head, 4 communication heads, attention dropout
    0.1.

    Choices the paper leaves open, documented here:

    * The input key and value projections are shared by all units (eq. 4 gives only the query a unit index);
      queries, dynamics and communication weights are per unit.
    * Queries have a per-unit bias. Without it every unit would attend uniformly from a zero state (the start of
      every episode), all null attentions would tie, and the winners would be decided by the order of the units.
    * ``input_value_size`` is what one unit reads, all heads together (each head reads
      ``input_value_size // input_heads``); it is the input size of each unit's cell.
    * Communication concatenates the heads and maps them back to ``unit_size`` with per-unit weights, through
      a gate and a squashing, ``h + sigmoid(W_g r) * tanh(W_o r)``, as in the authors' code. Eq. 8's plain
      residual is unbounded: units read each other's states, residuals included, so over a long episode the
      states can grow geometrically (we saw ``|h| ~ 1e14`` after a few hundred CartPole steps, then NaN).
    * ``input_attention=False`` (the §4.4 ablation "no input attention") makes every unit read the mean of the
      input values and keeps every unit active at every step, so all units communicate at all steps, as in
      Appendix C.13.2.

    Args:
        input_size: ``D``, the size of each element of the input set.
        num_units: ``K``, the number of RIMs.
        unit_size: ``H``, the hidden size of each RIM.
        k_active: ``k_A``, how many units are active per step, ``1 <= k_active <= num_units``.
        cell: ``"lstm"`` or ``"gru"``, the dynamics of each unit.
        input_key_size: query/key size per input-attention head.
        input_value_size: size of what each unit reads from the input (all heads); default ``4 * unit_size``.
        input_heads: number of input-attention heads; must divide ``input_value_size``.
        comm_key_size: query/key size per communication head.
        comm_value_size: value size per communication head.
        comm_heads: number of communication heads.
        dropout: dropout on the attention weights (input and communication), active in training mode only.
            The selection of active units is made before dropout, so it is the same in train and eval mode.
        input_attention: if False, no input competition (see above).
        communication: if False, units never read each other.

    Inputs: ``input``, ``state``, ``episode_starts``
        * **input**: ``(L, B, N, D)``, a sequence of input sets of ``N`` elements, or ``(L, B, D)`` for a single
          vector per step (``N = 1``).
        * **state**: optional pair ``(h_0, c_0)``, each ``(B, K * H)``; zeros if omitted. Unit ``k`` owns
          columns ``k * H : (k + 1) * H``. For ``cell="gru"`` the cell state is unused (``c_n`` is zeros).
        * **episode_starts**: optional ``(L, B)``; where non-zero, the state of that sample is reset to zero
          before the step (the convention of sb3-contrib's recurrent policies).

    Outputs: ``output``, ``(h_n, c_n)``, ``info``
        * **output**: ``(L, B, K * H)``, the hidden state of all units after each step.
        * **h_n**, **c_n**: ``(B, K * H)``, the state after the last step.
        * **info**: :class:`RIMInfo` with the activation mask ``(L, B, K)`` and the input attention
          ``(L, B, K, N + 1)`` of every step.

    Attributes (as :class:`torch.nn.LSTM`, so code written for it can size its buffers): ``input_size``,
    ``hidden_size = K * H``, ``num_layers = 1``.
    """

    def __init__(
        self,
        input_size: int,
        num_units: int = 6,
        unit_size: int = 100,
        k_active: int = 4,
        cell: str = "lstm",
        input_key_size: int = 64,
        input_value_size: int | None = None,
        input_heads: int = 4,
        comm_key_size: int = 32,
        comm_value_size: int = 32,
        comm_heads: int = 4,
        dropout: float = 0.1,
        input_attention: bool = True,
        communication: bool = True,
    ) -> None:
        super().__init__()
        if input_value_size is None:
            input_value_size = 4 * unit_size
        for name, value in (
            ("input_size", input_size),
            ("num_units", num_units),
            ("unit_size", unit_size),
            ("input_key_size", input_key_size),
            ("input_value_size", input_value_size),
            ("input_heads", input_heads),
            ("comm_key_size", comm_key_size),
            ("comm_value_size", comm_value_size),
            ("comm_heads", comm_heads),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(k_active, bool) or not isinstance(k_active, int) or not 1 <= k_active <= num_units:
            raise ValueError(f"k_active must be an integer in [1, num_units={num_units}], got {k_active!r}")
        if cell not in _CELLS:
            raise ValueError(f"cell must be one of {', '.join(_CELLS)}, got {cell!r}")
        if input_value_size % input_heads:
            raise ValueError(
                f"input_heads={input_heads} must divide input_value_size={input_value_size} "
                "(each head reads an equal share of the value)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        self.input_size = input_size
        self.num_units = num_units
        self.unit_size = unit_size
        self.k_active = k_active
        self.cell = cell
        self.input_key_size = input_key_size
        self.input_value_size = input_value_size
        self.input_heads = input_heads
        self.comm_key_size = comm_key_size
        self.comm_value_size = comm_value_size
        self.comm_heads = comm_heads
        self.dropout = float(dropout)
        self.input_attention = bool(input_attention)
        self.communication = bool(communication)
        self.dropped_units: tuple[int, ...] = ()
        """Units removed at test time (ablation, §4.4): never active, state held at zero. Set it directly (indices
        in ``[0, num_units)``); only runs without gradient (``torch.no_grad()``), e.g. in evaluation."""
        # nn.LSTM-compatible sizes (sb3-contrib sizes its state buffers from these).
        self.hidden_size = num_units * unit_size
        self.num_layers = 1

        K, H = num_units, unit_size
        n_gates = 4 if cell == "lstm" else 3

        # §2.3 eq. 4: shared key/value projections, no bias -> the null element's key and value are exactly zero.
        self.input_value = nn.Linear(input_size, input_value_size, bias=False)
        if self.input_attention:
            self.input_key: nn.Linear | None = nn.Linear(input_size, input_heads * input_key_size, bias=False)
            # Per-unit queries W_k^q (with a per-unit bias, see the class docstring).
            self.query_weight = nn.Parameter(torch.empty(K, H, input_heads * input_key_size))
            self.query_bias = nn.Parameter(torch.empty(K, 1, input_heads * input_key_size))
        else:
            self.input_key = None
            self.register_parameter("query_weight", None)
            self.register_parameter("query_bias", None)

        # §2.1: per-unit LSTM/GRU. Gate order: LSTM (i, f, o, g); GRU (r, z, n).
        self.weight_ih = nn.Parameter(torch.empty(K, input_value_size, n_gates * H))
        self.weight_hh = nn.Parameter(torch.empty(K, H, n_gates * H))
        self.bias_ih = nn.Parameter(torch.empty(K, 1, n_gates * H))
        # GRU needs the recurrent bias apart (it sits inside r * (W_hn h + b_hn)); LSTM folds it into bias_ih.
        self.bias_hh = nn.Parameter(torch.empty(K, 1, n_gates * H)) if cell == "gru" else None

        # §2.4 eq. 5-8: per-unit communication query/key/value, and the per-unit output projection.
        if self.communication:
            self.comm_qkv = nn.Parameter(torch.empty(K, H, comm_heads * (2 * comm_key_size + comm_value_size)))
            # Output and gate projections together: (K, heads * value, 2H), columns [output | gate].
            self.comm_out = nn.Parameter(torch.empty(K, comm_heads * comm_value_size, 2 * H))
            self.comm_out_bias = nn.Parameter(torch.empty(K, 1, 2 * H))
        else:
            self.register_parameter("comm_qkv", None)
            self.register_parameter("comm_out", None)
            self.register_parameter("comm_out_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.LSTM``/``nn.Linear`` (uniform in +-1/sqrt(fan_in)), each unit drawn independently,
        with the LSTM forget-gate bias at 1 (Jozefowicz et al., 2015)."""
        H = self.unit_size
        self.input_value.reset_parameters()
        if self.input_key is not None:
            self.input_key.reset_parameters()
            _uniform_(self.query_weight, 1.0 / math.sqrt(H))
            _uniform_(self.query_bias, 1.0 / math.sqrt(H))
        _uniform_(self.weight_ih, 1.0 / math.sqrt(H))
        _uniform_(self.weight_hh, 1.0 / math.sqrt(H))
        if self.cell == "lstm":
            with torch.no_grad():
                self.bias_ih.zero_()
                self.bias_ih[..., H : 2 * H] = 1.0  # forget gate
        else:
            _uniform_(self.bias_ih, 1.0 / math.sqrt(H))
            assert self.bias_hh is not None
            _uniform_(self.bias_hh, 1.0 / math.sqrt(H))
        if self.comm_qkv is not None and self.comm_out is not None:
            _uniform_(self.comm_qkv, 1.0 / math.sqrt(H))
            _uniform_(self.comm_out, 1.0 / math.sqrt(self.comm_heads * self.comm_value_size))
            _uniform_(self.comm_out_bias, 1.0 / math.sqrt(self.comm_heads * self.comm_value_size))

    def extra_repr(self) -> str:
        s = (
            f"{self.input_size}, num_units={self.num_units}, unit_size={self.unit_size}, k_active={self.k_active}, "
            f"cell={self.cell!r}, input_heads={self.input_heads}, comm_heads={self.comm_heads}, dropout={self.dropout}"
        )
        if not self.input_attention:
            s += ", input_attention=False"
        if not self.communication:
            s += ", communication=False"
        if self.dropped_units:
            s += f", dropped_units={self.dropped_units}"
        return s

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Zero state ``(h_0, c_0)``, each ``(batch_size, K * H)``."""
        device = device if device is not None else self.weight_hh.device
        h = torch.zeros(batch_size, self.hidden_size, device=device, dtype=self.weight_hh.dtype)
        return h, torch.zeros_like(h)

    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input: Tensor,
        state: tuple[Tensor, Tensor] | None = None,
        episode_starts: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], RIMInfo]:
        x = input
        if x.dim() == 3:
            x = x.unsqueeze(2)
        if x.dim() != 4 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"input must have shape (L, B, D) or (L, B, N, D) with D={self.input_size}, got {tuple(input.shape)}"
            )
        L, B, N, _ = x.shape
        K, H = self.num_units, self.unit_size
        if state is None:
            h0, c0 = self.initial_state(B, x.device)
        else:
            h0, c0 = state
            if h0.shape != (B, K * H) or c0.shape != (B, K * H):
                raise ValueError(
                    f"state must be a pair of (B, K*H) = ({B}, {K * H}) tensors, "
                    f"got {tuple(h0.shape)} and {tuple(c0.shape)}"
                )
        # Unit-major layout (K, B, H) inside the loop, so per-unit weights apply with one bmm.
        h0 = h0.reshape(B, K, H).transpose(0, 1)
        c0 = c0.reshape(B, K, H).transpose(0, 1) if self.cell == "lstm" else None

        keep = None
        if episode_starts is not None:
            keep = (1.0 - episode_starts.reshape(L, B).to(x.dtype)).view(L, 1, B, 1)

        # ---- Step-independent work, once for the whole sequence (§2.3: keys and values of the input set) -----
        Hi, dk = self.input_heads, self.input_key_size
        dv = self.input_value_size // Hi
        values = self.input_value(x)  # (L, B, N, Hi*dv); the null element's value is zero and is left out
        keys = gates_x = None
        mode = "none" if not self.input_attention else ("vector" if N == 1 else "set")
        if mode == "none":
            # Every unit reads the mean of the input values (uniform attention over the real elements); the read
            # does not depend on the state, so the input side of the dynamics is computed for all steps at once.
            gates_x = torch.einsum("lbv,kvg->lkbg", values.mean(dim=2), self.weight_ih) + self.bias_ih
            values = None
        else:
            assert self.input_key is not None
            keys = self.input_key(x) * (1.0 / math.sqrt(dk))
            if mode == "vector":
                keys, values = keys.view(L, B, Hi, dk), values.view(L, B, Hi, dv)
            else:
                keys = keys.view(L, B, N, Hi, dk).permute(0, 1, 3, 4, 2)  # (L, B, Hi, dk, N)
                values = values.view(L, B, N, Hi, dv).transpose(2, 3)  # (L, B, Hi, N, dv)

        loop_mode = mode
        if mode == "vector" and _project_vector_input(L, B, H, dk, dv, self.weight_ih.shape[-1]):
            loop_mode = "projected"
        dropped = tuple(sorted(set(self.dropped_units)))
        if dropped:
            if any(not 0 <= j < K for j in dropped):
                raise ValueError(f"dropped_units must be unit indices in [0, {K}), got {self.dropped_units}")
            if torch.is_grad_enabled():
                raise ValueError("dropped_units is a test-time ablation: run the RIM under torch.no_grad()")
        cfg = _LoopConfig(
            mode=loop_mode, cell=self.cell, k_active=self.k_active, dropout=self.dropout if self.training else 0.0,
            heads=Hi, key_size=dk, comm_heads=self.comm_heads, comm_key_size=self.comm_key_size,
            comm_value_size=self.comm_value_size, communication=self.communication, dropped=dropped,
        )  # fmt: skip
        weights = (
            self.query_weight, self.query_bias, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh,
            self.comm_qkv, self.comm_out, self.comm_out_bias,
        )  # fmt: skip
        if torch.is_grad_enabled():
            outputs, h_n, c_n, masks, attention = _RIMSequence.apply(cfg, keys, values, gates_x, h0, c0, keep, *weights)
        else:
            outputs, h_n, c_n, masks, attention, _ = _run_loop(cfg, keys, values, gates_x, h0, c0, keep, weights)

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
        info = RIMInfo(activation_mask=masks.transpose(1, 2), input_attention=input_attention)
        return output, (h_n, c_n), info


# ====================================================================================================================
# The sequence loop and its hand-written backward (back-propagation through time)
# ====================================================================================================================
class _LoopConfig(NamedTuple):
    mode: str  # "vector" (N = 1), "projected" (N = 1 via _VectorProjections), "set" (N > 1), "none" (no input attn)
    cell: str
    k_active: int
    dropout: float  # 0 in eval mode
    heads: int
    key_size: int
    comm_heads: int
    comm_key_size: int
    comm_value_size: int
    communication: bool
    dropped: tuple[int, ...] = ()  # test-time ablation (no-grad path only): never active, state zero


def _dropout_mask(like: Tensor, p: float) -> Tensor:
    return torch.empty_like(like).bernoulli_(1.0 - p).div_(1.0 - p)


class _VectorProjections(NamedTuple):
    """Input attention over a single input vector (N = 1), with the step-independent work done for all steps.

    With one element per head, unit ``k``'s score for head ``h`` is ``q_kh . key_h`` with ``q = h_k W_q + b_q``,
    which is ``h_k (W_q,h key_h) + b_q,h . key_h``; and what it feeds its gates is ``sum_h p_kh value_h W_ih,h``.
    ``W_q,h key_h`` and ``value_h W_ih,h`` do not depend on the state, so they are computed for all steps in one
    batched product each; a step is then two small products (a unit's state against its ``Hi`` score columns, its
    ``Hi`` attention weights against its ``Hi`` gate rows) instead of reading the full query and input-to-gate
    weights (``K x 4H x 4H`` floats at the paper's sizes) once per step. Same function, summed in another order.
    """

    score_weight: Tensor  # (L, K*B, H, Hi): W_q,h key_h per unit, sample and head
    score_bias: Tensor  # (L, K*B, 1, Hi): b_q,h . key_h
    gates: Tensor  # (L, K*B, Hi, G): value_h W_ih,h, G = n_gates * H
    gate_bias: Tensor  # (K*B, 1, G): b_ih for every sample


PROJECT_VECTOR_INPUT: bool | None = None
"""Whether a single input vector (N = 1) goes through :class:`_VectorProjections`: None (default) decides by the
sizes (:func:`_project_vector_input`); True or False forces it (tests check both ways against the reference)."""


def _project_vector_input(L: int, B: int, H: int, dk: int, dv: int, G: int) -> bool:
    """The projected path computes as many products as the per-step one, in one batched product instead of one per
    step; it pays when the per-step weights it stops reading (``dv x G`` and ``H x dk`` per head and unit) are large
    against what it reads instead (``B x (G + H)``): long sequences of few samples, as PPO minibatches of a few
    128-step sequences on Atari (measured 1.17x at B = 2, 1.05x at B = 4, 0.93x at B = 8 for the Atari sizes)."""
    if PROJECT_VECTOR_INPUT is not None:
        return PROJECT_VECTOR_INPUT
    return L > 1 and dv * G + H * dk >= 24 * B * (G + H)


def _vector_projections(keys: Tensor, values: Tensor, weights: tuple[Tensor | None, ...]) -> _VectorProjections:
    wq, bq, wih, bih = weights[:4]
    assert wq is not None and bq is not None and wih is not None and bih is not None
    L, B, Hi, dk = keys.shape
    dv = values.shape[-1]
    K, H, _ = wq.shape
    G = wih.shape[-1]
    score_weight = torch.einsum("kdhe,lbhe->lkbdh", wq.view(K, H, Hi, dk), keys).reshape(L, K * B, H, Hi)
    score_bias = torch.einsum("khe,lbhe->lkbh", bq.view(K, Hi, dk), keys).reshape(L, K * B, 1, Hi)
    gates = torch.einsum("lbhv,khvg->lkbhg", values, wih.view(K, Hi, dv, G)).reshape(L, K * B, Hi, G)
    return _VectorProjections(score_weight, score_bias, gates, bih.expand(K, B, G).reshape(K * B, 1, G))


def _run_loop(
    cfg: _LoopConfig,
    keys: Tensor | None,
    values: Tensor | None,
    gates_x_all: Tensor | None,
    h: Tensor,
    c: Tensor | None,
    keep: Tensor | None,
    weights: tuple[Tensor | None, ...],
    tape: list[dict[str, Any]] | None = None,
    proj: _VectorProjections | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, list[dict[str, Any]] | None]:
    """Run the RIM over a sequence (no autograd). With ``tape``, record what the backward pass needs.

    ``h``, ``c`` are ``(K, B, H)``. Returns outputs ``(L, K, B, H)``, ``h_n``, ``c_n``, activation masks
    ``(L, K, B)``, the attention that decided them (vector: ``(L, K, B)`` on the input; set: ``(L, K, B, N+1)``;
    none: None) and the tape.
    """
    wq, bq, wih, bih, whh, bhh, wqkv, wout, bout = weights
    K, B, H = h.shape
    L = (keys if keys is not None else gates_x_all).shape[0]  # type: ignore[union-attr]
    Hi, dk = cfg.heads, cfg.key_size
    Hc, ck, cv = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
    drop = cfg.dropout
    lstm = cfg.cell == "lstm"
    reset_steps = (keep != 1).flatten(1).any(1).tolist() if keep is not None else [False] * L
    all_active = torch.ones(K, B, dtype=torch.bool, device=h.device)
    no_winner = torch.zeros(K, B, dtype=torch.bool, device=h.device)
    alive = None
    if cfg.dropped:
        alive = torch.ones(K, 1, 1, dtype=h.dtype, device=h.device)
        alive[list(cfg.dropped)] = 0.0
        all_active = all_active & (alive[..., 0] > 0)
        h = h * alive
        c = c * alive if c is not None else None
    if cfg.mode == "projected" and proj is None:
        assert keys is not None and values is not None
        proj = _vector_projections(keys, values, weights)
    outputs, masks, attentions = [], [], []
    for t in range(L):
        rec: dict[str, Any] = {}
        if reset_steps[t]:  # sb3-contrib's convention: the state is zeroed before the first step of an episode
            assert keep is not None
            h = h * keep[t]
            if c is not None:
                c = c * keep[t]
            rec["reset"] = True
        rec["h"], rec["c"] = h, c

        # ---- 1-2. Input attention and selection (§2.3) ----------------------------------------------------------
        if cfg.mode == "none":
            assert gates_x_all is not None
            gx = gates_x_all[t]
            active = all_active
        else:
            assert keys is not None and values is not None
            if cfg.mode == "set":
                q = torch.baddbmm(bq, h, wq).view(K, B, Hi, dk)
                scores = torch.matmul(q.permute(1, 2, 0, 3), keys[t])  # (B, Hi, K, N)
                a = torch.softmax(F.pad(scores, (1, 0)), dim=-1)  # the null score, 0, in column 0
                attention = a.mean(1).transpose(0, 1)  # (K, B, N+1)
                attentions.append(attention)
                on_input = -attention[..., 0]
                a_read = a[..., 1:]
                if drop > 0:
                    rec["drop_in"] = _dropout_mask(a_read, drop)
                    a_read = a_read * rec["drop_in"]
                read = torch.matmul(a_read, values[t]).permute(2, 0, 1, 3).reshape(K, B, -1)  # (K, B, Hi*dv)
                gx = torch.baddbmm(bih, read, wih)
                rec.update(q=q, a=a, a_read=a_read, read=read)
            else:
                # N = 1: softmax over {null, x} where the null score is exactly 0, so the weight on x is sigmoid(score).
                if cfg.mode == "projected":  # through the step-independent projections (see _VectorProjections)
                    assert proj is not None
                    hb = h.reshape(K * B, 1, H)
                    p = torch.sigmoid(torch.baddbmm(proj.score_bias[t], hb, proj.score_weight[t])).view(K, B, Hi)
                else:
                    q = torch.baddbmm(bq, h, wq).view(K, B, Hi, dk)
                    p = torch.sigmoid((q * keys[t]).sum(-1))  # (K, B, Hi)
                    rec["q"] = q
                on_input = p.mean(-1)  # (K, B) = 1 - null attention
                attentions.append(on_input)
                p_read = p
                if drop > 0:
                    rec["drop_in"] = _dropout_mask(p, drop)
                    p_read = p * rec["drop_in"]
                if cfg.mode == "projected":
                    gx = torch.baddbmm(proj.gate_bias, p_read.view(K * B, 1, Hi), proj.gates[t]).view(K, B, -1)
                else:
                    rec["read"] = read = (p_read.unsqueeze(-1) * values[t]).reshape(K, B, -1)
                    gx = torch.baddbmm(bih, read, wih)
                rec.update(p=p, p_read=p_read)
            if cfg.k_active == K:
                active = all_active
            else:  # the k_A units with the least attention on the null element
                if alive is not None:  # dropped units never win (the others may fill their place)
                    on_input = on_input.masked_fill(alive[..., 0] == 0, -math.inf)
                winners = torch.topk(on_input, cfg.k_active, dim=0).indices  # (k_A, B)
                active = no_winner.scatter(0, winners, True)
                if alive is not None:  # fewer units left than k_A: the dropped ones still stay inactive
                    active = active & all_active
        m = active.unsqueeze(-1)
        rec["m"] = m

        # ---- 3. Independent dynamics (§2.1): all units computed, the losers' state kept exactly -----------------
        if lstm:
            assert c is not None
            gates = torch.baddbmm(gx, h, whh)
            ifo = torch.sigmoid(gates[..., : 3 * H])
            g = torch.tanh(gates[..., 3 * H :])
            i, f, o = ifo.split(H, dim=-1)
            c_new = torch.addcmul(f * c, i, g)
            tanh_c = torch.tanh(c_new)
            h1 = torch.where(m, o * tanh_c, h)
            c = torch.where(m, c_new, c)
            rec.update(ifo=ifo, g=g, tanh_c=tanh_c)
        else:
            gh = torch.baddbmm(bhh, h, whh)
            rz = torch.sigmoid(gx[..., : 2 * H] + gh[..., : 2 * H])
            r, z = rz.split(H, dim=-1)
            gh_n = gh[..., 2 * H :]
            n = torch.tanh(torch.addcmul(gx[..., 2 * H :], r, gh_n))
            h1 = torch.where(m, torch.addcmul(n, z, h - n), h)  # (1 - z) * n + z * h
            rec.update(rz=rz, n=n, gh_n=gh_n)

        # ---- 4. Communication (§2.4): active units read all units; gated, squashed residual ---------------------
        if cfg.communication:
            qkv = torch.bmm(h1, wqkv).view(K, B * Hc, 2 * ck + cv).transpose(0, 1)  # (B*Hc, K, 2ck+cv)
            q2, k2, v2 = qkv.split((ck, ck, cv), dim=-1)
            ac = torch.softmax(torch.bmm(q2, k2.transpose(1, 2)).mul_(1.0 / math.sqrt(ck)), dim=-1)  # (B*Hc, K, K)
            ac_read = ac
            if drop > 0:
                rec["drop_c"] = _dropout_mask(ac, drop)
                ac_read = ac * rec["drop_c"]
            rc = torch.bmm(ac_read, v2).transpose(0, 1).reshape(K, B, Hc * cv)
            pre = torch.baddbmm(bout, rc, wout)
            update = torch.tanh(pre[..., :H])
            gate = torch.sigmoid(pre[..., H:])
            h2 = torch.where(m, torch.addcmul(h1, gate, update), h1)
            rec.update(h1=h1, q2=q2, k2=k2, v2=v2, ac=ac, ac_read=ac_read, rc=rc, update=update, gate=gate)
        else:
            h2 = h1
        h = h2
        outputs.append(h)
        masks.append(active)
        if tape is not None:
            tape.append(rec)
    attention_out = torch.stack(attentions) if attentions else None
    return torch.stack(outputs), h, c, torch.stack(masks), attention_out, tape


class _RIMSequence(torch.autograd.Function):
    """The RIM loop as one autograd node with a hand-written backward through time.

    Per-step autograd would record ~40 small ops per step and compute every weight gradient once per step (a
    product contracted over the batch only, memory-bound for small batches). Here the backward loop computes only
    the activation gradients per step and keeps (input, output-gradient) pairs; each weight gradient is then one
    batched matmul over all steps, as fused RNN kernels do. Tests check it against a naive autograd reference.
    """

    @staticmethod
    def forward(ctx, cfg, keys, values, gates_x_all, h0, c0, keep, *weights):  # type: ignore[override]
        tape: list[dict[str, Any]] = []
        proj = _vector_projections(keys, values, weights) if cfg.mode == "projected" else None
        outputs, h_n, c_n, masks, attention, _ = _run_loop(
            cfg, keys, values, gates_x_all, h0, c0, keep, weights, tape, proj
        )
        ctx.cfg, ctx.tape, ctx.keep, ctx.proj = cfg, tape, keep, proj
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
        cfg: _LoopConfig = ctx.cfg
        tape: list[dict[str, Any]] = ctx.tape
        keys, values, wq, bq, wih, whh, wqkv, wout = ctx.saved_tensors
        proj: _VectorProjections | None = ctx.proj
        L = len(tape)
        K, B, H = tape[0]["h"].shape
        Hi, dk = cfg.heads, cfg.key_size
        Hc, ck, cv = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
        lstm = cfg.cell == "lstm"
        like = tape[0]["h"]
        dh = d_hn if d_hn is not None else torch.zeros_like(like)
        dc = (d_cn if d_cn is not None else torch.zeros_like(like)) if lstm else None
        # (input, output-gradient) pairs of each per-unit weight, over all steps
        pairs: dict[str, tuple[list[Tensor], list[Tensor]]] = {n: ([], []) for n in ("q", "ih", "hh", "qkv", "out")}
        d_keys, d_values, d_gates_x = [], [], []
        d_vector_scores: list[Tensor] = []  # projected mode: per step (K, B, Hi), in reverse time order

        for t in reversed(range(L)):
            rec = tape[t]
            if d_outputs is not None:
                dh = dh + d_outputs[t]
            m = rec["m"]
            h, c = rec["h"], rec["c"]

            # ---- 4. communication -------------------------------------------------------------------------------
            if cfg.communication:
                update, gate = rec["update"], rec["gate"]
                dh_active = torch.where(m, dh, 0.0)
                d_pre = torch.cat(
                    [dh_active * gate * (1.0 - update * update), dh_active * update * gate * (1.0 - gate)], dim=-1
                )
                pairs["out"][0].append(rec["rc"])
                pairs["out"][1].append(d_pre)
                d_rc = torch.bmm(d_pre, wout.transpose(1, 2)).view(K, B * Hc, cv).transpose(0, 1)  # (B*Hc, K, cv)
                ac, ac_read = rec["ac"], rec["ac_read"]
                d_ac = torch.bmm(d_rc, rec["v2"].transpose(1, 2))
                d_v2 = torch.bmm(ac_read.transpose(1, 2), d_rc)
                if "drop_c" in rec:
                    d_ac = d_ac * rec["drop_c"]
                d_scores = ac * (d_ac - (d_ac * ac).sum(-1, keepdim=True))
                d_scores = d_scores * (1.0 / math.sqrt(ck))
                d_q2 = torch.bmm(d_scores, rec["k2"])
                d_k2 = torch.bmm(d_scores.transpose(1, 2), rec["q2"])
                d_qkv = torch.cat([d_q2, d_k2, d_v2], dim=-1).transpose(0, 1).reshape(K, B, -1)
                pairs["qkv"][0].append(rec["h1"])
                pairs["qkv"][1].append(d_qkv)
                dh1 = torch.baddbmm(dh, d_qkv, wqkv.transpose(1, 2))  # residual + through q, k, v
            else:
                dh1 = dh

            # ---- 3. dynamics ---------------------------------------------------------------------------------
            dh1_active = torch.where(m, dh1, 0.0)
            if lstm:
                ifo, g, tanh_c = rec["ifo"], rec["g"], rec["tanh_c"]
                i, f, o = ifo.split(H, dim=-1)
                assert dc is not None
                dc_active = torch.where(m, dc, 0.0)
                d_o = dh1_active * tanh_c
                dc_new = torch.addcmul(dc_active, dh1_active * o, 1.0 - tanh_c * tanh_c)
                d_ifo = torch.cat([dc_new * g, dc_new * c, d_o], dim=-1) * ifo * (1.0 - ifo)
                d_gates = torch.cat([d_ifo, dc_new * i * (1.0 - g * g)], dim=-1)
                dc = torch.where(m, dc_new * f, dc)
                d_gx = d_gh = d_gates
                dh_prev = torch.where(m, 0.0, dh1)
            else:
                rz, n, gh_n = rec["rz"], rec["n"], rec["gh_n"]
                r, z = rz.split(H, dim=-1)
                d_n = dh1_active * (1.0 - z) * (1.0 - n * n)
                d_rz = torch.cat([d_n * gh_n, dh1_active * (h - n)], dim=-1) * rz * (1.0 - rz)
                d_gx = torch.cat([d_rz, d_n], dim=-1)
                d_gh = torch.cat([d_rz, d_n * r], dim=-1)
                dh_prev = torch.where(m, dh1 * z, dh1)
            pairs["hh"][0].append(h)
            pairs["hh"][1].append(d_gh)
            dh_prev = torch.baddbmm(dh_prev, d_gh, whh.transpose(1, 2))

            # ---- 1. input attention -----------------------------------------------------------------------------
            if cfg.mode == "none":
                d_gates_x.append(d_gx)
            elif cfg.mode == "projected":
                # Through the step-independent projections; their own gradients are formed after the loop.
                assert proj is not None
                pairs["ih"][1].append(d_gx)
                d_p = torch.bmm(d_gx.reshape(K * B, 1, -1), proj.gates[t].transpose(1, 2)).view(K, B, Hi)
                if "drop_in" in rec:
                    d_p = d_p * rec["drop_in"]
                p = rec["p"]
                d_s = d_p * p * (1.0 - p)  # (K, B, Hi), gradient of the scores
                d_vector_scores.append(d_s)
                dh_prev = torch.baddbmm(
                    dh_prev.reshape(K * B, 1, H), d_s.view(K * B, 1, Hi), proj.score_weight[t].transpose(1, 2)
                ).view(K, B, H)
            else:
                pairs["ih"][0].append(rec["read"])
                pairs["ih"][1].append(d_gx)
                d_read = torch.bmm(d_gx, wih.transpose(1, 2))  # (K, B, Hi*dv)
                q = rec["q"]  # (K, B, Hi, dk)
                if cfg.mode == "vector":
                    d_read = d_read.view(K, B, Hi, -1)
                    p, p_read = rec["p"], rec["p_read"]
                    d_p = (d_read * values[t]).sum(-1)  # (K, B, Hi)
                    d_values.append((d_read * p_read.unsqueeze(-1)).sum(0))
                    if "drop_in" in rec:
                        d_p = d_p * rec["drop_in"]
                    d_s = (d_p * p * (1.0 - p)).unsqueeze(-1)
                    d_q = d_s * keys[t]  # (K, B, Hi, dk)
                    d_keys.append((d_s * q).sum(0))
                else:
                    a, a_read = rec["a"], rec["a_read"]  # (B, Hi, K, N+1), (B, Hi, K, N)
                    d_read = d_read.view(K, B, Hi, -1).permute(1, 2, 0, 3)  # (B, Hi, K, dv)
                    d_a = torch.matmul(d_read, values[t].transpose(-1, -2))  # (B, Hi, K, N)
                    d_values.append(torch.matmul(a_read.transpose(-1, -2), d_read))  # (B, Hi, N, dv)
                    if "drop_in" in rec:
                        d_a = d_a * rec["drop_in"]
                    a_real = a[..., 1:]
                    d_scores = a_real * (d_a - (d_a * a_real).sum(-1, keepdim=True))  # null column: no read
                    q_b = q.permute(1, 2, 0, 3)  # (B, Hi, K, dk)
                    d_q = torch.matmul(d_scores, keys[t].transpose(-1, -2)).permute(2, 0, 1, 3)  # (K, B, Hi, dk)
                    d_keys.append(torch.matmul(q_b.transpose(-1, -2), d_scores))  # (B, Hi, dk, N)
                d_q = d_q.reshape(K, B, Hi * dk)
                pairs["q"][0].append(h)
                pairs["q"][1].append(d_q)
                dh_prev = torch.baddbmm(dh_prev, d_q, wq.transpose(1, 2))

            if rec.get("reset"):
                dh_prev = dh_prev * ctx.keep[t]
                if dc is not None:
                    dc = dc * ctx.keep[t]
            dh = dh_prev

        def weight_grad(name: str, with_bias: bool) -> tuple[Tensor | None, Tensor | None]:
            xs, gys = pairs[name]
            if not xs:
                return None, None
            x = torch.cat(xs, dim=1)  # (K, L*B, in)
            gy = torch.cat(gys, dim=1)  # (K, L*B, out)
            return torch.bmm(x.transpose(1, 2), gy), (gy.sum(1, keepdim=True) if with_bias else None)

        d_wq, d_bq = weight_grad("q", True)
        d_wih, d_bih = weight_grad("ih", True)
        d_whh, d_bhh = weight_grad("hh", not lstm)
        d_wqkv, _ = weight_grad("qkv", False)
        d_wout, d_bout = weight_grad("out", True)
        if cfg.mode == "none":
            d_gates_all = torch.stack(d_gates_x[::-1])
            d_keys_all = d_values_all = None
        elif cfg.mode == "projected":  # gradients of the projections, all steps at once (time-major, (L, K, B, .))
            d_gates_all = None
            dv = values.shape[-1]
            d_gx = torch.stack(pairs["ih"][1][::-1])  # (L, K, B, G)
            d_s = torch.stack(d_vector_scores[::-1]).unsqueeze(-1)  # (L, K, B, Hi, 1)
            p_read = torch.stack([rec["p_read"] for rec in tape]).unsqueeze(-1)  # (L, K, B, Hi, 1)
            h_all = torch.stack([rec["h"] for rec in tape])  # (L, K, B, H)
            read = (p_read * values.unsqueeze(1)).view(L, K, B, Hi * dv)
            d_wih = torch.einsum("lkbi,lkbg->kig", read, d_gx)
            d_bih = d_gx.sum((0, 2)).unsqueeze(1)
            d_read = torch.einsum("lkbg,kig->lkbi", d_gx, wih).view(L, K, B, Hi, dv)
            d_values_all = (d_read * p_read).sum(1)  # (L, B, Hi, dv)
            d_q = (d_s * keys.unsqueeze(1)).view(L, K, B, Hi * dk)
            d_wq = torch.einsum("lkbd,lkbq->kdq", h_all, d_q)
            d_bq = d_q.sum((0, 2)).unsqueeze(1)
            q = torch.einsum("lkbd,kdq->lkbq", h_all, wq).add_(bq.view(1, K, 1, Hi * dk)).view(L, K, B, Hi, dk)
            d_keys_all = (d_s * q).sum(1)  # (L, B, Hi, dk)
        else:
            d_gates_all = None
            d_keys_all = torch.stack(d_keys[::-1])
            d_values_all = torch.stack(d_values[::-1])
        return (
            None, d_keys_all, d_values_all, d_gates_all, dh, dc, None,
            d_wq, d_bq, d_wih, d_bih, d_whh, d_bhh, d_wqkv, d_wout, d_bout,
        )  # fmt: skip
