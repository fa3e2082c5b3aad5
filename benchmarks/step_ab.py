"""CPU seconds per training step and the resident peak above the loaded model, for one engine configuration.

``python benchmarks/step_ab.py --method dora|qlora|lora [--set key=value ...] [--steps 5]``

Sets up the engine's recipe as ``profile_step.py`` does (the default model, the demo data, LoRA r16, batch 4, one
thread), with the engine's allocator settings (``memory_budget``: the 128 KiB mmap pin while loading, the step heap
after), then runs ``--steps`` steps over the first batches of the run's own order and prints each step's CPU time
(``time.process_time``) and loss, and the resident peak (VmHWM) of the steps above the resident size once the model
was ready. ``--set`` overrides TrainConfig fields (``--set compute_dtype=float32 --set kernels=torch``). Run each
variant in its own process, interleaved, to compare them: one process's peak is its own.

``--lever NAME [--rounds 6] [--fresh-batches]``: an A/B of one lever in one process instead: the same batch (or
each round a batch of its own, the same for both sides: new shapes each round, as in a run), from the same adapter
weights and a fresh optimizer each time, one step with the lever off and one with it on, alternating (which side
goes first alternates too), ``--rounds`` times; prints each side's CPU seconds (median and best), the ratio on/off
and both sides' losses and gradient norms (a lever that keeps the maths gives the same loss). The levers
(``LEVERS``) switch a kernel choice on a set-up model; new ones are a pair of functions there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MIB = 2**20


def _head_grad_bf16(setup, on: bool) -> None:
    """The output head's gradient product in bf16 (``kernels.linear_logprobs.set_head_grad_dtype``)."""
    import torch

    from finetune_studio.kernels.linear_logprobs import set_head_grad_dtype

    head = setup.model.get_base_model().get_output_embeddings()
    set_head_grad_dtype(head.weight, torch.bfloat16 if on else None)


def _lora_bf16(setup, on: bool) -> None:
    """The LoRA adapters' own products in bf16 (``kernels.lora_linear``'s ``adapter_dtype``)."""
    import torch

    from finetune_studio.engine.train.model_patches.kernel_wiring import lora_linears

    for layer in lora_linears(setup.model):
        layer._fs_adapter_dtype = torch.bfloat16 if on else None


def _lora_stacked(setup, on: bool) -> None:
    """bf16 adapter products with A stacked under W (``kernels.lora_linear``'s ``stacked``) against without."""
    import torch

    from finetune_studio.engine.train.model_patches.kernel_wiring import lora_linears
    from finetune_studio.kernels.lora_linear import stack_weight

    for layer in lora_linears(setup.model):
        layer._fs_adapter_dtype = torch.bfloat16
        base = layer.get_base_layer()
        if on and getattr(layer, "_fs_stacked", None) is None:
            r = layer.lora_A[layer.active_adapters[0]].weight.shape[0]
            stacked = stack_weight(base.weight.data, r)
            base.weight.data = stacked[: base.weight.shape[0]]
            layer._fs_stacked = stacked
        elif not on:
            layer._fs_stacked = None


def _all_bf16(setup, on: bool) -> None:
    """Both: the adapters' products in bf16 (A stacked under W, as the engine installs them) and the head's gradient
    product in bf16, against float32 for both (what bf16-mixed ran before 2026-12-07)."""
    _lora_bf16(setup, on)
    _head_grad_bf16(setup, on)


LEVERS = {
    "head_grad_bf16": _head_grad_bf16,
    "lora_bf16": _lora_bf16,
    "lora_stacked": _lora_stacked,
    "all_bf16": _all_bf16,
}


def lever_ab(setup, batches, name: str, rounds: int) -> None:
    """Alternate one step with the lever off and one with it on, from the same weights, on the same batch (or on
    each round's own batch, the same for both sides); print the comparison."""
    import statistics

    import torch

    from finetune_studio.engine.train.recipe import micro_step

    switch = LEVERS[name]
    state = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}

    def step(on: bool, batch) -> tuple[float, float, float]:
        with torch.no_grad():
            for n, p in setup.model.named_parameters():
                if n in state:
                    p.copy_(state[n])
        setup.optimizer.state.clear()
        switch(setup, on)
        t0 = time.process_time()
        loss = micro_step(setup, batch, setup.objective.denominator(batch))["loss"]
        norm = torch.nn.utils.clip_grad_norm_(setup.params, 1.0)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
        return time.process_time() - t0, float(loss), float(norm)

    step(False, batches[0])  # warm-up: lazy inits, the allocator's first growth
    step(True, batches[0])
    times: dict[bool, list[float]] = {False: [], True: []}
    seen: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for r in range(rounds):
        batch = batches[min(r + 1, len(batches) - 1)]
        for on in (False, True) if r % 2 == 0 else (True, False):
            t, loss, norm = step(on, batch)
            times[on].append(t)
            seen[on].append((loss, norm))
    switch(setup, False)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    pairs = statistics.median(t_on / t_off for t_on, t_off in zip(times[True], times[False]))
    sizes = "/".join(str(b.tokens) for b in batches[1:] or batches)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"lever {name}: CPU s per step off {off:.3f} (best {min(times[False]):.3f}), on {on:.3f} (best "
        f"{min(times[True]):.3f}); on/off median {on / off:.3f}, best {min(times[True]) / min(times[False]):.3f}, "
        f"median of the rounds' ratios {pairs:.3f}; {rounds} rounds, "
        f"{'one batch of' if len(batches) == 1 else 'batches of'} {sizes} tokens; load average {load}\n"
        f"  loss off {seen[False][0][0]:.6f} on {seen[True][0][0]:.6f}; grad norm off {seen[False][0][1]:.6f} "
        f"on {seen[True][0][1]:.6f}"
    )


