"""CPU seconds per training step and the resident peak above the loaded model, for one engine configuration.

``python benchmarks/step_ab.py --method dora|qlora|lora [--set key=value ...] [--steps 5]``

Sets up the engine's recipe as ``profile_step.py`` does (the default model, the demo data, LoRA r16, batch 4, one
thread), with the engine's allocator settings (``memory_budget``: the 128 KiB mmap pin while loading, the step heap
after), then runs ``--steps`` steps over the first batches of the run's own order and prints each step's CPU time
(``time.process_time``) and loss, and the resident peak (VmHWM) of the steps above the resident size once the model
was ready. ``--set`` overrides TrainConfig fields (``--set compute_dtype=float32 --set kernels=torch``). Run each
variant in its own process, interleaved, to compare them: one process's peak is its own.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MIB = 2**20


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
