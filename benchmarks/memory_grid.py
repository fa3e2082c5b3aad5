"""Estimate against measured peak over a grid of runs: ``python benchmarks/memory_grid.py [--size small|full]``.

Grid: methods (LoRA, DoRA) x objectives (SFT, DPO) x batch x max_length x gradient checkpointing x optimizer
(AdamW, 8-bit AdamW) x lengths (fitted to a ragged dataset, or the worst case). Each row runs two real training
steps the engine's way (``tests/measuring.py``'s ``measure_step``: PEFT adapters, the chunked output head, DPO's
reference pass first) on a small Llama built from a config, and compares:

- estimate: ``core.memory.estimate.estimate_training_memory`` less the runtime overhead (a constant: the CUDA context or
  the Python baseline) and the allocator slack, i.e. the tensors;
- measured: the peak bytes in use over the second step, minus what was in use before the model existed
  (CUDA: ``torch.cuda.max_memory_allocated``; CPU: glibc malloc's bytes in use read after every aten op).

Fitted rows: a synthetic dataset of ragged rows (30-100% of max_length, an answer of about 35% trained); the
estimate gets the dataset's ``DataLengths`` and the step runs its longest batch (``longest_batch``: what
``longest_batch_first`` puts first). Worst-case rows: no dataset; the step runs full rows, every token trained.
Error = estimate / measured - 1 (positive: the estimate was high). Verdict: for each row and each of a ladder of
device sizes, whether "fits" (estimate <= device) agrees with the truth (measured <= device).
Prints a Markdown table (``--markdown``) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the measuring helpers the tests use

from measuring import measure_step
from memory_estimate import TINY_LLAMA

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory.estimate import ModelShape, estimate_training_memory

MIB = 2**20


def ragged_examples(config: TrainConfig, n: int = 200, seed: int = 0) -> list:
    """Tokenised examples (as the engine holds them, truncated at max_length) with ragged lengths."""
    from finetune_studio.engine.datasets.render import IGNORE, Tokenized, TokenizedPair

    rng = random.Random(seed)

    def row(length: int, answer: int) -> Tokenized:
        answer = max(1, min(answer, length - 1))
        return Tokenized([0] * length, [IGNORE] * (length - answer) + [1] * answer)

    out = []
    for _ in range(n):
        length = rng.randint(int(0.3 * config.max_length), config.max_length)
        if config.objective == "dpo":
            other = max(8, int(length * rng.uniform(0.6, 1.0)))
            prompt = int(0.6 * min(length, other))
            out.append(TokenizedPair(row(length, length - prompt), row(other, other - prompt), prompt))
        else:
            out.append(row(length, int(length * rng.uniform(0.25, 0.45))))
    return out


def batch_rows(examples: list, indices: list[int]) -> list[tuple[int, int]]:
    """(length, trained) per batch row; DPO: chosen rows then rejected rows (``engine.train.batches.make_batch``)."""
    from finetune_studio.engine.datasets.render import TokenizedPair

    items = [examples[i] for i in indices]
    if isinstance(items[0], TokenizedPair):
        items = [p.chosen for p in items] + [p.rejected for p in items]
    return [(len(t.input_ids), t.trained_tokens) for t in items]


def grid(size: str):
    """``full``: every combination (for a GPU or an idle machine). ``small``: methods x objectives x
    checkpointing x lengths at batch 2 / max_length 128, plus 8-bit AdamW and other batch sizes and lengths
    for LoRA SFT (22 rows: about 8 minutes on a busy 2-core CPU)."""
    base = dict(lora_rank=16, compute_dtype="float32")
    if size == "full":
        for method, objective, bs, length, ckpt, opt, fitted in itertools.product(
            ("lora", "dora"),
            ("sft", "dpo"),
            (1, 2, 4, 8),
            (128, 256, 512),
            (False, True),
            ("adamw", "adamw_8bit"),
            (True, False),
        ):
            if objective == "dpo" and bs > 4:
                continue
            cfg = dict(method=method, objective=objective, batch_size=bs, max_length=length)
            yield TrainConfig(**cfg, gradient_checkpointing=ckpt, optimizer=opt, **base), fitted
        return
    for method, objective, ckpt, fitted in itertools.product(
        ("lora", "dora"), ("sft", "dpo"), (False, True), (True, False)
    ):
        cfg = dict(method=method, objective=objective, gradient_checkpointing=ckpt)
        yield TrainConfig(**cfg, batch_size=2, max_length=128, **base), fitted
    for fitted in (True, False):
        yield TrainConfig(optimizer="adamw_8bit", batch_size=2, max_length=128, **base), fitted
    for bs, length in ((1, 256), (4, 64), (4, 256), (8, 128)):
        yield TrainConfig(batch_size=bs, max_length=length, **base), True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (CPU) or bfloat16 (GPU)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--limit", type=int, default=0, help="only the first N rows (a quick check)")
    parser.add_argument("--every", type=int, default=1, help="only every N-th row of the grid")
    parser.add_argument("--method", default="", help="only the rows of this method (lora, dora)")
    args = parser.parse_args(argv)
    import torch

    from finetune_studio.engine.train.memory_budget import data_lengths, fix_malloc_threshold, longest_batch

    fix_malloc_threshold()
    torch.manual_seed(0)
    shape = ModelShape.from_config_dict(TINY_LLAMA)
    target = DeviceInfo("cuda" if args.device.startswith("cuda") else "cpu", args.device, 0, 0, True)
    rows, started = [], time.perf_counter()
    sep = "|" if args.markdown else " "
    header = ["method", "obj", "batch", "len", "ckpt", "optim", "lengths", "seq x rows", "est MiB", "meas MiB", "error"]
    print(f"Small Llama {shape.hidden_size}h x {shape.num_hidden_layers}L, V={shape.vocab_size}, {args.dtype}")
    print(sep.join(f"{h:>10}" for h in header) if not args.markdown else "| " + " | ".join(header) + " |")
    if args.markdown:
        print("|" + "---|" * len(header))
    cases = [c for c in grid(args.size) if not args.method or c[0].method == args.method][:: args.every]
    for config, fitted in cases[: args.limit or None]:
        config = config.replace(compute_dtype=args.dtype)
        if fitted:
            examples = ragged_examples(config)
            lengths = data_lengths(examples)
            step_rows = batch_rows(examples, longest_batch(examples, config.batch_size))
        else:
            lengths, step_rows = None, None
        est = estimate_training_memory(shape, config, target, lengths)
        tensors = est.total_bytes - est.runtime_overhead - est.allocator_slack
        m = measure_step(TINY_LLAMA, config, args.dtype, args.device, rows=step_rows)
        error = tensors / m.peak - 1
        batch = est.batch
        cells = [
            config.method,
            config.objective,
            str(config.batch_size),
            str(config.max_length),
            "on" if config.gradient_checkpointing else "off",
            "8-bit" if config.optimizer.endswith("8bit") else "AdamW",
            "fitted" if fitted else "worst",
            f"{batch.seq}x{batch.rows}",
            f"{tensors / MIB:.2f}",
            f"{m.peak / MIB:.2f}",
            f"{error:+.1%}",
        ]
        rows.append((error, tensors, m.peak))
        print("| " + " | ".join(cells) + " |" if args.markdown else " ".join(f"{c:>10}" for c in cells), flush=True)
    errors = sorted(e for e, _, _ in rows)
    absolute = sorted(abs(e) for e in errors)
    p90 = absolute[max(0, int(0.9 * len(absolute) + 0.5) - 1)]
    ladder = [int(MIB * 2 ** (k / 4)) for k in range(0, 40)]  # 1 MiB to ~800 MiB in steps of 19%
    checks = [(t <= d) == (p <= d) for _, t, p in rows for d in ladder if min(t, p) / 4 <= d <= max(t, p) * 4]
    print()
    print(f"rows: {len(rows)} in {time.perf_counter() - started:.0f} s on {platform.machine()} ({args.device})")
    print(f"median |error| {statistics.median(absolute):.1%}, p90 |error| {p90:.1%}, worst {errors[0]:+.1%} (under) ")
    print(f"/ {errors[-1]:+.1%} (over); rows under by more than 8%: {sum(e < -0.08 for e in errors)}")
    print(f"verdict right in {sum(checks) / len(checks):.1%} of {len(checks)} (row, device size) checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
