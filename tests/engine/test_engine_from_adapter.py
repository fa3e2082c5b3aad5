"""Runs that start from an adapter (init_adapter), DPO on the preference store, samples at eval, early stopping."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from engine_helpers import Recorder, tiny_config, write_dpo, write_sft

from finetune_studio.core.store import Store
from finetune_studio.engine.train.recipe import StopFlag, TrainingFailed, train_run
from finetune_studio.engine.train.reporting import Reporter


@pytest.fixture
def sft_run(tiny_model_dir, tmp_path):
    """A short SFT run whose adapter clearly changed the model."""
    rec = Recorder()
    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "sft.jsonl"), max_steps=6, checkpoint_every=3)
    result = train_run(config, reporter=Reporter(extra=rec))
    assert result.status == "completed" and rec.losses[-1] < rec.losses[0] * 0.9
    return result


def _store_pairs(n: int = 40) -> None:
    rows = [
        {"prompt": f"Give the number {i} in JSON.", "chosen": f'{{"n": {i}}}', "rejected": f"It is {i}."}
        for i in range(n)
    ]
    store = Store()
    store.preferences.import_pairs(rows, source="test")
    store.close()


def test_dpo_from_an_sft_adapter_starts_at_ln2_with_the_starting_model_as_reference(tiny_model_dir, tmp_path, sft_run):
    _store_pairs()
    curves = []
    for precompute in (False, True):
        rec = Recorder()
        config = tiny_config(
            tiny_model_dir,
            "pairs:latest",
            objective="dpo",
            max_steps=4,
            learning_rate=5e-3,
            init_adapter=sft_run.run_id,
            precompute_reference=precompute,
        )
        result = train_run(config, reporter=Reporter(extra=rec))
        first = rec.of("step")[0]
        # Policy and reference are both base + the SFT adapter: every implicit reward is exactly 0 at step 0.
        assert first.loss == pytest.approx(math.log(2), abs=1e-6)
        assert first.reward_chosen == 0 and first.reward_rejected == 0 and first.reward_margin == 0
        assert rec.losses[-1] < rec.losses[0]
        curves.append(rec.losses)
        started = rec.of("started")[0]
        assert started.parent_run_id == sft_run.run_id
    # The reference computed before any step equals the one computed as training goes: the copy stays frozen.
    assert curves[0] == pytest.approx(curves[1], abs=1e-5)

    store = Store()
    run = store.get_run(result.run_id)
    assert run["parent_run_id"] == sft_run.run_id and run["init_adapter"] == str(sft_run.adapter_dir)
    snapshot = store.preferences.snapshots()[0]["id"]
    assert run["pairs_snapshot"] == snapshot == started.pairs_snapshot
    assert [r["id"] for r in store.lineage(result.run_id)] == [sft_run.run_id, result.run_id]
    # Only the trained adapter is saved, not the frozen reference copy.
    assert not (result.adapter_dir / "reference").exists()
    store.close()

    lineage = subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "runs", "lineage", result.run_id, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lineage.returncode == 0, lineage.stderr
    assert [r["id"] for r in json.loads(lineage.stdout)["lineage"]] == [sft_run.run_id, result.run_id]


def test_the_reference_is_base_plus_starting_adapter_not_the_bare_base(tiny_model_dir, tmp_path, sft_run):
    from peft import PeftModel

    from finetune_studio.engine.models import load_causal_lm
    from finetune_studio.engine.train.batches import make_batch
    from finetune_studio.engine.train.forward import LogprobModel
    from finetune_studio.engine.train.recipe import Recipe

    config = tiny_config(  # float32: the exact comparison with a float32 base (bf16-mixed rounds the base weights)
        tiny_model_dir,
        write_dpo(tmp_path / "p.jsonl"),
        objective="dpo",
        init_adapter=sft_run.run_id,
        max_steps=2,
        compute_dtype="float32",
    )
    store = Store()
    run_id = store.create_run(config.to_dict(), run_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    recipe = Recipe(config, run_id, tmp_path / "run", store, Reporter(), StopFlag())
    setup = recipe.setup(resume=False)
    batch = make_batch(setup.data.train, [0, 1, 2], setup.tokenizer.pad_token_id)
    ref_c, ref_r = setup.objective.reference_logps(batch)
    assert any(p.requires_grad for n, p in setup.model.named_parameters() if ".default." in n)
    assert not any(p.requires_grad for n, p in setup.model.named_parameters() if ".reference." in n)

    def logps(model):
        out = LogprobModel(model)(batch)
        return torch.zeros(out.batch).index_add(0, out.rows, out.logps.detach())

    base = load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu", quantize_4bit=False)
    bare = logps(base)
    starting = logps(PeftModel.from_pretrained(base, str(sft_run.adapter_dir)).eval())
    assert torch.allclose(torch.cat([ref_c, ref_r]), starting, atol=1e-5)
    assert (torch.cat([ref_c, ref_r]) - bare).abs().max() > 1e-2
    store.close()


def test_resume_of_a_dpo_run_from_an_adapter_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, sft_run):
    config = tiny_config(
        tiny_model_dir,
        write_dpo(tmp_path / "p.jsonl"),
        objective="dpo",
        max_steps=6,
        batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        init_adapter=f"{sft_run.run_id}:step-000003",
    )
    full = Recorder()
    train_run(config, reporter=Reporter(extra=full))
    assert full.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    stop, first = StopFlag(), Recorder()

    def stop_at_two(event):
        first(event)
        if event.type == "step" and event.step == 2:
            stop.set()

    stopped = train_run(config, reporter=Reporter(extra=stop_at_two), stop=stop)
    assert stopped.status == "stopped"
    second = Recorder()
    resumed = train_run(resume=stopped.run_id, reporter=Reporter(extra=second))
    assert resumed.status == "completed"
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-5)


def test_sft_from_an_adapter_folder_continues_where_it_ended_and_bad_refs_fail_clearly(
    tiny_model_dir, tmp_path, sft_run
):
    from finetune_studio.engine.export.writer import export_adapter

    data = write_sft(tmp_path / "sft.jsonl")
    fresh = Recorder()
    train_run(tiny_config(tiny_model_dir, data, max_steps=1), reporter=Reporter(extra=fresh))
    exported = export_adapter(sft_run.run_id, tmp_path / "exported")
    continued = Recorder()
    result = train_run(
        tiny_config(tiny_model_dir, data, max_steps=1, init_adapter=str(exported)), reporter=Reporter(extra=continued)
    )
    assert continued.losses[0] < fresh.losses[0] * 0.9  # it starts from the trained adapter
    assert Store().get_run(result.run_id)["parent_run_id"] == ""  # an export outside any run has no parent
    inside = train_run(
        tiny_config(tiny_model_dir, data, max_steps=1, init_adapter=str(sft_run.adapter_dir)), reporter=Reporter()
    )
    assert Store().get_run(inside.run_id)["parent_run_id"] == sft_run.run_id
    for ref, message in (
        ("no-such-run", "no run or adapter folder named 'no-such-run'"),
        (f"{sft_run.run_id}:step-000099", "its checkpoints:"),
        (str(tmp_path), "holds no PEFT adapter"),
    ):
        rec = Recorder()
        with pytest.raises(TrainingFailed):
            train_run(tiny_config(tiny_model_dir, data, init_adapter=ref), reporter=Reporter(extra=rec))
        failed = rec.of("failed")[0]
        assert failed.kind == "config" and message in failed.message, failed.message


def test_each_evaluation_emits_and_stores_the_models_greedy_answers(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from finetune_studio.engine.models import load_causal_lm, load_tokenizer

    rec = Recorder()
    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), max_steps=4, eval_every=2)
    result = train_run(config, reporter=Reporter(extra=rec))
    samples = rec.of("sample")
    assert [s.step for s in samples] == [e.step for e in rec.of("eval")] == [2, 4]
    assert all(len(s.prompts) == len(s.answers) == 3 for s in samples)
    assert all(p.startswith("What is") for p in samples[0].prompts)
    stored = Store().samples(result.run_id)
    assert [(r["step"], r["answer"]) for r in stored] == [(s.step, a) for s in samples for a in s.answers]

    # The last answers are what plain transformers greedy generation gives with the final adapter.
    tok = load_tokenizer(str(tiny_model_dir))
    base = load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu", quantize_4bit=False)
    model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": samples[-1].prompts[0]}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(
        input_ids=ids, max_new_tokens=config.sample_max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == samples[-1].answers[0]


def test_early_stopping_stops_when_eval_loss_stops_improving_and_keeps_the_best(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    rec = Recorder()
    config = tiny_config(
        tiny_model_dir,
        write_sft(tmp_path / "d.jsonl"),
        max_steps=30,
        eval_every=1,
        early_stopping_patience=2,
        validation_fraction=0.2,
        learning_rate=1e-1,
        lr_scheduler="constant",
        sample_prompts=0,
    )
    result = train_run(config, reporter=Reporter(extra=rec))
    evals = rec.of("eval")
    losses = [e.eval_loss for e in evals]
    best = min(range(len(losses)), key=losses.__getitem__)
    finished = rec.of("finished")[0]
    assert result.status == "completed" and finished.stopped_early and result.step < 30
    # It stopped after exactly `patience` evaluations without a new best.
    assert len(losses) - 1 - best == 2 and all(loss >= losses[best] for loss in losses[best + 1 :])
    assert finished.best_step == evals[best].step and evals[best].is_best and not evals[-1].is_best
    assert evals[-1].best_eval_loss == losses[best]
    run = Store().get_run(result.run_id)
    assert run["best_step"] == evals[best].step and run["best_eval_loss"] == pytest.approx(losses[best])
    assert run["best_checkpoint"] == finished.best_checkpoint == str(result.run_dir / "best")
    best_state = json.loads((result.run_dir / "best" / "trainer_state.json").read_text())
    assert best_state["step"] == evals[best].step
    kept = load_file(str(result.run_dir / "best" / "adapter_model.safetensors"))
    final = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert kept.keys() == final.keys() and any(not torch.equal(kept[k], final[k]) for k in kept)
    # The best checkpoint is a starting point like any other.
    follow = train_run(
        tiny_config(tiny_model_dir, tmp_path / "d.jsonl", max_steps=1, init_adapter=f"{result.run_id}:best"),
        reporter=Reporter(),
    )
    assert Store().get_run(follow.run_id)["parent_run_id"] == result.run_id


def test_a_resumed_run_stops_early_where_an_uninterrupted_one_does(tiny_model_dir, tmp_path):
    config = tiny_config(
        tiny_model_dir,
        write_sft(tmp_path / "d.jsonl"),
        max_steps=30,
        eval_every=1,
        early_stopping_patience=2,
        validation_fraction=0.2,
        learning_rate=1e-1,
        lr_scheduler="constant",
        sample_prompts=0,
    )
    full = Recorder()
    train_run(config, reporter=Reporter(extra=full))
    stop, first = StopFlag(), Recorder()

    def stop_after_the_first_worse_eval(event):
        first(event)
        if event.type == "eval" and not event.is_best:
            stop.set()

    stopped = train_run(config, reporter=Reporter(extra=stop_after_the_first_worse_eval), stop=stop)
    assert stopped.status == "stopped"
    second = Recorder()
    resumed = train_run(resume=stopped.run_id, reporter=Reporter(extra=second))
    evals = first.of("eval") + second.of("eval")
    assert [(e.step, e.best_step) for e in evals] == [(e.step, e.best_step) for e in full.of("eval")]
    assert [e.eval_loss for e in evals] == pytest.approx([e.eval_loss for e in full.of("eval")], abs=1e-5)
    assert second.of("finished")[0].stopped_early and resumed.step == full.of("finished")[0].step
