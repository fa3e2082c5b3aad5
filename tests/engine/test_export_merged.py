"""The merged export keeps what was trained: a real short run whose LoRA update is smaller than bfloat16's spacing
for most weights. bfloat16 is refused with the share it would lose; the default dtype keeps the update, and the
merged model answers the held-out prompts as the trained model does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from engine_helpers import tiny_config, write_sft

from finetune_studio.core import paths
from finetune_studio.engine.export.writer import ExportError, ExportRequest, export


@pytest.fixture(scope="module")
def gently_trained(tiny_model_dir, tmp_path_factory):
    """Three steps at a learning rate so small that the update stays below bfloat16's rounding for most weights."""
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    home = tmp_path_factory.mktemp("gentle-home")
    old = os.environ.get(paths.ENV_HOME)
    os.environ[paths.ENV_HOME] = str(home)
    try:
        data = write_sft(home / "sft.jsonl")
        cfg = tiny_config(tiny_model_dir, data, max_steps=3, learning_rate=2e-5, validation_fraction=0.1)
        result = train_run(cfg, reporter=Reporter())
    finally:
        if old is None:
            os.environ.pop(paths.ENV_HOME)
        else:
            os.environ[paths.ENV_HOME] = old
    return {"home": home, "run_id": result.run_id, "run_dir": Path(result.run_dir), "config": cfg}


def _lora_delta(adapter_dir: Path, module: str) -> torch.Tensor:
    """The update ``scale * B @ A`` of one adapted layer, read from the adapter's own files."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a = next(v for k, v in weights.items() if f"{module}.lora_A" in k)
    b = next(v for k, v in weights.items() if f"{module}.lora_B" in k)
    return (b.float() @ a.float()) * (config["lora_alpha"] / config["r"])


def test_bfloat16_is_refused_and_the_default_keeps_the_update(gently_trained, studio_home, tiny_model_dir, tmp_path):
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copy2(gently_trained["home"] / "studio.sqlite3", studio_home / "studio.sqlite3")
    (studio_home / "runs").symlink_to(gently_trained["home"] / "runs")  # run folders are relative to the home
    run_id = gently_trained["run_id"]
    torch.set_num_threads(1)

    # The update, from the adapter's files: below bfloat16's spacing for most weights, so rounding removes it.
    module = "model.layers.0.self_attn.q_proj"
    base_w = load_file(str(tiny_model_dir / "model.safetensors"))[f"{module}.weight"].float()
    delta = _lora_delta(gently_trained["run_dir"] / "adapter", module)
    changed = (base_w + delta) != base_w
    survives_bf16 = ((base_w + delta).bfloat16() != base_w.bfloat16()) & changed
    assert changed.float().mean() > 0.9 and survives_bf16.sum() < 0.5 * changed.sum()

    with pytest.raises(ExportError, match=r"bfloat16 would lose the training.*Choose float(16|32)") as refused:
        export(ExportRequest(run=run_id, out=tmp_path / "bf16", formats=("merged",), dtype="bfloat16", check=False))
    assert "%" in str(refused.value) and not (tmp_path / "bf16").exists()

    out = export(ExportRequest(run=run_id, out=tmp_path / "auto", formats=("merged",)))
    report = json.loads((out.path / "check.json").read_text())
    merge = report["merge"]
    print("merge:", {k: merge[k] for k in ("dtype", "kept", "changed_elements")})
    print("verdict:", report["verdict"])
    assert merge["requested"] == "auto" and merge["dtype"] in ("float16", "float32")
    assert merge["kept"]["bfloat16"] < 0.5 and merge["kept"][merge["dtype"]] >= 0.99
    assert merge["layers"][module]["kept"]["bfloat16"] < 0.5 and f"in {merge['dtype']}" in report["verdict"]
    assert report["passed"], report["verdict"]
    forms = {f["label"]: f for f in report["forms"]}
    assert forms["merged"]["prompts"] == report["reference"]["prompt_count"] >= 3
    assert "validation prompts" in report["reference"]["prompts"]

    # The written weights carry the update (the merged weight minus the base is the adapter's B @ A)...
    merged_w = load_file(str(out.path / "merged" / "model.safetensors"))[f"{module}.weight"].float()
    error = ((merged_w - base_w) - delta).norm() / delta.norm()
    bf16_error = (((base_w + delta).bfloat16().float() - base_w.bfloat16().float()) - delta).norm() / delta.norm()
    assert error < 0.05 < 0.5 < bf16_error, (error, bf16_error)

    # ... and the merged model answers the held-out prompts as the trained model does.
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    trained = PeftModel.from_pretrained(base, str(gently_trained["run_dir"] / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out.path / "merged"), dtype=torch.float32).eval()
    held_out = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in (41, 57, 63)]
    for messages in held_out:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            want = trained(**ids).logits
            got = merged(**ids).logits
            answer = trained.generate(**ids, max_new_tokens=12, do_sample=False)
            merged_answer = merged.generate(**ids, max_new_tokens=12, do_sample=False)
        assert (got.argmax(-1) == want.argmax(-1)).all() and (got - want).abs().max() < 0.05
        assert merged_answer.tolist() == answer.tolist()


def test_the_dtype_rule_on_updates_of_known_size():
    """At 0.5, bfloat16's spacing is 2**-8 and float16's 2**-11: an update of 1e-3 survives float16 only, one of
    1e-4 neither; weights beyond 65504 overflow float16."""
    from finetune_studio.engine.export.build import UpdateRounding, choose_dtype

    base = torch.full((40, 25), 0.5)
    medium = UpdateRounding()
    medium.add("layer.a", base, base + 1e-3)
    medium.add("layer.b", base, base.clone())  # untouched: no changed weights, nothing to lose
    assert medium.kept_share("bfloat16") == 0.0 and medium.kept_share("float16") == 1.0
    assert choose_dtype("auto", medium) == "float16" and choose_dtype("float32", medium) == "float32"
    with pytest.raises(ExportError, match=r"removes the update from 100\.0% of the weights it changed.*Choose float16"):
        choose_dtype("bfloat16", medium)

    tiny = UpdateRounding()
    tiny.add("layer.a", base, base + 1e-3)
    tiny.add("layer.b", base, base + 1e-4)  # one layer losing its update is enough to refuse
    assert tiny.worst_layer("float16") == ("layer.b", 0.0) and tiny.kept_share("float16") == 0.5
    assert choose_dtype("auto", tiny) == "float32"
    with pytest.raises(ExportError, match=r"in layer\.b, 100\.0%.*Choose float32"):
        choose_dtype("float16", tiny)

    large = UpdateRounding()
    large.add("layer.a", torch.full((4,), 7e4), torch.full((4,), 7e4 + 64))
    assert large.beyond_float16 == 4 and choose_dtype("auto", large) == "float32"
    report = large.report("float32", "auto")
    assert report["kept"]["float32"] == 1.0 and report["layers"]["layer.a"]["changed"] == 4
