"""kernels.lora_linear and its wiring into peft's LoRA linears: peft's numbers in one autograd node."""

from __future__ import annotations

import pytest
import torch

from finetune_studio.engine.train.model_patches import kernel_wiring
from finetune_studio.engine.train.model_patches.mixed_precision import apply_mixed
from finetune_studio.kernels.lora_linear import lora_linear, lora_linear_reference


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
    assert kernel_wiring._plain_lora_adapter(layer, x, (), {}) is None
    model.eval()
    assert kernel_wiring._plain_lora_adapter(layer, x, (), {}) == name
