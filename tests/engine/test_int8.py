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


def test_the_compiled_one_row_product_is_the_dequantised_int8_product_and_greedy_keeps_its_tokens(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune_studio.engine.decoding import int8
    from finetune_studio.engine.decoding.decode import decode
    from finetune_studio.engine.decoding.token_sampling import Sampler

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    quantize_linears_int8(model)

    def greedy() -> list[int]:
        out: list[int] = []
        decode(model, IDS[0].tolist(), 1, 16, Sampler(temperature=0), lambda t: (out.append(t[0]), [False])[1])
        return out

    dot = int8.use_dot_products(False)  # the compiled product is what runs where the integer products do not
    int8.use_row_products(False)
    try:
        kernel = greedy()
        assert int8.compile_row_products(model) > 0  # every int8 shape: the stacks, o/down and the head
        head = model.lm_head
        x = torch.randn(1, 1, head.in_features)
        with torch.inference_mode():
            reference = x.reshape(1, -1) @ (head.int8_weight.float() * head.int8_scale.float()[:, None]).T
            eager = int8.row_product(x.reshape(1, -1), head.int8_weight, head.int8_scale)
            int8.use_row_products(True)
            compiled = head(x)
            two_rows = head(torch.cat([x, x]))  # two rows: the kernel (bfloat16 products)
        assert torch.allclose(eager, reference, atol=1e-5) and torch.allclose(compiled[0], reference, atol=1e-4)
        assert not torch.equal(two_rows[0], compiled[0])  # the kernel rounds the input to bfloat16; this does not
        assert torch.allclose(two_rows[0], compiled[0], atol=0.05 * reference.std().item())
        compiled_tokens = greedy()
        assert compiled_tokens == kernel  # the same greedy tokens as the kernel on this model

        from peft import LoraConfig, get_peft_model

        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.3)
        tuned = greedy()  # the fast step calls the adapter layers; their base layers use the compiled products
        with peft.disable_adapter():
            assert greedy() == compiled_tokens  # adapters off: exactly the int8 base again, nothing recompiled
        assert tuned != compiled_tokens
    finally:
        int8.use_row_products(True)
        int8.use_dot_products(dot)
