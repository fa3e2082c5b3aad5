"""Weight-only int8 linear layers (the worker's ``weights: int8``): close to full precision, adapters still work."""

import torch

from finetune_studio.engine.decoding.int8 import quantize_linears_int8

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


def test_int8_logits_are_close_to_full_precision_and_lora_still_applies(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        full = model(IDS).logits.clone()
    assert quantize_linears_int8(model) == 2 * 7 + 1  # 7 linear layers per block, and the head
    with torch.no_grad():
        q = model(IDS).logits
    assert not torch.equal(q, full)  # the int8 path is in use
    err = (q - full).abs()  # int8 weights and a bfloat16 product: errors of about 1% of the logits' spread
    assert err.max() < 0.1 * full.std() and err.mean() < 0.02 * full.std()
    assert q.dtype == torch.float32

    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.fill_(0.3)
        tuned = peft(IDS).logits.clone()
        with peft.disable_adapter():
            base = peft(IDS).logits
    assert torch.equal(base, q)  # adapters off: exactly the int8 base
    assert (tuned - q).abs().max() > 0.1 * full.std()


def test_projections_reading_one_input_share_one_stacked_int8_weight(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune_studio.engine.decoding.int8 import int8_matmul, stacked

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    quantize_linears_int8(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    weight, scale, bias, sizes = stacked(attn, "int8_qkv")
    assert sizes == [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features] and bias is None
    assert attn.k_proj.int8_weight.data_ptr() == weight[sizes[0]].data_ptr()  # a view of the stack, no copy
    x = torch.randn(3, 1, attn.q_proj.in_features)
    with torch.no_grad():
        parts = int8_matmul(x, weight, scale, bias).split(sizes, dim=-1)
        for part, proj in zip(parts, (attn.q_proj, attn.k_proj, attn.v_proj), strict=True):
            assert torch.allclose(part, proj(x), atol=1e-6)
    assert stacked(mlp, "int8_gate_up") is not None

    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert stacked(attn, "int8_qkv") is None  # q_proj is an adapter layer now: the stack is not used
    assert stacked(mlp, "int8_gate_up") is not None
