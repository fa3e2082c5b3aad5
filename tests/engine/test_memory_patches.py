"""engine.train.model_patches.fused_ops: the fused ops give the unpatched model's loss and adapter gradients, and save
less."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import Recorder, micro_step_loss, tiny_config, write_sft
from tiny_model import FAMILY_SHAPE, tiny_lora_model

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.memory.estimate import ModelShape, activation_bytes
from finetune_studio.engine.datasets.render import IGNORE
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.model_patches import kernel_wiring
from finetune_studio.engine.train.model_patches.fused_ops import apply_memory_patches, count_patched
from finetune_studio.engine.train.saved_tensors import SavedTensorCensus

SHAPE = FAMILY_SHAPE


def _model(arch: str, fused: bool, config: TrainConfig):
    model = tiny_lora_model(arch, config)
    patched = apply_memory_patches(model, fused)
    kernel_wiring.install_kernels(model, "auto", "cpu", fused_ops=fused)  # as engine.train.recipe does (DoRA's output)
    model.train()
    return model, patched


def _batch(rows: int, seq: int, pairs: int = 0) -> Batch:
    """Right-padded rows of different lengths, the second half of each trained."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, SHAPE["vocab_size"], (rows, seq), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i in range(rows):
        n = seq - 3 * i
        mask[i, :n] = 1
        labels[i, n // 2 : n] = ids[i, n // 2 : n]
    return Batch(ids, mask, labels, pairs=pairs)


def _step(model, config: TrainConfig, batch: Batch):
    """The engine's loss (Recipe._micro_step), its saved bytes, and the adapter gradients."""
    census = SavedTensorCensus(model)
    loss = micro_step_loss(model, config.objective, batch, policy=lambda: census)
    saved = census.alive_bytes()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), saved, grads


CASES = [
    ("llama", dict()),
    ("llama", dict(objective="dpo")),
    ("llama", dict(method="dora")),
    ("llama", dict(method="dora", objective="dpo")),
    ("llama", dict(gradient_checkpointing=True)),
    ("llama", dict(gradient_checkpointing=True, method="dora", objective="dpo")),
    ("mistral", dict()),
    ("qwen2", dict()),
    ("qwen3", dict(objective="dpo")),
]


@pytest.mark.parametrize("arch, changes", CASES)
def test_patched_model_gives_the_same_loss_and_adapter_gradients(arch, changes):
    config = TrainConfig(**{**dict(batch_size=2, max_length=24, lora_rank=4), **changes})
    batch = _batch(4 if config.objective == "dpo" else 3, 21, pairs=2 if config.objective == "dpo" else 0)
    plain, none = _model(arch, False, config)
    fused, patched = _model(arch, True, config)
    assert none == [] and count_patched(plain) == 0
    assert {"rms_norm", "swiglu", "gqa_attention", "recompute"} <= set(patched)
    loss0, saved0, grads0 = _step(plain, config, batch)
    loss1, saved1, grads1 = _step(fused, config, batch)
    assert loss1 == pytest.approx(loss0, rel=1e-6, abs=1e-7)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name, g in grads0.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (grads1[name] - g).abs().max().item() <= 1e-5 * scale + 1e-9, name
    if config.gradient_checkpointing:
        assert saved1 == saved0  # only the blocks' inputs are kept until backward
    else:
        assert saved1 < saved0


def test_saved_bytes_fall_by_what_the_fused_ops_leave_out():
    """Per token and layer, float32, LoRA on every linear: silu(gate) and the SwiGLU product (8i), the two norm
    outputs (8h; not the first layer's first, which nothing rebuilds), repeated keys and values (8 (q - kv)).
    The measured difference is that exactly, and the estimate (core.memory.estimate) falls by the same bytes."""
    config = TrainConfig(batch_size=3, max_length=21, lora_rank=4, packing=False)  # _batch is padded
    batch = _batch(3, 21)
    tokens, layers = batch.input_ids.numel(), SHAPE["num_hidden_layers"]
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    head = h // SHAPE["num_attention_heads"]
    q, kv = h, SHAPE["num_key_value_heads"] * head
    _, saved0, _ = _step(_model("llama", False, config)[0], config, batch)
    _, saved1, _ = _step(_model("llama", True, config)[0], config, batch)
    expected = tokens * (layers * (8 * i + 8 * (q - kv)) + (2 * layers - 1) * 4 * h)
    assert saved0 - saved1 == expected
    assert saved1 / saved0 < 0.7

    shape = ModelShape.from_config_dict({"architectures": ["LlamaForCausalLM"], **SHAPE})
    off = config.replace(fused_ops=False)
    est = [activation_bytes(shape, c, 3, 21, 4, device_kind="cpu") for c in (off, config)]
    assert est[0] - est[1] == expected


