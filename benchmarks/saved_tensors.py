"""What one engine training step saves for backward, by module and op, and its malloc peak vs resident peak.

``python benchmarks/saved_tensors.py [--objective sft|dpo] [--method lora|dora] [--no-fused-ops] [--top 20]``

Sets up the engine's recipe as ``profile_step.py`` does (the default model, the demo data, LoRA r16, batch 4), runs
one warm-up step, then one step with ``engine.train.saved_tensors.SavedTensorCensus`` over the forward pass: the bytes
autograd holds for backward when the forward ends (each storage once, parameters excluded), grouped by the module
class and the torch function that saved them, also per token per layer. The same step reports glibc malloc's peak
bytes in use (read after every aten op) and the process's resident peak (VmHWM, reset before the step through
/proc/self/clear_refs), both above what was in use before the step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the measuring helpers the tests use

from measuring import Malloc, peak_mode
from profile_step import make_recipe

MIB = 2**20


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objective", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--method", choices=("lora", "dora", "qlora"), default="lora")
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument(
        "--no-fused-ops", action="store_true", help="train without engine.train.model_patches.fused_ops's fused ops"
    )
    args = ap.parse_args(argv)

    from profile_step import one_step

    from finetune_studio.engine.train.batches import make_batch
    from finetune_studio.engine.train.memory_budget import fix_malloc_threshold, resident_peak
    from finetune_studio.engine.train.saved_tensors import SavedTensorCensus

    fix_malloc_threshold()
    args.fused_ops = not args.no_fused_ops
    import psutil

    proc = psutil.Process()
    setup = make_recipe(args)
    batch = make_batch(setup.data.train, setup.sampler.next_indices(), setup.tokenizer.pad_token_id, setup.packing)
    rss_setup = proc.memory_info().rss
    one_step(setup, batch)  # warm-up: optimizer states, lazy inits
    rss_warm, warm_peak = proc.memory_info().rss, resident_peak()

    denom = setup.objective.denominator(batch)
    malloc = Malloc()
    census = SavedTensorCensus(setup.model)
    base, rss0 = malloc.in_use(), resident_peak()
    hwm_reset = _reset_hwm()
    rss_base = resident_peak() if hwm_reset else rss0
    mode = peak_mode(malloc)
    with mode:
        with census:
            if setup.objective.name == "dpo":
                losses, _, _ = setup.objective.terms(batch)
                loss = losses.sum() / denom
            else:
                from finetune_studio.engine.train.losses import sft_loss

                loss = sft_loss(setup.logps(batch).logps, denom)
        saved = census.alive_bytes()
        rows = census.breakdown()
        loss.backward()
        del loss
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
    rss_peak = resident_peak()
    tokens = batch.input_ids.numel()
    layers = setup.model.get_base_model().config.num_hidden_layers
    print(
        f"{args.method} {args.objective}, fused ops {'on' if args.fused_ops else 'off'}; batch "
        f"{batch.input_ids.shape[0]} x {batch.input_ids.shape[1]} ({tokens} positions, {batch.trained_tokens} "
        f"trained), {layers} layers"
    )
    print(f"saved for backward: {saved / MIB:.1f} MiB = {saved / tokens / layers / 1024:.1f} KiB per token per layer")
    print(f"{'module':<22} {'op':<34} {'MiB':>8} {'KiB/tok/layer':>14} {'tensors':>8}")
    for module, op, nbytes, n in rows[: args.top]:
        print(f"{module:<22} {op[:34]:<34} {nbytes / MIB:8.1f} {nbytes / tokens / layers / 1024:14.2f} {n:8d}")
    print(
        f"step peak above its start: malloc {(mode.peak - base) / MIB:.0f} MiB, resident "
        f"{(rss_peak - rss_base) / MIB:.0f} MiB{'' if hwm_reset else ' (VmHWM not reset: process peak)'}"
    )
    print(
        f"resident after set-up {rss_setup / MIB:.0f} MiB; the warm-up step peaked {(warm_peak - rss_setup) / MIB:.0f} "
        f"MiB above it and left {(rss_warm - rss_setup) / MIB:.0f} MiB more resident"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
