import pytest
import torch

from finetune_studio.kernels.linear_logprobs import token_logprobs, token_logprobs_reference


@pytest.mark.parametrize("n,h,v,chunk", [(1, 8, 5, 4), (37, 16, 101, 8), (64, 32, 257, 64), (130, 24, 50, 7)])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_chunked_matches_reference_forward_and_backward(n, h, v, chunk, softcap):
    torch.manual_seed(n + v)
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    grad = torch.randn(n, dtype=torch.float64)

    ref = token_logprobs_reference(hidden, weight, targets, softcap)
    gh_ref, gw_ref = torch.autograd.grad((ref * grad).sum(), (hidden, weight))
    out = token_logprobs(hidden, weight, targets, impl="chunked", chunk=chunk, softcap=softcap)
    gh, gw = torch.autograd.grad((out * grad).sum(), (hidden, weight))

    assert out.dtype == torch.float64
    assert torch.allclose(out, ref, atol=1e-10)
    assert torch.allclose(gh, gh_ref, atol=1e-9)
    assert torch.allclose(gw, gw_ref, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_low_precision_inputs_close_to_float64(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(50, 32)
    weight = torch.randn(97, 32) * 0.1
    targets = torch.randint(0, 97, (50,))
    exact = token_logprobs_reference(hidden.double(), weight.double(), targets)
    h = hidden.to(dtype).requires_grad_()
    out = token_logprobs(h, weight.to(dtype), targets, impl="chunked", chunk=16)
    out.sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), exact, atol=tol)
    assert h.grad is not None and h.grad.dtype == dtype


def test_frozen_weight_gets_no_gradient():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    out = token_logprobs(hidden, weight, torch.randint(0, 20, (10,)), impl="chunked", chunk=3)
    out.sum().backward()
    assert weight.grad is None and hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk", [4, 1024])
def test_frozen_head_gradient_computed_in_forward_matches_reference(softcap, chunk):
    """With a frozen head the chunked op computes d logp / d hidden in its forward pass; the gradient of any
    loss of the log-probs (here a random weighting, and a DPO-like one that couples rows) equals the reference."""
    torch.manual_seed(3)
    hidden = torch.randn(45, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(61, 16, dtype=torch.float64)
    targets = torch.randint(0, 61, (45,))
    grad = torch.randn(45, dtype=torch.float64)

    def losses(out):
        weighted = (out * grad).sum()
        coupled = -torch.nn.functional.logsigmoid(0.1 * (out[:20].sum() - out[20:].sum()))
        return weighted, coupled

    for pick in (0, 1):
        ref = losses(token_logprobs_reference(hidden, weight, targets, softcap))[pick]
        (g_ref,) = torch.autograd.grad(ref, hidden)
        out = token_logprobs(hidden, weight, targets, impl="chunked", chunk=chunk, softcap=softcap)
        (g,) = torch.autograd.grad(losses(out)[pick], hidden)
        assert torch.allclose(g, g_ref, atol=1e-10)
    with torch.no_grad():  # a reference pass: no gradient wanted, the same log-probs
        plain = token_logprobs(hidden, weight, targets, impl="chunked", chunk=chunk, softcap=softcap)
    assert not plain.requires_grad
    assert torch.allclose(plain, token_logprobs_reference(hidden, weight, targets, softcap).detach(), atol=1e-10)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="unknown impl"):
        token_logprobs(torch.randn(5000, 4), torch.randn(3, 4), torch.zeros(5000, dtype=torch.long), impl="cuda")


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_head_gradient_in_bf16_keeps_the_log_probs_and_rounds_only_the_gradient(softcap, native, monkeypatch):
    """set_head_grad_dtype(weight, bf16): the same float32 log-probs bit for bit; d logp / d hidden within bf16's
    rounding of the reference (torch's path: the head cast a vocabulary chunk at a time, 3 chunks here; or
    kernels.bf16_head where it runs); None undoes it."""
    from finetune_studio.kernels import bf16_head
    from finetune_studio.kernels import linear_logprobs as ll

    if native and not bf16_head.available():
        pytest.skip("needs AVX-512 BF16 and a C compiler")
    monkeypatch.setattr(ll, "GRAD_VOCAB_CHUNK", 40)
    monkeypatch.setattr(ll, "BF16_HEAD_KERNEL", native)
    torch.manual_seed(5)
    hidden = torch.randn(30, 24)
    weight = torch.randn(101, 24) * 0.3
    targets = torch.randint(0, 101, (30,))
    grad = torch.randn(30)

    def run():
        h = hidden.clone().requires_grad_()
        out = token_logprobs(h, weight, targets, impl="chunked", chunk=16, softcap=softcap)
        (g,) = torch.autograd.grad((out * grad).sum(), h)
        return out.detach(), g

    exact_out, exact_g = run()
    ll.set_head_grad_dtype(weight, torch.bfloat16)
    assert ll.head_grad_dtype(weight) == torch.bfloat16
    low_out, low_g = run()
    h64 = hidden.double().requires_grad_()
    ref = token_logprobs_reference(h64, weight.double(), targets, softcap)
    (ref_g,) = torch.autograd.grad((ref * grad.double()).sum(), h64)
    assert torch.equal(low_out, exact_out)
    rel = ((low_g.double() - ref_g).norm() / ref_g.norm()).item()
    assert 1e-5 < rel < 1e-2  # rounded (not the float32 path), but only to bf16's precision
    assert ((exact_g.double() - ref_g).norm() / ref_g.norm()).item() < 1e-5
    ll.set_head_grad_dtype(weight, None)
    assert ll.head_grad_dtype(weight) is None
    assert torch.equal(run()[1], exact_g)
    with pytest.raises(ValueError, match="16-bit"):
        ll.set_head_grad_dtype(weight, torch.float64)


def test_mixed_precision_marks_a_frozen_float32_head_only():
    import transformers

    from finetune_studio.engine.train.model_patches.mixed_precision import apply_mixed
    from finetune_studio.kernels.linear_logprobs import head_grad_dtype

    cfg = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=40
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    apply_mixed(model)
    assert head_grad_dtype(model.get_output_embeddings().weight) == torch.bfloat16
    trained = transformers.LlamaForCausalLM(cfg)  # a head that trains keeps its float32 gradient path
    trained.requires_grad_(False)
    trained.get_output_embeddings().weight.requires_grad_(True)
    apply_mixed(trained)
    assert head_grad_dtype(trained.get_output_embeddings().weight) is None
