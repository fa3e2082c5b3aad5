"""One LoRA training step: our engine's path vs the usual transformers + PEFT path.

``python benchmarks/engine_vs_hf.py [--steps N] [--real] [--device cpu|cuda] [--dtype auto|float32|bfloat16]``

Same model, same adapters (``engine.train.adapters.add_adapters`` with the default ``TrainConfig``: LoRA r=16,
alpha=32, all linear layers), same batch (``engine.train.batches.make_batch``), same optimizer
(``engine.train.adapters.make_optimizer``: AdamW), two paths:

- ours: ``engine.train.forward.LogprobModel(model)(batch)`` -> ``engine.train.losses.sft_loss`` -> backward -> step. The
  decoder body runs, only the trained positions' hidden states go through the output head, in chunks
  (``kernels.linear_logprobs``); no [B, T, V] float32 logits;
- baseline: ``model(input_ids=..., attention_mask=..., labels=labels).loss`` -> backward -> step, what HF
  Trainer / TRL SFTTrainer do per step (full [B, T, V] logits, cross-entropy on the shifted labels).

First a check that both paths give the same loss and the same LoRA gradients (fp32, on fresh models, for the
first step and again for the second, when the LoRA B matrices are no longer zero and the A gradients are not
trivially zero). Then the steps are timed, alternating the two paths (ABBA order, to share out the drift of a
busy machine), and reported as medians; then one more step of each path is run for memory: on CUDA
``torch.cuda.max_memory_allocated``, on the CPU the largest bytes-in-use of glibc's malloc read after every
aten op (the probe of ``tests/measuring.py``), minus what was in use just before the step
(weights, adapters, optimizer states). Timing steps run without the probe.

Cases: a Llama built from a config with the default model's vocabulary (49,152) but 4 narrow layers, batch 4,
length 256 (rows ragged, right-padded), once with an SFT mask (~30% of tokens trained: the assistant part)
and once with every token trained; with ``--real`` also the default model (SmolLM2-135M-Instruct), batch 2,
length 256, if ``engine.models.resolve_model("default")`` finds it (slow on a CPU). The default run takes
about two minutes on an idle two-core CPU (4 timed steps; several times that when the cores are busy).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the measuring helpers the tests use

import torch  # noqa: E402
from measuring import Malloc, peak_mode  # noqa: E402  (the malloc-in-use probe)

from finetune_studio.core.config import TrainConfig  # noqa: E402
from finetune_studio.engine.datasets.render import IGNORE, Tokenized  # noqa: E402
from finetune_studio.engine.train.adapters import add_adapters, make_optimizer  # noqa: E402
from finetune_studio.engine.train.batches import Batch, make_batch  # noqa: E402
from finetune_studio.engine.train.forward import LogprobModel  # noqa: E402
from finetune_studio.engine.train.losses import sft_loss  # noqa: E402

SMALL_LLAMA = dict(
    vocab_size=49152,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
MIB = 2**20
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # is_gradient_checkpointing


# --- models and batches -------------------------------------------------------------------------------------


def small_base(dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA, attn_implementation="sdpa")).to(dtype=dtype, device=device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def real_base(folder, dtype, device):
    from transformers.utils import logging as hf_logging

    from finetune_studio.engine.models import load_causal_lm

    hf_logging.disable_progress_bar()
    return load_causal_lm(folder, dtype=dtype, device=device, quantize_4bit=False)


def with_adapters(base, config: TrainConfig):
    torch.manual_seed(1)  # LoRA A init: the same in both copies
    model = add_adapters(base, config)
    model.train()
    return model


def sft_batch(vocab: int, rows: int, length: int, *, all_trained: bool, pad_id: int, device) -> Batch:
    """Random token ids through the engine's collator. Row lengths vary (the first row is full, the others
    85-100% of ``length``, right-padded). SFT mask: a prompt (system + user, ~70% of the row) then the
    assistant answer, trained; ``all_trained``: every real token trained."""
    g = torch.Generator().manual_seed(2)
    examples = []
    for i in range(rows):
        n = length if i == 0 else int(length * (0.85 + 0.15 * torch.rand(1, generator=g).item()))
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        prompt = 0 if all_trained else int(n * (0.66 + 0.08 * torch.rand(1, generator=g).item()))
        examples.append(Tokenized(ids, [IGNORE] * prompt + ids[prompt:]))
    return make_batch(examples, list(range(rows)), pad_id).to(device)


# --- the two steps ------------------------------------------------------------------------------------------


@dataclass
class Runner:
    name: str
    model: object
    opt: object
    loss_fn: object  # (batch) -> loss
    times: list = field(default_factory=list)
    peak: int = 0


def ours_loss(model):
    logps = LogprobModel(model)
    assert logps.fused, "LogprobModel did not take the fused (chunked head) path"

    def loss(batch: Batch):
        return sft_loss(logps(batch).logps, batch.trained_tokens)

    return loss


def baseline_loss(model):
    def loss(batch: Batch):
        return model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, use_cache=False
        ).loss

    return loss


def autocast_for(device: str, dtype):
    # as engine.train.recipe.Recipe._autocast (HF Trainer's bf16=True does the same): 16-bit autocast on CUDA only
    if device == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def step(path: Runner, batch: Batch, autocast) -> float:
    with autocast:
        loss = path.loss_fn(batch)
    loss.backward()
    value = loss.item()  # the engine logs the loss every step (a device sync on CUDA)
    path.opt.step()
    path.opt.zero_grad(set_to_none=True)
    return value


def lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def check(ours: Runner, base: Runner, batch: Batch) -> list[str]:
    """Loss and LoRA gradients of both paths on the first two steps (fp32, identical fresh models)."""
    lines = []
    for k in (1, 2):
        vals, grads = [], []
        for p in (ours, base):
            loss = p.loss_fn(batch)
            loss.backward()
            vals.append(loss.item())
            grads.append(lora_grads(p.model))
            p.opt.step()
            p.opt.zero_grad(set_to_none=True)
        go, gb = grads
        assert go.keys() == gb.keys()
        num = max((go[n] - gb[n]).abs().max().item() for n in go)
        den = max(gb[n].abs().max().item() for n in gb)
        close = all(torch.allclose(go[n], gb[n], rtol=1e-4, atol=1e-6 * max(den, 1e-12)) for n in go)
        nonzero = sum(1 for n in gb if gb[n].abs().max() > 0)
        dl = abs(vals[0] - vals[1])
        ok = dl <= 1e-5 * max(1.0, abs(vals[1])) and close
        lines.append(
            f"    step {k}: loss ours {vals[0]:.7f} baseline {vals[1]:.7f} |diff| {dl:.1e}; "
            f"LoRA grads {len(go)} tensors ({nonzero} nonzero) max|diff| {num:.1e} (max|g| {den:.1e}) "
            f"allclose={close}  {'OK' if ok else 'MISMATCH'}"
        )
    return lines


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(path: Runner, batch: Batch, autocast, device) -> None:
    sync(device)
    t0 = time.perf_counter()
    step(path, batch, autocast)
    sync(device)
    path.times.append(time.perf_counter() - t0)


def peak_of_step(path: Runner, batch: Batch, autocast, device) -> int:
    """Peak bytes in use during one step, above what was in use just before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(path, batch, autocast)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    malloc = Malloc()
    before = malloc.in_use()
    mode = peak_mode(malloc)
    with mode:
        step(path, batch, autocast)
    return mode.peak - before


