"""Recurrent Independent Mechanisms (Goyal, Lamb et al., ICLR 2021, §2), in pure PyTorch.

One :class:`RIM` call runs a whole sequence. Everything that does not depend on the recurrent state (the input keys
and values, and for a one-element input set the input side of the dynamics) is computed once for all steps; the
per-step loop only does what depends on the state. All per-unit weights carry a leading unit axis and are applied
with batched matmuls over it: there is no Python loop over units.

This module imports only torch: it can be used outside reinforcement learning.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
       attention (per-unit query/key/value weights) and add the result to their state (residual connection);
       inactive units are unchanged.

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
        # nn.LSTM-compatible sizes (sb3-contrib sizes its state buffers from these).
        self.hidden_size = num_units * unit_size
        self.num_layers = 1

        K, H = num_units, unit_size
        n_gates = 4 if cell == "lstm" else 3
        self._n_gates = n_gates

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
        h = h0.reshape(B, K, H).transpose(0, 1).contiguous()
        c = c0.reshape(B, K, H).transpose(0, 1).contiguous() if self.cell == "lstm" else None

        # Steps at which some sample starts a new episode (one host sync for the whole sequence).
        reset_steps: list[bool] = [False] * L
        keep_steps: tuple[Tensor, ...] = ()
        if episode_starts is not None:
            starts = episode_starts.reshape(L, B).to(x.dtype)
            reset_steps = (starts != 0).any(dim=1).tolist()
            keep_steps = (1.0 - starts).view(L, 1, B, 1).unbind(0)

        # Per-unit weights used at every step. Under autograd their gradients are computed once for the whole
        # sequence (see _SequenceWeight), as fused RNN kernels do, instead of once per step.
        track = torch.is_grad_enabled()
        w_ih = _SequenceWeight(self.weight_ih, self.bias_ih, track)
        w_hh = _SequenceWeight(self.weight_hh, self.bias_hh, track)  # LSTM: bias_ih already holds both biases
        w_comm_qkv = w_comm_out = None
        if self.comm_qkv is not None and self.comm_out is not None:
            w_comm_qkv = _SequenceWeight(self.comm_qkv, None, track)
            w_comm_out = _SequenceWeight(self.comm_out, self.comm_out_bias, track)

        # ---- Step-independent work, once for the whole sequence (§2.3: keys and values of the input set) -----
        Hi, dk = self.input_heads, self.input_key_size
        dv = self.input_value_size // Hi
        values = self.input_value(x)  # (L, B, N, Hi*dv); the null element's value is zero and is left out
        mode = "none" if not self.input_attention else ("vector" if N == 1 else "set")
        if mode == "none":
            # Every unit reads the mean of the input values (uniform attention over the real elements), and the
            # read does not depend on the state: the input side of the dynamics is computed for all steps at once.
            gates_x_steps = (torch.einsum("lbv,kvg->lkbg", values.mean(dim=2), self.weight_ih) + self.bias_ih).unbind(0)
        else:
            assert self.input_key is not None
            w_query = _SequenceWeight(self.query_weight, self.query_bias, track)
            keys = self.input_key(x) * (1.0 / math.sqrt(dk))
            if mode == "vector":
                # unbind, not [t]: its backward stacks the step gradients once instead of a full-size zero each step
                key_steps = keys.view(L, B, Hi, dk).unbind(0)
                value_steps = values.view(L, B, Hi, dv).unbind(0)
            else:
                key_steps = keys.view(L, B, N, Hi, dk).permute(0, 1, 3, 4, 2).unbind(0)  # (B, Hi, dk, N)
                value_steps = values.view(L, B, N, Hi, dv).transpose(2, 3).unbind(0)  # (B, Hi, N, dv)
        all_active = torch.ones(K, B, dtype=torch.bool, device=x.device)
        no_winner = torch.zeros(K, B, dtype=torch.bool, device=x.device)

        outputs: list[Tensor] = []
        masks: list[Tensor] = []
        attentions: list[Tensor] = []  # per step: (K, B) attention on the real input (vector) or (K, B, N+1)
        for t in range(L):
            if reset_steps[t]:
                h = h * keep_steps[t]
                if c is not None:
                    c = c * keep_steps[t]

            # ---- 1-2. Input attention and selection (§2.3) --------------------------------------------------
            if mode == "none":
                gates_x = gates_x_steps[t]
                active = all_active
            else:
                q = w_query.bmm(h).view(K, B, Hi, dk)
                if mode == "vector":
                    # Softmax over {null, x} where the null score is exactly 0: the weight on x is sigmoid(score).
                    p = torch.sigmoid((q * key_steps[t]).sum(-1))  # (K, B, Hi)
                    on_input = p.mean(-1)  # (K, B) = 1 - null attention
                    attentions.append(on_input.detach())
                    p = F.dropout(p, self.dropout, self.training)
                    read = p.unsqueeze(-1) * value_steps[t]  # (K, B, Hi, dv)
                else:
                    scores = torch.matmul(q.permute(1, 2, 0, 3), key_steps[t])  # (B, Hi, K, N)
                    a = torch.softmax(F.pad(scores, (1, 0)), dim=-1)  # the null score, 0, in column 0
                    attention = a.mean(1).transpose(0, 1)  # (K, B, N+1)
                    attentions.append(attention.detach())
                    on_input = -attention[..., 0]
                    a = F.dropout(a[..., 1:], self.dropout, self.training)
                    read = torch.matmul(a, value_steps[t]).permute(2, 0, 1, 3)  # (K, B, Hi, dv)
                gates_x = w_ih.bmm(read.reshape(K, B, Hi * dv))
                if self.k_active == K:
                    active = all_active
                else:  # §2.3: the k_A units with the least attention on the null element
                    winners = torch.topk(on_input, self.k_active, dim=0).indices  # (k_A, B)
                    active = no_winner.scatter(0, winners, True)
            m = active.unsqueeze(-1)

            # ---- 3. Independent dynamics (§2.1): all units computed, the losers' state kept exactly -----------
            if c is not None:
                h, c = _LSTMUpdate.apply(w_hh.bmm(h, add=gates_x), h, c, m)
            else:
                gates_h = w_hh.bmm(h)
                rz = torch.sigmoid(gates_x[..., : 2 * H] + gates_h[..., : 2 * H])
                r, z = rz.split(H, dim=-1)
                n = torch.tanh(torch.addcmul(gates_x[..., 2 * H :], r, gates_h[..., 2 * H :]))
                h_new = torch.addcmul(n, z, h - n)  # (1 - z) * n + z * h
                h = torch.where(m, h_new, h)

            # ---- 4. Communication (§2.4): the active units read all units, with a residual ------------------
            if w_comm_qkv is not None and w_comm_out is not None:
                h = _GatedResidual.apply(self._communicate(h, w_comm_qkv, w_comm_out), h, m)

            outputs.append(h)
            masks.append(active)

        output = torch.stack(outputs).permute(0, 2, 1, 3).reshape(L, B, K * H)
        h_n = h.transpose(0, 1).reshape(B, K * H)
        c_n = c.transpose(0, 1).reshape(B, K * H) if c is not None else torch.zeros_like(h_n)
        if mode == "none":
            input_attention = torch.cat([x.new_zeros(L, B, K, 1), x.new_full((L, B, K, N), 1.0 / N)], dim=-1)
        elif mode == "vector":
            on_input = torch.stack(attentions).transpose(1, 2)  # (L, B, K)
            input_attention = torch.stack([1.0 - on_input, on_input], dim=-1)
        else:
            input_attention = torch.stack(attentions).transpose(1, 2)
        info = RIMInfo(activation_mask=torch.stack(masks).transpose(1, 2), input_attention=input_attention)
        return output, (h_n, c_n), info

    def _communicate(self, h: Tensor, w_qkv: _SequenceWeight, w_out: _SequenceWeight) -> Tensor:
        """Multi-head attention of every unit over all units: ``(K, B, H)`` in, the pre-activations of the
        update and its gate ``(K, B, 2H)`` out."""
        K, B, _ = h.shape
        Hc, dk, dv = self.comm_heads, self.comm_key_size, self.comm_value_size
        qkv = w_qkv.bmm(h).view(K, B * Hc, 2 * dk + dv).transpose(0, 1)  # (B*Hc, K, 2dk+dv)
        q, k, v = qkv.split((dk, dk, dv), dim=-1)
        scores = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(dk))  # (B*Hc, K, K)
        a = F.dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
        read = torch.bmm(a, v).transpose(0, 1).reshape(K, B, Hc * dv)
        return w_out.bmm(read)


class _SequenceWeight:
    """A per-unit weight ``(K, in, out)`` (and optional bias ``(K, 1, out)``) applied at every step of a sequence.

    Plain autograd computes the weight's gradient at every step: a ``(K, in, out)`` product contracted over the
    batch only, memory-bound for small batches, plus an accumulation. Here each step's backward only keeps its
    input and output-gradient, and the weight's (and bias's) gradient is computed once, from all steps stacked,
    when backward reaches the start of the sequence. Without autograd (or for frozen weights) it is a plain
    ``baddbmm``.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, track: bool) -> None:
        self.weight, self.bias = weight, bias
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.tracked = track and (weight.requires_grad or (bias is not None and bias.requires_grad))
        if self.tracked:
            # The aliases are graph inputs of every step's product; their backward runs after all of the steps'.
            self.weight, self.bias = _WeightTap.apply(weight, bias, self)

    def bmm(self, x: Tensor, add: Tensor | None = None) -> Tensor:
        """``add + bias + x @ weight`` for ``x`` of shape ``(K, B, in)``; ``add`` is ``(K, B, out)`` or None."""
        if self.tracked:
            return _TappedBmm.apply(x, self.weight, self.bias, add, self)
        return _baddbmm(x, self.weight, self.bias, add)


