"""kernels.lora_linear and its wiring into peft's LoRA linears: peft's numbers in one autograd node."""

from __future__ import annotations

import pytest
import torch

from finetune_studio.engine.train.model_patches import kernel_wiring
from finetune_studio.engine.train.model_patches.mixed_precision import apply_mixed
from finetune_studio.kernels.lora_linear import lora_linear, lora_linear_reference, stack_weight


def _inputs(weight_dtype, bias: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 40, generator=g).requires_grad_()
    weight = torch.randn(24, 40, generator=g).to(weight_dtype)
    b = torch.randn(24, generator=g) if bias else None
    a = (torch.randn(4, 40, generator=g) * 0.3).requires_grad_()
    bb = (torch.randn(24, 4, generator=g) * 0.3).requires_grad_()
    return x, weight, b, a, bb


def _run(fn, x, weight, bias, a, b, scaling=1.5):
    out = fn(x, weight, bias, a, b, scaling)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((out * w).sum(), [t for t in (x, a, b) if t.requires_grad])
    return out, grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_output_and_gradients_match_autograd_and_the_reference(weight_dtype, bias):
    inputs = _inputs(weight_dtype, bias)
    out, grads = _run(lambda *t: lora_linear(*t, impl="auto"), *inputs)
    same, same_grads = _run(lambda *t: lora_linear(*t, impl="torch"), *inputs)
    ref, ref_grads = _run(lora_linear_reference, *inputs)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 24)
    tight = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, same, **tight)
    for got, want in zip(grads, same_grads):
        torch.testing.assert_close(got, want, **tight)
    # against everything in float32: exact for a float32 base; a bf16 base rounds x and W (about 2^-8 relative)
    loose = tight if weight_dtype == torch.float32 else dict(atol=0.15, rtol=0.03)
    torch.testing.assert_close(out, ref, **loose)
    torch.testing.assert_close(grads[0], ref_grads[0], **loose)
    for got, want in zip(grads[1:], ref_grads[1:]):  # A and B see x and g in float32 only: tight either way
        torch.testing.assert_close(got, want, **tight)


def test_no_input_gradient_when_x_needs_none():
    x, weight, bias, a, b = _inputs(torch.bfloat16, False)
    x = x.detach()
    out = lora_linear(x, weight, bias, a, b, 2.0)
    ga, gb = torch.autograd.grad(out.sum(), [a, b])
    ra, rb = torch.autograd.grad(lora_linear_reference(x, weight, bias, a, b, 2.0).sum(), [a, b])
    torch.testing.assert_close(ga, ra, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, rb, atol=1e-5, rtol=1e-5)


def test_keeps_x_and_the_low_rank_product_only():
    x, weight, bias, a, b = _inputs(torch.bfloat16, True)
    kept: list[tuple[int, ...]] = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t is not weight and t is not a and t is not b:
            kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, weight, bias, a, b, 1.0)
    assert sorted(kept) == sorted([(3, 5, 40), (15, 4)])


def test_bad_calls_are_named():
    x, weight, bias, a, b = _inputs(torch.float32, False)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, weight.clone().requires_grad_(), bias, a, b, 1.0)
    with pytest.raises(ValueError, match="x's dtype"):
        lora_linear(x, weight, bias, a.detach().double(), b, 1.0)
    with pytest.raises(ValueError, match="impl"):
        lora_linear(x, weight, bias, a, b, 1.0, impl="triton")


def _peft_model(dropout: float = 0.0, mixed: bool = True):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    base = transformers.LlamaForCausalLM(cfg)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout))
    with torch.no_grad():  # B = 0 at the start would hide the low-rank part
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    if mixed:
        apply_mixed(model)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mixed", [True, False])
def test_wired_layers_give_peft_s_loss_and_gradients(mixed):
    model = _peft_model(mixed=mixed)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    loss0, grads0 = _loss_and_grads(model, ids)
    n = kernel_wiring.install_lora_linear(model)
    assert n == 7 and len(kernel_wiring.lora_linears(model)) == 7
    loss1, grads1 = _loss_and_grads(model, ids)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name, g in grads0.items():
        assert (grads1[name] - g).abs().max().item() <= 1e-5 * g.abs().max().item() + 1e-9, name
    with model.disable_adapter(), torch.no_grad():  # DPO's reference pass: peft's forward, the base alone
        off = model(input_ids=ids).logits
    kernel_wiring.uninstall_lora_linear(model)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(off, model(input_ids=ids).logits, atol=0, rtol=0)


