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
