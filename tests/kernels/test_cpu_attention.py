"""kernels.cpu_attention (causal attention over a packed row in one C call) against torch's SDPA per sequence."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import micro_step_loss

from finetune_studio.engine.datasets.render import IGNORE, Tokenized
from finetune_studio.engine.train.batches import make_batch
from finetune_studio.engine.train.model_patches import fused_ops as patching
from finetune_studio.kernels import attention, cpu_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="needs AVX-512 and a C compiler")


def _inputs(b, h, kv, t, d, seed=0, dtype=torch.float32):
    """q [b, h, t, d], k / v [b, kv, t, d] as transformers passes them: transposed views of [b, t, heads, d]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, t, kv, d, generator=g, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, t, kv, d, generator=g, dtype=dtype).transpose(1, 2)
    grad = torch.randn(b, h, t, d, generator=g, dtype=dtype)
    return q, k, v, grad


def _run(fn, q, k, v, grad):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


CASES = [  # heads, kv heads, head dim, sequence lengths of one packed row
    (9, 3, 64, (115, 118, 110, 112)),
    (3, 1, 16, (1,)),
    (6, 2, 32, (1, 7, 70, 2)),
    (2, 2, 48, (6, 65, 13)),
    (4, 4, 80, (129,)),
    (3, 3, 128, (31, 1, 17)),
]


@pytest.mark.parametrize("h, kv, d, lengths", CASES)
def test_packed_row_within_float32_rounding_of_the_float64_reference(h, kv, d, lengths):
    """The output and dq, dk, dv of a packed row through the kernel are as close to the float64 reference (SDPA per
    sequence) as torch's float32 SDPA is (within 3x its error, and 2e-5 of the values' scale; inputs are of order 1,
    so the scale is at least 1: a one-token sequence's dq is 0 up to the rounding of dP - delta)."""
    q, k, v, grad = _inputs(1, h, kv, sum(lengths), d, seed=len(lengths) + d)
    scale = 0.7 / d**0.5

    def packed(impl):
        return lambda a, b, c: attention.packed_attention(a, b, c, list(lengths), scale=scale, impl=impl)

    native = _with_threads(1, lambda: _run(packed("auto"), q, k, v, grad))
    torch32 = _run(packed("torch"), q, k, v, grad)
    ref = _run(packed("torch"), *(x.double() for x in (q, k, v, grad)))
    for name, got, plain, want in zip(("out", "dq", "dk", "dv"), native, torch32, ref):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        err, torch_err = (got.double() - want).abs().max().item(), (plain.double() - want).abs().max().item()
        size = max(want.abs().max().item(), 1.0)
        assert err <= max(3 * torch_err, 2e-6 * size), (name, err, torch_err)
        assert err <= 2e-5 * size, (name, err, size)


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_rows_strides_and_threads_give_the_same_numbers(threads):
    """gqa_attention's causal call (no mask) of two rows goes through the kernel: each row the same numbers as that
    row alone, contiguous inputs the same as transposed views, any thread count the same (each task owns its
    outputs; no sums across threads)."""
    q, k, v, grad = _inputs(2, 6, 2, 37, 64, seed=5)
    both = _with_threads(
        threads, lambda: _run(lambda a, b, c: attention.gqa_attention(a, b, c, is_causal=True), q, k, v, grad)
    )
    ref = _run(lambda a, b, c: attention.gqa_attention(a, b, c, is_causal=True, impl="torch"), q, k, v, grad)
    for got, want in zip(both, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    first = _run(
        lambda a, b, c: attention.gqa_attention(a, b, c, is_causal=True),
        *(x[:1].contiguous() for x in (q, k, v, grad)),
    )
    for row, alone in zip(both, first):
        assert torch.equal(row[:1], alone)


def test_layouts_the_output_as_flash_and_the_gradients_token_major():
    """The output is a contiguous [B, H, T, D] (as flash's: what a step holds stays what the estimate counts); dq,
    dk, dv come as the projections' outputs are laid out, [B, T, heads, D] underneath."""
    q, k, v, grad = _inputs(1, 4, 2, 20, 16)
    out, dq, dk, dv = _run(lambda a, b, c: attention.packed_attention(a, b, c, [12, 8]), q, k, v, grad)
    assert out.is_contiguous()
    assert dq.transpose(1, 2).is_contiguous() and dk.transpose(1, 2).is_contiguous()
    assert dv.transpose(1, 2).is_contiguous()


def test_saves_what_flash_saves_no_probabilities():
    """Saved for backward: q, k, v, the output and a [B, H, T] logsumexp; nothing of [T, T]."""
    q, k, v, _ = _inputs(1, 6, 2, 96, 32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = attention.packed_attention(q, k, v, [50, 46])
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(out.shape), (1, 6, 96)])


