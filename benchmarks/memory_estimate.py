"""Estimated vs measured memory of one training step: ``python benchmarks/memory_estimate.py``.

For several configs on a small Llama built from a config, it runs real training steps the way the engine does and
measures weights, adapters, gradients, optimizer states, the activations autograd keeps and the whole step's peak
(``tests/measuring.py``'s ``measure_step``, which the tests check the estimate against; its docstring says how each
figure is measured). Then it prints the estimate of ``core.memory.estimate`` beside each figure, and the default
model's estimate (analytic only). Runs on a CPU in about two minutes (more when the cores are shared).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the measuring helpers the tests use

from measuring import measure_step

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.devices import DeviceInfo, best_device
from finetune_studio.core.memory.estimate import GIB, ModelShape, estimate_training_memory, fits

TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=3000,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    torch_dtype="float32",
)


CASES = [  # the last two train 1,531 and 2,039 tokens: two chunks of the output head
    ("LoRA fp32 b4 s128", dict(), "float32"),
    ("LoRA fp32 b1 s256", dict(batch_size=1, max_length=256), "float32"),
    ("LoRA bf16 b4 s128", dict(), "bfloat16"),
    ("DoRA bf16 b4 s128", dict(method="dora"), "bfloat16"),
    ("DPO LoRA bf16 b2", dict(objective="dpo", batch_size=2), "bfloat16"),
    ("LoRA 8-bit AdamW", dict(optimizer="adamw_8bit"), "float32"),
    ("LoRA fp32 b4 s384", dict(max_length=384), "float32"),
    ("LoRA +ckpt bf16 b8 s256", dict(gradient_checkpointing=True, batch_size=8, max_length=256), "bfloat16"),
]


def _row(name: str, est: float, meas: float) -> str:
    ratio = f"{est / meas:6.3f}" if meas else "     -"
    return f"  {name:<18} {est / 2**20:10.2f} {meas / 2**20:10.2f}   {ratio}"


def main() -> int:
    import torch

    dev = best_device()
    device = "cuda" if dev.kind == "cuda" and torch.cuda.is_available() else "cpu"
    shape = ModelShape.from_config_dict(TINY_LLAMA)
    print(
        f"Small Llama: h={shape.hidden_size} L={shape.num_hidden_layers} heads={shape.num_attention_heads}/"
        f"{shape.num_key_value_heads} i={shape.intermediate_size} V={shape.vocab_size}, "
        f"{shape.parameter_count:,} parameters; measured on {device}\n"
    )
    print(f"  {'term':<18} {'est MiB':>10} {'meas MiB':>10}   est/meas")
    for title, changes, dtype in CASES:
        config = TrainConfig(**{**dict(batch_size=4, max_length=128, lora_rank=16), **changes}, compute_dtype=dtype)
        if config.optimizer.endswith("8bit") and device == "cpu":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                print(f"{title}: skipped (bitsandbytes not installed)")
                continue
        target = DeviceInfo(device if device == "cuda" else "cpu", device, 0, 0, True)
        est = estimate_training_memory(shape, config, target)
        m = measure_step(TINY_LLAMA, config, dtype, device)
        tensors = est.total_bytes - est.runtime_overhead - est.allocator_slack
        print(f"{title}  (trainable {est.trainable_params:,} est / {m.trainable_params:,} PEFT)")
        print(_row("base weights", est.base_weights, m.base_weights))
        print(_row("adapters", est.adapter_weights, m.adapter_weights))
        print(_row("gradients", est.gradients, m.gradients))
        print(_row("optimizer", est.optimizer_states, m.optimizer_states))
        print(_row("activations", est.activations, m.activations))
        # the output head at the peak, measured as what the peak holds beyond weights, states and activations
        # (no adapter gradients exist yet when the head's backward runs)
        rest = m.base_weights + m.adapter_weights + m.optimizer_states + m.activations
        print(_row("output head", est.logits, m.peak - rest))
        print(_row("peak (tensors)", tensors, m.peak))
    print("\nDefault model (SmolLM2-135M-Instruct), analytic, on a 24 GiB bf16 GPU:")
    default = ModelShape.for_model_spec("default")
    gpu = DeviceInfo("cuda", "24 GiB GPU", 24 * GIB, 24 * GIB, True)
    for changes in (
        dict(),
        dict(method="qlora"),
        dict(gradient_checkpointing=True),
        dict(objective="dpo"),
        dict(batch_size=16, max_length=2048),
    ):
        config = TrainConfig(**changes)
        est = estimate_training_memory(default, config, gpu)
        terms = "  ".join(f"{k}={v / 2**20:.0f}" for k, v in est.terms.items() if v)
        print(f"  {changes or 'defaults'}: {fits(est, gpu, config=config).message}\n      MiB: {terms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