def _value(text: str):
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=("lora", "dora", "qlora"), default="dora")
    ap.add_argument("--objective", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="a TrainConfig field: key=value")
    ap.add_argument("--label", default="")
    ap.add_argument("--dora-norm", default="", help="after set-up: install_dora_norm(model, impl) (chunked, torch)")
    ap.add_argument(
        "--dora-output", default="", choices=("", "off", "peft", "chunked"), help="after set-up: DoRA's output path"
    )
    ap.add_argument("--bnb-compute", default="", help="after set-up: every Linear4bit's compute_dtype (bfloat16)")
    ap.add_argument("--lever", default="", choices=("", *LEVERS), help="an in-process A/B of one lever")
    ap.add_argument("--rounds", type=int, default=6, help="--lever: steps on each side")
    ap.add_argument(
        "--fresh-batches", action="store_true", help="--lever: each round its own batch (new shapes, as in a run)"
    )
    args = ap.parse_args(argv)

    import tempfile

    import psutil
    import torch
    from profile_step import DATA, one_step

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.engine.train import memory_budget
    from finetune_studio.engine.train.batches import make_batch
    from finetune_studio.engine.train.recipe import Recipe, StopFlag
    from finetune_studio.engine.train.reporting import Reporter

    memory_budget.fix_malloc_threshold()
    fields = dict(
        model="default",
        dataset=str(DATA[args.objective]),
        method=args.method,
        objective=args.objective,
        batch_size=4,
        max_length=256,
        validation_fraction=0.0,
        num_threads=1,
        fused_ops=True,
    )
    fields.update({k: _value(v) for k, v in (s.split("=", 1) for s in args.set)})
    recipe = Recipe(TrainConfig(**fields), "step_ab", Path(tempfile.mkdtemp()), None, Reporter(), StopFlag())
    setup = recipe.setup(resume=False)
    setup.model.train()
    if args.dora_norm:
        from finetune_studio.engine.train.model_patches.kernel_wiring import install_dora_norm

        install_dora_norm(setup.model, args.dora_norm)
    if args.dora_output:
        from finetune_studio.engine.train.model_patches.kernel_wiring import install_dora_output, uninstall_dora_output

        uninstall_dora_output(setup.model)
        if args.dora_output != "off":
            install_dora_output(setup.model, None if args.dora_output == "peft" else args.dora_output)
    if args.bnb_compute:
        for module in setup.model.modules():
            if type(module).__name__ == "Linear4bit":
                module.compute_dtype = getattr(torch, args.bnb_compute)
    memory_budget.reuse_memory_between_steps()
    if args.lever:
        batches = [
            make_batch(setup.data.train, setup.sampler.next_indices(), setup.tokenizer.pad_token_id, setup.packing)
            for _ in range(args.rounds + 1 if args.fresh_batches else 1)
        ]
        lever_ab(setup, batches, args.lever, args.rounds)
        return 0
    batches = [
        make_batch(setup.data.train, setup.sampler.next_indices(), setup.tokenizer.pad_token_id)
        for _ in range(args.steps)
    ]
    rss_ready = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")
    times, losses = [], []
    for batch in batches:
        t0 = time.process_time()
        losses.append(float(one_step(setup, batch)))
        times.append(time.process_time() - t0)
    peak = memory_budget.resident_peak()
    later = times[1:] or times
    print(
        f"{args.label or ' '.join(args.set) or 'default'}: {args.method} {args.objective}; CPU s per step "
        f"{' '.join(f'{t:.2f}' for t in times)} (mean after the first {sum(later) / len(later):.2f}); peak above "
        f"the ready model {(peak - rss_ready) / MIB:.0f} MiB (ready {rss_ready / MIB:.0f} MiB); losses "
        f"{' '.join(f'{x:.5f}' for x in losses)}; torch threads {torch.get_num_threads()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
