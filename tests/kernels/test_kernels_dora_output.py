"""kernels.dora_output and its wiring into peft's DoRA linears: peft's numbers, one tensor kept for backward."""

from __future__ import annotations

import pytest
import torch
from peft_dora import dora_model, run_step

from finetune_studio.engine.train.model_patches import kernel_wiring
from finetune_studio.kernels.dora_output import dora_output


def _inputs(base_dtype=torch.float32, zero_magnitude=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 5, 40, generator=g).to(base_dtype).requires_grad_()
    lora = torch.randn(3, 5, 40, generator=g).requires_grad_()
    magnitude = (torch.rand(40, generator=g) + 0.5).requires_grad_()
    if zero_magnitude:
        with torch.no_grad():
            magnitude[7] = 0
    norm = torch.rand(40, generator=g) + 0.5
    weights = torch.randn(3, 5, 40, generator=g)
    return base, lora, magnitude, norm, weights


def _grads(impl, base, lora, magnitude, norm, weights, scaling=2.0):
    out = dora_output(base, lora, magnitude, norm, scaling, impl=impl)
    grads = torch.autograd.grad((out.float() * weights).sum(), [base, lora, magnitude])
    return out, grads


@pytest.mark.parametrize("zero_magnitude", [False, True])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_output_and_gradients_are_peft_s(base_dtype, zero_magnitude):
    inputs = _inputs(base_dtype, zero_magnitude)
    out, grads = _grads("auto", *inputs)
    ref, ref_grads = _grads("torch", *inputs)
    assert out.dtype == base_dtype
    tight, bf16 = dict(atol=1e-5, rtol=1e-5), dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), **(tight if base_dtype == torch.float32 else bf16))
    for name, got, want in zip(("base", "lora", "magnitude"), grads, ref_grads):
        assert got.dtype == want.dtype, name
        tol = tight if got.dtype == torch.float32 else bf16  # lora and magnitude: float32, for a bf16 base too
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=name)
    if zero_magnitude:  # the zero row still gets its gradient (from the kept sum, not from y = 0)
        assert grads[2][7].abs() > 0


def _saved_bytes(fn) -> tuple[int, set[int]]:
    """Bytes autograd keeps for backward (each storage once) and those storages' pointers."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), set(seen), out


def test_only_the_output_itself_is_kept_for_backward():
    base, lora, magnitude, norm, _ = _inputs()
    out_bytes = base.numel() * 4
    ours, ptrs, out = _saved_bytes(lambda: dora_output(base, lora, magnitude, norm, 2.0))
    assert out.untyped_storage().data_ptr() in ptrs  # the output, which its consumer may keep anyway
    assert out_bytes <= ours < out_bytes + 1024  # plus two [out] vectors
    theirs, _, _ = _saved_bytes(lambda: dora_output(base, lora, magnitude, norm, 2.0, impl="torch"))
    assert theirs >= 2 * out_bytes  # peft's expression keeps base and lora


def test_bad_shapes_and_impl_are_refused():
    base, lora, magnitude, norm, _ = _inputs()
    with pytest.raises(ValueError, match="must match"):
        dora_output(base, lora[..., :-1], magnitude, norm, 2.0)
    with pytest.raises(ValueError, match="must be \\[40\\]"):
        dora_output(base, lora, magnitude[:-1], norm[:-1], 2.0)
    with pytest.raises(ValueError, match="impl must be one of auto, torch"):
        dora_output(base, lora, magnitude, norm, 2.0, impl="triton")


# --- wired into peft's LoRA linears ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm_impl", [None, "chunked"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_patched_dora_linears_match_peft(norm_impl, dropout):
    x = torch.randn(6, 24)
    ours, theirs = dora_model(dropout), dora_model(dropout)
    assert kernel_wiring.install_dora_output(ours, norm_impl) == 2  # one with a bias (up), one without (down)
    out, grads = run_step(ours, x)
    ref, ref_grads = run_step(theirs, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and sum("magnitude" in n for n in grads) == 2
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    ours.eval(), theirs.eval()  # eval: dropout off, the patched path runs for dropout 0.2 too
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    with ours.disable_adapter(), theirs.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)
    kernel_wiring.uninstall_dora_output(ours)
    assert all("forward" not in m.__dict__ for m in kernel_wiring.dora_linears(ours))


def test_install_kernels_patches_dora_outputs_only_with_fused_ops():
    model = dora_model()
    assert kernel_wiring.install_kernels(model, "auto", "cpu", fused_ops=False) == [
        "Kernels: DoRA weight norms of 2 layers via dora_weight_norm(impl='chunked')"
    ]
    assert all("forward" not in m.__dict__ for m in kernel_wiring.dora_linears(model))
    notes = kernel_wiring.install_kernels(dora_model(), "torch", "cpu", fused_ops=True)
    assert notes == ["Fused ops: the outputs of 2 DoRA layers via dora_output (one tensor kept for backward)"]


def test_engine_dora_step_keeps_less_and_gives_peft_s_gradients(tiny_model_dir):
    from finetune_studio.core.config import TrainConfig
    from finetune_studio.engine.models import load_causal_lm
    from finetune_studio.engine.train.adapters import add_adapters
    from finetune_studio.engine.train.batches import Batch
    from finetune_studio.engine.train.forward import LogprobModel
    from finetune_studio.engine.train.model_patches.fused_ops import apply_memory_patches

    def model():
        cfg = TrainConfig(model=str(tiny_model_dir), method="dora", lora_rank=4, lora_alpha=8)
        torch.manual_seed(0)  # the same lora_A in both models
        m = add_adapters(load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu", quantize_4bit=False), cfg)
        torch.manual_seed(0)
        with torch.no_grad():  # B starts at zero; a trained-looking B makes the norm and scales matter
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.2)
        apply_memory_patches(m)
        return m

    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)

    def step(m):
        params = [p for p in m.parameters() if p.requires_grad]
        saved, _, logps = _saved_bytes(lambda: LogprobModel(m)(batch).logps)
        return saved, logps, torch.autograd.grad(logps.sum(), params)

    theirs, ours = model(), model()
    assert kernel_wiring.install_dora_output(ours, "chunked") > 0
    saved_theirs, want, want_grads = step(theirs)
    saved_ours, got, got_grads = step(ours)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    assert saved_ours < saved_theirs