def test_dora_keeps_its_outputs_once_and_the_estimate_counts_that():
    """Per token and layer, float32, DoRA on every linear, fused ops: peft kept each layer's base and adapter
    outputs (8 * out); kernels.dora_output keeps the layer's output (4 * out), which SwiGLU (gate, up) and the
    unrepeated attention (v) keep anyway: DoRA over LoRA is 4 * (q + kv + 2h) per token and layer, plus each
    layer's m / n vector. The estimate's DoRA term (core.memory.estimate) is the same bytes."""
    lora = TrainConfig(batch_size=3, max_length=21, lora_rank=4)
    dora = lora.replace(method="dora")
    batch = _batch(3, 21)
    tokens, layers = batch.input_ids.numel(), SHAPE["num_hidden_layers"]
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    q, kv = h, SHAPE["num_key_value_heads"] * (h // SHAPE["num_attention_heads"])
    outs = q + 2 * kv + h + 2 * i + h
    _, saved_lora, _ = _step(_model("llama", True, lora)[0], lora, batch)
    model, _ = _model("llama", True, dora)
    assert len(kernel_wiring.dora_linears(model)) == 7 * layers
    assert all("forward" in m.__dict__ for m in kernel_wiring.dora_linears(model))
    _, saved_dora, _ = _step(model, dora, batch)
    assert saved_dora - saved_lora == tokens * layers * 4 * (q + kv + 2 * h) + layers * 4 * outs
    shape = ModelShape.from_config_dict({"architectures": ["LlamaForCausalLM"], **SHAPE})
    est = [activation_bytes(shape, c, 3, 21, 4, device_kind="cpu") for c in (lora, dora)]
    assert est[1] - est[0] == saved_dora - saved_lora
    peft = dora.replace(fused_ops=False)  # peft's DoRA forward: base and adapter outputs, 8 * out per token
    unfused = [activation_bytes(shape, c, 3, 21, 4, device_kind="cpu") for c in (lora.replace(fused_ops=False), peft)]
    assert unfused[1] - unfused[0] == tokens * layers * 8 * outs + layers * 12 * outs


def test_other_architectures_and_fused_ops_off_are_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    assert apply_memory_patches(gpt2) == [] and count_patched(gpt2) == 0
    config = TrainConfig(lora_rank=4)
    model, patched = _model("llama", False, config)
    assert patched == [] and count_patched(model) == 0
    assert apply_memory_patches(model) and apply_memory_patches(model) == []  # idempotent: nothing left to patch


def test_a_training_run_is_the_same_with_and_without_fused_ops(tiny_model_dir, tmp_path, monkeypatch):
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter
    from finetune_studio.kernels import cpu_attention

    # attention's float32 products (not bf16-mixed's bf16 ones): the runs' float32-rounding differences would flip a
    # few of the bf16 roundings of attention's operands and reach 1.1e-5 by step 3 (test_cpu_attention checks them)
    monkeypatch.setattr(cpu_attention, "BF16_PRODUCTS", False)
    data = write_sft(tmp_path / "d.jsonl", n=16)
    curves = []
    for fused, grouped in ((True, False), (False, False), (True, True)):
        monkeypatch.setattr(kernel_wiring, "GROUPED", grouped)
        rec = Recorder()
        config = tiny_config(tiny_model_dir, data, max_steps=3, fused_ops=fused, validation_fraction=0.0)
        assert train_run(config, reporter=Reporter(extra=rec)).status == "completed"
        curves.append(rec.losses)
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)
    # bf16-mixed (auto on a fast-bf16 CPU) with q/k/v and gate/up grouped: the same first step; then their input
    # gradient, summed in one bf16 product instead of three rounded ones, differs by rounding
    assert curves[2][0] == curves[0][0] and curves[2] == pytest.approx(curves[0], rel=1e-3)
