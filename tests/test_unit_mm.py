"""The C++ loop's own product for the per-step weight products (``unit_mm`` in ``csrc/rim_loop.cpp``): bias + a @ w
per unit, with few rows, as ``torch.baddbmm`` computes it up to rounding (its sums run in another order)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import rims_rl.rim_fast


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


# every column path (two 32-byte vectors, one, a 16-byte one, single numbers) and row block (4, 2, 1), in shapes
# small enough to run on one thread and large enough to be split among threads; and the loop's own shapes
SHAPES = [(3, 1, 5, 1), (2, 3, 7, 3), (2, 5, 9, 13), (3, 7, 17, 37), (6, 2, 100, 400), (6, 9, 64, 100),
          (12, 1, 100, 4), (12, 1, 4, 400), (6, 16, 33, 129)]  # fmt: skip


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


def test_unit_mm_leaves_other_products_to_aten(native):
    """Many rows of large weights (where bmm is as fast) and weights that are not contiguous go to ATen's bmm, with
    its numbers exactly."""
    for b, a, w in (
        operands(6, 64, 100, 400, "row", torch.float32, strided=False),
        (None, torch.randn(6, 2, 40), torch.randn(6, 30, 40).transpose(1, 2)),
    ):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = native.unit_mm(b, a, w)
        assert "rims_rl::unit_mm" not in {e.key for e in prof.key_averages()}
        assert torch.equal(got, torch.bmm(a, w) if b is None else torch.baddbmm(b, a, w))
