"""The fused C++ loop's own products (``csrc/rim_loop.cpp``): ``unit_mm`` for the per-step weight products (bias + a @ w
per unit, with few rows, as ``torch.baddbmm`` computes it up to rounding: its sums run in another order), and the
projected path's products on the projections laid out by head (``_vector_projections(..., by_head=True)``)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import rims_rl.rim_fast
from rims_rl import RIM


@pytest.fixture(scope="module")
def native():
    module = rims_rl.rim_fast._native()
    if module is None:
        pytest.skip("the C++ loop could not be built here (test_native_loop_builds says why)")
    return module


def operands(K, M, N, P, bias, dtype, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, M, N, generator=g, dtype=dtype)
    if strided:  # the loop passes slices of per-sequence buffers and transposed views
        a = torch.randn(K, N, M, generator=g, dtype=dtype).transpose(1, 2)
    w = torch.randn(K, N, P, generator=g, dtype=dtype)
    b = None
    if bias == "row":
        b = torch.randn(K, 1, P, generator=g, dtype=dtype)
    elif bias == "full":  # (a narrowed buffer, as the gates' part of [queries | gates])
        b = torch.randn(K, M, P + 3, generator=g, dtype=dtype)[:, :, 3:]
    return b, a, w


def reference(b, a, w):
    """In float64, whatever the operands' type."""
    a64, w64 = a.double(), w.double()
    return torch.bmm(a64, w64) if b is None else torch.baddbmm(b.double(), a64, w64)


