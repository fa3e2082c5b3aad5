"""bf16-mixed: the frozen-linear op against its float32 reference, the model wiring, and a short run that learns."""

import pytest
import torch
from engine_helpers import Recorder, tiny_config, write_dpo, write_sft

from finetune_studio.engine.train.model_patches import mixed_precision
from finetune_studio.engine.train.model_patches.mixed_precision import BF16FrozenLinear, apply_mixed, uses_mixed
from finetune_studio.kernels.frozen_linear import frozen_linear, frozen_linear_reference

BF16_TOL: dict = dict(rtol=2e-2, atol=2e-2)  # bf16 keeps 8 mantissa bits: inputs and weights rounded by up to 2^-9


@pytest.mark.parametrize("shape", [(7, 33, 19), (2, 5, 64, 24), (1, 1, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_linear_matches_the_float32_reference_forward_and_backward(shape, bias):
    torch.manual_seed(0)
    *lead, n_in, n_out = shape
    w32 = torch.randn(n_out, n_in) / n_in**0.5
    w16 = w32.bfloat16()
    b = torch.randn(n_out) if bias else None
    x = torch.randn(*lead, n_in, requires_grad=True)
    g = torch.randn(*lead, n_out)

    ref = frozen_linear_reference(x, w32, b)
    (ref_gx,) = torch.autograd.grad(ref, x, g)
    outs = {}
    for impl in ("auto", "torch"):
        y = frozen_linear(x, w16, b, impl=impl)
        (gx,) = torch.autograd.grad(y, x, g)
        assert y.dtype == torch.float32 and gx.dtype == torch.float32
        torch.testing.assert_close(y, ref, **BF16_TOL)
        torch.testing.assert_close(gx, ref_gx, **BF16_TOL)
        outs[impl] = (y, gx)
    torch.testing.assert_close(outs["auto"], outs["torch"], rtol=0, atol=0)  # the same maths, bit for bit
    # With a float32 weight nothing is rounded: exactly torch's own linear.
    y = frozen_linear(x, w32, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w32, b), rtol=0, atol=0)


def test_frozen_linear_refuses_a_trainable_weight_and_an_unknown_impl():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="frozen"):
        frozen_linear(x, w.requires_grad_())
    with pytest.raises(ValueError, match="impl"):
        frozen_linear(x, w.detach(), impl="triton")


def _lora_model(tiny_model_dir, method="lora", b_scale=0.0):
    from finetune_studio.engine.models import load_causal_lm
    from finetune_studio.engine.train.adapters import add_adapters

    base = load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu", quantize_4bit=False)
    torch.manual_seed(0)
    model = add_adapters(base, tiny_config(tiny_model_dir, tiny_model_dir, method=method))
    if b_scale:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, b_scale)
    return model


def _loss_and_grads(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_the_swap_keeps_the_float32_maths_exactly(tiny_model_dir, method):
    """With the swapped linears kept in float32, loss and every adapter gradient (A, B, DoRA m) are unchanged."""
    model = _lora_model(tiny_model_dir, method, b_scale=0.02)
    loss, grads = _loss_and_grads(model)
    n = apply_mixed(model, dtype=torch.float32)
    assert n == 2 * 7  # every decoder linear of the 2 layers; not the head, not the adapters' own layers
    loss2, grads2 = _loss_and_grads(model)
    assert loss2 == loss
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name], g, rtol=0, atol=0, msg=name)


