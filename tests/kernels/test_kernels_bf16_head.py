"""kernels.bf16_head: the head's logits from bf16 inputs with a float32 result, against its torch reference, and
its use by linear_logprobs (set_head_logits_dtype) and bf16-mixed."""

import pytest
import torch

from finetune_studio.kernels import bf16_head
from finetune_studio.kernels import linear_logprobs as ll
from finetune_studio.kernels.bf16_head import (
    bf16_grad_product,
    bf16_grad_product_reference,
    bf16_logits,
    bf16_logits_reference,
)

needs_kernel = pytest.mark.skipif(not bf16_head.available(), reason="needs AVX-512 BF16 and a C compiler")


@needs_kernel
@pytest.mark.parametrize(
    "n,h,v",
    [(1, 8, 5), (12, 64, 32), (13, 576, 1000), (37, 7, 33), (25, 40, 64), (124, 96, 257), (3, 1, 17)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_logits_match_the_bf16_rounded_inputs_multiplied_in_float32(n, h, v, threads):
    """Every shape the tiles and panels split unevenly (rows not a multiple of 12, vocabularies not of 32, odd and
    tiny hidden sizes): the reference's numbers to float32 summation order."""
    torch.manual_seed(n * v + h)
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h) * 0.1
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = bf16_logits(hidden, weight)
    finally:
        torch.set_num_threads(old)
    ref = bf16_logits_reference(hidden, weight)
    assert out.dtype == torch.float32 and out.shape == (n, v)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, h**0.5))


@needs_kernel
@pytest.mark.parametrize(
    "n,v,h",
    [(1, 5, 8), (12, 256, 32), (13, 1000, 576), (37, 33, 7), (25, 513, 64), (124, 300, 96), (3, 17, 1), (2, 1, 40)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_gradient_product_matches_the_bf16_rounded_inputs_multiplied_in_float32(n, v, h, threads):
    """G W for shapes the vocabulary blocks (256 rows), the column panels (32) and the row tiles (12) split unevenly,
    an odd vocabulary included (its last pair half zero), on one thread and split between two."""
    torch.manual_seed(n * v + h)
    grad = torch.randn(n, v) * 0.01
    weight = torch.randn(v, h) * 0.1
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = bf16_grad_product(grad, weight)
    finally:
        torch.set_num_threads(old)
    ref = bf16_grad_product_reference(grad, weight)
    assert out.dtype == torch.float32 and out.shape == (n, h)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-7 * max(1.0, v**0.5))
    assert not torch.equal(out, grad @ weight)  # the inputs really are rounded


@needs_kernel
def test_log_probs_closer_than_with_bf16_logits():
    """The point of the kernel: the log-probs from its logits (inputs rounded, result not) are closer to float64's
    than those of a bf16 product, whose logits are rounded too (on the bundled model's head: 5x closer, in
    benchmarks/RESULTS.md; on random inputs the margin is smaller)."""
    torch.manual_seed(1)
    hidden = torch.randn(40, 256) * 2
    weight = torch.randn(300, 256) * 0.2
    exact = (hidden.double() @ weight.double().t()).log_softmax(-1)

    def error(logits: torch.Tensor) -> float:
        return (logits.double().log_softmax(-1) - exact).abs().mean().item()

    ours = error(bf16_logits(hidden, weight))
    assert ours < 0.75 * error(hidden.bfloat16() @ weight.bfloat16().t())
    assert ours > 100 * error(hidden @ weight.t())  # the inputs really are rounded (not a float32 product)


@needs_kernel
def test_rows_with_a_stride_and_an_empty_batch():
    torch.manual_seed(2)
    wide = torch.randn(20, 100)
    hidden = wide[:, 10:74]  # rows 100 apart, each contiguous
    weight = torch.randn(45, 64)
    assert torch.allclose(bf16_logits(hidden, weight), bf16_logits_reference(hidden, weight), rtol=1e-5, atol=1e-4)
    assert bf16_logits(torch.empty(0, 64), weight).shape == (0, 45)


def test_bad_inputs_are_refused():
    if not bf16_head.available():
        with pytest.raises(RuntimeError, match="not available"):
            bf16_logits(torch.randn(2, 4), torch.randn(3, 4))
        return
    with pytest.raises(ValueError, match="float32"):
        bf16_logits(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\[n, H\]"):
        bf16_logits(torch.randn(2, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[n, V\]"):
        bf16_grad_product(torch.randn(2, 4), torch.randn(3, 5))


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_log_probs_with_bf16_logits_stay_within_bf16_input_rounding(softcap):
    """set_head_logits_dtype(weight, bf16): log-probs and d logp / d hidden within the inputs' bf16 rounding of the
    float64 reference; None gives the float32 path again bit for bit. Where the kernel does not run the mark
    changes nothing."""
    torch.manual_seed(5)
    hidden = torch.randn(30, 48)
    weight = torch.randn(101, 48) * 0.3
    targets = torch.randint(0, 101, (30,))
    grad = torch.randn(30)

    def run():
        h = hidden.clone().requires_grad_()
        out = ll.token_logprobs(h, weight, targets, impl="chunked", chunk=16, softcap=softcap)
        (g,) = torch.autograd.grad((out * grad).sum(), h)
        return out.detach(), g

    exact_out, exact_g = run()
    ll.set_head_logits_dtype(weight, torch.bfloat16)
    assert ll.head_logits_dtype(weight) == torch.bfloat16
    try:
        low_out, low_g = run()
        with torch.no_grad():  # a reference pass (DPO's) goes the same way
            plain = ll.token_logprobs(hidden, weight, targets, impl="chunked", chunk=16, softcap=softcap)
    finally:
        ll.set_head_logits_dtype(weight, None)
    assert torch.equal(plain, low_out)
    h64 = hidden.double().requires_grad_()
    ref = ll.token_logprobs_reference(h64, weight.double(), targets, softcap)
    (ref_g,) = torch.autograd.grad((ref * grad.double()).sum(), h64)
    err = (low_out.double() - ref.detach()).abs().max().item()
    rel_g = ((low_g.double() - ref_g).norm() / ref_g.norm()).item()
    if bf16_head.available():
        assert 1e-6 < err < 5e-2 and rel_g < 1e-2
    else:
        assert torch.equal(low_out, exact_out) and torch.equal(low_g, exact_g)
    assert ll.head_logits_dtype(weight) is None
    assert torch.equal(run()[0], exact_out)
    with pytest.raises(ValueError, match="bfloat16"):
        ll.set_head_logits_dtype(weight, torch.float16)


def test_bf16_mixed_marks_a_frozen_float32_heads_logits():
    import transformers

    from finetune_studio.engine.train.model_patches.mixed_precision import apply_mixed

    cfg = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=40
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    apply_mixed(model)
    assert ll.head_logits_dtype(model.get_output_embeddings().weight) == torch.bfloat16
    trained = transformers.LlamaForCausalLM(cfg)  # a head that trains keeps its float32 logits
    trained.requires_grad_(False)
    trained.get_output_embeddings().weight.requires_grad_(True)
    apply_mixed(trained)
    assert ll.head_logits_dtype(trained.get_output_embeddings().weight) is None
    half = transformers.LlamaForCausalLM(cfg)  # the kernel is bf16's: float16 bases leave the logits alone
    half.requires_grad_(False)
    apply_mixed(half, torch.float16)
    assert ll.head_logits_dtype(half.get_output_embeddings().weight) is None
