"""Recurrent Independent Mechanisms (Goyal, Lamb et al., ICLR 2021, §2), in pure PyTorch.

This module is the model as the paper writes it: :class:`RIM` holds the parameters, and :meth:`RIM.step` is one step
of §2, the equations in order (input attention against a null element, selection of the ``k_active`` winners,
independent dynamics, communication), readable on its own. :meth:`RIM.forward` runs whole sequences through the fast
machinery of :mod:`rims_rl.rim_fast` (step-independent work hoisted out of the loop, a hand-written backward through
time, the loop in C++), which computes the same function: the tests check every fast path against
:func:`reference_forward`, the loop of :meth:`RIM.step`, values and gradients. To change the model, change
:meth:`RIM.step`; the tests then say whether the fast paths still agree.

This module imports only torch: it can be used outside reinforcement learning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rims_rl import rim_fast

__all__ = ["RIM", "RIMInfo", "reference_forward", "run_together"]

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
       averaged over heads, are active. Exactly ``k_active`` units win per sample. Exact ties (a saturated
       softmax) go to the larger mean log-odds of reading the input, then the lower index
       (:func:`rims_rl.rim_fast.select_winners`).
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
        * **start_states**: optional pair ``(h, c)``, each ``(L, B, K * H)``; where ``episode_starts`` is set, the
          sample's state is reset to its row of these instead of zero (ignored elsewhere). With it, one row of the
          batch can run several sequences one after the other, each from its own initial state (the policies pack
          PPO's padded minibatches this way: :func:`rims_rl.policies.pack_sequences`). No gradient flows into them:
          they must not require one.

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
        sizes = dict(
            input_size=input_size,
            num_units=num_units,
            unit_size=unit_size,
            input_key_size=input_key_size,
            input_value_size=input_value_size,
            input_heads=input_heads,
            comm_key_size=comm_key_size,
            comm_value_size=comm_value_size,
            comm_heads=comm_heads,
        )
        _check_args(sizes, k_active, cell, dropout)

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
    # ------------------------------------------------------------------------------------------------------------
    def step(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One step of §2, written as the paper's equations (the reference the fast paths are tested against).

        :param x: ``(B, N, D)``, the input set of this step.
        :param h: ``(B, K, H)``, each unit's hidden state; ``c`` the same for the LSTM cell (ignored by the GRU).
        :return: ``h``, ``c`` after the step ``(B, K, H)``; the activation mask ``(B, K)``; the input attention
            ``(B, K, N + 1)``, averaged over heads, column 0 on the null element.
        """
        B, N, _ = x.shape
        K, H, k_active = self.num_units, self.unit_size, self.k_active
        heads, dk = self.input_heads, self.input_key_size
        dv = self.input_value_size // heads

        # §2.2-2.3, eq. 3: a null element of zeros joins the input set.
        X = torch.cat([x.new_zeros(B, 1, x.shape[-1]), x], dim=1)  # (B, N+1, D)
        # eq. 4: keys and values from projections shared by the units, without bias (the null's are exactly 0);
        # queries from each unit's own state and weights; scaled dot-product attention per head.
        values = self.input_value(X).view(B, N + 1, heads, dv)
        if self.input_attention:
            keys = self.input_key(X).view(B, N + 1, heads, dk)
            queries = torch.einsum("bkh,khq->bkq", h, self.query_weight) + self.query_bias.transpose(0, 1)
            scores = torch.einsum("bkid,bnid->bkin", queries.view(B, K, heads, dk), keys) / math.sqrt(dk)
            attention = torch.softmax(scores, dim=-1)  # (B, K, heads, N+1)
        else:  # ablation: every unit reads the mean of the real elements, nothing of the null
            attention = torch.cat([x.new_zeros(B, K, heads, 1), x.new_full((B, K, heads, N), 1.0 / N)], dim=-1)
        read = F.dropout(attention, self.dropout, self.training)
        read = torch.einsum("bkin,bniv->bkiv", read, values).reshape(B, K, heads * dv)  # A_k^(in)
        input_attention = attention.mean(dim=2)  # (B, K, N+1): heads averaged

        # §2.3: the k_active units with the least attention on the null element win (all units without attention).
        alive = torch.ones(K, dtype=torch.bool, device=x.device)
        alive[list(self.dropped_units)] = False  # test-time ablation: never active, state held at zero
        if self.input_attention and k_active < K:
            on_input = (1.0 - input_attention[..., 0]).masked_fill(~alive, -math.inf)
            # exact ties (a saturated softmax) go to the larger log-odds of reading the input, then the lower index
            log_odds = (torch.logsumexp(scores[..., 1:], -1) - scores[..., 0]).mean(-1)  # (B, K)
            winners = rim_fast.select_winners(on_input, log_odds, k_active, dim=1)
            active = torch.zeros(B, K, dtype=torch.bool, device=x.device).scatter(1, winners, True) & alive
        else:
            active = alive.expand(B, K)
        h, c = h * alive[:, None], c * alive[:, None]
        m = active.unsqueeze(-1)

        # §2.1, eq. 1-2: every unit's own LSTM or GRU on what it read; the inactive units keep h and c exactly.
        gates_x = torch.einsum("bkv,kvg->bkg", read, self.weight_ih) + self.bias_ih.transpose(0, 1)
        gates_h = torch.einsum("bkh,khg->bkg", h, self.weight_hh)
        if self.cell == "lstm":  # gate order i, f, o, g; one bias (in bias_ih)
            i, f, o, g = (gates_x + gates_h).split(H, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            c = torch.where(m, c_new, c)
        else:  # gate order r, z, n; the recurrent bias sits inside r * (W_hn h + b_hn)
            gates_h = gates_h + self.bias_hh.transpose(0, 1)
            r, z = torch.sigmoid(gates_x[..., : 2 * H] + gates_h[..., : 2 * H]).split(H, dim=-1)
            n = torch.tanh(gates_x[..., 2 * H :] + r * gates_h[..., 2 * H :])
            h_new = (1 - z) * n + z * h
        h = torch.where(m, h_new, h)

        # §2.4, eq. 5-8: the active units read every unit (multi-head attention, per-unit query/key/value weights)
        # and add the result to their state through a gate and a squashing (class docstring); the others don't.
        if self.communication:
            Hc, ck, cv = self.comm_heads, self.comm_key_size, self.comm_value_size
            qkv = torch.einsum("bkh,khp->bkp", h, self.comm_qkv).view(B, K, Hc, 2 * ck + cv)
            q, k, v = qkv.split((ck, ck, cv), dim=-1)
            weights = torch.softmax(torch.einsum("bqid,bjid->biqj", q, k) / math.sqrt(ck), dim=-1)
            weights = F.dropout(weights, self.dropout, self.training)
            heard = torch.einsum("biqj,bjiv->bqiv", weights, v).reshape(B, K, Hc * cv)
            out = torch.einsum("bkr,kro->bko", heard, self.comm_out) + self.comm_out_bias.transpose(0, 1)
            update, gate = out.split(H, dim=-1)
            h = torch.where(m, h + torch.sigmoid(gate) * torch.tanh(update), h)
        return h, c, active, input_attention

    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input: Tensor,
        state: tuple[Tensor, Tensor] | None = None,
        episode_starts: Tensor | None = None,
        start_states: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], RIMInfo]:
        output, state, mask, attention = rim_fast.sequence(self, input, state, episode_starts, start_states)
        return output, state, RIMInfo(mask, attention)


