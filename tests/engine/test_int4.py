"""Weight-only int4 linear layers (the worker's ``weights: int4``): the kernel computes the dequantised weight's
product, shapes the kernel cannot take fall back to int8, stacked projections equal separate ones, adapters apply."""

import pytest
import torch
from torch import nn

from finetune_studio.engine.decoding.int4 import (
    dequantize_int4,
    int4_fits,
    int4_matmul,
    quantize_int4,
    quantize_linears_int4,
    stacked_int4,
)

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_is_the_dequantised_weights_product(group_size):
    torch.manual_seed(0)
    layer = nn.Linear(256, 48, bias=True)
    model = nn.Sequential(layer)
    assert quantize_linears_int4(model, group_size=group_size, head="int4") == (1, 0)
    codes, scales_zeros = quantize_int4(layer.weight, group_size)
    assert codes.min() >= 0 and codes.max() <= 15 and scales_zeros.shape == (256 // group_size, 48, 2)
    dequantised = dequantize_int4(codes, scales_zeros.bfloat16(), group_size)  # the scales the kernel reads
    x = torch.randn(5, 256)
    with torch.no_grad():
        y = layer(x)
        expected = x.bfloat16().float() @ dequantised.T + layer.bias
        full = x @ layer.weight.T + layer.bias
    assert y.dtype == torch.float32 and y.shape == (5, 48)
    assert (y - expected).abs().max() < 0.02 * expected.abs().max()  # bfloat16 product of the same weight
    assert not torch.allclose(y, full, atol=1e-4)  # the int4 path is in use: int4 rounding is visible
    assert (y - full).abs().max() < 0.2 * full.abs().max()


def test_shapes_the_kernel_cannot_take_fall_back_to_int8_or_are_refused():
    assert int4_fits(64, 32, 32) and not int4_fits(576, 64, 128) and not int4_fits(64, 40, 32)
    model = nn.Sequential(nn.Linear(96, 32), nn.Linear(32, 40), nn.Linear(64, 32))
    four, eight = quantize_linears_int4(model, group_size=64, head="int4")
    assert (four, eight) == (1, 2)  # 96 is no multiple of 64, 40 outputs no multiple of 16
    assert hasattr(model[2], "int4_weight") and hasattr(model[0], "int8_weight") and hasattr(model[1], "int8_weight")
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.allclose(model[0](x), x @ model[0].weight.T + model[0].bias, atol=0.05)
    with pytest.raises(ValueError, match="does not fit groups of 64"):
        quantize_int4(torch.randn(32, 96), 64)
    with pytest.raises(ValueError, match="group size"):
        quantize_linears_int4(nn.Sequential(nn.Linear(64, 32)), group_size=16)


def test_int4_model_is_close_to_full_precision_the_head_stays_int8_and_lora_applies(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        full = model(IDS).logits.clone()
    assert quantize_linears_int4(model) == (2 * 7, 1)  # 7 linear layers per block in int4, the head in int8
    assert hasattr(model.lm_head, "int8_weight") and not hasattr(model.lm_head, "int4_weight")
    with torch.no_grad():
        q = model(IDS).logits
    assert q.dtype == torch.float32 and not torch.equal(q, full)
    err = (q - full).abs()
    assert err.max() < 0.5 * full.std() and err.mean() < 0.1 * full.std(), (err.max(), err.mean(), full.std())

    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.fill_(0.3)
        tuned = peft(IDS).logits.clone()
        with peft.disable_adapter():
            base = peft(IDS).logits
    assert torch.equal(base, q)
    assert (tuned - q).abs().max() > 0.1 * full.std()


def test_projections_reading_one_input_share_one_stacked_int4_weight(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    quantize_linears_int4(model, group_size=32)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    weight, scales_zeros, group, bias, sizes = stacked_int4(attn, "int4_qkv")
    assert sizes == [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features] and bias is None
    assert group == 32 and attn.q_proj.int4_weight.data_ptr() == weight.data_ptr()  # q's rows: a view of the stack
    for parent, fused, names in ((attn, "int4_qkv", ("q_proj", "k_proj", "v_proj")), (mlp, "int4_gate_up", None)):
        stack = stacked_int4(parent, fused)
        projections = [getattr(parent, n) for n in (names or ("gate_proj", "up_proj"))]
        x = torch.randn(3, 1, projections[0].in_features)
        with torch.no_grad():
            parts = int4_matmul(x, *stack[:4]).split(stack[4], dim=-1)
            for part, proj in zip(parts, projections, strict=True):
                assert torch.allclose(part, proj(x), atol=1e-5)

    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj"]))
    assert stacked_int4(mlp, "int4_gate_up") is None  # up_proj is an adapter layer now: the stack is not used
    assert stacked_int4(attn, "int4_qkv") is not None