def test_native_off_and_unsupported_inputs_keep_torchs_sdpa():
    """NATIVE = False, a head dim that is no multiple of 16, dropout, float64, a mask or a non-causal call: torch's
    SDPA, bit for bit."""
    q, k, v, grad = _inputs(1, 4, 2, 30, 32)
    lengths = [10, 20]

    def packed(impl="auto", **kw):
        return lambda a, b, c: attention.packed_attention(a, b, c, lengths, impl=impl, **kw)

    ref = _run(packed("torch"), q, k, v, grad)
    native = _run(packed(), q, k, v, grad)
    assert not all(torch.equal(a, b) for a, b in zip(native, ref))  # the kernel ran (another order of sums)
    attention.NATIVE = False
    try:
        plain = _run(packed(), q, k, v, grad)
    finally:
        attention.NATIVE = True
    assert all(torch.equal(a, b) for a, b in zip(plain, ref))
    odd = _inputs(1, 4, 2, 30, 24)
    assert all(torch.equal(a, b) for a, b in zip(_run(packed(), *odd), _run(packed("torch"), *odd)))
    wide = [x.double() for x in (q, k, v, grad)]
    assert all(torch.equal(a, b) for a, b in zip(_run(packed(), *wide), _run(packed("torch"), *wide)))
    torch.manual_seed(0)
    dropped = packed(dropout=0.5)(q, k, v)
    torch.manual_seed(0)
    assert torch.equal(dropped, packed("torch", dropout=0.5)(q, k, v))
    mask = torch.ones(30, 30, dtype=torch.bool).tril()
    masked = attention.gqa_attention(q, k, v, mask)
    assert torch.equal(masked, attention.gqa_attention(q, k, v, mask, impl="torch"))
    assert torch.equal(attention.gqa_attention(q, k, v), attention.gqa_attention(q, k, v, impl="torch"))
    assert cpu_attention.runs_on(q, k, v)
    assert not cpu_attention.runs_on(q, k[:, :, :29], v[:, :, :29])  # causal over unequal lengths: torch's
    assert not cpu_attention.runs_on(q.bfloat16(), k.bfloat16(), v.bfloat16())


def test_lengths_must_cover_the_row():
    q, k, v, _ = _inputs(1, 2, 1, 10, 16)
    with pytest.raises(ValueError, match="sum"):
        cpu_attention.causal_attention_native(q, k, v, [4, 5])


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # head dim 16
        vocab_size=256,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    patching.apply_memory_patches(model, True)
    patching.apply_packed_attention(model)
    return model.train()


def _two_steps(monkeypatch, native: bool):
    """Loss, gradients, and the loss after one SGD step, of a packed batch of four sequences."""
    calls = []
    real = cpu_attention.causal_attention_native
    monkeypatch.setattr(cpu_attention, "causal_attention_native", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(attention, "NATIVE", native)
    model = _tiny_model()
    rows = []
    for i, n in enumerate((23, 40, 1, 17)):
        ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(i)).tolist()
        rows.append(Tokenized(ids, [IGNORE] * (n // 2) + ids[n // 2 :]))
    batch = make_batch(rows, [0, 1, 2, 3], pad_id=0, packed=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = micro_step_loss(model, "sft", batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    with torch.no_grad():
        after = micro_step_loss(model, "sft", batch)
    return loss.item(), grads, after.item(), len(calls)


def test_a_training_step_of_a_tiny_model_with_and_without_the_kernel(monkeypatch):
    """A packed SFT step with the kernel (each layer's attention one call, forward and recompute-free backward) gives
    torch's loss and gradients to float32 rounding, and so the same loss after the step."""
    loss, grads, after, calls = _with_threads(1, lambda: _two_steps(monkeypatch, True))
    ref_loss, ref_grads, ref_after, ref_calls = _with_threads(1, lambda: _two_steps(monkeypatch, False))
    assert calls == 4 and ref_calls == 0  # 2 layers x (the step's forward, the forward after it)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert after == pytest.approx(ref_after, rel=1e-5)
    assert after < loss
    for name, g in ref_grads.items():
        scale = g.abs().max().item()
        assert (grads[name] - g).abs().max().item() <= 5e-5 * scale + 1e-9, name