# --- a case -------------------------------------------------------------------------------------------------


@dataclass
class Result:
    case: str
    tokens: int
    trained: int
    ours: Runner
    base: Runner
    check: list


def run_case(title: str, make_base, batch: Batch, config: TrainConfig, *, dtype, device, steps: int) -> Result:
    def pair(dt):
        paths = []
        for name, fn in (("ours", ours_loss), ("baseline", baseline_loss)):
            model = with_adapters(make_base(dt), config)
            opt = make_optimizer(model.parameters(), config, device)
            paths.append(Runner(name, model, opt, fn(model)))
        return paths

    ours, base = pair(torch.float32)
    check_lines = check(ours, base, batch)  # two steps each: also the warm-up when timing in fp32
    autocast = autocast_for(device, dtype)
    if dtype != torch.float32:
        del ours, base
        gc.collect()
        ours, base = pair(dtype)
        for p in (ours, base):
            step(p, batch, autocast)  # warm-up: lazy inits, optimizer states
    for i in range(steps):
        order = (ours, base) if i % 4 in (0, 3) else (base, ours)  # ABBA
        for p in order:
            timed(p, batch, autocast, device)
    for p in (ours, base):
        p.peak = peak_of_step(p, batch, autocast, device)
    return Result(title, batch.tokens, batch.trained_tokens, ours, base, check_lines)


