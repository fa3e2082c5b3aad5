"""The memory budget fitted to the data and counted exactly: meta-device parameter counts against PEFT's on
real models, the report's components, the longest batch (and longest-first order), the ``estimate`` command,
and the fitted estimate of a short demo-like run against the engine process's measured resident peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory.estimate import (
    GIB,
    DataLengths,
    ModelShape,
    batch_lengths,
    estimate_training_memory,
    trainable_params,
)
from finetune_studio.core.protocol.dataset_report import TokenStats
from finetune_studio.core.protocol.memory_report import COMPONENTS, MemoryReport, memory_report

ROOT = Path(__file__).resolve().parents[2]
GPU = DeviceInfo("cuda", "Test GPU", 8 * GIB, 8 * GIB, True)
DEFAULT = ModelShape.for_model_spec("default")
SMALL = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=256,
)
ARCHS = {  # config class, model class, extra config (None: GPT-2's own names)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}


def _hf_config(arch: str):
    import transformers

    config_cls, _, extra = ARCHS[arch]
    if extra is None:
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=256)
    return getattr(transformers, config_cls)(**SMALL, **extra)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_meta_counts_equal_peft(arch, method, tmp_path):
    """The engine's meta-device count equals PEFT's count on the real (random) model; the pure formula
    agrees wherever it knows the architecture, and the estimate takes the count where it does not (GPT-2)."""
    import torch
    import transformers
    from peft import get_peft_model

    from finetune_studio.engine.train.adapters import lora_config
    from finetune_studio.engine.train.memory_budget import meta_param_counts

    hf_config = _hf_config(arch)
    hf_config.save_pretrained(tmp_path)
    config = TrainConfig(method=method, lora_rank=8)
    torch.manual_seed(0)
    real = get_peft_model(getattr(transformers, ARCHS[arch][1])(hf_config), lora_config(config))
    trainable, total = real.get_nb_trainable_parameters()
    counts = meta_param_counts(tmp_path, config)
    assert (counts.trainable_params, counts.total_params) == (trainable, total)
    eight_bit = estimate_training_memory(
        ModelShape.from_model_dir(tmp_path), config.replace(optimizer="adamw_8bit"), GPU, counts=counts
    )
    assert eight_bit.optimizer_states == counts.optimizer_8bit_bytes > 0
    shape = ModelShape.from_model_dir(tmp_path)
    if arch == "gpt2":
        assert trainable_params(shape, config) != trainable  # fused Conv1D: the Llama formula is wrong ...
        report = memory_report(shape, config, GPU, counts=counts)
        assert report.params_source == "meta" and report.trainable_params == trainable  # ... the count is not
        assert report.total_params == total and "counted exactly" in " ".join(report.notes)
    else:
        assert trainable_params(shape, config) == trainable
        assert shape.parameter_count + trainable == total
        est = estimate_training_memory(shape, config, GPU, counts=counts)
        assert est.terms == estimate_training_memory(shape, config, GPU).terms  # the same bytes either way


def test_report_components_sum_to_the_total_and_round_trip():
    report = memory_report(DEFAULT, TrainConfig(objective="dpo"), GPU)
    assert tuple(report.components) == COMPONENTS
    assert sum(report.components.values()) == report.total_bytes == sum(report.terms.values())
    assert report.components["weights"] == report.terms["base_weights"] + report.terms["adapter_weights"]
    assert report.total_params == DEFAULT.parameter_count + report.trainable_params
    assert MemoryReport.from_json(report.to_json()) == report
    with pytest.raises(ValueError, match="sum"):
        MemoryReport(**{**report.__dict__, "total_bytes": report.total_bytes + 1})
    with pytest.raises(ValueError, match="version"):
        MemoryReport.from_dict({**report.to_dict(), "v": 99})


def test_fitted_lengths_are_the_longest_batch():
    config = TrainConfig(batch_size=4, max_length=512, packing=False)  # padded (packed: tests/engine/test_packing.py)
    worst = batch_lengths(config)
    assert (worst.rows, worst.seq, worst.trained_tokens, worst.fitted) == (4, 512, 4 * 511, False)
    assert worst.description.startswith("worst case")
    data = DataLengths.of_rows([126, 90, 120, 80, 60, 40], [30, 41, 20, 35, 10, 5])
    fitted = batch_lengths(config, data)
    # padded to the longest row; the 4 largest trained counts (an upper bound over every batch)
    assert (fitted.rows, fitted.seq, fitted.trained_tokens, fitted.fitted) == (4, 126, 41 + 35 + 30 + 20, True)
    assert "126 tokens" in fitted.description
    cut = batch_lengths(config.replace(max_length=64), data)
    assert cut.seq == 64 and cut.trained_tokens == 41 + 35 + 30 + 20 and "truncated" in cut.description
    dpo = batch_lengths(config.replace(objective="dpo", batch_size=2), data)  # 2 pairs = 4 rows
    assert dpo.rows == 4 and "2 pairs" in dpo.description
    partial = DataLengths((100,), (10,), measured=5, total=50)
    assert "first 5 of 50 rows" in batch_lengths(config.replace(batch_size=1), partial).description
    # the demo's case: rows of at most 126 tokens were estimated as if 512 long (4.4 GiB for a 2.4 GiB run)
    cpu = DeviceInfo("cpu", "cpu", 16 * GIB, 16 * GIB, True)
    full = estimate_training_memory(DEFAULT, config, cpu)
    fit = estimate_training_memory(DEFAULT, config, cpu, data)
    assert fit.total_bytes < 0.6 * full.total_bytes and fit.batch == fitted
    tokens = TokenStats(512, 2, None, None, 0, 0, 0, 0, longest_rows=(126, 90), most_trained_rows=(41, 30))
    assert DataLengths.from_token_stats(tokens, total_rows=10) == DataLengths((126, 90), (41, 30), 2, 10)
    assert DataLengths.from_token_stats(TokenStats(512, 2, None, None, 0, 0, 0, 0)) is None  # an older report


def test_cheapest_change_makes_it_fit():
    config = TrainConfig(batch_size=8, max_length=1024)
    need = memory_report(DEFAULT, config, GPU).total_bytes
    small = DeviceInfo("cuda", "small", int(need * 0.75), int(need * 0.75), True)
    report = memory_report(DEFAULT, config, small)
    assert report.verdict == "does not fit" and report.tight
    assert report.cheapest_change.startswith("lower batch_size to 4 with gradient_accumulation_steps 2")
    fixed = config.replace(batch_size=4, gradient_accumulation_steps=2)
    assert memory_report(DEFAULT, fixed, small).verdict == "fits"
    assert memory_report(DEFAULT, config, GPU.__class__("cuda", "big", 64 * GIB, 64 * GIB, True)).cheapest_change == ""


def test_longest_batch_first_is_deterministic_and_resumes(tiny_model_dir):
    from finetune_studio.engine.datasets.render import Tokenized
    from finetune_studio.engine.train.batches import Sampler
    from finetune_studio.engine.train.memory_budget import data_lengths, longest_batch

    examples = [Tokenized(list(range(n)), [-100] * (n // 2) + [1] * (n - n // 2)) for n in (5, 9, 7, 9, 3, 8)]
    first = longest_batch(examples, 3)
    assert first == [1, 3, 5]  # 9, 9 (lower index first), 8
    assert data_lengths(examples).longest_rows[:3] == (9, 9, 8)
    whole = Sampler(len(examples), 3, seed=1, first=first)
    order = [whole.next_indices() for _ in range(4)]
    assert order[0] == first and sorted(order[0] + order[1]) == list(range(6))  # epoch 0 keeps every example
    resumed = Sampler(len(examples), 3, seed=1, consumed=6, first=first)  # from a checkpoint at 2 batches
    assert [resumed.next_indices() for _ in range(2)] == order[2:]
    assert Sampler(len(examples), 3, seed=1, consumed=3, first=first).next_indices() == order[1]


def test_token_report_keeps_the_longest_rows(tiny_model_dir):
    from engine_helpers import write_dpo

    from finetune_studio.engine.datasets import load_dataset
    from finetune_studio.engine.datasets.problems import ProblemLog
    from finetune_studio.engine.datasets.render import tokenize_example
    from finetune_studio.engine.datasets.report import token_report
    from finetune_studio.engine.models import load_tokenizer

    path = write_dpo(Path(tiny_model_dir).parent / "pairs.jsonl", n=12)
    tok = load_tokenizer(str(tiny_model_dir))
    examples = load_dataset(str(path)).examples
    report = token_report(examples, tok, 16, "assistant", ProblemLog())
    full = [tokenize_example(tok, ex, 10**6) for ex in examples]
    rows = sorted((len(r.input_ids) for p in full for r in (p.chosen, p.rejected)), reverse=True)
    assert report.longest_rows == tuple(rows)  # both sides of every pair, before truncation, longest first
    assert len(report.most_trained_rows) == 24 and list(report.to_dict()["longest_rows"]) == rows


def _engine(*args: str, home: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINETUNE_STUDIO_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_estimate_command_prints_the_report(tiny_model_dir, tmp_path, studio_home):
    from engine_helpers import write_sft

    data = write_sft(tmp_path / "sft.jsonl", n=20)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndataset: {data}\nbatch_size: 4\nmax_length: 512\n", encoding="utf-8")
    done = _engine("estimate", str(cfg), "--json", "--device", "cpu", home=studio_home)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    for key in ("total_params", "trainable_params", "total_bytes", "device_bytes", "verdict", "cheapest_change"):
        assert key in report
    assert set(COMPONENTS) <= set(report["components"])
    assert sum(report["components"].values()) == report["total_bytes"]
    assert report["params_source"] == "meta" and report["verdict"] == "fits"
    lengths = report["lengths"]
    # packed (the default): one row of the 4 longest rows, each short, not 512
    assert lengths["fitted"] and lengths["rows"] == 1 and lengths["seq"] < 4 * 64
    info = _engine("model", "info", str(tiny_model_dir), "--method", "dora", "--lora-rank", "4", home=studio_home)
    assert info.returncode == 0, info.stderr[-2000:]
    from finetune_studio.core.protocol.events import parse_event
    from finetune_studio.engine.train.memory_budget import meta_param_counts

    ready = parse_event(info.stdout.strip().splitlines()[-1])
    counted = meta_param_counts(tiny_model_dir, TrainConfig(method="dora", lora_rank=4))
    assert (ready.total_params, ready.trainable_params, ready.counted_for) == (
        counted.total_params,
        counted.trainable_params,
        "dora r=4 all-linear",
    )
    missing = tmp_path / "bad.yaml"
    missing.write_text(f"model: {tmp_path / 'nope'}\n", encoding="utf-8")
    done = _engine("estimate", str(missing), home=studio_home)
    assert done.returncode != 0 and "error:" in done.stderr


def test_demo_like_run_estimate_is_near_its_measured_cpu_peak(tmp_path, studio_home):
    """A short run like the demo (its data, batch 4, max_length 512, LoRA, longest batch first) on a small
    Llama in its own process: the fitted estimate the run stored against the process's resident peak (VmHWM).
    A guard against gross error (the worst-case estimate was 80% high for the demo); the benchmark prints
    the exact figures."""
    from tiny_model import build_tiny_model_dir

    model = build_tiny_model_dir(tmp_path / "small", hidden_size=256, layers=4)
    rows = (ROOT / "resources" / "datasets" / "demo_sft.jsonl").read_text(encoding="utf-8").splitlines()[:48]
    data = tmp_path / "demo.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {model}\ndataset: {data}\nbatch_size: 4\nmax_length: 512\nmax_steps: 2\n"
        "validation_fraction: 0.0\neval_every: 0\ncheckpoint_every: 0\nlongest_batch_first: 'on'\n",
        encoding="utf-8",
    )
    done = _engine("train", str(cfg), home=studio_home, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from finetune_studio.core.store import Store

    run = Store().list_runs()[0]
    report = MemoryReport.from_json(run["memory_estimate"])
    peak = run["memory_peak_bytes"]
    assert report.lengths.fitted and report.total_bytes == run["memory_budget_bytes"]
    error = report.total_bytes / peak - 1
    print(
        f"demo-like run: estimate {report.total_bytes / 2**20:.0f} MiB, measured {peak / 2**20:.0f} MiB, {error:+.1%}"
    )
    # Measured: -15.1% run alone and -14.8% in a fresh clone's full suite when the CPU overhead was the process's
    # own resident memory after tokenising (542 MiB alone, 653 MiB late in the suite; with the old 0.5 GiB constant
    # the suite's run was -33%); -8.1% alone with the kept baseline (core.memory.runtime_baseline, measured as the
    # run's set-up starts: 612 MiB estimated, 666 measured). The rest is glibc keeping freed step memory resident.
    # The guard is against gross error (the worst case was 80% high), so 20%.
    assert abs(error) < 0.20
    # Without the data: the worst case (with the same measured process baseline as the run's estimate)
    baseline = report.terms["runtime_overhead"]
    device = DeviceInfo("cpu", "c", 0, 0, True, process_bytes=baseline)
    worst = memory_report(ModelShape.from_model_dir(model), TrainConfig.load(cfg), device)
    assert worst.total_bytes > report.total_bytes


def test_longest_batch_first_run_resumes_the_same_curve(tiny_model_dir, tmp_path):
    """With longest_batch_first on, step 1 trains the longest batch; the checkpoint keeps that batch, and a
    stopped and resumed run reproduces the uninterrupted loss curve."""
    from engine_helpers import Recorder, tiny_config, write_sft

    from finetune_studio.core.store import Store
    from finetune_studio.engine.checkpoint import latest_checkpoint
    from finetune_studio.engine.train.recipe import StopFlag, train_run
    from finetune_studio.engine.train.reporting import Reporter

    data = write_sft(tmp_path / "d.jsonl", n=24)
    config = tiny_config(tiny_model_dir, data, max_steps=4, batch_size=3, longest_batch_first="on")
    full = Recorder()
    done = train_run(config, reporter=Reporter(extra=full))
    logged = [e.message for e in full.of("log") if "longest batch first" in e.message]
    assert logged, "the run says it starts with the longest batch"
    run = Store().get_run(done.run_id)
    assert run["memory_budget_bytes"] > 0 and run["memory_peak_bytes"] > 0
    assert MemoryReport.from_json(run["memory_estimate"]).lengths.fitted
    stop, first = StopFlag(), Recorder()

    def stop_at_two(event):
        first(event)
        if event.type == "step" and event.step == 2:
            stop.set()

    stopped = train_run(config, reporter=Reporter(extra=stop_at_two), stop=stop)
    state = json.loads((latest_checkpoint(stopped.run_dir) / "trainer_state.json").read_text(encoding="utf-8"))
    assert len(state["first_batch"]) == 3 and str(state["first_batch"]) in logged[0]
    second = Recorder()
    train_run(resume=stopped.run_id, reporter=Reporter(extra=second))
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-5)
