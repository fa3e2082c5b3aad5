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


@pytest.mark.parametrize("hidden", [256, 512])
def test_head_sizes_64_and_128_with_their_own_attention_code_give_the_python_steps_logits(tmp_path, hidden):
    """The C step's attention keeps a row's weighted values in registers for heads of 64 and 128 (the tiny model's
    heads are 16: the general code); 3 rows at their own positions and masks, a row alone computed as in the batch."""
    from tiny_model import build_tiny_model_dir

    folder = build_tiny_model_dir(tmp_path / "model", hidden_size=hidden)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert model.model.layers[0].self_attn.head_dim == hidden // 4
    quantize_linears_int8(model)
    ours, _ = _steps(model, True, 3, 20, 4, True)
    theirs, _ = _steps(model, False, 3, 20, 4, True)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    alone, _ = _steps(model, True, 1, 20, 4, True)  # the first row (no padding) decoded alone: the same numbers
    assert torch.equal(alone[:, 0], ours[:, 0])


def _cache(model, rows=1):
    with torch.inference_mode():  # the worker decodes with the base model, PEFT's layers injected into it
        first = model(input_ids=torch.tensor([PROMPT]), cache=DynamicCache(config=model.config))
    return _expand_cache(first.cache, rows, 30)


@pytest.mark.parametrize("hidden", [64, 40])
def test_lora_adapters_apply_on_the_side_in_the_c_step_as_in_the_python_step(tiny_model_dir, tmp_path, hidden):
    """Hidden size 40: projections of 20, 40 and 80 outputs (B's products run 16 outputs at a time: partial blocks)."""
    from peft import LoraConfig, get_peft_model
    from tiny_model import build_tiny_model_dir

    folder = tiny_model_dir if hidden == 64 else build_tiny_model_dir(tmp_path / "model", hidden_size=hidden)
    int8_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    quantize_linears_int8(int8_model)
    base, _ = _steps(int8_model, True, 2, 20, 4, False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(int8_model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1))
    peft.eval()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    assert native_step.native_step(int8_model, _cache(int8_model), lambda *a: torch.zeros(1)) is not None
    ours, _ = _steps(int8_model, True, 2, 20, 4, False)  # the C step, adapters added on the side
    theirs, _ = _steps(int8_model, False, 2, 20, 4, False)  # the Python step through PEFT's layers
    assert (ours - base).abs().max() > 0.1 * base.std()  # the adapters apply
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    with peft.disable_adapter():  # "base": the adapters bypassed
        off, _ = _steps(int8_model, True, 2, 20, 4, False)
    assert torch.allclose(off, base, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the adapter's weights are read live, not copied when the model was loaded
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(2)
    doubled, _ = _steps(int8_model, True, 2, 20, 4, False)
    assert not torch.allclose(doubled, ours, atol=1e-3)


def test_adapters_the_c_step_cannot_apply_keep_the_python_step(int8_model):
    from peft import LoraConfig, get_peft_model

    get_peft_model(int8_model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True)).eval()
    assert native_step.native_step(int8_model, _cache(int8_model), lambda *a: torch.zeros(1)) is None

    def greedy() -> list[int]:
        out: list[int] = []
        decode(int8_model, PROMPT, 1, 8, Sampler(temperature=0), lambda t: (out.append(t[0]), [False])[1])
        return out

    assert len(greedy()) == 8  # the decode loop runs the Python step through DoRA's layers


def test_a_token_id_outside_the_vocabulary_raises_as_torch_does(int8_model):
    with torch.inference_mode():
        step = _fast_step(int8_model, _cache(int8_model))
        with pytest.raises(IndexError):
            step(torch.tensor([[int8_model.config.vocab_size + 5]]))


def test_an_adapter_weight_changed_between_steps_is_read_at_the_next_step(int8_model):
    """The C step reads B transposed (a copy): a B changed in place is copied again before the next step."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(int8_model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"])).eval()
    b = [p for name, p in peft.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for p in b:
            p.copy_(torch.randn_like(p) * 0.2)
    ids = torch.tensor([[7], [9]])
    was = native_step.use_native_step(False)
    try:
        with torch.inference_mode():
            python_step = _fast_step(int8_model, _cache(int8_model, 2))  # stays the Python step
    finally:
        native_step.use_native_step(was)
    with torch.inference_mode():
        c_cache = _cache(int8_model, 2)
        assert native_step.native_step(int8_model, c_cache, lambda *a: torch.zeros(1)) is not None
        c_step = _fast_step(int8_model, c_cache)
        first = c_step(ids)
        assert torch.allclose(first, python_step(ids), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        for p in b:
            p.mul_(-3)
    with torch.inference_mode():
        second, expected = c_step(ids), python_step(ids)
    assert not torch.allclose(second, first, atol=1e-2)
    assert torch.allclose(second, expected, atol=1e-4, rtol=1e-4)
