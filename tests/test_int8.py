"""Weight-only int8 linear layers (the worker's ``weights: int8``): close to full precision, adapters still work."""

import torch

from finetune_studio.engine.int8 import quantize_linears_int8

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
