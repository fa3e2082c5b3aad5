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


def _tiny_config():
    """A two-layer Llama config whose attention the C kernel takes (head dim 16, grouped key/value heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # head dim 16
        vocab_size=256,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )


def _tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config())
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


# ---- the bf16-product variant (bf16-mixed's attention) ----

needs_bf16 = pytest.mark.skipif(
    not (cpu_attention.available() and cpu_attention.bf16_available()), reason="needs AVX512_BF16"
)

BF16_CASES = [*CASES, (3, 1, 64, (1, 17, 115)), (4, 2, 16, (17, 1, 115, 3))]


@pytest.fixture(autouse=True)
def _bf16_products_on(monkeypatch):
    """The variant is off by default (its cost to the loss curves); these tests switch it on (a test that wants it
    off says so)."""
    monkeypatch.setattr(cpu_attention, "BF16_PRODUCTS", True)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.float().bfloat16().double()


def _rounded_reference(q, k, v, grad, lengths, scale):
    """float64 attention with the bf16 variant's roundings: q, k, v, the output's gradient, P where it multiplies
    (P v, P^T dout) and scale dS (dS k, dS^T q) rounded to bf16; softmax, delta = dout . out and dS in float64."""
    h, kv = q.shape[1], k.shape[1]
    q, k, v, grad = (x.double() for x in (q, k, v, grad))
    k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
    out, dq, dk, dv = (torch.zeros_like(x) for x in (q, q, k, v))
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        qs, ks, vs, gs = q[:, :, rows], k[:, :, rows], v[:, :, rows], grad[:, :, rows]
        s = scale * _bf16(qs) @ _bf16(ks).transpose(-1, -2)
        p = torch.softmax(s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), -1)
        o = _bf16(p) @ _bf16(vs)
        dp = _bf16(gs) @ _bf16(vs).transpose(-1, -2)
        ds = _bf16(scale * p * (dp - (gs * o).sum(-1, keepdim=True)))
        out[:, :, rows], dq[:, :, rows] = o, ds @ _bf16(ks)
        dk[:, :, rows], dv[:, :, rows] = ds.transpose(-1, -2) @ _bf16(qs), _bf16(p).transpose(-1, -2) @ _bf16(gs)
        start += n
    b, t, d = q.shape[0], q.shape[2], q.shape[3]
    return out, dq, dk.view(b, kv, h // kv, t, d).sum(2), dv.view(b, kv, h // kv, t, d).sum(2)


def _bf16_run(q, k, v, grad, lengths, scale, products=torch.bfloat16):
    return _with_threads(
        1,
        lambda: _run(
            lambda a, b, c: attention.packed_attention(a, b, c, list(lengths), scale=scale, products=products),
            q,
            k,
            v,
            grad,
        ),
    )


@needs_bf16
@pytest.mark.parametrize("h, kv, d, lengths", BF16_CASES)
def test_bf16_products_within_float32_sums_of_the_rounded_float64_reference(h, kv, d, lengths):
    """The output and dq, dk, dv of the bf16 variant are the float64 attention of the bf16-rounded operands to float32
    sums: 98% of the elements (measured: all but 0-0.7%) within 2e-6 of the values' scale; the rest hold a P or dS
    element that float32 and float64 round to neighbouring bf16 values (a product off by a bf16 ulp; a dS element
    reaches a whole row of dk), within 1e-3 (measured 3e-4). Unrounded operands miss nearly every element by the
    bf16 rounding itself (~4e-3 of the scale, the next test)."""
    q, k, v, grad = _inputs(1, h, kv, sum(lengths), d, seed=len(lengths) + d)
    scale = 0.7 / d**0.5
    got = _bf16_run(q, k, v, grad, lengths, scale)
    want = _rounded_reference(q, k, v, grad, lengths, scale)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.dtype == torch.float32 and x.shape == y.shape, name
        err, size = (x.double() - y).abs(), max(y.abs().max().item(), 1.0)
        assert err.max().item() <= 1e-3 * size, (name, err.max().item(), size)
        assert (err > 2e-6 * size).double().mean().item() <= 2e-2, (name, (err > 2e-6 * size).sum().item())


@needs_bf16
@pytest.mark.parametrize("h, kv, d, lengths", BF16_CASES)
def test_bf16_products_within_bf16_rounding_of_the_float32_kernel(h, kv, d, lengths):
    """Against the float32 kernel (and so torch's SDPA): the bf16 roundings' size, 1.5e-2 of the values' scale at
    most, and not the same numbers (the operands were rounded)."""
    q, k, v, grad = _inputs(1, h, kv, sum(lengths), d, seed=len(lengths) + d)
    scale = 0.7 / d**0.5
    got = _bf16_run(q, k, v, grad, lengths, scale)
    plain = _bf16_run(q, k, v, grad, lengths, scale, torch.float32)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, plain):
        size = max(y.abs().max().item(), 1.0)
        assert (x - y).abs().max().item() <= 1.5e-2 * size, name
    assert not torch.equal(got[0], plain[0])


@needs_bf16
@pytest.mark.parametrize("threads", [1, 2])
def test_float32_products_the_same_bits_with_the_flag_off_and_any_task_order(threads, monkeypatch):
    """float32 products give the same bits whatever BF16_PRODUCTS says, bf16 products with BF16_PRODUCTS off or on
    a CPU without AVX512_BF16 are the float32 kernel's, and both variants give the same bits with the tasks taken
    longest sequence first or in order, on any thread count (each task owns its outputs)."""
    import ctypes

    q, k, v, grad = _inputs(1, 6, 2, 160, 32, seed=3)
    lengths = (17, 115, 1, 27)

    def run(products):
        return _with_threads(
            threads,
            lambda: _run(
                lambda a, b, c: attention.packed_attention(a, b, c, list(lengths), products=products), q, k, v, grad
            ),
        )

    f32, b16 = run(torch.float32), run(torch.bfloat16)
    monkeypatch.setattr(cpu_attention, "BF16_PRODUCTS", False)
    assert all(torch.equal(a, b) for a, b in zip(run(torch.float32), f32))
    assert all(torch.equal(a, b) for a, b in zip(run(torch.bfloat16), f32))
    monkeypatch.setattr(cpu_attention, "BF16_PRODUCTS", True)
    monkeypatch.setattr(cpu_attention, "bf16_available", lambda: False)  # a CPU without AVX512_BF16
    assert all(torch.equal(a, b) for a, b in zip(run(torch.bfloat16), f32))
    monkeypatch.undo()
    monkeypatch.setattr(cpu_attention, "BF16_PRODUCTS", True)  # (undo() took the module fixture's setting too)
    flag = ctypes.c_int.in_dll(cpu_attention._lib(), "attention_longest_first")
    flag.value = 0
    try:
        assert all(torch.equal(a, b) for a, b in zip(run(torch.float32), f32))
        assert all(torch.equal(a, b) for a, b in zip(run(torch.bfloat16), b16))
    finally:
        flag.value = 1


def test_products_other_than_float32_or_bf16_are_refused():
    q, k, v, _ = _inputs(1, 2, 1, 10, 16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_attention.causal_attention_native(q, k, v, [10], products=torch.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        attention.set_products_dtype(torch.nn.Module(), torch.float16)


def _tiny_lora_model(mixed: bool):
    """A LoRA Llama (head dim 16, so the kernel runs) set up as a run sets it up: the fused ops, packed attention,
    bf16-mixed's frozen linears and attention marks if ``mixed``, and the kernels wired in."""
    from transformers import LlamaForCausalLM

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.engine.train.adapters import add_adapters
    from finetune_studio.engine.train.model_patches import kernel_wiring
    from finetune_studio.engine.train.model_patches.mixed_precision import apply_mixed

    torch.manual_seed(0)
    base = LlamaForCausalLM(_tiny_config())
    base.config.use_cache = False
    for p in base.parameters():
        p.requires_grad_(False)
    model = add_adapters(base, TrainConfig(lora_rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    patching.apply_memory_patches(model, True)
    patching.apply_packed_attention(model)
    if mixed:
        apply_mixed(model)
    kernel_wiring.install_kernels(model, "auto", "cpu", fused_ops=True)
    return model.train()


def _packed_step(monkeypatch, model):
    """(loss, gradients, the products each kernel call asked for) of one packed SFT step of four sequences."""
    asked: list[torch.dtype] = []
    real = cpu_attention.causal_attention_native

    def spy(q, k, v, lengths, scale=None, products=torch.float32):
        asked.append(products)
        return real(q, k, v, lengths, scale, products)

    monkeypatch.setattr(cpu_attention, "causal_attention_native", spy)
    rows = []
    for i, n in enumerate((23, 40, 1, 17)):
        ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(i)).tolist()
        rows.append(Tokenized(ids, [IGNORE] * (n // 2) + ids[n // 2 :]))
    batch = make_batch(rows, [0, 1, 2, 3], pad_id=0, packed=True)
    model.zero_grad(set_to_none=True)
    loss = micro_step_loss(model, "sft", batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, asked


@needs_bf16
def test_a_bf16_mixed_model_multiplies_attention_in_bf16_and_float32_stays_float32(monkeypatch):
    """bf16-mixed (apply_mixed) marks the attention modules: each layer's kernel call asks for bf16 products, and
    the loss and the adapters' gradients stay within bf16 rounding of the same model's float32-product attention
    (BF16_PRODUCTS off): each gradient moves less than twice as far as bf16-mixed's own move from the float32
    model's, and under 5%; a float32 model asks for float32 products."""
    monkeypatch.setattr(cpu_attention, "BF16_PRODUCTS", True)  # (off by default: the loss curves' cost)
    model = _tiny_lora_model(mixed=True)
    loss, grads, asked = _with_threads(1, lambda: _packed_step(monkeypatch, model))
    assert asked == [torch.bfloat16] * 2
    monkeypatch.setattr(cpu_attention, "BF16_PRODUCTS", False)
    ref_loss, ref_grads, _ = _with_threads(1, lambda: _packed_step(monkeypatch, model))
    assert loss != ref_loss  # the products differ
    assert loss == pytest.approx(ref_loss, rel=2e-3)
    monkeypatch.setattr(cpu_attention, "BF16_PRODUCTS", True)
    f32_loss, f32_grads, asked32 = _with_threads(1, lambda: _packed_step(monkeypatch, _tiny_lora_model(mixed=False)))
    assert asked32 == [torch.float32] * 2
    for name, g in ref_grads.items():  # measured: 0.5-3.4% of the norm; bf16-mixed itself moves them 0.7-4.0%
        off, mixed_off = (grads[name] - g).norm().item(), (f32_grads[name] - g).norm().item()
        assert off <= min(2 * mixed_off, 5e-2 * g.norm().item()), (name, off, mixed_off)
