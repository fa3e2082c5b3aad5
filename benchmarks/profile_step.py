"""Where an engine training step spends its time, and what two CPU levers change.

``python benchmarks/profile_step.py [--objective sft|dpo] [--method lora|dora|qlora] [--threads N]
[--top 25] [--levers] [--no-packing]``

Sets up the engine's own recipe (``engine.train.recipe.Recipe``: the default model, the demo data, LoRA r16, batch 4;
the process restarted with the engine's glibc malloc settings and the heap reused between steps, as in a run)
and runs its step code (``engine.train.recipe.micro_step``, clipping, optimizer step): one warm-up step, then one step
under ``torch.profiler``, printed as the top ops by self CPU time and the share of four groups (matrix products,
attention, the output head's chunked log-probs, the rest).

``--levers`` then times a few steps of the same batch for: float32 vs bfloat16 autocast on the CPU (speed and
loss; ``engine.train.forward`` keeps the output head in float32 under CPU autocast), and 1 thread vs one per core
(when another process is busy, the second is much slower).

``--ab NAME [--rounds 6] [--fresh-batches]``: an in-process A/B of one lever, alternating a step with it off and
one with it on from the same adapter weights (``benchmarks/step_ab.py``'s ``lever_ab``, with this script's levers
added to its ``LEVERS``): ``head_logits_bf16``, the output head's logits from bf16 inputs with a float32 result
(``kernels.bf16_head``) against torch's float32 product; ``head_kernel``, both head products through
``kernels.bf16_head`` (the logits, and the gradient product ``G W`` with nothing of it rounded) against the step
without that kernel (float32 logits, torch's bf16 ``G W`` a vocabulary chunk at a time); ``swiglu_native``,
SwiGLU's float32 forward and backward in one pass each (``kernels.cpu_swiglu``) against torch's ops;
``rms_norm_native``, RMSNorm's float32 forward, recompute and input gradient in one pass a row
(``kernels.cpu_rms_norm``) against torch's ops; ``rotary_native``, the rotary embedding of q and k in one pass each
way (``kernels.cpu_rotary``, the same numbers) against torch's ops. Read the profile's small ops (norms, casts, the
LoRA layers' own time) as upper bounds: the profiler books its own overhead per op to them; the A/Bs say what a lever
is worth.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = {"sft": ROOT / "resources/datasets/demo_sft.jsonl", "dpo": ROOT / "resources/datasets/demo_preference.jsonl"}


def make_recipe(args):
    from finetune_studio.core.config import TrainConfig
    from finetune_studio.engine.train.recipe import Recipe, StopFlag
    from finetune_studio.engine.train.reporting import Reporter

    cfg = TrainConfig(
        model=args.model,
        dataset=str(DATA[args.objective]),
        method=args.method,
        objective=args.objective,
        batch_size=args.batch_size,
        max_length=256,
        validation_fraction=0.0,
        num_threads=args.threads,
        fused_ops=getattr(args, "fused_ops", True),
        packing=not getattr(args, "no_packing", False),
    )
    setup = Recipe(cfg, "profile", Path(tempfile.mkdtemp()), None, Reporter(), StopFlag()).setup(resume=False)
    setup.model.train()
    return setup


def one_step(setup, batch, autocast=None) -> float:
    import torch

    from finetune_studio.engine.train.recipe import micro_step

    denom = setup.objective.denominator(batch)
    with autocast or contextlib.nullcontext():
        loss = micro_step(setup, batch, denom)["loss"]
    torch.nn.utils.clip_grad_norm_(setup.params, 1.0)
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return loss


GROUPS = {
    "matrix products (aten::mm / addmm / bmm / linear)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
    "attention (sdpa)": ("scaled_dot_product", "_flash_attention", "_efficient_attention"),
    "output head (chunked log-probs; kernels.bf16_head inside)": ("_ChunkedLogprobs", "logsumexp", "softmax", "gather"),
    "SwiGLU (kernels.cpu_swiglu inside _SwiGLU)": ("_SwiGLU", "aten::silu"),
    "casts (aten::copy_)": ("aten::copy_",),
    "LoRA linears' own time (Python, outside their ops)": ("_LoraLinear",),
}


def profile(setup, batch, top: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    one_step(setup, batch)  # warm-up: lazy inits, optimizer states
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(setup, batch)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))
    total = sum(e.self_cpu_time_total for e in events)
    print(f"profiled step: {wall:.2f} s wall (with the profiler's overhead), {total / 1e6:.2f} s self CPU in ops")
    for name, keys in GROUPS.items():
        t = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys))
        print(f"  {name:<60} {t / 1e6:6.2f} s  {100 * t / total:5.1f}%")


def levers(setup, batch, steps: int, thread_lever: bool = True) -> None:
    import torch

    state = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}

    def reset():
        with torch.no_grad():
            for n, p in setup.model.named_parameters():
                if n in state:
                    p.copy_(state[n])
        setup.optimizer.state.clear()

    def timed(label, autocast_dtype=None):
        reset()
        times, losses = [], []
        for _ in range(steps):
            ac = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else None
            t0 = time.perf_counter()
            losses.append(one_step(setup, batch, ac))
            times.append(time.perf_counter() - t0)
        best = min(times[1:] or times)
        print(
            f"  {label:<34} step s: min {best:.2f}, all {' '.join(f'{t:.2f}' for t in times)}; "
            f"losses {' '.join(f'{x:.5f}' for x in losses)}"
        )
        return best, losses

    print(f"\nLevers: {steps} steps each on the same batch ({batch.tokens} tokens), from the same adapter weights")
    threads = torch.get_num_threads()
    f32, l32 = timed(f"float32, {threads} thread(s)")
    b16, l16 = timed(f"bfloat16 autocast, {threads} thread(s)", torch.bfloat16)
    print(
        f"  bf16 / fp32 step time {b16 / f32:.2f}x; largest loss difference "
        f"{max(abs(a - b) for a, b in zip(l32, l16)):.2e}"
    )
    cores = len(__import__("os").sched_getaffinity(0))
    if cores > 1 and thread_lever:
        torch.set_num_threads(cores)
        many, _ = timed(f"float32, {cores} threads")
        torch.set_num_threads(threads)
        print(f"  {cores} threads / {threads} step time {many / f32:.2f}x (load average {_load()})")


def _head_logits_bf16(setup, on: bool) -> None:
    """The head's logits through ``kernels.bf16_head`` (``set_head_logits_dtype``) against float32."""
    import torch

    from finetune_studio.kernels.linear_logprobs import set_head_logits_dtype

    head = setup.model.get_base_model().get_output_embeddings()
    set_head_logits_dtype(head.weight, torch.bfloat16 if on else None)


