"""The q4_0 x q8_0 products (``engine.decoding.int4_dot``) of the int4 layers, and the whole step in C over them."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from finetune_studio.engine.decoding import int4, int4_dot, native_step
from finetune_studio.engine.decoding.decode import _expand_cache, _fast_step, decode
from finetune_studio.engine.decoding.int4 import dequantize_int4, quantize_int4, quantize_linears_int4
from finetune_studio.engine.decoding.token_sampling import Sampler

pytestmark = pytest.mark.skipif(not int4_dot.available(), reason="needs AVX-512 VNNI and a C compiler")

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 60, 61]


@pytest.mark.parametrize(("rows", "out_f", "in_f", "group"), [(1, 96, 64, 32), (3, 48, 256, 64), (11, 32, 384, 128)])
def test_the_product_is_the_dequantised_int4_product_within_the_activations_rounding(rows, out_f, in_f, group):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(out_f, in_f, generator=gen) * 0.05
    codes, scales_zeros = quantize_int4(weight, group)
    scales_zeros = scales_zeros.bfloat16()
    dequantised = dequantize_int4(codes, scales_zeros, group).double()
    x, bias = torch.randn(rows, in_f, generator=gen) * 3, torch.randn(out_f, generator=gen)
    x[:, 5] *= 40  # an outlier feature: its block of 32 gets a coarser scale
    reference = x.double() @ dequantised.T + bias.double()
    y = int4_dot.int4_dot_matmul(x, int4_dot.pack(codes, scales_zeros, group), bias)
    assert y.shape == (rows, out_f) and y.dtype == torch.float32
    # each block of 32 inputs rounded to int8 steps of d = max|x_block| / 127: at most d / 2 off per input
    steps = x.double().abs().reshape(rows, -1, 32).amax(-1) / 127 / 2  # (rows, blocks)
    weights = dequantised.abs().reshape(out_f, -1, 32).sum(-1)  # (out, blocks)
    bound = steps @ weights.T
    assert ((y.double() - reference).abs() <= bound * 1.01 + 1e-5 * reference.abs().max()).all()
    assert ((y.double() - reference).norm() / reference.norm()).item() < 0.02
    for r in range(rows):  # a row alone gives the same numbers as in the batch
        alone = int4_dot.int4_dot_matmul(x[r : r + 1], int4_dot.pack(codes, scales_zeros, group), bias)
        assert torch.equal(alone[0], y[r])


def test_several_threads_give_the_same_numbers():
    gen = torch.Generator().manual_seed(0)
    codes, scales_zeros = quantize_int4(torch.randn(320, 128, generator=gen), 32)
    packed, x = int4_dot.pack(codes, scales_zeros, 32), torch.randn(5, 128, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int4_dot.int4_dot_matmul(x, packed, None)
        torch.set_num_threads(2)
        assert torch.equal(int4_dot.int4_dot_matmul(x, packed, None), one)
    finally:
        torch.set_num_threads(threads)


def test_shapes_the_kernel_cannot_take_are_refused_with_a_message():
    with pytest.raises(ValueError, match="does not fit the kernel"):
        int4_dot.pack(torch.zeros(40, 64, dtype=torch.int32), torch.zeros(2, 40, 2), 32)
    packed = int4_dot.pack(torch.zeros(32, 64, dtype=torch.int32), torch.zeros(2, 32, 2), 32)
    with pytest.raises(ValueError, match="inputs"):
        int4_dot.int4_dot_matmul(torch.zeros(1, 96), packed, None)


@pytest.fixture
def int4_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    quantize_linears_int4(model)
    return model


def _steps(model, native: bool, rows: int, steps: int = 5):
    """Logits of ``steps`` steps of the fast step (C or Python) over ``rows`` rows at their own positions and masks."""
    was = native_step.use_native_step(native)
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([PROMPT]), cache=DynamicCache(config=model.config), use_cache=True)
            cache = _expand_cache(out.cache, rows, 12)
            step = _fast_step(model, cache)
            pad = torch.tensor([0, 3, 1][:rows])
            attend = torch.arange(12 + steps)[None, :] >= pad[:, None]
            logits, length = [], len(PROMPT)
            for t in range(steps):
                ids = torch.tensor([[t + 1 + 19 * r] for r in range(rows)])
                logits.append(step(ids, length - pad, attend[:, None, None, : length + 1]))
                length += 1
            return torch.stack(logits)
    finally:
        native_step.use_native_step(was)


def _greedy(model, native: bool) -> list[int]:
    was = native_step.use_native_step(native)
    try:
        out: list[int] = []
        decode(model, PROMPT, 1, 12, Sampler(temperature=0), lambda t: (out.append(t[0]), [False])[1])
        return out
    finally:
        native_step.use_native_step(was)


def test_the_c_step_with_int4_weights_gives_the_python_steps_logits_and_tokens(int4_model):
    with torch.inference_mode():
        cache = _expand_cache(int4_model(input_ids=torch.tensor([PROMPT]), cache=DynamicCache()).cache, 1, 30)
    assert native_step.native_step(int4_model, cache, lambda *a: torch.zeros(1)) is not None  # it applies
    ours, theirs = _steps(int4_model, True, 3), _steps(int4_model, False, 3)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert torch.equal(_steps(int4_model, True, 1)[:, 0], ours[:, 0])  # a row alone: the same numbers as in a batch
    assert _greedy(int4_model, True) == _greedy(int4_model, False)
    was = int4.use_dot_products(False)  # torch's int4 kernel (bfloat16) in the Python step: close, not equal
    try:
        kernel = _steps(int4_model, False, 3)
    finally:
        int4.use_dot_products(was)
    assert not torch.equal(kernel, theirs) and (kernel - theirs).abs().max() < 0.1 * theirs.std()


def test_lora_on_int4_weights_applies_in_the_c_step_as_in_the_python_step(int4_model):
    from peft import LoraConfig, get_peft_model

    base = _steps(int4_model, True, 2)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    peft = get_peft_model(int4_model, LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    with torch.inference_mode():
        cache = _expand_cache(int4_model(input_ids=torch.tensor([PROMPT]), cache=DynamicCache()).cache, 1, 30)
    assert native_step.native_step(int4_model, cache, lambda *a: torch.zeros(1)) is not None
    ours, theirs = _steps(int4_model, True, 2), _steps(int4_model, False, 2)
    assert (ours - base).abs().max() > 0.1 * base.std()
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_without_the_kernel_int4_keeps_torchs_kernel_and_the_python_step(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(int4_dot, "available", lambda: False)  # as on a CPU without AVX-512 VNNI
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    quantize_linears_int4(model)
    assert int4_dot.packed_for(model.model.layers[0].mlp.down_proj.int4_weight) is None
    with torch.inference_mode():
        cache = _expand_cache(model(input_ids=torch.tensor([PROMPT]), cache=DynamicCache()).cache, 1, 30)
    assert native_step.native_step(model, cache, lambda *a: torch.zeros(1)) is None
    assert len(_greedy(model, True)) == 12
