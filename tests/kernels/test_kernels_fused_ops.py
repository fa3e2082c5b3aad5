"""kernels' SwiGLU, RMSNorm, grouped-query attention and recompute-when-saved against their eager references."""

from __future__ import annotations

import pytest
import torch

from finetune_studio.kernels.attention import gqa_attention, gqa_attention_reference
from finetune_studio.kernels.recompute import recompute_when_saved
from finetune_studio.kernels.rms_norm import rms_norm, rms_norm_reference
from finetune_studio.kernels.swiglu import swiglu, swiglu_forward, swiglu_reference


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    out.backward(g)
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


@pytest.mark.parametrize("shape", [(3, 7, 13), (1, 5), (2, 1, 177)])
def test_swiglu_gradcheck_float64(shape):
    gate = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    up = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: swiglu(g, u), (gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_transformers_ops_exactly(dtype):
    """impl='torch': the same aten ops in the same dtype, the output and both gradients bit for bit the
    reference's (so is 'auto' for bf16, which the native kernel does not take)."""
    torch.manual_seed(0)
    gate, up = torch.randn(4, 9, 37, dtype=dtype), torch.randn(4, 9, 37, dtype=dtype)
    gate.requires_grad_(), up.requires_grad_()
    impls = ("torch", "auto") if dtype == torch.bfloat16 else ("torch",)
    ref, ref_grads = _grads(swiglu_reference, gate, up)
    for impl in impls:
        out, grads = _grads(lambda g, u, impl=impl: swiglu(g, u, impl=impl), gate, up)
        assert torch.equal(out, ref)
        for a, b in zip(grads, ref_grads):
            assert torch.equal(a, b)
        assert torch.equal(swiglu_forward(gate, up, impl=impl), ref)


@pytest.mark.parametrize("shape", [(4, 9, 37), (1, 455, 1536), (3,), (2, 17)])
@pytest.mark.parametrize("threads", [1, 2])
def test_swiglu_native_float32_within_ulps_of_the_reference(shape, threads):
    """impl='auto' on float32 CPU tensors: kernels.cpu_swiglu (where it runs), within a few float32 ulps of the
    reference forward and backward, over a range that saturates the sigmoid both ways; the forward without a graph
    (the recompute's) gives the same numbers bit for bit; NATIVE = False gives torch's exactly."""
    from finetune_studio.kernels import cpu_swiglu
    from finetune_studio.kernels import swiglu as sw

    if not cpu_swiglu.available():
        pytest.skip("needs AVX-512 and a C compiler")
    torch.manual_seed(1)
    gate = (torch.randn(shape) * 6).requires_grad_()
    up = torch.randn(shape).requires_grad_()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, grads = _grads(swiglu, gate, up)
        again = swiglu_forward(gate, up)
    finally:
        torch.set_num_threads(old)
    ref, ref_grads = _grads(swiglu_reference, gate, up)
    assert torch.equal(again, out)
    assert not torch.equal(out, ref) or out.numel() < 64  # the kernel really ran (its own exponential)
    for a, b in zip([out, *grads], [ref, *ref_grads]):
        assert torch.allclose(a, b, rtol=2e-6, atol=1e-6 * b.abs().max().item())
    sw.NATIVE = False
    try:
        out_torch, grads_torch = _grads(swiglu, gate, up)
    finally:
        sw.NATIVE = True
    assert torch.equal(out_torch, ref) and all(torch.equal(a, b) for a, b in zip(grads_torch, ref_grads))


def test_swiglu_native_reads_slices_of_a_stacked_product_in_place():
    """gate and up as the two halves of one stacked product (strided rows): the kernel reads them where they are, with
    no contiguous copies (the memory estimate counts none), and gives what it gives on contiguous copies."""
    from finetune_studio.kernels import cpu_swiglu

    if not cpu_swiglu.available():
        pytest.skip("needs AVX-512 and a C compiler")
    torch.manual_seed(2)
    stacked = torch.randn(3, 11, 2 * 37) * 4
    gate, up = stacked[..., :37], stacked[..., 37:]
    assert not gate.is_contiguous()
    assert cpu_swiglu._rows(gate).data_ptr() == gate.data_ptr()  # a view, not a copy
    grad = torch.randn(3, 11, 37)
    out = cpu_swiglu.swiglu_forward_native(gate, up)
    d_gate, d_up = cpu_swiglu.swiglu_backward_native(grad, gate, up)
    assert torch.equal(out, cpu_swiglu.swiglu_forward_native(gate.contiguous(), up.contiguous()))
    copies = cpu_swiglu.swiglu_backward_native(grad, gate.contiguous(), up.contiguous())
    assert torch.equal(d_gate, copies[0]) and torch.equal(d_up, copies[1])
    ref = torch.nn.functional.silu(gate) * up
    assert out.shape == (3, 11, 37) and torch.allclose(out, ref, rtol=2e-6, atol=1e-5)


def test_swiglu_saves_two_tensors_not_three():
    gate = torch.randn(8, 64, requires_grad=True)
    up = torch.randn(8, 64, requires_grad=True)
    for fn, expected in ((swiglu_reference, 3), (swiglu, 2)):
        saved: set[int] = set()

        def pack(t, saved=saved):
            saved.add(t.data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(gate, up)
        assert len(saved) == expected


def test_swiglu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="differ"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="impl"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3), impl="triton")


