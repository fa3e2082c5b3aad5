"""Adapter maths: identity at initialisation, merge equivalence, export loaded by PEFT."""

import pytest
import torch
from engine_helpers import tiny_config, write_sft

from finetune_studio.core.store import Store, new_run_id
from finetune_studio.engine import adapters
from finetune_studio.engine.models import load_causal_lm
from finetune_studio.engine.reporting import Reporter
from finetune_studio.engine.train import Recipe, StopFlag

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def _base(model_dir):
    return load_causal_lm(model_dir, dtype=torch.float32, device="cpu", quantize_4bit=False)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_at_initialisation_leave_logits_unchanged(tiny_model_dir, tmp_path, method):
    base = _base(tiny_model_dir)
    with torch.no_grad():
        before = base(IDS).logits.clone()
    model = adapters.add_adapters(base, tiny_config(tiny_model_dir, tmp_path / "x.jsonl", method=method))
    trainable, total = adapters.parameter_counts(model)
    assert 0 < trainable < total
    with torch.no_grad():
        after = model(IDS).logits
    assert torch.equal(before, after) if method == "lora" else torch.allclose(before, after, atol=1e-6)


def _trained_recipe(model_dir, tmp_path, **kw) -> Recipe:
    config = tiny_config(model_dir, write_sft(tmp_path / "sft.jsonl"), max_steps=5, learning_rate=3e-2, **kw)
    store = Store()
    run_id = new_run_id()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store.create_run(config.to_dict(), run_id=run_id, run_dir=str(run_dir))
    reporter = Reporter()
    reporter.attach_run(store, run_id, run_dir)
    recipe = Recipe(config, run_id, run_dir, store, reporter, StopFlag())
    result = recipe.run(resume=False)
    assert result.status == "completed"
    return recipe


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_weights_give_the_unmerged_logits(tiny_model_dir, tmp_path, method):
    recipe = _trained_recipe(tiny_model_dir, tmp_path, method=method)
    model = recipe.model.eval()
    with torch.no_grad():
        unmerged = model(IDS).logits.clone()
        base_only = None
        with model.disable_adapter():
            base_only = model(IDS).logits.clone()
        merged = model.merge_and_unload()(IDS).logits
    assert not torch.allclose(unmerged, base_only, atol=1e-3), "training changed nothing"
    assert torch.allclose(merged, unmerged, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_exported_adapter_loaded_by_peft_gives_the_engines_logits(tiny_model_dir, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_studio.engine.export import export_adapter

    recipe = _trained_recipe(tiny_model_dir, tmp_path, method=method)
    with torch.no_grad():
        engine_logits = recipe.model.eval()(IDS).logits.float()
    out = export_adapter(recipe.run_id, tmp_path / "export")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    import json

    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if method == "qlora":  # the same NF4 base the adapter was trained on
        base = recipe.model.get_base_model()
        loaded = PeftModel.from_pretrained(base, out, adapter_name="exported")
        loaded.set_adapter("exported")
    else:
        loaded = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        peft_logits = loaded.eval()(IDS).logits.float()
    assert torch.allclose(peft_logits, engine_logits, atol=1e-4)


def test_export_refuses_to_overwrite_and_unknown_runs(tiny_model_dir, tmp_path):
    from finetune_studio.engine.export import ExportError, export_adapter

    recipe = _trained_recipe(tiny_model_dir, tmp_path)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_adapter(recipe.run_id, target)
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="no run named"):
        export_adapter("no-such-run", tmp_path / "x")
