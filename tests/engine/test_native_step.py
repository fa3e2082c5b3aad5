"""The whole decoding step in C (``engine.decoding.native_step``) for plain int8 Llama-family models: the Python fast
step's numbers, rows at their own positions and masks, the cache written in place, adapters still applied."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from finetune_studio.engine.decoding import int8_dot, native_step
from finetune_studio.engine.decoding.decode import _expand_cache, _fast_step, decode
from finetune_studio.engine.decoding.int8 import quantize_linears_int8
from finetune_studio.engine.decoding.token_sampling import Sampler

pytestmark = pytest.mark.skipif(not int8_dot.available(), reason="needs AVX-512 VNNI and a C compiler")

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 60, 61]


@pytest.fixture
def int8_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    quantize_linears_int8(model)
    return model


def _steps(model, native: bool, rows: int, capacity: int, steps: int, padded: bool):
    """Logits of ``steps`` steps of the fast step (C or Python) over ``rows`` copies of the prompt, and the cache."""
    was = native_step.use_native_step(native)
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([PROMPT]), cache=DynamicCache(config=model.config), use_cache=True)
            cache = _expand_cache(out.cache, rows, capacity)
            step = _fast_step(model, cache)
            assert step is not None
            length = len(PROMPT)
            pad = torch.tensor([0, 3, 1][:rows])  # rows 1 and 2 ignore their first 3 and 1 cached positions
            attend = torch.arange(capacity + steps)[None, :] >= pad[:, None]
            logits = []
            for t in range(steps):
                ids = torch.tensor([[t + 1 + 19 * r] for r in range(rows)])
                if padded:
                    logits.append(step(ids, length - pad, attend[:, None, None, : length + 1]))
                else:
                    logits.append(step(ids))
                length += 1
            return torch.stack(logits), cache
    finally:
        native_step.use_native_step(was)


@pytest.mark.parametrize("padded", [False, True])
def test_the_c_step_gives_the_python_fast_steps_logits_and_cache(int8_model, padded):
    with torch.inference_mode():
        cache = _expand_cache(
            int8_model(input_ids=torch.tensor([PROMPT]), cache=DynamicCache(config=int8_model.config)).cache, 3, 40
        )
    assert native_step.native_step(int8_model, cache, lambda *a: torch.zeros(1)) is not None  # it applies here
    ours, ours_cache = _steps(int8_model, True, 3, 12, 6, padded)  # capacity 12 < 10 + 6: it grows on the way
    theirs, their_cache = _steps(int8_model, False, 3, 12, 6, padded)
    assert ours.shape == theirs.shape == (6, 3, int8_model.config.vocab_size)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    for a, b in zip(ours_cache.layers, their_cache.layers, strict=True):
        assert a.length == b.length == len(PROMPT) + 6
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    assert not torch.equal(ours[:, 0], ours[:, 1])  # rows at different tokens (and positions) differ


def test_adapters_attached_keep_the_python_step_and_apply(int8_model):
    from peft import LoraConfig, get_peft_model

    base, _ = _steps(int8_model, True, 2, 20, 4, False)  # the C step
    peft = get_peft_model(int8_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.inference_mode():  # the worker decodes with the base model, PEFT's layers injected into it
        first = int8_model(input_ids=torch.tensor([PROMPT]), cache=DynamicCache(config=int8_model.config))
    cache = _expand_cache(first.cache, 1, 30)
    assert native_step.native_step(int8_model, cache, lambda *a: torch.zeros(1)) is None  # adapter layers in the way
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.fill_(0.3)
    tuned, _ = _steps(int8_model, True, 2, 20, 4, False)  # the Python step, through the adapter layers
    assert (tuned - base).abs().max() > 0.1 * base.std()  # the adapter applies
    with peft.disable_adapter():
        off, _ = _steps(int8_model, True, 2, 20, 4, False)
    assert torch.allclose(off, base, atol=1e-4, rtol=1e-4)  # adapters off: the int8 base's logits

    def greedy() -> list[int]:
        out: list[int] = []
        decode(int8_model, PROMPT, 1, 8, Sampler(temperature=0), lambda t: (out.append(t[0]), [False])[1])
        return out

    assert len(greedy()) == 8  # the decode loop runs through the adapter layers
