"""The RIM module, specified test by test (paper §2)."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

import rims_rl.rim
import rims_rl.rim_fast
from rims_rl.rim import RIM, reference_forward


@pytest.fixture(
    autouse=True,
    params=list(itertools.product(["per-step", "projected", "folded"], [False, True])),
    ids=lambda p: f"{p[0]}-{'cpp' if p[1] else 'python'}",
)
def vector_input_path(request, monkeypatch):
    """Every test runs each way a single input vector can go: per-step query and input-to-gate products, the
    step-independent projections (``_VectorProjections``), or the key and value projections folded into the
    query and input-to-gate weights (``_fold_input``), chosen by sizes in use and forced here; and each with the
    loop in Python and in C++ (``NATIVE_LOOP``; it covers what it applies to, the rest runs in Python)."""
    path, native = request.param
    if native and rims_rl.rim_fast._native() is None:
        pytest.skip("the C++ loop could not be built here (test_native_loop_builds says why)")
    monkeypatch.setattr(rims_rl.rim_fast, "VECTOR_INPUT_PATH", path)
    monkeypatch.setattr(rims_rl.rim_fast, "NATIVE_LOOP", native)
    monkeypatch.setattr(rims_rl.rim_fast, "FUSED_KERNELS", native)  # the C++ loop with its fused CPU kernels
    return path


K, H, D = 5, 6, 7


def make_rim(**kwargs) -> RIM:
    torch.manual_seed(0)
    args = dict(num_units=K, unit_size=H, k_active=3, input_key_size=4, input_heads=2, comm_key_size=4,
                comm_value_size=3, comm_heads=2, dropout=0.0)  # fmt: skip
    args.update(kwargs)
    return RIM(D, **args).double()


def random_inputs(L=6, B=4, N=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, B, N, D, generator=g, dtype=torch.double)
    h0 = torch.randn(B, K * H, generator=g, dtype=torch.double) * 0.5
    c0 = torch.randn(B, K * H, generator=g, dtype=torch.double) * 0.5
    return x, h0, c0


def unit(t: torch.Tensor, k: int) -> torch.Tensor:
    return t[..., k * H : (k + 1) * H]


CONFIGS = [
    dict(cell=cell, input_attention=ia, communication=comm, k_active=k)
    for cell, ia, comm, k in itertools.product(["lstm", "gru"], [True, False], [True, False], [3, K])
    if ia or k == K
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("n_elements", [1, 3])
def test_matches_the_reference_step_in_values_and_gradients(config, n_elements):
    """Every fast path (the autouse fixture forces each) computes what a plain loop of RIM.step computes."""
    rim = make_rim(**config)
    x, h0, c0 = random_inputs(N=n_elements)
    starts = torch.zeros(6, 4)
    starts[3, 1] = 1.0
    inputs = [t.clone().requires_grad_() for t in (x, h0, c0)]
    out, (h, c), info = rim(inputs[0], (inputs[1], inputs[2]), episode_starts=starts)
    ref_inputs = [t.clone().requires_grad_() for t in (x, h0, c0)]
    r_out, (r_h, r_c), r_info = reference_forward(rim, ref_inputs[0], tuple(ref_inputs[1:]), episode_starts=starts)

    assert torch.equal(info.activation_mask, r_info.activation_mask)
    torch.testing.assert_close(info.input_attention, r_info.input_attention.detach())
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(h, r_h)
    if rim.cell == "lstm":
        torch.testing.assert_close(c, r_c)

    g = torch.Generator().manual_seed(2)
    w_out, w_h, w_c = (torch.randn(t.shape, generator=g, dtype=torch.double) for t in (out, h, c))
    params = list(rim.parameters())
    loss = (out * w_out).sum() + (h * w_h).sum() + (c * w_c).sum()
    grads = torch.autograd.grad(loss, params + inputs, allow_unused=True)  # GRU: c0 is unused
    ref_loss = (r_out * w_out).sum() + (r_h * w_h).sum() + (r_c * w_c).sum()
    ref_grads = torch.autograd.grad(ref_loss, params + ref_inputs, allow_unused=True)
    for name, a, b in zip([n for n, _ in rim.named_parameters()] + ["x", "h0", "c0"], grads, ref_grads, strict=True):
        if a is None:
            assert b is None or not b.any(), name
            continue
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("n_elements", [1, 3])
def test_a_state_without_gradient_leaves_the_other_gradients_exactly_as_they_were(config, L, n_elements):
    """Where the state entering the sequence wants no gradient (a rollout's stored state, or None), the backward
    skips the first step's products through it; every other gradient is the same, bit for bit."""
    rim = make_rim(**config)
    x, h0, c0 = random_inputs(L=L, N=n_elements)
    if n_elements == 1:
        x = x[:, :, 0]
    starts = torch.zeros(L, 4)
    starts[0, 2] = 1.0  # a reset at the first step too
    g = torch.Generator().manual_seed(2)
    results = []
    for state_grad in (True, False):
        inputs = [x.clone().requires_grad_(), h0.clone().requires_grad_(state_grad), c0.clone().requires_grad_()]
        inputs[2].requires_grad_(state_grad and rim.cell == "lstm")
        torch.manual_seed(3)
        out, (h, c), _ = rim(inputs[0], (inputs[1], inputs[2]), episode_starts=starts)
        if not results:
            w_out, w_h, w_c = (torch.randn(t.shape, generator=g, dtype=torch.double) for t in (out, h, c))
        wanted = list(rim.parameters()) + inputs[: 3 if state_grad else 1]
        loss = (out * w_out).sum() + (h * w_h).sum() + (c * w_c).sum()
        grads = torch.autograd.grad(loss, wanted, allow_unused=True)
        results.append([out, h, c, *grads[: len(grads) - (2 if state_grad else 0)]])
        if state_grad:
            assert grads[-2] is not None and grads[-2].any()
    for a, b in zip(*results, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_inactive_units_keep_state_exactly():
    rim = make_rim()
    x, h0, c0 = random_inputs(L=1, B=8)
    _, (h, c), info = rim(x, (h0, c0))
    mask = info.activation_mask[0]  # (B, K)
    assert (~mask).any()
    for b, k in (~mask).nonzero().tolist():
        assert torch.equal(unit(h[b], k), unit(h0[b], k))
        assert torch.equal(unit(c[b], k), unit(c0[b], k))
    for b, k in mask.nonzero().tolist():
        assert not torch.equal(unit(h[b], k), unit(h0[b], k))


def test_exactly_k_active_winners_per_sample():
    for k_active in range(1, K + 1):
        rim = make_rim(k_active=k_active)
        x, h0, c0 = random_inputs(L=5, B=6, N=3)
        _, _, info = rim(x, (h0, c0))
        assert info.activation_mask.dtype == torch.bool
        assert (info.activation_mask.sum(-1) == k_active).all()


def test_winners_have_least_null_attention():
    rim = make_rim()
    x, h0, c0 = random_inputs(L=5, B=6, N=3)
    _, _, info = rim(x, (h0, c0))
    null = info.null_attention
    mask = info.activation_mask
    worst_winner = null.masked_fill(~mask, -math.inf).amax(-1)
    best_loser = null.masked_fill(mask, math.inf).amin(-1)
    assert (worst_winner <= best_loser).all()
    # and the null attention is the head average of a softmax over N + 1 elements, null first
    torch.testing.assert_close(info.input_attention.sum(-1), torch.ones_like(null))


@pytest.mark.parametrize("N", [1, 3])
def test_saturated_attention_ties_go_to_the_larger_log_odds(N):
    """A trained policy's input attention saturates (each head's weight rounds to exactly 0 or 1), so the null
    attention averaged over heads ties between units. Ties go to the larger mean log-odds of reading the input,
    then to the lower index, the same on every path (torch.topk's order among ties is unspecified)."""
    rim = make_rim(input_heads=4, input_key_size=4, k_active=2)
    with torch.no_grad():
        rim.input_key.weight.mul_(1e4)
    x, h0, c0 = random_inputs(L=5, B=6, N=N)
    _, _, info = rim(x, (h0, c0))
    _, _, ref = reference_forward(rim, x, (h0, c0))
    assert torch.equal(info.activation_mask, ref.activation_mask)
    null = ref.null_attention
    ties = 0
    for t, b in itertools.product(range(5), range(6)):
        winners = ref.activation_mask[t, b]
        worst_winner, best_loser = null[t, b][winners].max(), null[t, b][~winners].min()
        ties += bool(worst_winner == best_loser)
    assert ties >= 1  # the rule below is exercised
    # the winners by the rule, recomputed from the reference step's scores
    h, c = h0.view(6, K, H), c0.view(6, K, H)
    with torch.no_grad():
        for t in range(5):
            X = torch.cat([x[t].new_zeros(6, 1, D), x[t]], dim=1)
            keys = rim.input_key(X).view(6, N + 1, 4, 4)
            queries = torch.einsum("bkh,khq->bkq", h, rim.query_weight) + rim.query_bias.transpose(0, 1)
            scores = torch.einsum("bkid,bnid->bkin", queries.view(6, K, 4, 4), keys) / 2.0
            log_odds = (torch.logsumexp(scores[..., 1:], -1) - scores[..., 0]).mean(-1)
            on_input = 1.0 - torch.softmax(scores, -1).mean(2)[..., 0]
            for b in range(6):
                ranked = sorted(range(K), key=lambda k: (-float(on_input[b, k]), -float(log_odds[b, k]), k))
                assert set(ranked[:2]) == set(ref.activation_mask[t, b].nonzero().flatten().tolist())
            h, c, _, _ = rim.step(x[t], h, c)


def test_null_key_and_value_are_exactly_zero():
    rim = make_rim()
    null = torch.zeros(3, D, dtype=torch.double)
    assert rim.input_key.bias is None and rim.input_value.bias is None
    assert torch.equal(rim.input_key(null), torch.zeros(3, rim.input_heads * rim.input_key_size, dtype=torch.double))
    assert torch.equal(rim.input_value(null), torch.zeros(3, rim.input_value_size, dtype=torch.double))


def test_without_communication_or_competition_units_are_independent():
    rim = make_rim(communication=False, k_active=K)
    x, h0, c0 = random_inputs(L=8)
    out, _, _ = rim(x, (h0, c0))
    j = 2
    with torch.no_grad():
        for p in (rim.query_weight, rim.weight_ih, rim.weight_hh, rim.bias_ih):
            p[j] += 0.5 * torch.randn_like(p[j])
    out2, _, _ = rim(x, (h0, c0))
    for k in range(K):
        same = torch.equal(unit(out2, k), unit(out, k))
        assert same == (k != j), f"unit {k}"


def test_without_communication_units_interact_only_through_the_competition():
    """Changing unit j's parameters changes another unit's trajectory only from the first step where the winner
    sets differ."""
    rim = make_rim(communication=False, k_active=2)
    x, h0, c0 = random_inputs(L=12, B=8)
    out, _, info = rim(x, (h0, c0))
    j = 1
    with torch.no_grad():
        rim.weight_hh[j] += torch.randn_like(rim.weight_hh[j])
        rim.query_bias[j] += torch.randn_like(rim.query_bias[j])
    out2, _, info2 = rim(x, (h0, c0))
    differ = (info.activation_mask != info2.activation_mask).any(-1)  # (L, B)
    first_change = torch.where(differ.any(0), differ.float().argmax(0), torch.full((8,), 12))
    for b in range(8):
        t0 = int(first_change[b])
        for k in range(K):
            if k != j:
                assert torch.equal(unit(out2[:t0, b], k), unit(out[:t0, b], k))
    assert differ.any(), "the perturbation should change some competition, or the test checks nothing"


def test_gradient_reaches_an_inactive_units_earlier_state():
    rim = make_rim(communication=False)
    x, h0, c0 = random_inputs(L=1, B=1)
    h0.requires_grad_()
    out, _, info = rim(x, (h0, c0))
    loser = int((~info.activation_mask[0, 0]).nonzero()[0])
    (grad,) = torch.autograd.grad(unit(out[0], loser).sum(), h0)
    assert torch.equal(unit(grad, loser), torch.ones(1, H, dtype=torch.double))  # the kept state is an identity
    # with communication, the winners' update reads the loser, and a loss on the winners reaches it too
    rim = make_rim()
    out, _, info = rim(x, (h0, c0))
    loser = int((~info.activation_mask[0, 0]).nonzero()[0])
    winners = info.activation_mask[0, 0].nonzero().flatten().tolist()
    (grad,) = torch.autograd.grad(sum(unit(out[0], k).sum() for k in winners), h0)
    assert unit(grad, loser).abs().sum() > 0


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("n_elements", [1, 4])
def test_one_sequence_call_equals_step_by_step_calls(cell, n_elements):
    for mode in ("train_without_dropout", "eval_with_dropout"):
        rim = make_rim(cell=cell, dropout=0.0 if mode == "train_without_dropout" else 0.3)
        rim.train(mode == "train_without_dropout")
        x, h0, c0 = random_inputs(L=7, N=n_elements)
        starts = torch.zeros(7, 4)
        starts[4, 2] = 1
        out, (h, c), info = rim(x, (h0, c0), episode_starts=starts)
        for grad in (True, False):  # without gradient, one step skips the merged [W_q | W_hh] product (rollouts)
            state = (h0, c0)
            with torch.set_grad_enabled(grad):
                for t in range(7):
                    o, state, i = rim(x[t : t + 1], state, episode_starts=starts[t : t + 1])
                    torch.testing.assert_close(o[0], out[t])
                    assert torch.equal(i.activation_mask[0], info.activation_mask[t])
                    torch.testing.assert_close(i.input_attention[0], info.input_attention[t])
            torch.testing.assert_close(state[0], h)
            torch.testing.assert_close(state[1], c)


def test_episode_start_resets_the_state_to_zero():
    rim = make_rim()
    x, h0, c0 = random_inputs(L=5)
    starts = torch.zeros(5, 4)
    starts[2] = 1
    out, _, _ = rim(x, (h0, c0), episode_starts=starts)
    fresh, _, _ = rim(x[2:], None)
    torch.testing.assert_close(out[2:], fresh)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("n_elements", [1, 3])
def test_start_states_run_several_sequences_one_after_the_other_in_one_row(cell, n_elements, monkeypatch):
    """``start_states``: sequences packed into the rows of one call, each reset to its own initial state at its
    first step, give the outputs, final states and gradients of running each alone (float64, to rounding: the
    batch's products differ in size); with ``run_together``'s two threads too. The policies pack PPO minibatches
    this way (``test_policies.py``)."""
    monkeypatch.setattr(rims_rl.rim_fast, "PARALLEL_LOOPS", True)
    rim = make_rim(cell=cell)
    lengths = [(4, 2), (2, 2, 2), (6,)]  # the sequences in each row, one after the other
    g = torch.Generator().manual_seed(5)
    seqs = [[torch.randn(n, 1, n_elements, D, generator=g, dtype=torch.double) for n in row] for row in lengths]
    inits = [
        [tuple(torch.randn(1, K * H, generator=g, dtype=torch.double) for _ in "hc") for _ in row] for row in lengths
    ]
    weights = list(rim.parameters())

    def gradients(outputs):
        loss = sum((o.sin() * (i + 1)).sum() for i, o in enumerate(outputs))
        return torch.autograd.grad(loss, weights + [x for row in seqs for x in row])

    alone = [
        rim(x.requires_grad_(), init)
        for row, inits_ in zip(seqs, inits, strict=True)
        for x, init in zip(row, inits_, strict=True)
    ]
    expected = [o for o, _, _ in alone]
    expected_grads = gradients(expected)
    L, B = 6, len(lengths)
    starts = torch.zeros(L, B, dtype=torch.double)
    start_states = tuple(torch.zeros(L, B, K * H, dtype=torch.double) for _ in "hc")
    for b, row in enumerate(lengths):
        for i, t in enumerate(itertools.accumulate((0, *row[:-1]))):
            starts[t, b] = 1.0
            for s, init in zip(start_states, inits[b][i], strict=True):
                s[t, b] = init[0]
    x = torch.cat([torch.cat(row) for row in seqs], dim=1)  # (6, 3, N, D): each row's sequences end to end
    for together in (False, True):
        call = (rim, x, None, starts, start_states)
        out, (h, c), _ = rims_rl.rim.run_together([call, call])[0] if together else rim(*call[1:])
        packed = [
            out[t : t + n, b : b + 1]
            for b, row in enumerate(lengths)
            for t, n in zip(itertools.accumulate((0, *row[:-1])), row, strict=True)
        ]
        for got, want in zip(packed, expected, strict=True):
            torch.testing.assert_close(got, want)
        last = [alone[i - 1] for i in itertools.accumulate(len(row) for row in lengths)]  # each row's last sequence
        torch.testing.assert_close(h, torch.cat([s[0] for _, s, _ in last]))
        if cell == "lstm":
            torch.testing.assert_close(c, torch.cat([s[1] for _, s, _ in last]))
        for got, want in zip(gradients(packed), expected_grads, strict=True):  # weights' and inputs' gradients
            torch.testing.assert_close(got, want)
        with torch.no_grad():
            torch.testing.assert_close(rim(*call[1:])[0], out)
            torch.testing.assert_close(reference_forward(*call)[0], out)


def test_start_states_are_checked():
    rim = make_rim()
    x, _, _ = random_inputs(L=3)
    starts = torch.zeros(3, 4)
    states = tuple(torch.zeros(3, 4, K * H, dtype=torch.double) for _ in "hc")
    with pytest.raises(ValueError, match="needs episode_starts"):
        rim(x, None, None, states)
    with pytest.raises(ValueError, match=r"pair of \(L, B, K\*H\)"):
        rim(x, None, starts, (states[0][:2], states[1]))
    with pytest.raises(ValueError, match="take no gradient"):
        rim(x, None, starts, (states[0].requires_grad_(), states[1]))


def test_gru_has_no_cell_state_and_lstm_does():
    x, h0, c0 = random_inputs()
    _, (_, c), _ = make_rim(cell="gru")(x, (h0, c0))
    assert torch.equal(c, torch.zeros_like(c))
    _, (_, c), _ = make_rim(cell="lstm")(x, (h0, c0))
    assert c.abs().sum() > 0


def test_ablations_input_attention_off_and_all_units_active():
    x, h0, c0 = random_inputs(N=3)
    _, _, info = make_rim(input_attention=False)(x, (h0, c0))
    assert info.activation_mask.all()
    assert torch.equal(info.null_attention, torch.zeros_like(info.null_attention))
    assert make_rim(input_attention=False).input_key is None
    _, _, info = make_rim(k_active=K)(x, (h0, c0))
    assert info.activation_mask.all()
    assert make_rim(communication=False).comm_qkv is None


def test_per_unit_parameters_are_distinct_and_lstm_forget_bias_is_one():
    rim = RIM(D, num_units=K, unit_size=H)
    for p in (rim.query_weight, rim.weight_ih, rim.weight_hh, rim.comm_qkv, rim.comm_out):
        assert not torch.equal(p[0], p[1])
    assert torch.equal(rim.bias_ih[:, 0, H : 2 * H], torch.ones(K, H))


def test_defaults_follow_the_papers_table_3():
    rim = RIM(D)
    assert (rim.num_units, rim.unit_size, rim.k_active) == (6, 100, 4)
    assert (rim.input_key_size, rim.input_value_size, rim.input_heads) == (64, 400, 4)
    assert (rim.comm_key_size, rim.comm_value_size, rim.comm_heads) == (32, 32, 4)
    assert rim.dropout == 0.1
    assert (rim.hidden_size, rim.num_layers) == (600, 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k_active=0), "k_active must be an integer in [1, num_units=6]"),
        (dict(k_active=7), "k_active must be an integer in [1, num_units=6]"),
        (dict(num_units=0), "num_units must be a positive integer"),
        (dict(unit_size=-3), "unit_size must be a positive integer"),
        (dict(cell="rnn"), "cell must be one of lstm, gru"),
        (dict(input_heads=3), "input_heads=3 must divide input_value_size=400"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(comm_heads=2.5), "comm_heads must be a positive integer"),
    ],
)
def test_bad_arguments_raise_a_sentence_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError) as err:
        RIM(D, **kwargs)
    assert message in str(err.value)