def _head_kernel(setup, on: bool) -> None:
    """The bf16 marks of the head (as bf16-mixed sets them) through ``kernels.bf16_head`` (logits and gradient
    product) against without it (the logits float32, the gradient product torch's bf16 one, chunk by chunk)."""
    from finetune_studio.kernels import linear_logprobs

    linear_logprobs.BF16_HEAD_KERNEL = on


def _swiglu_native(setup, on: bool) -> None:
    """SwiGLU's float32 forward and backward through ``kernels.cpu_swiglu`` against torch's ops."""
    from finetune_studio.kernels import swiglu

    swiglu.NATIVE = on


def _swiglu_bf16_io(setup, on: bool) -> None:
    """The MLP's h written in bf16 by SwiGLU and its gradient read in bf16 (bf16-mixed's stacked down_proj rounds
    h anyway) against the float32 h and its casts: the same numbers."""
    from finetune_studio.kernels import swiglu

    swiglu.BF16_IO = on


def _rms_norm_native(setup, on: bool) -> None:
    """RMSNorm's float32 forward, recompute and input gradient through ``kernels.cpu_rms_norm`` against torch's."""
    from finetune_studio.kernels import rms_norm

    rms_norm.NATIVE = on


def _attention_native(setup, on: bool) -> None:
    """Causal float32 attention (a packed row, forward and backward) through ``kernels.cpu_attention`` against torch's
    SDPA flash kernel sequence by sequence."""
    from finetune_studio.kernels import attention

    attention.NATIVE = on


def _rotary_native(setup, on: bool) -> None:
    """The rotary embedding of q and k (forward and backward) through ``kernels.cpu_rotary`` against torch's ops
    (transformers' ``apply_rotary_pos_emb``; the same numbers)."""
    from finetune_studio.kernels import cpu_rotary

    cpu_rotary.NATIVE = on


def _grouped_projections(setup, on: bool) -> None:
    """q/k/v and gate/up of each block as one stacked bf16 LoRA product each (``kernels.grouped_lora_linear``)
    against the layers one by one over the same stacks."""
    from finetune_studio.engine.train.model_patches import kernel_wiring

    kernel_wiring.GROUPED = on


def _grouped_swiglu(setup, on: bool) -> None:
    """gate/up's grouped product, its low-rank epilogue and SwiGLU as one node with C passes each way
    (``kernels.grouped_swiglu``) against the grouped product, the float32 casts and addmm_, then ``kernels.swiglu``."""
    from finetune_studio.kernels import grouped_swiglu

    grouped_swiglu.ENABLED = on


def _qkv_rotary(setup, on: bool) -> None:
    """q/k/v's grouped product, its low-rank epilogue and rotary as one node with C passes each way
    (``kernels.grouped_qkv_rotary``) against the grouped product, the float32 casts and addmm_, then
    ``kernels.cpu_rotary``."""
    from finetune_studio.kernels import grouped_qkv_rotary

    grouped_qkv_rotary.NATIVE = on


def _norm_bf16(setup, on: bool) -> None:
    """Each decoder RMSNorm whose q/k/v or gate/up group rounds its output to bf16 anyway writing it in bf16 and
    taking its gradient in bf16 (``fused_ops.NORM_BF16``) against the float32 output and its casts: the same
    numbers."""
    from finetune_studio.engine.train.model_patches import fused_ops

    fused_ops.NORM_BF16 = on


