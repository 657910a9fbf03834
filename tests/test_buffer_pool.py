"""The C++ loop's per-sequence buffers kept between calls (``BufferPool`` in ``csrc/rim_loop.cpp``): a buffer is
handed out again only once nothing holds it, so outputs a caller keeps and tapes awaiting their backward stay intact,
and reuse changes no number."""

from __future__ import annotations

import pytest
import torch

import rims_rl.rim_fast
from rims_rl import RIM


@pytest.fixture
def native(monkeypatch):
    module = rims_rl.rim_fast._native()
    if module is None:
        pytest.skip("the C++ loop could not be built here (test_native_loop_builds says why)")
    monkeypatch.setattr(rims_rl.rim_fast, "FUSED_KERNELS", True)
    module.release_buffers()
    yield module
    module.release_buffers()


def sizes_with_large_buffers():
    """A RIM and inputs whose per-sequence buffers (K, L, B, 4H) are ~2.5 MB, above the pool's 1 MB."""
    torch.manual_seed(0)
    rim = RIM(32, num_units=6, unit_size=100, k_active=4, dropout=0.0)  # (no random masks: calls comparable)
    xs = [torch.randn(32, 8, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    return rim, xs


def grads(rim):
    return [p.grad.clone() for p in rim.parameters()]


def test_kept_outputs_and_pending_tapes_are_not_reused(native):
    rim, xs = sizes_with_large_buffers()
    # each sequence alone, the pool emptied in between: the reference numbers
    want = []
    for x in xs:
        rim.zero_grad()
        out, _, _ = rim(x)
        out.square().sum().backward()
        want.append((out.detach().clone(), grads(rim)))
        del out
        native.release_buffers()
    # all three forwards first (outputs and tapes held), then the backwards in reverse order
    outs = [rim(x)[0] for x in xs]
    assert native.buffer_bytes() > 0
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 3
    for i in reversed(range(3)):
        rim.zero_grad()
        outs[i].square().sum().backward()
        assert torch.equal(outs[i].detach(), want[i][0])
        for g, w in zip(grads(rim), want[i][1], strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "aten"])
@pytest.mark.parametrize("path", ["per-step", "projected", "folded"])
def test_freed_buffers_are_reused_and_the_pool_stays_bounded(native, monkeypatch, fused, path):
    """A call on buffers another input's call left behind gives exactly the numbers of fresh buffers (no value is read
    before it is written), and the pool hands out the same buffers again instead of growing; with the fused kernels
    and with ATen operators, on each of the input attention's paths."""
    monkeypatch.setattr(rims_rl.rim_fast, "FUSED_KERNELS", fused)
    monkeypatch.setattr(rims_rl.rim_fast, "VECTOR_INPUT_PATH", path)
    rim, xs = sizes_with_large_buffers()

    def call(x):
        rim.zero_grad()
        out, _, _ = rim(x)
        out.square().sum().backward()
        return out.detach().clone(), grads(rim)

    fresh = call(xs[0])
    native.release_buffers()
    call(xs[1])  # the pool now holds xs[1]'s tape and gradients
    held = native.buffer_bytes()
    assert held > 0
    for x in (xs[0], xs[2], xs[0]):
        got = call(x)
        assert native.buffer_bytes() == held  # the same buffers again, none added
    for a, b in zip((got[0], *got[1]), (fresh[0], *fresh[1]), strict=True):
        assert torch.equal(a, b)
    native.release_buffers()
    assert native.buffer_bytes() == 0


def test_release_buffers_from_python(native):
    rim, xs = sizes_with_large_buffers()
    out, _, _ = rim(xs[0])
    del out
    assert native.buffer_bytes() > 0
    rims_rl.rim_fast.release_buffers()
    assert native.buffer_bytes() == 0


def test_a_call_under_inference_mode_leaves_no_inference_buffer_for_training(native):
    """Tensors made under ``torch.inference_mode`` may not be written or saved for backward outside it: a buffer made
    there must not come back to a training call."""
    rim, xs = sizes_with_large_buffers()
    with torch.inference_mode():
        out, _, _ = rim(xs[0])
    del out
    out, _, _ = rim(xs[0])
    out.sum().backward()
    assert all(p.grad is not None for p in rim.parameters())
