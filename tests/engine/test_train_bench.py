"""The engine and TRL train the same steps (tests/trl_crosscheck.py, which benchmarks/train_bench.py times): both sides
see the same tokens in the same order and agree step by step (TRL only)."""

import pytest
from engine_helpers import write_dpo, write_sft

pytest.importorskip("trl")

import trl_crosscheck


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_engine_and_trl_agree_step_by_step(tiny_model_dir, tmp_path, objective):
    data = (write_sft if objective == "sft" else write_dpo)(tmp_path / "data.jsonl")

    def run(impl):
        spec = trl_crosscheck.Spec(
            impl,
            "lora",
            objective,
            str(tiny_model_dir),
            steps=2,
            max_length=64,
            lora_rank=4,
            dataset=str(data),
            compute_dtype="float32",  # the exact comparison (auto is bf16-mixed on a fast-bf16 CPU)
        )
        return (trl_crosscheck.studio_worker if impl == "studio" else trl_crosscheck.baseline_worker)(spec)

    studio, base = run("studio"), run("baseline")
    assert studio.step_tokens == base.step_tokens and min(studio.step_tokens) > 0
    assert len(studio.losses) == len(base.losses) == 2
    # Step 1: same tokens, masks, weights; step 2: also the same LoRA initialisation, optimizer and schedule.
    assert studio.losses[0] == pytest.approx(base.losses[0], rel=1e-5)
    assert studio.losses[1] == pytest.approx(base.losses[1], rel=1e-4)
    assert studio.losses[1] != pytest.approx(studio.losses[0], rel=1e-3)  # the first step did change the adapter
    for o in (studio, base):
        assert o.peak_mem_bytes > o.model_mem_bytes > 0 and o.first_step_s > 0 and o.tokens_per_s > 0
