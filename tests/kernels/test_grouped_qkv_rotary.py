"""kernels.grouped_qkv_rotary (q/k/v's LoRA epilogue and rotary in one C pass a row) against today's ops (the grouped
product, then cpu_rotary) and the float32 reference, and its wiring into the fused attention forward."""

from __future__ import annotations

import pytest
import torch
from tiny_model import FAMILY_SHAPE, step_with_nodes, tiny_bf16_mixed_model

from finetune_studio.core.config import TrainConfig
from finetune_studio.kernels import grouped_qkv_rotary as qkv_rotary
from finetune_studio.kernels.grouped_lora_linear import stack_group
from finetune_studio.kernels.grouped_qkv_rotary import grouped_qkv_rotary, grouped_qkv_rotary_reference

pytestmark = pytest.mark.skipif(not qkv_rotary.available(), reason="needs AVX-512 (BW, VL, BF16) and a C compiler")

SCALINGS = (2.0, 0.5, 1.25)

# (batch, tokens, in, head_dim, q heads, kv heads, rank, cos batch): odd token counts, a head_dim whose half is a
# masked 16-lane block (8, 36) or four whole ones (64), widths with a masked 32-column tail in backward
SHAPES = [
    (1, 7, 48, 8, 6, 2, 4, 1),
    (2, 5, 64, 64, 3, 1, 16, 2),
    (1, 13, 40, 36, 2, 1, 3, 1),
    (3, 1, 24, 8, 3, 3, 2, 3),
]


def _group(shape, bias: bool, seed: int = 0):
    b, t, n_in, d, hq, hkv, r, cb = shape
    g = torch.Generator().manual_seed(seed)
    outs = (hq * d, hkv * d, hkv * d)
    weights = [(torch.randn(o, n_in, generator=g) / n_in**0.5).bfloat16() for o in outs]
    stacked, _ = stack_group(weights, [r] * 3)
    lora_as = [(torch.randn(r, n_in, generator=g) / n_in**0.5).requires_grad_() for _ in outs]
    lora_bs = [(torch.randn(o, r, generator=g) * 0.3).requires_grad_() for o in outs]
    biases = [torch.randn(o, generator=g) if bias else None for o in outs]
    angles = torch.randn(cb, t, d, generator=g) * 3
    x = torch.randn(b, t, n_in, generator=g)
    return x, weights, stacked, biases, lora_as, lora_bs, angles.cos(), angles.sin()


def _run(fn, x, lora_as, lora_bs, seed: int = 7):
    """Outputs and the gradients of x, each A and each B for fixed random output gradients."""
    for p in (x, *lora_as, *lora_bs):
        p.grad = None
    outs = fn()
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=g) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [p.grad.clone() for p in (x, *lora_as, *lora_bs)]


