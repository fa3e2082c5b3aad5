"""kernels.cpu_rotary (the rotary embedding of q and k in C) against transformers' ``apply_rotary_pos_emb``, and its
wiring (engine.train.model_patches.rotary)."""

from __future__ import annotations

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama

from finetune_studio.engine.train.model_patches import rotary
from finetune_studio.kernels import cpu_rotary

pytestmark = pytest.mark.skipif(not cpu_rotary.available(), reason="needs AVX-512 and a C compiler")

# transformers' function (the original where a patch in this process replaced it)
HF = getattr(modeling_llama.apply_rotary_pos_emb, "_fs_original", modeling_llama.apply_rotary_pos_emb)


def _cos_sin(batch: int, t: int, d: int, dtype=torch.float32, seed: int = 0):
    """Llama's cos/sin ([batch, T, D], each half repeated) for shifted positions per row, as a packed or padded
    batch has them."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    pos = torch.arange(t, dtype=torch.float64)[None] + torch.arange(batch, dtype=torch.float64)[:, None] * (seed + 3)
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _inputs(layout: str, b: int, t: int, h: int, kv: int, d: int, dtype=torch.float32):
    """(leaves, q, k, unsqueeze_dim): q and k as an attention forward passes them; the leaves take the gradients."""
    g = torch.Generator().manual_seed(b * 1000 + t * 10 + h)

    def randn(*size):  # float32 values (a float64 run sees the same ones)
        return torch.randn(*size, generator=g).to(dtype).requires_grad_()

    if layout == "stacked":  # slices of one q/k/v product, viewed and transposed
        qkv = randn(b, t, (h + 2 * kv) * d)
        q = qkv[..., : h * d].view(b, t, h, d).transpose(1, 2)
        k = qkv[..., h * d : (h + kv) * d].view(b, t, kv, d).transpose(1, 2)
        return (qkv,), q, k, 1
    qp, kp = randn(b, t, h * d), randn(b, t, kv * d)
    if layout == "transposed":  # Llama's q_proj(x).view(b, t, -1, d).transpose(1, 2)
        return (qp, kp), qp.view(b, t, h, d).transpose(1, 2), kp.view(b, t, kv, d).transpose(1, 2), 1
    if layout == "contiguous":  # [B, H, T, D] tensors of their own
        q, k = qp.view(b, t, h, d).transpose(1, 2).contiguous(), kp.view(b, t, kv, d).transpose(1, 2).contiguous()
        return (qp, kp), q, k, 1
    assert layout == "bthd"  # [B, T, H, D] with unsqueeze_dim=2
    return (qp, kp), qp.view(b, t, h, d), kp.view(b, t, kv, d), 2


def _run(fn, layout, shape, cos, sin, dtype=torch.float32):
    leaves, q, k, dim = _inputs(layout, *shape, dtype=dtype)
    out_q, out_k = fn(q, k, cos, sin, dim)
    g = torch.Generator().manual_seed(7)
    grads = torch.randn(out_q.shape, generator=g).to(dtype), torch.randn(out_k.shape, generator=g).to(dtype)
    torch.autograd.backward((out_q, out_k), grads)
    return out_q, out_k, [leaf.grad for leaf in leaves], (q, k)


SHAPES = [(1, 455, 9, 3, 64), (2, 13, 4, 2, 32), (1, 7, 3, 3, 36), (3, 1, 4, 1, 8), (2, 5, 2, 1, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["transposed", "stacked", "contiguous", "bthd"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_gives_transformers_numbers_bit_for_bit(shape, layout, threads):
    """Forward outputs and the input gradients equal transformers' ``apply_rotary_pos_emb`` exactly (each product
    and sum rounded once, as torch's ops), for H != KV heads, strided views, unsqueeze_dim 1 and 2, odd halves
    (masked lanes) and T = 1; and both are within float32 rounding of a float64 reference."""
    b, t, _, _, d = shape
    cos, sin = _cos_sin(b, t, d)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, q, k, dim = _inputs(layout, *shape)
        assert cpu_rotary.runs_on(q, k, cos, sin, dim)
        out_q, out_k, grads, _ = _run(cpu_rotary.rotary_native, layout, shape, cos, sin)
    finally:
        torch.set_num_threads(old)
    assert type(out_q.grad_fn).__name__ == "_RotaryBackward"  # the kernel ran, not a fallback
    ref_q, ref_k, ref_grads, _ = _run(HF, layout, shape, cos, sin)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    assert all(torch.equal(a, r) for a, r in zip(grads, ref_grads))
    c64, s64 = _cos_sin(b, t, d, torch.float64)
    f64_q, f64_k, f64_grads, _ = _run(cpu_rotary.rotary_reference, layout, shape, c64, s64, dtype=torch.float64)
    for got, want in zip([out_q, out_k, *grads], [f64_q, f64_k, *f64_grads]):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=2e-6)


def test_outputs_and_gradients_keep_the_inputs_memory_order():
    """The outputs lie in memory as q and k do (a [B, T, H, D] buffer for transposed projections, as torch's ops
    give), and the gradients too (the projection's view takes them back without a copy); a batch's shared cos
    ([1, T, D]) broadcasts over rows."""
    b, t, h, kv, d = 2, 6, 4, 2, 16
    cos, sin = _cos_sin(1, t, d)
    (qp, kp), q, k, _ = _inputs("transposed", b, t, h, kv, d)
    out_q, out_k = cpu_rotary.rotary_native(q, k, cos, sin, 1)
    ref_q, ref_k = HF(q, k, cos, sin)
    assert out_q.stride() == ref_q.stride() == q.stride() and out_k.stride() == k.stride()
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    grad_q = torch.randn(out_q.shape)  # a contiguous [B, H, T, D] gradient, as SDPA's backward gives
    d_q, d_k = torch.autograd.grad((out_q, out_k), (q, k), (grad_q, torch.ones_like(out_k)))
    assert d_q.stride() == q.stride() and d_k.stride() == k.stride()
    r_q, r_k = torch.autograd.grad((ref_q, ref_k), (q, k), (grad_q, torch.ones_like(ref_k)))
    assert torch.equal(d_q, r_q) and torch.equal(d_k, r_k)


def test_only_the_inputs_that_need_a_gradient_get_one():
    """As with torch's ops, the rotation of a k without a gradient has none, and q's gradient is transformers'."""
    cos, sin = _cos_sin(1, 5, 16)
    q = torch.randn(1, 4, 5, 16, requires_grad=True)
    k = torch.randn(1, 2, 5, 16)
    out_q, out_k = cpu_rotary.rotary_native(q, k, cos, sin, 1)
    ref_q, ref_k = HF(q, k, cos, sin)
    assert out_q.requires_grad and not out_k.requires_grad and not ref_k.requires_grad
    assert torch.equal(torch.autograd.grad(out_q.sum(), q)[0], torch.autograd.grad(ref_q.sum(), q)[0])


def test_fallbacks_run_torch_ops_with_the_same_numbers():
    """Inputs the kernel does not take (bf16, a cos that needs a gradient, a last dimension that is not contiguous,
    a cos that does not broadcast to q, NATIVE off) run torch's ops through ``apply_rotary``: transformers'
    numbers; under no_grad the kernel gives them too."""
    b, t, h, kv, d = 1, 9, 4, 2, 16
    cos, sin = _cos_sin(b, t, d)
    _, q, k, _ = _inputs("transposed", b, t, h, kv, d)
    q, k = q.detach(), k.detach()
    bq, bk, bc, bs = q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16()
    assert not cpu_rotary.runs_on(bq, bk, bc, bs)
    assert all(torch.equal(a, r) for a, r in zip(cpu_rotary.apply_rotary(bq, bk, bc, bs), HF(bq, bk, bc, bs)))
    assert not cpu_rotary.runs_on(q[..., ::2], k[..., ::2], cos[..., ::2], sin[..., ::2])
    assert not cpu_rotary.runs_on(q, k, cos[:, :4], sin[:, :4])
    assert not cpu_rotary.runs_on(q, k, cos, sin, 2)  # [1, T, 1, D] does not broadcast to [1, H, T, D]
    trained = cos.clone().requires_grad_()
    assert not cpu_rotary.runs_on(q, k, trained, sin)
    out_q, _ = cpu_rotary.apply_rotary(q, k, trained, sin)
    out_q.sum().backward()
    assert trained.grad is not None and torch.equal(out_q, HF(q, k, cos, sin)[0])
    with torch.no_grad():
        assert cpu_rotary.runs_on(q, k, trained, sin)
        assert torch.equal(cpu_rotary.apply_rotary(q, k, trained, sin)[1], HF(q, k, cos, sin)[1])
    cpu_rotary.NATIVE = False
    try:
        assert not cpu_rotary.runs_on(q, k, cos, sin)
        out = cpu_rotary.apply_rotary(q.requires_grad_(), k, cos, sin)
        assert type(out[0].grad_fn).__name__ == "AddBackward0"
    finally:
        cpu_rotary.NATIVE = True
    with pytest.raises(ValueError, match="unknown impl"):
        cpu_rotary.apply_rotary(q, k, cos, sin, impl="triton")


@pytest.fixture
def restored():
    """Put transformers' functions back after the test (and, for the test, start from them)."""
    before = rotary.installed()
    rotary.uninstall()
    yield
    rotary.uninstall()
    for name in before:  # what another test of this process had installed
        rotary.install_module(name)


def _tiny_lora(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_training_step_is_the_same_with_and_without_the_kernel(tiny_model_dir, restored, monkeypatch):
    """The fused ops install the kernel in the Llama modeling module; a LoRA training step of the tiny model gives
    the loss and every adapter gradient of the step through transformers' function bit for bit, and the kernel
    really ran (one call a layer, counted by a wrapper that calls it)."""
    from finetune_studio.engine.train.model_patches.fused_ops import apply_memory_patches

    model = _tiny_lora(tiny_model_dir)
    ids = torch.randint(0, 300, (2, 23), generator=torch.Generator().manual_seed(1))
    plain_loss, plain_grads = _step(model, ids)
    assert "rotary" in apply_memory_patches(model)
    assert modeling_llama.apply_rotary_pos_emb._fs_original is HF
    calls = []
    real = cpu_rotary.rotary_native
    monkeypatch.setattr(cpu_rotary, "rotary_native", lambda *a: calls.append(1) or real(*a))
    loss, grads = _step(model, ids)
    assert len(calls) == model.config.num_hidden_layers
    cpu_rotary.NATIVE = False
    try:
        off_loss, off_grads = _step(model, ids)  # the patched model with the kernel off: transformers' ops
    finally:
        cpu_rotary.NATIVE = True
    assert len(calls) == model.config.num_hidden_layers
    assert plain_grads.keys() == grads.keys() == off_grads.keys() and len(grads) > 0
    assert torch.equal(loss, off_loss) and all(torch.equal(grads[n], off_grads[n]) for n in grads)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)  # the other fused ops round differently
    assert apply_memory_patches(model) == []  # idempotent


def test_install_is_undone_and_leaves_other_architectures_alone(tiny_model_dir, restored):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    assert rotary.install(gpt2) == []
    model = _tiny_lora(tiny_model_dir)
    assert rotary.install(model) == [modeling_llama.__name__]
    assert rotary.install(model) == []  # idempotent
    assert modeling_llama.apply_rotary_pos_emb is not HF
    rotary.uninstall()
    assert modeling_llama.apply_rotary_pos_emb is HF and rotary.installed() == {}


def test_a_function_with_other_numbers_is_not_replaced(tiny_model_dir, restored, monkeypatch):
    """A modeling module whose function computes something else (here: the interleaved GPT-J pairing) keeps it."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        def interleaved(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + interleaved(q) * sin, k * cos + interleaved(k) * sin

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    assert rotary.install(_tiny_lora(tiny_model_dir)) == []
    assert modeling_llama.apply_rotary_pos_emb is apply_rotary_pos_emb
