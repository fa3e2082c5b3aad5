"""The RMSNorm's bf16 output for a group of LoRA projections that rounds it to bf16 anyway: the norm's bf16 output
and gradient (C and torch), the grouped op on a bf16 x, and the wired model with ``fused_ops.NORM_BF16`` on and off
(the same loss and gradients bit for bit; float32 wherever the group does not take the output)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import micro_step_loss
from tiny_model import FAMILY_SHAPE, tiny_bf16_mixed_model

from finetune_studio.core.config import TrainConfig
from finetune_studio.engine.datasets.render import IGNORE
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.model_patches import fused_ops, kernel_wiring
from finetune_studio.kernels import cpu_rms_norm
from finetune_studio.kernels import rms_norm as rms_norm_ops
from finetune_studio.kernels.grouped_lora_linear import grouped_lora_linear, stack_group
from finetune_studio.kernels.rms_norm import rms_norm_forward, rms_norm_with_rstd

BF16 = torch.bfloat16
native_bf16 = pytest.mark.skipif(not cpu_rms_norm.bf16_available(), reason="needs AVX-512 BF16")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == BF16 else t.view(torch.int32)


def _norm_inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x over a wide range of magnitudes, and a weight with entries that make subnormal, zero and huge outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[:-1], generator=g) * 3)[..., None]
    w = torch.randn(shape[-1], generator=g)
    w[:3] = torch.tensor([1e-39, 0.0, -3e-38])  # outputs below the smallest normal float32 (and bf16) and zero
    return x, w


@native_bf16
@pytest.mark.parametrize("shape", [(455, 576), (7, 33), (3, 5, 16), (4, 17), (2, 48), (1, 3)])
def test_native_bf16_output_is_the_float32_output_rounded(shape):
    x, w = _norm_inputs(shape)
    y, rstd = cpu_rms_norm.rms_norm_forward_native(x, w, 1e-6)
    y16, rstd16 = cpu_rms_norm.rms_norm_forward_native(x, w, 1e-6, out_dtype=BF16)
    assert y16.dtype == BF16 and y16.shape == y.shape
    assert torch.equal(_bits(y16), _bits(y.to(BF16))) and torch.equal(rstd16, rstd)
    again, _ = cpu_rms_norm.rms_norm_forward_native(x, w, 0.0, rstd, out_dtype=BF16)  # a recompute: rstd given
    assert torch.equal(_bits(again), _bits(y16))


@native_bf16
@pytest.mark.parametrize("shape", [(455, 576), (7, 33), (3, 5, 16)])
def test_native_backward_from_a_bf16_gradient_is_the_widened_gradients(shape):
    x, w = _norm_inputs(shape, seed=1)
    _, rstd = cpu_rms_norm.rms_norm_forward_native(x, w, 1e-6)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(BF16)
    got = cpu_rms_norm.rms_norm_backward_native(grad, x, w, rstd)
    assert got.dtype == torch.float32
    assert torch.equal(got, cpu_rms_norm.rms_norm_backward_native(grad.float(), x, w, rstd))


@pytest.mark.parametrize("native", ["c", "c_float32_only", "torch"])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_the_op_with_a_bf16_output_is_todays_op_rounded(native, weight_trains, monkeypatch):
    """rms_norm_with_rstd(out_dtype=bf16): the float32 output rounded, bit for bit; from a bf16 output gradient the
    input's (and the weight's) gradient of today's float32 output given that gradient widened; the recompute the
    same tensor. The C path, the C float32 kernels with casts (a CPU without AVX-512 BF16), torch's (``NATIVE``
    off)."""
    monkeypatch.setattr(rms_norm_ops, "NATIVE", native != "torch")
    if native == "c_float32_only":
        monkeypatch.setattr(cpu_rms_norm, "bf16_available", lambda: False)
    x, w = _norm_inputs((3, 11, 40), seed=3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(BF16)

    def run(out_dtype):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_(weight_trains)
        out, rstd = rms_norm_with_rstd(xi, wi, 1e-5, out_dtype=out_dtype)
        out.backward(grad if out_dtype is not None else grad.float())
        return out.detach(), rstd, xi.grad, wi.grad

    y, rstd, dx, dw = run(None)
    y16, rstd16, dx16, dw16 = run(BF16)
    assert y16.dtype == BF16 and torch.equal(_bits(y16), _bits(y.to(BF16))) and torch.equal(rstd16, rstd)
    assert dx16.dtype == torch.float32 and torch.equal(dx16, dx)
    assert (dw16 is None) == (not weight_trains) and (dw is None or torch.equal(dw16, dw))
    assert torch.equal(_bits(rms_norm_forward(x, w, rstd, BF16)), _bits(y16))
    with pytest.raises(ValueError, match="out_dtype"):
        rms_norm_with_rstd(x, w, 1e-5, out_dtype=torch.float64)


def _group(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    outs, ranks, n_in = (48, 16, 16), (4, 4, 8), 64
    weights = [(torch.randn(o, n_in, generator=g) / 8).to(BF16) for o in outs]
    stacked, _ = stack_group(weights, ranks)
    lora_as = [torch.randn(r, n_in, generator=g) / 8 for r in ranks]
    lora_bs = [torch.randn(o, r, generator=g) / 4 for o, r in zip(outs, ranks, strict=True)]
    biases = [None, torch.randn(16, generator=g), None]
    upstream = [torch.randn(2, 13, o, generator=g) for o in outs]
    return stacked, biases, lora_as, lora_bs, (1.5, 2.0, 0.7), upstream


def test_grouped_op_on_a_bf16_x_is_the_float32_x_of_its_values():
    """Outputs (float32, the adapters' dtype) and every gradient bit for bit; x's gradient the bf16 product's result
    that the float32 x's gradient is a cast of."""
    stacked, biases, lora_as, lora_bs, scalings, upstream = _group()
    x16 = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(9)).to(BF16)

    def run(x):
        x = x.clone().requires_grad_()
        a_s = [a.clone().requires_grad_() for a in lora_as]
        b_s = [b.clone().requires_grad_() for b in lora_bs]
        outs = grouped_lora_linear(x, stacked, biases, a_s, b_s, scalings)
        torch.autograd.backward(outs, upstream)
        return outs, x.grad, [a.grad for a in a_s], [b.grad for b in b_s]

    outs32, dx32, da32, db32 = run(x16.float())
    outs16, dx16, da16, db16 = run(x16)
    assert all(o.dtype == torch.float32 for o in outs16) and dx16.dtype == BF16
    assert all(torch.equal(a, b) for a, b in zip(outs16, outs32, strict=True))
    assert torch.equal(dx16.float(), dx32)
    assert all(torch.equal(a, b) for a, b in zip(da16 + db16, da32 + db32, strict=True))
    with pytest.raises(ValueError, match="x's dtype"):  # a 16-bit x that is not the stack's dtype
        grouped_lora_linear(x16.half(), stacked, biases, lora_as, lora_bs, scalings)