def _strides(t: torch.Tensor) -> list[int]:
    return [s for s, n in zip(t.stride(), t.shape) if n != 1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_c_pass_gives_the_ops_numbers_and_the_reference_to_bf16_rounding(shape, bias):
    """Against today's ops (grouped product, float32 addmm_, cpu_rotary): every gradient bit for bit (the same bf16
    gradient buffer), the outputs to a few float32 ulps (the low-rank sum's order); against the float32 reference:
    bf16 products' rounding."""
    x, weights, stacked, biases, lora_as, lora_bs, cos, sin = _group(shape, bias)
    x.requires_grad_()
    d = shape[3]

    def op(impl):
        return lambda: grouped_qkv_rotary(
            x, stacked, biases, lora_as, lora_bs, SCALINGS, cos=cos, sin=sin, head_dim=d, impl=impl
        )

    assert qkv_rotary.runs_on(x, cos, sin, d, stacked)
    fused, fused_grads = _run(op("auto"), x, lora_as, lora_bs)
    ops, ops_grads = _run(op("ops"), x, lora_as, lora_bs)
    ref, ref_grads = _run(
        lambda: grouped_qkv_rotary_reference(x, weights, biases, lora_as, lora_bs, SCALINGS, cos, sin, d),
        x,
        lora_as,
        lora_bs,
    )
    for got, want in zip(fused, ops):
        assert got.shape == want.shape and _strides(got) == _strides(want)  # the layout the attention reads
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    for got, want in zip(fused_grads, ops_grads):
        assert torch.equal(got, want)
    for got, want in zip((*fused, *fused_grads), (*ref, *ref_grads)):
        assert _rel(got, want) < 2e-2


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_a_bf16_input_gives_the_float32_inputs_numbers(shape):
    """x in bf16: the product rounds x to bf16 either way, so the outputs and the adapters' gradients are those of
    the same values in float32 bit for bit, and x's gradient that one rounded to bf16 (the bf16 product's result)."""
    x32, _, stacked, biases, lora_as, lora_bs, cos, sin = _group(shape, bias=True, seed=3)
    x16 = x32.bfloat16().requires_grad_()
    x32 = x16.detach().float().requires_grad_()
    d = shape[3]
    runs = []
    for x in (x16, x32):
        runs.append(
            _run(
                lambda x=x: grouped_qkv_rotary(
                    x, stacked, biases, lora_as, lora_bs, SCALINGS, cos=cos, sin=sin, head_dim=d
                ),
                x,
                lora_as,
                lora_bs,
            )
        )
    (outs16, grads16), (outs32, grads32) = runs
    assert all(o.dtype == torch.float32 for o in outs16)
    for got, want in zip(outs16, outs32):
        assert torch.equal(got, want)
    assert grads16[0].dtype == torch.bfloat16 and torch.equal(grads16[0], grads32[0].bfloat16())
    for got, want in zip(grads16[1:], grads32[1:]):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_an_unused_output_and_frozen_adapters():
    """k unused by the loss: its adapters' gradients are zero; a frozen B gets none, the others as before."""
    shape = SHAPES[0]
    x, _, stacked, biases, lora_as, lora_bs, cos, sin = _group(shape, bias=False)
    lora_bs[2].requires_grad_(False)
    q, k, v = grouped_qkv_rotary(x, stacked, biases, lora_as, lora_bs, SCALINGS, cos=cos, sin=sin, head_dim=shape[3])
    (q.sum() + v.square().sum()).backward()
    assert lora_as[1].grad.abs().max() == 0 and lora_bs[1].grad.abs().max() == 0
    assert lora_bs[2].grad is None and lora_as[2].grad.abs().max() > 0 and lora_as[0].grad.abs().max() > 0


def test_inputs_the_c_pass_does_not_take_run_todays_ops(monkeypatch):
    shape = SHAPES[0]
    x, _, stacked, biases, lora_as, lora_bs, cos, sin = _group(shape, bias=False)
    d = shape[3]
    assert not qkv_rotary.runs_on(x, cos.double(), sin.double(), d, stacked)
    assert not qkv_rotary.runs_on(x, cos, sin, d, stacked.half())
    assert not qkv_rotary.runs_on(x, cos.requires_grad_(), sin, d, stacked)
    cos = cos.detach()
    assert not qkv_rotary.runs_on(x, cos, sin, d + 2, stacked)
    monkeypatch.setattr(qkv_rotary, "NATIVE", False)
    assert not qkv_rotary.runs_on(x, cos, sin, d, stacked)
    q, _, _ = grouped_qkv_rotary(x, stacked, biases, lora_as, lora_bs, SCALINGS, cos=cos, sin=sin, head_dim=d)
    assert type(q.grad_fn).__name__ == "_RotaryBackward"


def test_bad_calls_are_named():
    shape = SHAPES[0]
    x, _, stacked, biases, lora_as, lora_bs, cos, sin = _group(shape, bias=False)
    d = shape[3]
    with pytest.raises(ValueError, match="three members"):
        grouped_qkv_rotary(x, stacked, biases[:2], lora_as[:2], lora_bs[:2], SCALINGS[:2], cos=cos, sin=sin, head_dim=d)
    with pytest.raises(ValueError, match="whole heads"):
        grouped_qkv_rotary(x, stacked, biases, lora_as, lora_bs, SCALINGS, cos=cos, sin=sin, head_dim=5)
    with pytest.raises(ValueError, match="sum"):
        grouped_qkv_rotary(x, stacked[:-1], biases, lora_as, lora_bs, SCALINGS, cos=cos, sin=sin, head_dim=d)
    with pytest.raises(ValueError, match="impl"):
        grouped_qkv_rotary(x, stacked, biases, lora_as, lora_bs, SCALINGS, cos=cos, sin=sin, head_dim=d, impl="x")


# --- wired into a model: fused ops + bf16-mixed, as engine.train.recipe sets a run up ---

IDS = torch.randint(0, FAMILY_SHAPE["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(1))


def _model(arch: str):
    return tiny_bf16_mixed_model(arch, TrainConfig(lora_rank=4, lora_dropout=0.0))


def _step(model, fused: bool, monkeypatch):
    """Loss, adapter gradients and the autograd nodes' names of one forward and backward."""
    monkeypatch.setattr(qkv_rotary, "NATIVE", fused)
    return step_with_nodes(model, IDS)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_a_wired_step_is_the_unfused_ones_to_float32_rounding(arch, monkeypatch):
    model = _model(arch)
    loss1, grads1, nodes1 = _step(model, True, monkeypatch)
    loss0, grads0, nodes0 = _step(model, False, monkeypatch)
    assert "_GroupedQkvRotaryBackward" in nodes1 and "_RotaryBackward" not in nodes1
    assert "_GroupedQkvRotaryBackward" not in nodes0 and "_RotaryBackward" in nodes0
    assert abs(loss1 - loss0) <= 1e-5 * abs(loss0)
    assert grads1.keys() == grads0.keys()
    for name, g in grads0.items():
        assert _rel(grads1[name], g) < 1e-3, name


def test_qwen3_keeps_its_path(monkeypatch):
    """q_norm/k_norm run before rotary: the group's outputs and the rotary as before, the same numbers bit for bit."""
    model = _model("qwen3")
    loss1, grads1, nodes1 = _step(model, True, monkeypatch)
    loss0, grads0, _ = _step(model, False, monkeypatch)
    assert "_GroupedQkvRotaryBackward" not in nodes1 and "_RotaryBackward" in nodes1
    assert loss1 == loss0 and all(torch.equal(grads1[n], g) for n, g in grads0.items())


def test_nothing_more_is_kept_for_backward(monkeypatch):
    from finetune_studio.engine.train.saved_tensors import SavedTensorCensus

    model = _model("llama")
    saved = {}
    for fused in (False, True):
        monkeypatch.setattr(qkv_rotary, "NATIVE", fused)
        census = SavedTensorCensus(model)
        with census:
            loss = model(input_ids=IDS, labels=IDS).loss
        saved[fused] = census.alive_bytes()
        loss.backward()
    assert saved[True] == saved[False] > 0


def test_two_threads_give_the_one_threads_numbers():
    """Rows split over OpenMP threads (tiles of four, a short last tile): each row is computed alike."""
    shape = (2, 9, 64, 64, 3, 1, 16, 1)
    x, _, stacked, biases, lora_as, lora_bs, cos, sin = _group(shape, bias=True)
    x.requires_grad_()
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(
                _run(
                    lambda: grouped_qkv_rotary(
                        x, stacked, biases, lora_as, lora_bs, SCALINGS, cos=cos, sin=sin, head_dim=shape[3]
                    ),
                    x,
                    lora_as,
                    lora_bs,
                )
            )
    finally:
        torch.set_num_threads(before)
    for got, want in zip((*runs[1][0], *runs[1][1]), (*runs[0][0], *runs[0][1])):
        assert torch.equal(got, want)
