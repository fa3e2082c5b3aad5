"""Which bf16 op costs the learning, and whether bf16-mixed learns like float32.

``python benchmarks/mixed_precision_check.py variants [--objective sft|dpo] [--steps 6]``
    From the same adapter weights, on the same batch, a few steps each of: float32; bf16 autocast (output head in
    float32, as ``engine.train.forward`` does); bf16-mixed (``engine.train.model_patches.mixed_precision``: only the
    frozen base products in
    bf16); and bf16-mixed plus one bf16 op at a time: (a) the LoRA layer's sum rounded to bf16 (what PEFT does
    under autocast), (b) the adapters' own products (A x, B (A x) and their gradients) in bf16, (d) attention
    (sdpa) in bf16. Prints the loss per step and the step time.

``python benchmarks/mixed_precision_check.py curve [--objective sft|dpo] [--steps 20] [--seeds 1,2,3]``
    Real training steps through the engine's recipe (the demo data in one fixed order, batch 4, max_length 256,
    LoRA r16 on all linears): float32 with each adapter-init seed, then bf16-mixed with the first seed. The spread
    of float32 over seeds is the noise yardstick for the mixed curve. ``--json PATH`` writes the curves.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = {"sft": ROOT / "resources/datasets/demo_sft.jsonl", "dpo": ROOT / "resources/datasets/demo_preference.jsonl"}


def make_recipe(objective: str, dtype: str, seed: int = 42, max_length: int = 256, method: str = "lora"):
    from finetune_studio.core.config import TrainConfig
    from finetune_studio.engine.train.batches import Sampler
    from finetune_studio.engine.train.recipe import Recipe, StopFlag
    from finetune_studio.engine.train.reporting import Reporter

    cfg = TrainConfig(
        dataset=str(DATA[objective]),
        objective=objective,
        method=method,
        batch_size=4,
        max_length=max_length,
        validation_fraction=0.0,
        num_threads=1,
        compute_dtype=dtype,
        seed=seed,
    )
    setup = Recipe(cfg, "mixed-check", Path(tempfile.mkdtemp()), None, Reporter(), StopFlag()).setup(resume=False)
    setup = dataclasses.replace(setup, sampler=Sampler(len(setup.data.train), cfg.batch_size, 42))  # one data order
    setup.model.train()
    return setup


def one_step(setup, batch, ctx=None) -> float:
    import torch

    from finetune_studio.engine.train.recipe import micro_step

    denom = setup.objective.denominator(batch)
    with ctx or contextlib.nullcontext():
        loss = micro_step(setup, batch, denom)["loss"]
    torch.nn.utils.clip_grad_norm_(setup.params, 1.0)
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    setup.scheduler.step()
    return loss


@contextlib.contextmanager
def lora_sum_in_bf16(model):
    """(a): every LoRA layer's output (base + delta) rounded to bf16, as PEFT's cast back does under autocast."""
    from peft.tuners.lora import LoraLayer

    hooks = [
        m.register_forward_hook(lambda _m, _i, out: out.bfloat16().float())
        for m in model.modules()
        if isinstance(m, LoraLayer)
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def adapters_in_bf16(model):
    """(b): lora_A / lora_B products, forward and backward (dA, dB, dx), in bf16; results back in float32."""
    import torch
    import torch.nn.functional as F

    mods = [m for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".lora_" in n]

    def fwd(m):
        return lambda x: F.linear(x.bfloat16(), m.weight.bfloat16()).float()

    for m in mods:
        m.forward = fwd(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


@contextlib.contextmanager
def attention_in_bf16():
    """(d): scaled_dot_product_attention on bf16 q, k, v; its output back in float32."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, *args, **kw):
        mask = attn_mask if attn_mask is None or attn_mask.dtype == torch_bool() else attn_mask.bfloat16()
        return original(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, *args, **kw).to(q.dtype)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def torch_bool():
    import torch

    return torch.bool


def variants(args) -> dict:
    import torch

    from finetune_studio.engine.train.batches import make_batch
    from finetune_studio.engine.train.model_patches.mixed_precision import apply_mixed

    setup = make_recipe(args.objective, "float32")
    batch = make_batch(setup.data.train, setup.sampler.next_indices(), setup.tokenizer.pad_token_id, setup.packing)
    state = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    sched = setup.scheduler.state_dict()

    def run(label, make_ctx=None):
        with torch.no_grad():
            for n, p in setup.model.named_parameters():
                if n in state:
                    p.copy_(state[n])
        setup.optimizer.state.clear()
        setup.scheduler.load_state_dict(sched)
        losses, times = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(one_step(setup, batch, make_ctx() if make_ctx else None))
            times.append(time.perf_counter() - t0)
        best = min(times[1:] or times)
        print(f"  {label:<44} min step {best:5.2f} s; losses {' '.join(f'{x:.4f}' for x in losses)}", flush=True)
        return {"losses": losses, "step_s": best}

    print(
        f"{args.objective}: {args.steps} steps on one batch ({batch.tokens} tokens), same start; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    out = {"float32": run("float32")}
    out["autocast"] = run("bf16 autocast (head float32)", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    apply_mixed(setup.model)  # from here on the frozen linears are bf16
    out["mixed"] = run("bf16-mixed (base products bf16)")
    out["mixed+a"] = run("bf16-mixed + (a) LoRA sum rounded to bf16", lambda: lora_sum_in_bf16(setup.model))
    out["mixed+b"] = run("bf16-mixed + (b) adapter products in bf16", lambda: adapters_in_bf16(setup.model))
    out["mixed+d"] = run("bf16-mixed + (d) attention in bf16", attention_in_bf16)
    return out


def curve(args) -> dict:
    from finetune_studio.engine.train.batches import make_batch

    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [("float32", s) for s in seeds] * ("float32" in args.dtypes)
    runs += [("bf16-mixed", s) for s in seeds[: args.mixed_seeds]] * ("bf16-mixed" in args.dtypes)
    out = {}
    for dtype, seed in runs:
        setup = make_recipe(args.objective, dtype, seed, method=args.method)
        losses, times = [], []
        for _ in range(args.steps):
            batch = make_batch(
                setup.data.train, setup.sampler.next_indices(), setup.tokenizer.pad_token_id, setup.packing
            )
            t0 = time.perf_counter()
            losses.append(one_step(setup, batch))
            times.append(time.perf_counter() - t0)
        label = f"{dtype} seed {seed}"
        out[label] = {"losses": losses, "step_s": sum(times) / len(times)}
        print(
            f"  {label:<22} mean step {sum(times) / len(times):5.2f} s; losses {' '.join(f'{x:.4f}' for x in losses)}",
            flush=True,
        )
        if args.json:  # after every run: a long check that is stopped keeps what it measured
            Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("variants", "curve"))
    ap.add_argument("--objective", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--method", choices=("lora", "dora", "qlora"), default="lora", help="curve: the method")
    ap.add_argument("--steps", type=int, default=0, help="default: 6 (variants), 20 (curve)")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--mixed-seeds", type=int, default=1, help="how many of the seeds also run bf16-mixed")
    ap.add_argument("--dtypes", default="float32,bf16-mixed", help="curve: which computes to run")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    args.steps = args.steps or (6 if args.what == "variants" else 20)

    import torch

    torch.set_num_threads(1)
    out = variants(args) if args.what == "variants" else curve(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
