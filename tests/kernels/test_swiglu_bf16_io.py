"""SwiGLU with a bf16 h (``kernels.swiglu`` ``out_dtype``, ``BF16_IO``): the float32 path's numbers bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny_model import FAMILY_SHAPE, tiny_bf16_mixed_model

from finetune_studio.engine.train.model_patches import fused_ops
from finetune_studio.kernels import cpu_swiglu
from finetune_studio.kernels import swiglu as sw
from finetune_studio.kernels.lora_linear import lora_linear, stack_weight


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _grads(fn, gate, up, grad):
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = fn(gate, up)
    out.backward(grad)
    return out.detach(), gate.grad, up.grad


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("shape", [(455, 1536), (3, 37), (2, 5, 19)])
def test_bf16_h_is_the_float32_h_rounded_and_its_gradient_widened(shape, native, monkeypatch):
    if native and not cpu_swiglu.bf16_available():
        pytest.skip("the bf16 SwiGLU kernels do not run on this CPU")
    monkeypatch.setattr(sw, "NATIVE", native)
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen) * 2
    gate.view(-1)[:3] = torch.tensor([1e-39, -1e-40, 0.0])  # subnormals round as torch rounds them
    grad = torch.randn(shape, generator=gen).to(torch.bfloat16)
    h32, dg32, du32 = _grads(sw.swiglu, gate, up, grad.float())
    h16, dg16, du16 = _grads(lambda g, u: sw.swiglu(g, u, out_dtype=torch.bfloat16), gate, up, grad)
    assert h16.dtype == torch.bfloat16 and dg16.dtype == du16.dtype == torch.float32
    assert torch.equal(_bits(h16), _bits(h32.to(torch.bfloat16)))
    assert torch.equal(_bits(dg16), _bits(dg32)) and torch.equal(_bits(du16), _bits(du32))
    again = sw.swiglu_forward(gate, up, out_dtype=torch.bfloat16)
    assert torch.equal(_bits(again), _bits(h16))


def test_the_kernel_rounds_to_nearest_even_as_torch_does():
    if not cpu_swiglu.bf16_available():
        pytest.skip("the bf16 SwiGLU kernels do not run on this CPU")
    bits = torch.randint(-(2**31), 2**31 - 1, (400_000,), generator=torch.Generator().manual_seed(3))
    x = bits.to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)][: 16 * 20_000].reshape(-1, 16)
    gate = torch.full_like(x, 100.0)  # silu(100) == 100 in float32: h = 100 x, any float32 bit pattern's range
    h = cpu_swiglu.swiglu_forward_native(gate, x)
    assert torch.equal(_bits(cpu_swiglu.swiglu_forward_native_bf16(gate, x)), _bits(h.to(torch.bfloat16)))


@pytest.mark.parametrize("shape", [(3, 47), (5, 16), (2, 33), (1, 2), (4, 1536)])
def test_the_kernel_rounds_tails_zeros_and_nans(shape):
    if not cpu_swiglu.bf16_available():
        pytest.skip("the bf16 SwiGLU kernels do not run on this CPU")
    gen = torch.Generator().manual_seed(4)
    gate, up = torch.randn(shape, generator=gen) * 4, torch.randn(shape, generator=gen)
    gate.view(-1)[0], up.view(-1)[-1] = float("nan"), 0.0
    got = cpu_swiglu.swiglu_forward_native_bf16(gate, up).float()
    want = cpu_swiglu.swiglu_forward_native(gate, up).to(torch.bfloat16).float()
    assert torch.isnan(got.view(-1)[0]) and got.view(-1)[-1] == 0
    assert torch.equal(_bits(got.view(-1)[1:]), _bits(want.view(-1)[1:]))


def test_a_stacked_lora_linear_takes_a_bf16_input_with_the_float32_inputs_numbers():
    gen = torch.Generator().manual_seed(1)
    n_in, n_out, r = 40, 24, 4
    weight = (torch.randn(n_out, n_in, generator=gen) * 0.1).to(torch.bfloat16)
    stacked = stack_weight(weight, r)
    weight = stacked[:n_out]
    a, b = torch.randn(r, n_in, generator=gen) * 0.1, torch.randn(n_out, r, generator=gen) * 0.1
    x32 = torch.randn(2, 7, n_in, generator=gen).to(torch.bfloat16).float()
    grad = torch.randn(2, 7, n_out, generator=gen)
    results = []
    for x in (x32, x32.to(torch.bfloat16)):
        x, aa, bb = x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
        out = lora_linear(x, weight, None, aa, bb, 2.0, adapter_dtype=torch.bfloat16, stacked=stacked)
        out.backward(grad)
        results.append((out.detach(), x.grad, aa.grad, bb.grad))
    (o32, gx32, ga32, gb32), (o16, gx16, ga16, gb16) = results
    assert o16.dtype == torch.float32 and gx16.dtype == torch.bfloat16
    assert torch.equal(o16, o32) and torch.equal(ga16, ga32) and torch.equal(gb16, gb32)
    assert torch.equal(gx16.float(), gx32)
    with pytest.raises(ValueError, match="x's dtype"):
        lora_linear(x32.to(torch.bfloat16), weight, None, a, b, 2.0, adapter_dtype=torch.bfloat16)


SHAPE = FAMILY_SHAPE
IDS = torch.randint(0, SHAPE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))


def _model():
    return tiny_bf16_mixed_model()


def test_a_bf16_mixed_step_is_the_same_bit_for_bit_with_and_without_a_bf16_h(monkeypatch):
    model = _model()
    mlp = model.get_base_model().model.layers[0].mlp
    results, used = {}, {}
    for on in (True, False, True):
        monkeypatch.setattr(sw, "BF16_IO", on)
        used[on] = fused_ops._bf16_down(mlp.down_proj, torch.zeros(1, dtype=torch.float32)) is not None
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.setdefault(on, []).append((loss.item(), grads))
    assert used == {True: True, False: False}
    (loss_on, grads_on), (again, _) = results[True]
    loss_off, grads_off = results[False][0]
    assert loss_on == loss_off == again
    assert grads_on.keys() == grads_off.keys() and any("down_proj" in n for n in grads_on)
    for name, g in grads_off.items():
        assert torch.equal(_bits(grads_on[name]), _bits(g)), name
