"""Full fine-tuning (``method: full``) on the tiny model: the loss falls, the saved folder is a model transformers
loads to the same logits, resume reproduces the curve, the estimate counts every parameter, DPO against the frozen
start weights, distillation into a fully trained student."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import Recorder, tiny_config, write_dpo, write_sft

from finetune_studio.core.store import Store, new_run_id
from finetune_studio.engine.train import adapters
from finetune_studio.engine.train.memory_budget import meta_param_counts
from finetune_studio.engine.train.methods import full
from finetune_studio.engine.train.recipe import Recipe, StopFlag, train_run
from finetune_studio.engine.train.reporting import Reporter

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def _config(model_dir, data, **kw):
    kw.setdefault("compute_dtype", "float32")
    kw.setdefault("learning_rate", 1e-3)
    return tiny_config(model_dir, data, method="full", **kw)


def _plain(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def test_the_loss_falls_and_the_saved_folder_is_a_model_with_the_same_logits(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, write_sft(tmp_path / "sft.jsonl"), max_steps=8)
    store = Store()
    run_id, run_dir = new_run_id(), tmp_path / "run"
    run_dir.mkdir()
    store.create_run(config.to_dict(), run_id=run_id, run_dir=str(run_dir))
    rec = Recorder()
    reporter = Reporter(extra=rec)
    reporter.attach_run(store, run_id, run_dir)
    recipe = Recipe(config, run_id, run_dir, store, reporter, StopFlag())
    setup = recipe.setup(resume=False)
    result = recipe.train(setup)
    assert result.status == "completed"
    assert min(rec.losses[-3:]) < rec.losses[0] - 0.05, rec.losses
    started = rec.of("started")[0]
    assert (
        started.trainable_params == started.total_params == sum(p.numel() for p in _plain(tiny_model_dir).parameters())
    )

    folder = result.adapter_dir
    assert full.is_full_model_folder(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    assert not list(run_dir.glob(".adapter-tmp-*"))  # written under a temporary name, renamed
    with torch.no_grad():
        trained = setup.model.eval()(IDS).logits
        loaded = _plain(folder)(IDS).logits
        start = _plain(tiny_model_dir)(IDS).logits
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    assert not torch.allclose(loaded, start, atol=1e-3), "training changed nothing"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(folder)).vocab_size > 0


def test_resume_reproduces_the_curve_with_the_optimizer_state(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, write_sft(tmp_path / "sft.jsonl"), max_steps=6, batch_size=3)
    whole = Recorder()
    train_run(config, reporter=Reporter(extra=whole))
    stop, first = StopFlag(), Recorder()

    def stop_at_three(event):
        first(event)
        if event.type == "step" and event.step == 3:
            stop.set()

    stopped = train_run(config, reporter=Reporter(extra=stop_at_three), stop=stop)
    assert stopped.status == "stopped" and stopped.step == 3
    second = Recorder()
    assert train_run(resume=stopped.run_id, reporter=Reporter(extra=second)).status == "completed"
    assert first.losses + second.losses == pytest.approx(whole.losses, abs=1e-5)


def test_the_estimate_counts_every_parameter_trainable(tiny_model_dir, tmp_path):
    from finetune_studio.core.memory.estimate import ModelShape, trainable_params

    config = _config(tiny_model_dir, tmp_path / "x.jsonl")
    model = adapters.add_adapters(_plain(tiny_model_dir), config)
    trainable, total = adapters.parameter_counts(model)
    assert trainable == total == sum(p.numel() for p in _plain(tiny_model_dir).parameters())
    counts = meta_param_counts(tiny_model_dir, config)
    assert counts.trainable_params == counts.total_params == trainable
    shape = ModelShape.from_model_dir(tiny_model_dir)
    assert trainable_params(shape, config) == trainable

    from finetune_studio.core.devices import DeviceInfo
    from finetune_studio.core.memory.estimate import estimate_training_memory

    cpu = DeviceInfo("cpu", "CPU", 16 * 2**30, 12 * 2**30, False)
    for used in (counts, None):  # the engine's count, and the formula from config.json
        est = estimate_training_memory(shape, config, cpu, counts=used)
        assert est.trainable_params == est.total_params == trainable
        assert (est.adapter_weights, est.gradients, est.optimizer_states) == (
            4 * trainable,
            4 * trainable,
            8 * trainable,
        )
        assert est.base_weights == 0  # the weights are the trained parameters
    dpo = estimate_training_memory(shape, config.replace(objective="dpo"), cpu, counts=counts)
    assert dpo.base_weights == 4 * trainable  # the frozen start weights DPO compares with


def test_dpo_trains_against_the_frozen_start_weights(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, write_dpo(tmp_path / "dpo.jsonl"), objective="dpo", max_steps=6)
    base = _plain(tiny_model_dir)
    model = adapters.add_adapters(_plain(tiny_model_dir), config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
        moved = model(IDS).logits.clone()
        with model.disable_adapter():
            reference = model(IDS).logits
        torch.testing.assert_close(reference, base(IDS).logits, atol=0, rtol=0)
        torch.testing.assert_close(model(IDS).logits, moved, atol=0, rtol=0)  # the trained weights back
    rec = Recorder()
    assert train_run(config, reporter=Reporter(extra=rec)).status == "completed"
    assert rec.losses[-1] < rec.losses[0]


def test_distill_into_a_fully_trained_student(tiny_model_dir, tmp_path):
    config = _config(
        tiny_model_dir,
        write_sft(tmp_path / "sft.jsonl"),
        objective="distill",
        distill_teacher=str(tiny_model_dir),
        distill_alpha=0.5,
        distill_measure_speed=False,
        max_steps=4,
    )
    rec = Recorder()
    result = train_run(config, reporter=Reporter(extra=rec))
    assert result.status == "completed" and full.is_full_model_folder(result.adapter_dir)
    kl = [e.metrics["kl"] for e in rec.of("step")]
    assert kl[0] == pytest.approx(0.0, abs=1e-5)  # the student starts as the teacher
    assert kl[-1] > 1e-6  # the cross-entropy half moved every weight away from it
    assert rec.losses[-1] < rec.losses[0]


def test_exports_the_model_itself_as_merged_and_gguf_checked_in_a_fresh_process(tiny_model_dir, tmp_path):
    import json

    from finetune_studio.engine.export.writer import ExportRequest, export

    torch.set_num_threads(1)
    config = _config(tiny_model_dir, write_sft(tmp_path / "sft.jsonl"), max_steps=4, learning_rate=2e-3)
    result = train_run(config, reporter=Reporter())
    out = export(ExportRequest(run=result.run_id, out=tmp_path / "x", formats=("merged", "ollama"), quants=("f16",)))
    report = json.loads((out.path / "check.json").read_text())
    assert report["passed"], report["verdict"]
    forms = {f["label"]: f for f in report["forms"]}
    assert set(forms) == {"adapter", "merged", "gguf-f16"}
    for label in ("adapter", "merged", "gguf-f16"):
        assert forms[label]["greedy_same"] and forms[label]["agreement"] == 1.0, forms[label]
    assert forms["adapter"]["max_logit_diff"] < 1e-5  # the saved model itself
    assert report["merge"]["changed_elements"] > 0  # measured against the start weights
    assert (out.path / "gguf" / "Modelfile").is_file()
    assert "fine-tuned in full" in (out.path / "README.md").read_text()
    with torch.no_grad():
        want = _plain(result.adapter_dir)(IDS).logits
        merged = _plain(out.path / "merged")(IDS).logits
    assert torch.allclose(merged, want, atol=0.05) and (merged.argmax(-1) == want.argmax(-1)).all()


def test_grpo_measures_its_kl_against_the_start_weights(tiny_model_dir, tmp_path):
    config = _config(
        tiny_model_dir,
        write_sft(tmp_path / "sft.jsonl"),
        objective="grpo",
        rewards=[{"kind": "regex", "pattern": "[a-z]"}],
        grpo_group_size=3,
        grpo_max_new_tokens=3,
        grpo_beta=0.1,
        batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
    )
    rec = Recorder()
    assert train_run(config, reporter=Reporter(extra=rec)).status == "completed"
    kl = [s.metrics["kl"] for s in rec.of("step")]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # the first answers come from the start weights themselves
    assert kl[-1] > 0  # the trained weights moved away from the frozen copy


def test_on_policy_distillation_samples_from_the_fully_trained_student(tiny_model_dir, tmp_path):
    config = _config(
        tiny_model_dir,
        write_sft(tmp_path / "sft.jsonl"),
        objective="distill",
        distill_teacher=str(tiny_model_dir),
        distill_on_policy=True,
        distill_measure_speed=False,
        max_steps=2,
    )
    rec = Recorder()
    assert train_run(config, reporter=Reporter(extra=rec)).status == "completed"
    assert rec.of("step")[0].metrics["kl"] == pytest.approx(0.0, abs=1e-5)
