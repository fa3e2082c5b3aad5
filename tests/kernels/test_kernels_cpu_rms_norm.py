"""kernels.cpu_rms_norm (RMSNorm's float32 CPU passes in C) against kernels.rms_norm's torch path and the reference."""

from __future__ import annotations

import pytest
import torch

from finetune_studio.kernels import cpu_rms_norm
from finetune_studio.kernels import rms_norm as rn

pytestmark = pytest.mark.skipif(not cpu_rms_norm.available(), reason="needs AVX-512 and a C compiler")


def _grads(fn, x, w, g):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(w.requires_grad)
    out = fn(x, w)
    out.backward(g)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape", [(2, 11, 96), (1, 455, 576), (3, 7), (5, 131)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_native_within_float32_rounding_of_the_torch_path(shape, threads, weight_trains):
    """impl='auto' on float32 CPU tensors runs the kernel (forward, the input's gradient); the output, both
    gradients and the saved rstd agree with impl='torch' to float32 rounding (the sums in another order); the
    recompute from (x, rstd) gives the forward's output bit for bit; NATIVE = False gives the torch path's."""
    torch.manual_seed(2)
    x = torch.randn(shape) * 3
    w = torch.randn(shape[-1]).requires_grad_(weight_trains)
    g = torch.randn(shape)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, gx, gw = _grads(lambda a, b: rn.rms_norm(a, b, 1e-5), x, w, g)
        _, rstd = rn.rms_norm_with_rstd(x, w.detach(), 1e-5)
        again = rn.rms_norm_forward(x, w.detach(), rstd)
    finally:
        torch.set_num_threads(old)
    ref, rx, rw = _grads(lambda a, b: rn.rms_norm(a, b, 1e-5, impl="torch"), x, w, g)
    _, ref_rstd = rn.rms_norm_with_rstd(x, w.detach(), 1e-5, native=False)
    assert torch.equal(again, out)
    if x.numel() >= 1000:  # the kernel really ran (its sums in another order move some last bits)
        assert not (torch.equal(out, ref) and torch.equal(gx, rx))
    assert rstd.shape == ref_rstd.shape == (*shape[:-1], 1)
    torch.testing.assert_close(rstd, ref_rstd, rtol=2e-6, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5 * rx.abs().max().item())
    if weight_trains:
        torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5 * rw.abs().max().item())
    else:
        assert gw is None
    rn.NATIVE = False
    try:
        plain, px, _ = _grads(lambda a, b: rn.rms_norm(a, b, 1e-5), x, w, g)
    finally:
        rn.NATIVE = True
    assert torch.equal(plain, ref) and torch.equal(px, rx)


def test_native_matches_the_float64_reference():
    """Against transformers' maths in float64: the kernel's float32 output and input gradient are as close as the
    torch path's float32 ones (within 2x their error)."""
    torch.manual_seed(3)
    x, w, g = torch.randn(64, 576) * 2, torch.randn(576), torch.randn(64, 576)
    ref, rx, _ = _grads(lambda a, b: rn.rms_norm_reference(a, b, 1e-6), x.double(), w.double(), g.double())
    for impl in ("auto", "torch"):
        out, gx, _ = _grads(lambda a, b, impl=impl: rn.rms_norm(a, b, 1e-6, impl=impl), x, w, g)
        err = ((out.double() - ref).abs().max().item(), (gx.double() - rx).abs().max().item())
        if impl == "auto":
            native_err = err
        else:
            assert native_err[0] <= 2 * err[0] + 1e-7 and native_err[1] <= 2 * err[1] + 1e-7


def test_runs_on_only_float32_cpu_tensors_of_one_width():
    x = torch.randn(4, 8)
    assert cpu_rms_norm.runs_on(x, torch.randn(8))
    assert not cpu_rms_norm.runs_on(x.bfloat16(), torch.randn(8))
    assert not cpu_rms_norm.runs_on(x, torch.randn(9))
    assert not cpu_rms_norm.runs_on(x.double(), torch.randn(8).double())


def test_shapes_that_do_not_fit_are_refused_before_the_kernel_reads():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_rms_norm.rms_norm_forward_native(x, torch.randn(8), 1e-5, rstd=torch.ones(3, 1))
    with pytest.raises(ValueError, match="do not fit"):
        cpu_rms_norm.rms_norm_backward_native(torch.randn(4, 8), x, torch.randn(8), torch.ones(5, 1))