@pytest.mark.parametrize("hidden", [3, 7, 64, 131])
def test_rms_norm_gradcheck_float64_input_and_weight(hidden):
    x = torch.randn(3, 5, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.randn(hidden, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rms_norm_matches_transformers_maths(dtype, tol):
    torch.manual_seed(1)
    x = (torch.randn(2, 11, 96) * 3).to(dtype).requires_grad_()
    w = torch.randn(96).to(dtype).requires_grad_()
    out, (gx, gw) = _grads(lambda a, b: rms_norm(a, b, 1e-5, impl="torch"), x, w)
    ref, (rx, rw) = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), x, w)
    assert torch.equal(out, ref)  # impl='torch' runs the reference's ops ('auto': test_kernels_cpu_rms_norm.py)
    assert gx.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(gx.float(), rx.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=tol, atol=tol * 10)


def test_rms_norm_keeps_a_16_bit_input_in_16_bits():
    """transformers keeps a float32 copy of a bfloat16 input (4 bytes per element); the op keeps the input."""
    x = torch.randn(16, 128, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(128, dtype=torch.bfloat16)

    def saved_bytes(fn):
        seen = {}
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
            lambda t: t,
        ):
            fn(x, w, 1e-6)
        return sum(v for k, v in seen.items() if k != w.untyped_storage().data_ptr())

    assert saved_bytes(rms_norm_reference) == 16 * 128 * 4 + 16 * 4
    assert saved_bytes(rms_norm) == 16 * 128 * 2 + 16 * 4


@pytest.mark.parametrize("heads, kv, t, d", [(4, 2, 9, 8), (6, 3, 13, 5), (3, 1, 7, 4)])
def test_gqa_attention_gradcheck_with_padding_mask(heads, kv, t, d):
    q = torch.randn(2, heads, t, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv, t, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv, t, d, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(2, 1, t, t).clone()
    mask[1, :, :, -2:] = False  # right padding on the second row
    mask[1, :, -2:, 0] = True
    assert torch.autograd.gradcheck(lambda a, b, c: gqa_attention(a, b, c, mask), (q, k, v))
    out, grads = _grads(lambda a, b, c: gqa_attention(a, b, c, mask), q, k, v)
    ref, ref_grads = _grads(lambda a, b, c: gqa_attention_reference(a, b, c, mask), q, k, v)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_gqa_attention_rejects_uneven_heads():
    with pytest.raises(ValueError, match="evenly"):
        gqa_attention(torch.randn(1, 3, 4, 2), torch.randn(1, 2, 4, 2), torch.randn(1, 2, 4, 2))


def _census(fn):
    """Bytes of the distinct storages saved for backward, and the function's result."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_recompute_when_saved_rebuilds_instead_of_keeping():
    """h = silu(g) * u feeds a linear layer that trains (it saves h as [B*T, i]); inside the block h is rebuilt
    in backward from g and u, the gradients are unchanged, and an outer hook still sees every other tensor."""
    torch.manual_seed(0)
    g0, u0 = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    w0 = torch.randn(8, 32)

    def run(recompute: bool):
        g, u, w = g0.clone().requires_grad_(), u0.clone().requires_grad_(), w0.clone().requires_grad_()

        def fwd():
            h = swiglu(g, u)
            if not recompute:
                return torch.nn.functional.linear(h, w)
            gd, ud = g.detach(), u.detach()
            with recompute_when_saved(h, lambda: swiglu_forward(gd, ud)):
                return torch.nn.functional.linear(h, w)

        nbytes, out = _census(fwd)
        out.pow(2).sum().backward()
        return nbytes, out.detach(), g.grad, u.grad, w.grad

    kept, *plain = run(False)
    rebuilt, *fused = run(True)
    assert kept - rebuilt == 3 * 5 * 32 * 4  # h is no longer kept; g, u (swiglu) and w (linear) still are
    for a, b in zip(plain, fused):
        assert torch.equal(a, b)


def test_recompute_when_saved_does_nothing_without_gradients():
    x = torch.randn(4, 4)
    with torch.no_grad(), recompute_when_saved(x, lambda: x):
        y = x * 2
    assert not y.requires_grad