def _epilogues(setup, on: bool) -> None:
    """The levers of 2026-12-07 20:00-21:00 together (``norm_bf16``, ``qkv_rotary``, ``grouped_swiglu``,
    ``lora_backward_native``): the step with the norms' bf16 output, both epilogue nodes and the rank-r backward pass
    against the step of 19:40."""
    _norm_bf16(setup, on)
    _qkv_rotary(setup, on)
    _grouped_swiglu(setup, on)
    _lora_backward_native(setup, on)


def _lora_backward_native(setup, on: bool) -> None:
    """Each LoRA member's rank-r backward products (``g B`` and B's gradient) in one C pass over its bf16 output
    gradient (``kernels.cpu_lora_backward``) against two torch products that each read it."""
    from finetune_studio.kernels import cpu_lora_backward

    cpu_lora_backward.NATIVE = on


def _lora_backward_parallel(setup, on: bool) -> None:
    """The rank-r backward pass's rows shared among torch's threads (``kernels.cpu_lora_backward.PARALLEL``) against
    the pass on one thread: the same numbers (run with ``--threads 2``)."""
    from finetune_studio.kernels import cpu_lora_backward

    cpu_lora_backward.PARALLEL = on


def _attention_bf16(setup, on: bool) -> None:
    """Attention's products from bf16-rounded operands (vdpbf16ps; float32 sums, softmax and results) under
    bf16-mixed (``kernels.cpu_attention.BF16_PRODUCTS``) against its float32 products."""
    from finetune_studio.kernels import cpu_attention

    cpu_attention.BF16_PRODUCTS = on


AB_LEVERS = {
    "head_logits_bf16": _head_logits_bf16,
    "head_kernel": _head_kernel,
    "swiglu_native": _swiglu_native,
    "swiglu_bf16_io": _swiglu_bf16_io,
    "rms_norm_native": _rms_norm_native,
    "rotary_native": _rotary_native,
    "attention_native": _attention_native,
    "grouped_projections": _grouped_projections,
    "grouped_swiglu": _grouped_swiglu,
    "qkv_rotary": _qkv_rotary,
    "norm_bf16": _norm_bf16,
    "epilogues": _epilogues,
    "lora_backward_native": _lora_backward_native,
    "lora_backward_parallel": _lora_backward_parallel,
    "attention_bf16": _attention_bf16,
}


def _load() -> str:
    import os

    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objective", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--method", choices=("lora", "dora", "qlora"), default="lora")
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="0: the engine's automatic choice")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--levers", action="store_true", help="also time bf16 autocast and the thread count")
    ap.add_argument("--lever-steps", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-packing", action="store_true", help="padded batches (TrainConfig.packing off)")
    ap.add_argument("--no-thread-lever", action="store_true", help="skip the one-thread-per-core timing")
    ap.add_argument("--ab", default="", help="an in-process A/B of one lever: " + ", ".join(AB_LEVERS))
    ap.add_argument("--rounds", type=int, default=6, help="--ab: steps on each side")
    ap.add_argument("--fresh-batches", action="store_true", help="--ab: each round its own batch, as in a run")
    args = ap.parse_args(argv)
    if argv is None:  # run as a script: the engine's glibc malloc settings, as a training process has them
        from finetune_studio.core.process_env import restart_with_engine_environment

        restart_with_engine_environment()

    import torch

    from finetune_studio.engine.train.batches import make_batch

    setup = make_recipe(args)
    from finetune_studio.engine.train.memory_budget import reuse_memory_between_steps

    reuse_memory_between_steps()  # what Recipe.run does once the model is ready
    if args.ab:
        import step_ab

        step_ab.LEVERS.update(AB_LEVERS)
        if args.ab not in step_ab.LEVERS:
            ap.error(f"--ab: one of {', '.join(step_ab.LEVERS)}")
        batches = [
            make_batch(setup.data.train, setup.sampler.next_indices(), setup.tokenizer.pad_token_id, setup.packing)
            for _ in range(args.rounds + 1 if args.fresh_batches else 1)
        ]
        step_ab.lever_ab(setup, batches, args.ab, args.rounds)
        return 0
    idx = setup.sampler.next_indices()
    batch = make_batch(setup.data.train, idx, setup.tokenizer.pad_token_id, setup.packing).to(setup.device)
    print(
        f"torch {torch.__version__}; {setup.device}, {torch.get_num_threads()} thread(s); {args.method} "
        f"{args.objective}; batch {batch.input_ids.shape[0]} rows x {batch.input_ids.shape[1]} "
        f"({batch.tokens} tokens, {batch.trained_tokens} trained); load average {_load()}\n"
    )
    if not args.no_profile:
        profile(setup, batch, args.top)
    if args.levers:
        levers(setup, batch, args.lever_steps, not args.no_thread_lever)
    return 0


if __name__ == "__main__":
    sys.exit(main())