def _baddbmm(x: Tensor, weight: Tensor, bias: Tensor | None, add: Tensor | None) -> Tensor:
    base = add if bias is None else (bias if add is None else add + bias)
    return torch.bmm(x, weight) if base is None else torch.baddbmm(base, x, weight)


class _WeightTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor | None, owner: _SequenceWeight):  # type: ignore[override]
        ctx.owner = owner
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), (bias.view_as(bias) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_w: Tensor | None, grad_b: Tensor | None):  # type: ignore[override]
        pairs = ctx.owner.pairs
        if not pairs:
            return grad_w, grad_b, None
        x = torch.cat([p[0] for p in pairs], dim=1)  # (K, steps*B, in)
        gy = torch.cat([p[1] for p in pairs], dim=1)  # (K, steps*B, out)
        pairs.clear()
        dw = torch.bmm(x.transpose(1, 2), gy)
        dw = dw if grad_w is None else dw + grad_w
        db = None
        if ctx.has_bias:
            db = gy.sum(1, keepdim=True)
            db = db if grad_b is None else db + grad_b
        return dw, db, None


class _TappedBmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, add, owner):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.owner = owner
        return _baddbmm(x, weight, bias, add)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        ctx.owner.pairs.append((x, gy))
        dx = torch.bmm(gy, weight.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        dadd = gy if ctx.needs_input_grad[3] else None
        return dx, None, None, dadd, None


class _LSTMUpdate(torch.autograd.Function):
    """The LSTM cell's element-wise part for all units at once, keeping the inactive units' state exactly.

    ``gates`` ``(K, B, 4H)`` in order (i, f, o, g); ``h``, ``c`` ``(K, B, H)``; ``mask`` ``(K, B, 1)`` bool.
    Returns ``(where(mask, o * tanh(c'), h), where(mask, c', c))`` with ``c' = f * c + i * g``. One autograd node
    with a hand-written backward instead of a dozen (the RIM step is dominated by per-op overhead on CPU).
    """

    @staticmethod
    def forward(ctx, gates: Tensor, h: Tensor, c: Tensor, mask: Tensor):  # type: ignore[override]
        H = h.shape[-1]
        ifo, g = gates.split((3 * H, H), dim=-1)
        ifo = torch.sigmoid(ifo)
        g = torch.tanh(g)
        i, f, o = ifo.split(H, dim=-1)
        c_new = torch.addcmul(f * c, i, g)
        tanh_c = torch.tanh(c_new)
        ctx.save_for_backward(ifo, g, c, tanh_c, mask)
        return torch.where(mask, o * tanh_c, h), torch.where(mask, c_new, c)

    @staticmethod
    def backward(ctx, dh: Tensor | None, dc: Tensor | None):  # type: ignore[override]
        ifo, g, c, tanh_c, mask = ctx.saved_tensors
        H = c.shape[-1]
        i, f, o = ifo.split(H, dim=-1)
        zero = dh.new_zeros(()) if dh is not None else dc.new_zeros(())  # type: ignore[union-attr]
        dh_new = torch.where(mask, dh, zero) if dh is not None else None
        dc_new = torch.where(mask, dc, zero) if dc is not None else torch.zeros_like(c)
        if dh_new is not None:
            d_o = dh_new * tanh_c
            dc_new = torch.addcmul(dc_new, dh_new * o, 1.0 - tanh_c * tanh_c)
        else:
            d_o = torch.zeros_like(c)
        d_ifo = torch.cat([dc_new * g, dc_new * c, d_o], dim=-1) * ifo * (1.0 - ifo)
        d_g = dc_new * i * (1.0 - g * g)
        d_gates = torch.cat([d_ifo, d_g], dim=-1)
        dh_prev = torch.where(mask, zero, dh) if dh is not None else None
        dc_prev = dc_new * f
        if dc is not None:
            dc_prev = dc_prev + torch.where(mask, zero, dc)
        return d_gates, dh_prev, dc_prev, None


class _GatedResidual(torch.autograd.Function):
    """``where(mask, h + sigmoid(gate) * tanh(update), h)`` with ``pre = [update | gate]`` ``(K, B, 2H)``, as one
    autograd node (§2.4 eq. 8, with the authors' gate and squashing)."""

    @staticmethod
    def forward(ctx, pre: Tensor, h: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        update, gate = pre.chunk(2, dim=-1)
        update = torch.tanh(update)
        gate = torch.sigmoid(gate)
        ctx.save_for_backward(update, gate, mask)
        return torch.where(mask, torch.addcmul(h, gate, update), h)

    @staticmethod
    def backward(ctx, dh: Tensor):  # type: ignore[override]
        update, gate, mask = ctx.saved_tensors
        dh_active = torch.where(mask, dh, dh.new_zeros(()))
        d_update = dh_active * gate * (1.0 - update * update)
        d_gate = dh_active * update * gate * (1.0 - gate)
        return torch.cat([d_update, d_gate], dim=-1), dh, None