def test_bad_input_shapes_are_rejected():
    rim = make_rim()
    with pytest.raises(ValueError, match="input must have shape"):
        rim(torch.randn(3, 2, D + 1, dtype=torch.double))
    with pytest.raises(ValueError, match="state must be a pair"):
        rim(torch.randn(3, 2, D, dtype=torch.double), (torch.zeros(2, 5), torch.zeros(2, 5)))


def test_moves_between_dtypes_and_devices():
    rim = make_rim().float()
    x = torch.randn(4, 3, D)
    out, (h, _), info = rim(x)
    assert out.dtype == torch.float32 and h.shape == (3, K * H)
    if torch.cuda.is_available():
        out_gpu, _, info_gpu = rim.cuda()(x.cuda())
        torch.testing.assert_close(out_gpu.cpu(), out, atol=1e-5, rtol=1e-4)
        assert torch.equal(info_gpu.activation_mask.cpu(), info.activation_mask)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("n_elements", [1, 3])
def test_backward_through_time_with_dropout_passes_gradcheck(cell, n_elements):
    """The hand-written backward, dropout masks included, against finite differences (masks fixed by reseeding)."""
    rim = make_rim(cell=cell, dropout=0.3, num_units=4, unit_size=3, k_active=2)
    rim.train()
    x = torch.randn(3, 2, n_elements, D, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(2, 4 * 3, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(2, 4 * 3, dtype=torch.double, requires_grad=True)
    names = [n for n, _ in rim.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in rim.parameters()]

    def fn(x, h0, c0, *ps):
        with torch.random.fork_rng():
            torch.manual_seed(123)
            out, (h, c), _ = torch.func.functional_call(rim, dict(zip(names, ps, strict=True)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("input_attention", [True, False])
def test_a_dropped_unit_is_never_active_and_its_state_stays_zero(input_attention):
    torch.manual_seed(0)
    rim = RIM(8, num_units=5, unit_size=6, k_active=3, input_attention=input_attention, dropout=0.0).eval()
    x = torch.randn(7, 4, 8)
    state = tuple(torch.randn(4, 30) for _ in range(2))  # a live state: the dropped unit's part is zeroed
    with torch.no_grad():
        intact, _, intact_info = rim(x, state)
        rim.dropped_units = (1, 3)
        out, (h, _), info = rim(x, state)
    mask = info.activation_mask
    assert not mask[..., [1, 3]].any()
    assert (mask.sum(-1) == 3).all()  # the 3 units left are all active (k_A = 3), with or without input attention
    units = out.view(7, 4, 5, 6)
    assert (units[:, :, [1, 3]] == 0).all() and (h.view(4, 5, 6)[:, [1, 3]] == 0).all()
    assert not torch.equal(out, intact) and intact_info.activation_mask[..., [1, 3]].any()
    with pytest.raises(ValueError, match=r"torch\.no_grad"):
        rim(x, state)
    rim.dropped_units = (5,)
    with torch.no_grad(), pytest.raises(ValueError, match=r"dropped_units must be unit indices in \[0, 5\)"):
        rim(x, state)


def test_the_vector_input_path_is_chosen_by_sizes(monkeypatch):
    monkeypatch.setattr(rims_rl.rim_fast, "VECTOR_INPUT_PATH", None)
    choose = rims_rl.rim_fast._vector_input_path
    # Atari: CNN features 512, RIM 6 x 100, keys 64, values 100 per head, LSTM gates 400; PPO minibatches of two
    # 128-step sequences: projected; rollout steps and larger batches: per step.
    assert choose(L=128, B=2, D=512, H=100, dk=64, dv=100, G=400) == "projected"
    assert choose(L=128, B=4, D=512, H=100, dk=64, dv=100, G=400) == "projected"
    assert choose(L=1, B=8, D=512, H=100, dk=64, dv=100, G=400) == "per-step"
    assert choose(L=128, B=8, D=512, H=100, dk=64, dv=100, G=400) == "per-step"
    # CartPoleNoVel: 2 observation numbers against keys of 16 and values of 32 per head: folded for sequences; a
    # single rollout step does not pay for folding the weights.
    assert choose(L=16, B=32, D=2, H=32, dk=16, dv=32, G=128) == "folded"
    assert choose(L=1, B=32, D=2, H=32, dk=16, dv=32, G=128) == "per-step"


def test_native_loop_builds(monkeypatch):
    """The C++ loop builds where the tests run (a compiler and ninja): a broken build would otherwise only show as
    skipped C++ variants of the tests above. ``RIMS_RL_NATIVE=0`` opts out."""
    if os.environ.get("RIMS_RL_NATIVE", "1") == "0":
        pytest.skip("RIMS_RL_NATIVE=0: the C++ loop is switched off")
    monkeypatch.setattr(rims_rl.rim_fast, "NATIVE_LOOP", True)
    assert rims_rl.rim_fast._native() is not None


def test_native_loop_runs_where_it_applies_and_python_elsewhere(monkeypatch):
    """With the C++ loop on, one input vector never enters the Python loop (forward, backward, without gradient;
    with and without attention dropout); an input set still does."""
    monkeypatch.setattr(rims_rl.rim_fast, "NATIVE_LOOP", None)
    if rims_rl.rim_fast._native() is None:
        pytest.skip("the C++ loop could not be built here (test_native_loop_builds says why)")
    monkeypatch.setattr(rims_rl.rim_fast, "NATIVE_LOOP", True)
    calls = []
    for name in ("_run_loop", "_backward_loop"):
        original = getattr(rims_rl.rim_fast, name)
        monkeypatch.setattr(
            rims_rl.rim_fast, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    x, h0, c0 = random_inputs()
    rim = make_rim()
    out, _, _ = rim(x[:, :, 0], (h0, c0))
    out.sum().backward()
    with torch.no_grad():
        rim(x[:, :, 0], (h0, c0))
        rim(x[:1, :, 0], (h0, c0))
    assert calls == []
    out, _, _ = make_rim(dropout=0.2)(x[:, :, 0], (h0, c0))
    out.sum().backward()
    assert calls == []
    xs, _, _ = random_inputs(N=3)
    with torch.no_grad():
        make_rim()(xs, (h0, c0))
    assert calls == ["_run_loop"]


@pytest.mark.parametrize("comm", [(4, 3), (16, 16)], ids=["comm-4x3", "comm-16x16"])
@pytest.mark.parametrize("fused", [False, True], ids=["aten", "fused"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_python_and_cpp_loops_agree_with_attention_dropout(cell, fused, comm, monkeypatch):
    """Dropout masks are drawn before the loop, so with the same seed the C++ loop gives the Python loop's
    outputs and gradients: with ATen operators only (as on a GPU), the LSTM bit for bit and the GRU to rounding;
    with the fused CPU kernels (``FUSED_KERNELS``), to rounding (float64). Communication head sizes of 16 run the
    fused communication kernels with their sizes fixed at compile time, 4 x 3 with run-time sizes."""
    monkeypatch.setattr(rims_rl.rim_fast, "NATIVE_LOOP", None)
    if rims_rl.rim_fast._native() is None:
        pytest.skip("the C++ loop could not be built here (test_native_loop_builds says why)")
    monkeypatch.setattr(rims_rl.rim_fast, "FUSED_KERNELS", fused)
    results = []
    for native in (False, True):
        monkeypatch.setattr(rims_rl.rim_fast, "NATIVE_LOOP", native)
        rim = make_rim(cell=cell, dropout=0.3, comm_key_size=comm[0], comm_value_size=comm[1])
        x, h0, c0 = random_inputs()
        x = x[:, :, 0].requires_grad_()
        torch.manual_seed(5)
        out, (h, c), info = rim(x, (h0, c0))
        (out.sin().sum() + h.cos().sum() + c.sum()).backward()
        results.append([out, h, c, info.input_attention, x.grad, *(p.grad for p in rim.parameters())])
    tolerance = 0.0 if cell == "lstm" and not fused else 1e-12
    for python, cpp in zip(*results, strict=True):
        torch.testing.assert_close(cpp, python, rtol=0, atol=tolerance)
    torch.manual_seed(5)
    again, _, _ = make_rim(cell=cell, dropout=0.3)(x, (h0, c0))
    assert not torch.equal(again, make_rim(cell=cell, dropout=0.0)(x, (h0, c0))[0])  # dropout did act


@pytest.mark.parametrize("comm", [32, 16], ids=["comm-32", "comm-16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_kernels_match_aten_operators_in_float32(cell, dropout, comm, monkeypatch):
    """In float32 (training's precision), at sizes like the benchmark's (communication heads of 32, the paper's)
    and the configs' (16), the C++ loop's fused CPU kernels give the ATen operators' results (what a GPU runs):
    the same winners, and every output, state, input attention and gradient within 1e-5 of the tensor's largest
    magnitude (measured: up to 1.3e-6 over the three input paths with the per-step products in ``unit_mm``, 5e-7
    before; a few float32 ulps)."""
    monkeypatch.setattr(rims_rl.rim_fast, "NATIVE_LOOP", None)
    if rims_rl.rim_fast._native() is None:
        pytest.skip("the C++ loop could not be built here (test_native_loop_builds says why)")
    results = []
    for fused in (False, True):
        monkeypatch.setattr(rims_rl.rim_fast, "FUSED_KERNELS", fused)
        torch.manual_seed(0)
        sizes = dict(num_units=6, unit_size=32, k_active=4, comm_key_size=comm, comm_value_size=comm)
        rim = RIM(16, cell=cell, dropout=dropout, **sizes)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 4, 16, generator=g).requires_grad_()
        starts = torch.zeros(32, 4)
        starts[10, 2] = 1.0
        torch.manual_seed(3)
        out, (h, c), info = rim(x, episode_starts=starts)
        (out.sin().sum() + h.cos().sum() + c.sum()).backward()
        results.append(
            [info.activation_mask, out, h, c, info.input_attention, x.grad, *(p.grad for p in rim.parameters())]
        )
    (aten_mask, *aten), (fused_mask, *fused_results) = results
    assert torch.equal(fused_mask, aten_mask)
    for a, b in zip(fused_results, aten, strict=True):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_fused_activations_saturate_like_atens(monkeypatch):
    """The fused kernels' own exp (the LSTM cell's and the residual's sigmoid and tanh, the softmax among units) is
    clamped to [-87, 88]. With inputs x 1000, the cell's pre-activations go far beyond it: outputs, states and
    gradients stay finite, the winners are the same, and the outputs and states match the ATen operators' within
    1e-3 of their scale (this regime amplifies rounding: measured ~6e-5 on the folded path, 2e-5 with std::exp in
    every kernel; the gradients, sums of products of inputs ~1000, differ by up to ~6e-3 of their scale on the
    per-step path); a NaN input gives NaN where it does with the ATen operators."""
    monkeypatch.setattr(rims_rl.rim_fast, "NATIVE_LOOP", True)
    if rims_rl.rim_fast._native() is None:
        pytest.skip("the C++ loop could not be built here (test_native_loop_builds says why)")
    results, nans = [], []
    for fused in (False, True):
        monkeypatch.setattr(rims_rl.rim_fast, "FUSED_KERNELS", fused)
        torch.manual_seed(0)
        rim = RIM(16, num_units=6, unit_size=32, k_active=4)
        x = (1000 * torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(1))).requires_grad_()
        out, (h, c), info = rim(x)
        (out.sum() + c.sum()).backward()
        results.append([info.activation_mask, out, h, c, x.grad, *(p.grad for p in rim.parameters())])
        nan_in = x.detach().clone()
        nan_in[3, 1, 0] = float("nan")
        with torch.no_grad():
            nans.append(rim(nan_in)[0].isnan())
    assert nans[0][3, 1].any() and torch.equal(nans[1], nans[0])
    (aten_mask, *aten), (fused_mask, *fused_results) = results
    assert torch.equal(fused_mask, aten_mask)
    for i, (a, b) in enumerate(zip(fused_results, aten, strict=True)):
        assert a.isfinite().all()
        if i < 3:  # the outputs and states (the gradients, products of large numbers here, only finite)
            assert (a - b).abs().max() <= 1e-3 * b.abs().max()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_run_together_equals_one_after_the_other(cell, dropout, monkeypatch):
    """Two RIMs (an actor's and a critic's) through ``run_together`` with ``PARALLEL_LOOPS``: the same outputs,
    states, infos and gradients as calling them one after the other, with and without gradient (on the C++ loop
    their loops run on two threads at once, one OpenMP thread each; the dropout masks are drawn before, in call
    order, so they are the same too)."""
    monkeypatch.setattr(rims_rl.rim_fast, "PARALLEL_LOOPS", True)
    threads = torch.get_num_threads()
    a, b = make_rim(cell=cell, dropout=dropout), make_rim(cell=cell, k_active=4, dropout=dropout)
    x, h0, c0 = random_inputs()
    x = x[:, :, 0].requires_grad_()
    h0.requires_grad_()
    starts = torch.zeros(x.shape[:2])
    starts[2, 1] = 1.0
    leaves = [x, h0, *a.parameters(), *b.parameters()]
    results = []
    for together in (False, True):
        for p in leaves:
            p.grad = None
        calls = [(a, x, (h0, c0), starts), (b, x * 2.0, None, starts)]
        torch.manual_seed(3)
        outs = rims_rl.rim.run_together(calls) if together else [rim(i, s, e) for rim, i, s, e in calls]
        sum(o.sin().sum() + h.cos().sum() + c.sum() for o, (h, c), _ in outs).backward()
        with torch.no_grad():
            no_grad = rims_rl.rim.run_together(calls) if together else [rim(i, s, e) for rim, i, s, e in calls]
        flat = [t for o, (h, c), info in outs for t in (o, h, c, info.activation_mask, info.input_attention)]
        results.append(flat + [p.grad.clone() for p in leaves] + [t for o, (h, c), _ in no_grad for t in (o, h, c)])
    for one_by_one, together in zip(*results, strict=True):
        torch.testing.assert_close(together, one_by_one, rtol=0, atol=0)
    assert torch.get_num_threads() == threads  # the loops' one-thread setting stayed in their own threads