def test_mixed_model_stores_frozen_linears_in_bf16_and_keeps_the_rest_float32(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    apply_mixed(model)
    swapped = [m for m in model.modules() if type(m) is BF16FrozenLinear]
    assert len(swapped) == 14 and all(m.weight.dtype == torch.bfloat16 for m in swapped)
    others = [p for m in model.modules() if type(m) is not BF16FrozenLinear for p in m.parameters(recurse=False)]
    assert others and all(p.dtype == torch.float32 for p in others)  # adapters, norms, embeddings, head
    head = model.get_base_model().get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32


def test_a_small_lora_delta_survives_in_mixed_mode_where_autocast_rounds_it_away(tiny_model_dir):
    """A LoRA layer's delta s*B*A*x at about 1e-4 of its base output: bf16-mixed adds it in float32, exactly as
    float32 does; bf16 autocast adds it to a bf16 base output and loses most of it."""
    model = _lora_model(tiny_model_dir, b_scale=1e-6)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(4, 64)

    def delta(ctx=None):
        with ctx or torch.autocast("cpu", enabled=False), torch.no_grad():
            on = layer(x).float()
            with model.disable_adapter():
                off = layer(x).float()
        return on - off

    f32 = delta()
    assert f32.abs().max() > 0 and (f32.abs() / layer.base_layer(x).abs().clamp_min(1e-3)).median() < 1e-3
    autocast = delta(torch.autocast("cpu", dtype=torch.bfloat16))
    apply_mixed(model)
    mixed = delta()
    # The same float32 adapter maths on the same x; (base + delta) - base only rounds at float32's precision.
    torch.testing.assert_close(mixed, f32, rtol=0, atol=1e-2 * f32.abs().mean().item())
    assert (autocast - f32).abs().mean() > 0.5 * f32.abs().mean()  # autocast: mostly rounded away


def test_auto_picks_mixed_only_on_a_cpu_with_fast_bf16(monkeypatch):
    for fast in (True, False):
        monkeypatch.setattr(mixed_precision, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert uses_mixed("auto", "cpu") is fast  # 16/32-bit and 4-bit bases alike
        assert not uses_mixed("auto", "cpu", distributed=True)
        assert not uses_mixed("auto", "cuda") and not uses_mixed("float32", "cpu")
        assert not uses_mixed("bfloat16", "cpu")
        assert uses_mixed("bf16-mixed", "cpu") and uses_mixed("bf16-mixed", "cuda")
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    monkeypatch.undo()
    assert mixed_precision.cpu_has_fast_bf16() == expected


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_a_short_bf16_mixed_run_learns(tiny_model_dir, tmp_path, objective):
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    data = write_sft(tmp_path / "d.jsonl") if objective == "sft" else write_dpo(tmp_path / "d.jsonl")
    rec = Recorder()
    config = tiny_config(
        tiny_model_dir,
        data,
        objective=objective,
        compute_dtype="bf16-mixed",
        max_steps=8,
        learning_rate=1e-2 if objective == "sft" else 5e-3,
    )
    result = train_run(config, reporter=Reporter(extra=rec))
    losses = rec.losses
    assert result.status == "completed" and len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0] * (0.97 if objective == "sft" else 0.9)
    logs = " ".join(e.message for e in rec.of("log"))
    assert "bf16-mixed: 14 frozen linears" in logs
    if objective == "dpo":
        assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference (adapters off) at the start


def test_a_bf16_mixed_adapter_exported_onto_the_float32_base_gives_the_trained_logits(tiny_model_dir, tmp_path):
    """What a user gets: the adapter trained in bf16-mixed on a fresh float32 base. It differs from the trained
    model only by the bf16 rounding of the frozen weights: far less than what training changed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_studio.core.store import Store, new_run_id
    from finetune_studio.engine.export.writer import export_adapter
    from finetune_studio.engine.train.recipe import Recipe, StopFlag
    from finetune_studio.engine.train.reporting import Reporter

    config = tiny_config(
        tiny_model_dir, write_sft(tmp_path / "d.jsonl"), max_steps=5, learning_rate=3e-2, compute_dtype="bf16-mixed"
    )
    run_id, run_dir = new_run_id(), tmp_path / "run"
    run_dir.mkdir()
    Store().create_run(config.to_dict(), run_id=run_id, run_dir=str(run_dir))
    reporter = Reporter()
    reporter.attach_run(Store(), run_id, run_dir)
    recipe = Recipe(config, run_id, run_dir, Store(), reporter, StopFlag())
    setup = recipe.setup(resume=False)
    assert recipe.train(setup).status == "completed"
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        trained = setup.model.eval()(ids).logits.float()
    out = export_adapter(run_id, tmp_path / "export")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_only = base(ids).logits.float()
        exported = PeftModel.from_pretrained(base, out).eval()(ids).logits.float()
    changed = (trained - base_only).abs().max()
    assert changed > 0.1  # training moved the logits
    assert (exported - trained).abs().max() < 0.05 * changed


def _qlora_model(tiny_model_dir):
    from finetune_studio.engine.models import load_causal_lm
    from finetune_studio.engine.train.adapters import add_adapters

    base = load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu", quantize_4bit=True)
    torch.manual_seed(0)
    model = add_adapters(base, tiny_config(tiny_model_dir, tiny_model_dir, method="qlora"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _logps_and_grads(model, ids):
    from finetune_studio.engine.train.batches import Batch
    from finetune_studio.engine.train.forward import LogprobModel

    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    logps = LogprobModel(model)(batch).logps
    params = [p for p in model.parameters() if p.requires_grad]
    return logps.detach(), torch.autograd.grad(logps.sum(), params)


def test_bf16_mixed_4bit_layers_dequantise_and_multiply_in_bf16(tiny_model_dir):
    """apply_mixed on a QLoRA model: each Linear4bit computes in bf16 (its first forward must not reset that to
    the float32 input's dtype), its output back in float32; log-probs and adapter gradients follow float32's
    within bf16 rounding, and differ from them (the bf16 path really runs)."""
    import bitsandbytes as bnb

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    f32 = _qlora_model(tiny_model_dir)
    want, want_grads = _logps_and_grads(f32, ids)
    mixed = _qlora_model(tiny_model_dir)
    four_bit = [m for m in mixed.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert apply_mixed(mixed) == len(four_bit) == 14
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype))) for m in four_bit]
    got, grads = _logps_and_grads(mixed, ids)
    for h in hooks:
        h.remove()
    assert all(m.compute_dtype == torch.bfloat16 for m in four_bit)
    assert set(seen) == {(torch.float32, torch.float32)}  # float32 around the bf16 product
    assert got.dtype == torch.float32 and (got - want).abs().max() > 0
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32
        assert (g - w).norm() <= 0.05 * w.norm()


def test_a_short_qlora_run_in_bf16_mixed_learns(tiny_model_dir, tmp_path):
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    rec = Recorder()
    config = tiny_config(
        tiny_model_dir,
        write_sft(tmp_path / "d.jsonl"),
        method="qlora",
        compute_dtype="bf16-mixed",
        max_steps=8,
        learning_rate=1e-2,
    )
    result = train_run(config, reporter=Reporter(extra=rec))
    losses = rec.losses
    assert result.status == "completed" and len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0] * 0.97
    assert "bf16-mixed: 14 frozen linears" in " ".join(e.message for e in rec.of("log"))


@pytest.mark.parametrize("fast", [True, False])
def test_auto_trains_qlora_in_bf16_mixed_only_on_a_cpu_with_fast_bf16(tiny_model_dir, tmp_path, monkeypatch, fast):
    import bitsandbytes as bnb

    from finetune_studio.engine.train.recipe import Recipe, StopFlag
    from finetune_studio.engine.train.reporting import Reporter

    monkeypatch.setattr(mixed_precision, "cpu_has_fast_bf16", lambda: fast)
    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), method="qlora", max_steps=1)
    assert config.compute_dtype == "auto"
    recipe = Recipe(config, "auto-qlora", tmp_path / "run", None, Reporter(), StopFlag())
    setup = recipe.setup(resume=False)
    four_bit = [m for m in setup.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14
    want = torch.bfloat16 if fast else torch.float32
    assert all(m.compute_dtype == want for m in four_bit)