def test_an_active_dropout_runs_peft_s_forward():
    model = _peft_model(dropout=0.5)
    kernel_wiring.install_lora_linear(model)
    model.train()
    layer = kernel_wiring.lora_linears(model)[0]
    x = torch.randn(2, 3, layer.in_features)
    name = layer.active_adapters[0]
    assert kernel_wiring._plain_lora_parts(layer, x, (), {}) is None
    model.eval()
    parts = kernel_wiring._plain_lora_parts(layer, x, (), {})
    assert parts is not None and parts[0] == name


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_adapter_products_match_autograd_and_the_reference_to_bf16_rounding(bias):
    """adapter_dtype=bf16: the Function against autograd through the same casts, and against everything in
    float32, to bf16's rounding (a wrong term or a lost scaling would be off by far more: checked below)."""
    x, weight, b, a, bb = _inputs(torch.bfloat16, bias)
    out, grads = _run(lambda *t: lora_linear(*t, adapter_dtype=torch.bfloat16), x, weight, b, a, bb)
    same, same_grads = _run(lambda *t: lora_linear(*t, impl="torch", adapter_dtype=torch.bfloat16), x, weight, b, a, bb)
    ref, ref_grads = _run(lora_linear_reference, x, weight, b, a, bb)
    fp32, fp32_grads = _run(lora_linear, x, weight, b, a, bb)  # the adapter products in float32
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    for got, want in zip((out, *grads), (same, *same_grads)):
        assert _rel(got, want) < 1e-2
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert _rel(got, want) < 2e-2
    for got, want in zip(grads[1:], fp32_grads[1:]):  # A's and B's gradients: bf16 rounding, not exact
        assert 0 < _rel(got, want) < 1e-2
    # the scaling reaches every term: another scaling is far off
    other, other_grads = _run(lambda *t: lora_linear(*t[:-1], 1.0, adapter_dtype=torch.bfloat16), x, weight, b, a, bb)
    assert all(_rel(g, w) > 0.1 for g, w in zip(other_grads[1:], ref_grads[1:]))


def test_bf16_adapter_products_keep_a_small_update_against_the_base_output():
    """The low-rank part is added to the float32 base output in float32: an update 1e-4 the size of the output
    survives (rounding the sum to bf16, as autocast does, would lose it)."""
    x, weight, _, a, bb = _inputs(torch.bfloat16, False)
    with torch.no_grad():
        bb.mul_(1e-4)
        zero = torch.zeros_like(bb)
    out = lora_linear(x, weight, None, a, bb, 1.0, adapter_dtype=torch.bfloat16)
    base = lora_linear(x, weight, None, a, zero, 1.0, adapter_dtype=torch.bfloat16)
    delta = lora_linear_reference(x, weight, None, a, bb, 1.0) - lora_linear_reference(x, weight, None, a, zero, 1.0)
    assert _rel(out - base, delta) < 1e-2
    assert _rel((out.bfloat16().float() - base.bfloat16().float()), delta) > 0.5


@pytest.mark.parametrize("bias", [False, True])
def test_stacked_a_gives_the_same_output_and_gradients_to_bf16_rounding(bias):
    """A written under W ([W; A], one product each way): the forward is the unstacked one bit for bit (the same
    products), A's and B's gradients too; the input gradient differs by rounding its low-rank part with the base's."""
    x, weight, b, a, bb = _inputs(torch.bfloat16, bias)
    stacked = stack_weight(weight, a.shape[0])
    view = stacked[: weight.shape[0]]
    assert torch.equal(view, weight) and view.data_ptr() == stacked.data_ptr()
    plain = _run(lambda *t: lora_linear(*t, adapter_dtype=torch.bfloat16), x, weight, b, a, bb)
    fused = _run(lambda *t: lora_linear(*t, adapter_dtype=torch.bfloat16, stacked=stacked), x, view, b, a, bb)
    ref = _run(lora_linear_reference, x, weight, b, a, bb)
    assert torch.equal(fused[0], plain[0])
    assert torch.equal(stacked[weight.shape[0] :], a.detach().bfloat16())  # A written into the stack
    for got, want in zip(fused[1][1:], plain[1][1:]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert _rel(fused[1][0], plain[1][0]) < 1e-2 and _rel(fused[1][0], ref[1][0]) < 2e-2
    with pytest.raises(ValueError, match="stacked"):  # a stack that does not hold W is refused
        lora_linear(x, weight, b, a, bb, 1.0, adapter_dtype=torch.bfloat16, stacked=stacked)


def test_wired_bf16_adapters_follow_peft_to_bf16_rounding():
    model = _peft_model(mixed=True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    loss0, grads0 = _loss_and_grads(model, ids)
    with model.disable_adapter(), torch.no_grad():
        off0 = model(input_ids=ids).logits
    kernel_wiring.install_lora_linear(model, low_precision_adapters=True)
    layers = kernel_wiring.lora_linears(model)
    assert {layer._fs_adapter_dtype for layer in layers} == {torch.bfloat16}
    for layer in layers:  # each base weight now the first rows of its stack
        assert layer._fs_stacked.data_ptr() == layer.get_base_layer().weight.data_ptr()
        assert layer._fs_stacked.shape[0] == layer.out_features + 4
    loss1, grads1 = _loss_and_grads(model, ids)
    assert loss1 == pytest.approx(loss0, rel=1e-3)
    for name, g in grads0.items():
        assert _rel(grads1[name], g) < 2e-2, name
    with model.disable_adapter(), torch.no_grad():  # DPO's reference pass: the base alone, unchanged
        torch.testing.assert_close(model(input_ids=ids).logits, off0, atol=0, rtol=0)
    kernel_wiring.uninstall_lora_linear(model)
    assert not any(hasattr(layer, "_fs_adapter_dtype") for layer in kernel_wiring.lora_linears(model))
    assert _loss_and_grads(model, ids)[0] == pytest.approx(loss0, rel=1e-6)  # peft's forward over the same weights
    unmixed = _peft_model(mixed=False)  # float32 bases keep float32 adapter products
    kernel_wiring.install_lora_linear(unmixed, low_precision_adapters=True)
    assert {layer._fs_adapter_dtype for layer in kernel_wiring.lora_linears(unmixed)} == {None}