# every column path (a work item's 8 or 4 32-byte vectors with one or two rows, its 3 with more; then, in a last item,
# two 32-byte vectors, one, a 16-byte one, single numbers) and row block (8 with AVX-512, 4, 2, 1; a last block of 3
# or 5-7 rows filled up), in shapes small enough to run on one thread and large enough to be split among threads; and
# the loop's own shapes
SHAPES = [(3, 1, 5, 1), (2, 3, 7, 3), (2, 5, 9, 13), (3, 7, 17, 37), (6, 2, 100, 400), (6, 9, 64, 100),
          (12, 1, 100, 4), (12, 1, 4, 400), (6, 16, 33, 129), (2, 6, 11, 24), (3, 13, 17, 40), (4, 2, 9, 100),
          (3, 1, 7, 70), (6, 2, 400, 100), (3, 40, 50, 400)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bias", [None, "row", "full"], ids=["no-bias", "bias-row", "bias-full"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_unit_mm_matches_baddbmm(native, shape, strided, bias, dtype):
    """Within a few units of rounding of each output's terms: |error| <= 4 eps N max|a_mn w_np| (float64 reference)."""
    b, a, w = operands(*shape, bias, dtype, strided)
    got = native.unit_mm(b, a, w)
    assert got.dtype == dtype and got.shape == (shape[0], shape[1], shape[3]) and got.is_contiguous()
    want = reference(b, a, w)
    eps = torch.finfo(dtype).eps
    bound = 4 * eps * shape[2] * (a.double().abs().max() * w.double().abs().max() + 1)
    assert (got.double() - want).abs().max() <= bound


def test_unit_mm_runs_its_own_kernel_on_several_threads_with_the_same_numbers(native):
    """The product the loop calls is unit_mm's own kernel (not ATen's bmm, which it leaves larger products to), and
    it gives the same numbers on one thread as on several: each output is summed by one thread, in one order."""
    b, a, w = operands(6, 2, 100, 400, "row", torch.float32, strided=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        several = native.unit_mm(b, a, w)
    names = {e.key for e in prof.key_averages()}
    assert "rims_rl::unit_mm" in names and "aten::baddbmm" not in names
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.unit_mm(b, a, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, several)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bias", [None, "row", "full"], ids=["no-bias", "bias-row", "bias-full"])
@pytest.mark.parametrize(
    "shape",
    [(6, 8, 100, 400), (3, 13, 17, 40), (4, 5, 9, 13), (6, 2, 100, 400), (4, 2, 9, 100)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_unit_mm_computes_the_marked_rows_with_the_same_numbers(native, shape, bias, dtype):
    """With ``rows`` (the loop's active units, bool or 1.0 / 0.0), the marked rows are exactly those of the product of
    all rows (each row's sums do not depend on the rows computed with it), and the others are the bias, or zero."""
    b, a, w = operands(*shape, bias, dtype, strided=True)
    full = native.unit_mm(b, a, w)
    K, M = shape[:2]
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(K, M, generator=g) < p for p in (0.2, 0.5, 0.7, 0.9)]
    masks += [torch.zeros(K, M, dtype=torch.bool), torch.ones(K, M, dtype=torch.bool)]
    for mask in masks:
        for rows in (mask, mask.to(dtype)):
            got = native.unit_mm(b, a, w, rows=rows)
            assert torch.equal(got[mask], full[mask])
            left = torch.zeros_like(full) if b is None else b.expand_as(full)
            assert torch.equal(got[~mask], left[~mask])


def test_unit_mm_refuses_rows_of_another_shape_or_type(native):
    b, a, w = operands(2, 3, 5, 7, None, torch.float32, strided=False)
    for rows in (
        torch.ones(2, 4, dtype=torch.bool),
        torch.ones(3, dtype=torch.bool),
        torch.ones(2, 3, dtype=torch.int64),
    ):
        with pytest.raises(RuntimeError, match="rows must be"):
            native.unit_mm(b, a, w, rows=rows)


def test_unit_mm_leaves_other_products_to_aten(native):
    """More than 256 rows of large weights (where bmm catches up) and weights that are not contiguous go to ATen's
    bmm, with its numbers exactly."""
    for b, a, w in (
        operands(6, 300, 100, 400, "row", torch.float32, strided=False),
        (None, torch.randn(6, 2, 40), torch.randn(6, 30, 40).transpose(1, 2)),
    ):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = native.unit_mm(b, a, w)
        assert "rims_rl::unit_mm" not in {e.key for e in prof.key_averages()}
        assert torch.equal(got, torch.bmm(a, w) if b is None else torch.baddbmm(b, a, w))


def test_projections_by_head_hold_the_same_numbers():
    """The by-head layouts are the einsums' own; the per-step layouts are copies of the same numbers."""
    g = torch.Generator().manual_seed(0)
    L, B, K, H, Hi, dk, dv, G = 5, 3, 4, 6, 2, 7, 5, 24
    keys, values = torch.randn(L, B, Hi, dk, generator=g), torch.randn(L, B, Hi, dv, generator=g)
    weights = (torch.randn(K, H, Hi * dk, generator=g), torch.randn(K, 1, Hi * dk, generator=g),
               torch.randn(K, Hi * dv, G, generator=g), torch.randn(K, 1, G, generator=g))  # fmt: skip
    rows = rims_rl.rim_fast._vector_projections(keys, values, weights)
    by_head = rims_rl.rim_fast._vector_projections(keys, values, weights, by_head=True)
    assert by_head.score_weight.shape == (Hi, L, B, K, H) and by_head.score_weight.is_contiguous()
    assert by_head.gates.shape == (Hi, L, B, K, G) and by_head.gates.is_contiguous()
    assert torch.equal(by_head.score_weight.permute(1, 3, 2, 4, 0).reshape(L, K * B, H, Hi), rows.score_weight)
    assert torch.equal(by_head.gates.permute(1, 3, 2, 0, 4).reshape(L, K * B, Hi, G), rows.gates)
    assert torch.equal(by_head.score_bias, rows.score_bias) and torch.equal(by_head.gate_bias, rows.gate_bias)


@pytest.mark.parametrize("fused_backward", [False, True], ids=["aten-backward", "fused-backward"])
def test_projected_path_by_head_with_fused_kernels_switched_off_before_the_backward(
    native, fused_backward, monkeypatch
):
    """A forward with the fused kernels lays the projections out by head; a backward after FUSED_KERNELS was turned
    off reads them with ATen operators (one step's slice copied to their layout) and gives the same gradients as a
    fused backward, to rounding (float64), and the Python loop's."""
    monkeypatch.setattr(rims_rl.rim_fast, "VECTOR_INPUT_PATH", "projected")
    layouts = []
    project = rims_rl.rim_fast._vector_projections

    def spy(keys, values, weights, by_head=False):
        layouts.append(by_head)
        return project(keys, values, weights, by_head)

    monkeypatch.setattr(rims_rl.rim_fast, "_vector_projections", spy)
    results = []
    for loop in ("python", "cpp"):
        monkeypatch.setattr(rims_rl.rim_fast, "NATIVE_LOOP", loop == "cpp")
        monkeypatch.setattr(rims_rl.rim_fast, "FUSED_KERNELS", loop == "cpp")
        torch.manual_seed(0)
        rim = RIM(7, num_units=5, unit_size=6, k_active=3, input_key_size=4, input_heads=2, comm_key_size=4,
                  comm_value_size=3, comm_heads=2, dropout=0.2).double()  # fmt: skip
        x = torch.randn(9, 4, 7, dtype=torch.double, generator=torch.Generator().manual_seed(1)).requires_grad_()
        torch.manual_seed(2)
        out, (h, c), _ = rim(x)
        monkeypatch.setattr(rims_rl.rim_fast, "FUSED_KERNELS", loop == "cpp" and fused_backward)
        (out.sin().sum() + h.cos().sum() + c.sum()).backward()
        results.append([out, x.grad, *(p.grad for p in rim.parameters())])
    assert layouts == [False, True]  # the Python loop's per-step layout, the fused C++ loop's by head
    for python, cpp in zip(*results, strict=True):
        torch.testing.assert_close(cpp, python, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", ["folded", "projected"])
def test_fused_loop_gives_the_same_numbers_on_one_thread_and_on_several(native, path, monkeypatch):
    """The fused kernels and unit_mm split their rows among the intra-op threads at these sizes (a CartPoleNoVel
    minibatch); each row is computed by one thread as it would be serially, so the outputs and every gradient are
    bit for bit those of one thread."""
    monkeypatch.setattr(rims_rl.rim_fast, "NATIVE_LOOP", True)
    monkeypatch.setattr(rims_rl.rim_fast, "FUSED_KERNELS", True)
    monkeypatch.setattr(rims_rl.rim_fast, "VECTOR_INPUT_PATH", path)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            rim = RIM(4, num_units=6, unit_size=32, k_active=4, input_key_size=16, comm_key_size=16,
                      comm_value_size=16, dropout=0.1)  # fmt: skip
            x = torch.randn(16, 48, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
            torch.manual_seed(2)
            out, (h, c), _ = rim(x)
            (out.sin().sum() + h.cos().sum() + c.sum()).backward()
            results.append([out, h, c, x.grad, *(p.grad for p in rim.parameters())])
    finally:
        torch.set_num_threads(threads)
    for one, several in zip(*results, strict=True):
        assert torch.equal(one, several)