def _model(arch: str = "llama", config: TrainConfig | None = None):
    return tiny_bf16_mixed_model(arch, config)


IDS = torch.randint(0, FAMILY_SHAPE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))


def _step(model, lever: bool, monkeypatch):
    monkeypatch.setattr(fused_ops, "NORM_BF16", lever)
    model.zero_grad(set_to_none=True)
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for m in _decoder_norms(model)]
    try:
        loss = model(input_ids=IDS, labels=IDS).loss
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, seen


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_step_with_the_lever_is_the_step_without_it(arch, monkeypatch):
    """Every decoder norm writes bf16 with the lever (Qwen3's q/k norms, which feed no group, stay float32) and the
    loss and every adapter gradient are those without it, bit for bit."""
    model = _model(arch)
    loss0, grads0, seen0 = _step(model, False, monkeypatch)
    loss1, grads1, seen1 = _step(model, True, monkeypatch)
    assert set(seen0) == {torch.float32} and seen1 and set(seen1) == {BF16}
    assert torch.equal(loss1, loss0)
    assert grads1.keys() == grads0.keys() and all(torch.equal(grads1[n], g) for n, g in grads0.items())
    if arch == "qwen3":
        q_norms: list[torch.dtype] = []
        attn = model.get_base_model().model.layers[0].self_attn
        hook = attn.q_norm.register_forward_hook(lambda _m, _i, out: q_norms.append(out.dtype))
        model(input_ids=IDS, labels=IDS)
        hook.remove()
        assert q_norms == [torch.float32]