# --- report -------------------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    head = f"{'case':<42} {'path':<10} {'step s (median)':>15} {'min-max s':>13} {'tokens/s':>9} {'peak MiB':>9}"
    out = [head, "-" * len(head)]
    for r in results:
        rows = []
        for p in (r.ours, r.base):
            med = statistics.median(p.times)
            rows.append((p.name, med, min(p.times), max(p.times), r.tokens / med, p.peak / MIB))
        case = f"{r.case} ({r.trained}/{r.tokens} trained)"
        for i, (name, med, lo, hi, tps, mib) in enumerate(rows):
            out.append(
                f"{case if i == 0 else '':<42} {name:<10} {med:>15.3f} {f'{lo:.2f}-{hi:.2f}':>13} "
                f"{tps:>9.0f} {mib:>9.1f}"
            )
        o, b = rows
        out.append(f"{'':<42} {'ours/base':<10} {o[1] / b[1]:>15.2f} {'':>13} {o[4] / b[4]:>9.2f} {o[5] / b[5]:>9.2f}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per path and case (median reported)")
    ap.add_argument("--real", action="store_true", help="also the default model (SmolLM2-135M), batch 2, seq 256")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="timing dtype; auto: as the engine (float32 on the CPU, bf16/fp16 on CUDA). "
        "The equivalence check always runs in float32",
    )
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    from finetune_studio.engine.models import compute_dtype

    dtype = compute_dtype(args.dtype, device)
    config = TrainConfig(batch_size=4, max_length=256)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}; {where}; timing dtype {str(dtype).replace('torch.', '')}; "
        f"LoRA r={config.lora_rank} alpha={config.lora_alpha:g} {','.join(config.target_modules)}, AdamW "
        f"lr={config.learning_rate:g}; {args.steps} timed steps per path\n"
    )

    cases = []
    s = SMALL_LLAMA
    print(
        f"Small Llama: V={s['vocab_size']} h={s['hidden_size']} L={s['num_hidden_layers']} "
        f"i={s['intermediate_size']} heads={s['num_attention_heads']}/{s['num_key_value_heads']}, batch 4, seq 256"
    )
    for title, all_trained in (("small, SFT mask", False), ("small, all tokens", True)):
        batch = sft_batch(s["vocab_size"], 4, 256, all_trained=all_trained, pad_id=0, device=device)
        cases.append((title, lambda dt: small_base(dt, device), batch))
    if args.real:
        from finetune_studio.engine.models import ModelError, resolve_model

        try:
            folder = resolve_model("default")
        except ModelError as exc:
            print(f"--real: default model not available ({exc}); skipped")
        else:
            import json

            vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
            batch = sft_batch(vocab, 2, 256, all_trained=False, pad_id=0, device=device)
            cases.append(("SmolLM2-135M, SFT mask", lambda dt: real_base(folder, dt, device), batch))

    results = []
    started = time.perf_counter()
    for title, make_base, batch in cases:
        t0 = time.perf_counter()
        r = run_case(
            title,
            make_base,
            batch,
            TrainConfig(batch_size=batch.input_ids.shape[0], max_length=256),
            dtype=dtype,
            device=device,
            steps=args.steps,
        )
        print(f"  {title}: same loss and LoRA gradients on both paths (fp32)?  [{time.perf_counter() - t0:.0f} s]")
        print("\n".join(r.check))
        results.append(r)
        del r.ours.model, r.base.model, r.ours.opt, r.base.opt, r.ours.loss_fn, r.base.loss_fn
        gc.collect()

    print("\n" + table(results))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    print(
        "\npeak MiB: the step's peak bytes in use above those in use just before it (weights, adapters and "
        "optimizer states excluded); tokens/s: non-padding tokens of the batch / median step time."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