def reference_forward(
    rim: RIM,
    input: Tensor,
    state: tuple[Tensor, Tensor] | None = None,
    episode_starts: Tensor | None = None,
    start_states: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor], RIMInfo]:
    """What :meth:`RIM.forward` computes, as a plain loop of :meth:`RIM.step` under autograd (slow; the reference).

    Same arguments and results as :meth:`RIM.forward`. Attention dropout draws its own masks, so in training mode
    with dropout its results are a different draw of the same distribution.
    """
    x = input.unsqueeze(2) if input.dim() == 3 else input
    L, B = x.shape[:2]
    K, H = rim.num_units, rim.unit_size
    h, c = state if state is not None else rim.initial_state(B, x.device)
    h, c = h.view(B, K, H), c.view(B, K, H)
    outputs, masks, attentions = [], [], []
    for t in range(L):
        if episode_starts is not None:  # sb3-contrib's convention: the state is zeroed at an episode's first step
            keep = (1.0 - episode_starts.reshape(L, B)[t].to(x.dtype)).view(B, 1, 1)
            h, c = h * keep, c * keep
            if start_states is not None:
                h, c = (s + (1.0 - keep) * new[t].view(B, K, H) for s, new in zip((h, c), start_states, strict=True))
        h, c, active, attention = rim.step(x[t], h, c)
        outputs.append(h.reshape(B, K * H))
        masks.append(active)
        attentions.append(attention)
    c_n = c.reshape(B, K * H) if rim.cell == "lstm" else torch.zeros_like(h.reshape(B, K * H))
    info = RIMInfo(torch.stack(masks), torch.stack(attentions))
    return torch.stack(outputs), (h.reshape(B, K * H), c_n), info


def run_together(calls: Sequence[rim_fast.Call]) -> list[tuple[Tensor, tuple[Tensor, Tensor], RIMInfo]]:
    """``[rim(*args) for rim, *args in calls]`` (``args``: ``input, state, episode_starts`` and optionally
    ``start_states``), with the same results. With ``rims_rl.rim_fast.PARALLEL_LOOPS = True``, the RIMs' C++
    loops run at once on two threads (without the GIL), forward and backward, each on one core; off by default,
    as one after the other measured faster in RecurrentPPO on 2 cores once a step's small operations were fused
    (:data:`rim_fast.PARALLEL_LOOPS`)."""
    results = rim_fast.run_together(calls)
    return [(output, state, RIMInfo(mask, attention)) for output, state, mask, attention in results]


def _check_args(sizes: dict[str, int], k_active: int, cell: str, dropout: float) -> None:
    """:class:`RIM`'s arguments: a ``ValueError`` that says which one is wrong and what is valid."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    num_units, heads, value_size = sizes["num_units"], sizes["input_heads"], sizes["input_value_size"]
    if isinstance(k_active, bool) or not isinstance(k_active, int) or not 1 <= k_active <= num_units:
        raise ValueError(f"k_active must be an integer in [1, num_units={num_units}], got {k_active!r}")
    if cell not in _CELLS:
        raise ValueError(f"cell must be one of {', '.join(_CELLS)}, got {cell!r}")
    if value_size % heads:
        raise ValueError(
            f"input_heads={heads} must divide input_value_size={value_size} "
            "(each head reads an equal share of the value)"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