def test_without_a_group_the_norms_stay_float32(monkeypatch):
    """Grouping off, or the adapters disabled (DPO's reference pass): float32 norms, the same logits as the lever
    off."""
    model = _model()
    monkeypatch.setattr(kernel_wiring, "GROUPED", False)
    _, _, seen = _step(model, True, monkeypatch)
    assert set(seen) == {torch.float32}
    monkeypatch.setattr(kernel_wiring, "GROUPED", True)
    logits, seen = {}, []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for m in _decoder_norms(model)]
    for lever in (False, True):
        monkeypatch.setattr(fused_ops, "NORM_BF16", lever)
        seen.clear()
        with torch.no_grad(), model.disable_adapter():
            logits[lever] = model(input_ids=IDS).logits
        assert set(seen) == {torch.float32}
    for h in hooks:
        h.remove()
    assert torch.equal(logits[True], logits[False])


def _decoder_norms(model) -> list[torch.nn.Module]:
    layers = model.get_base_model().model.layers
    return [getattr(layer, n) for layer in layers for n in ("input_layernorm", "post_attention_layernorm")]


def test_a_call_the_group_does_not_take_gets_the_norms_values_in_float32(monkeypatch):
    """A forward with a cache (the attention block then runs its layers one by one): the bf16 output the norm wrote
    for the MLP's group is the MLP's, the attention block's is widened to float32 before its layers see it; the
    logits those of the lever off."""
    model = _model()
    model.eval()
    attn_inputs: list[torch.dtype] = []
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    hooks = [q_proj.register_forward_pre_hook(lambda _m, args: attn_inputs.append(args[0].dtype))]
    norms: list[torch.dtype] = []
    hooks += [m.register_forward_hook(lambda _m, _i, out: norms.append(out.dtype)) for m in _decoder_norms(model)]
    logits = {}
    for lever in (False, True):
        monkeypatch.setattr(fused_ops, "NORM_BF16", lever)
        with torch.no_grad():
            logits[lever] = model(input_ids=IDS, use_cache=True).logits
    for h in hooks:
        h.remove()
    assert norms == [torch.float32] * 4 + [BF16] * 4 and attn_inputs == [torch.float32, torch.float32]
    assert torch.equal(logits[True], logits[False])


def test_the_lever_keeps_no_more_for_backward(monkeypatch):
    """The norm's output is recomputed, not kept, either way; the one it cannot recompute (the first layer's, whose
    input needs no gradient) is kept in bf16: half its bytes."""
    from finetune_studio.engine.train.saved_tensors import SavedTensorCensus

    model = _model()
    saved = {}
    for lever in (False, True):
        monkeypatch.setattr(fused_ops, "NORM_BF16", lever)
        census = SavedTensorCensus(model)
        with census:
            loss = model(input_ids=IDS, labels=IDS).loss
        saved[lever] = census.alive_bytes()
        loss.backward()
    assert saved[False] - saved[True] == IDS.numel() * FAMILY_SHAPE["hidden_size"] * 2


@pytest.mark.parametrize("changes", [dict(objective="dpo"), dict(gradient_checkpointing=True)])
def test_an_engine_step_with_the_lever_is_the_step_without_it(changes, monkeypatch):
    """The engine's loss (DPO: the reference pass with the adapters off first; or checkpointed blocks, which run
    their norms again in backward) and adapter gradients bit for bit with the lever on and off; DPO's reference pass
    keeps float32 norms."""
    config = TrainConfig(**{**dict(batch_size=2, max_length=24, lora_rank=4), **changes})
    model = _model("llama", config)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, FAMILY_SHAPE["vocab_size"], (4, 17), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE
    batch = Batch(ids, torch.ones_like(ids), labels, pairs=2 if config.objective == "dpo" else 0)
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for m in _decoder_norms(model)]
    results = {}
    for lever in (False, True):
        monkeypatch.setattr(fused_ops, "NORM_BF16", lever)
        seen.clear()
        model.zero_grad(set_to_none=True)
        loss = micro_step_loss(model, config.objective, batch)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[lever] = (loss.detach(), grads, list(seen))
    for h in hooks:
        h.remove()
    (loss0, grads0, seen0), (loss1, grads1, seen1) = results[False], results[True]
    assert torch.equal(loss1, loss0) and grads1.keys() == grads0.keys()
    assert all(torch.equal(grads1[n], g) for n, g in grads0.items())
    norms = len(_decoder_norms(model))
    assert set(seen0) == {torch.float32}
    if config.objective == "dpo":  # the reference pass, then the policy's
        assert seen1 == [torch.float32] * norms + [BF16] * norms
    else:  # the forward, then each checkpointed block's again in backward
        assert seen1 == [BF16] * (2 * norms)
