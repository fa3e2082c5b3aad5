"""Decoding speed: the generation worker's decode loop against llama.cpp, one answer and several at once.

    python benchmarks/decode_bench.py [--model default] [--finetune-steps 20] [--threads 1] [--new-tokens 128]
                                      [--repeats 3] [--batches 4 8] [--int4-gguf q4_0|q4_1] [--profile]

Needs llama.cpp's Python binding (the ``gguf-check`` extra, llama-cpp-python 0.3.36, built from source). The model
is ``--model`` fine-tuned ``--finetune-steps`` full-parameter AdamW steps on the demo SFT data (written once to the
temp folder; the bundled model's float32 weights are a dequantised Q4_1 GGUF, so a fine-tune is what moves them off
that grid, as a user's merged model is), written as GGUF f16 / q8_0 / q4_0 / q4_1 by the export's own writer.
Both sides: one thread, greedy, ``--new-tokens`` new tokens per answer (end-of-text ignored), the prefill included
(a 40-token chat prompt). One answer: the worker's decode loop (``engine.decoding.decode.decode_batch``) on the
model loaded as the worker loads it (``weights`` full / int8 / int4, the compiled one-row int8 products included)
against llama.cpp on the comparable GGUF (f16 / q8_0 / q4_0 or q4_1). Several answers: 4 and 8 different chat
prompts decoded as one batch (prompt batching, one forward per token for all of them). The sides alternate within
each round; the best of ``--repeats`` rounds is printed as wall-clock new tokens/s and new tokens per CPU-second
of this process: on the shared 2-core machine (load average 9-12) the wall clock mostly measures the neighbours,
so the ratios are taken on CPU time. Then KL(float32 ‖ side) and top-1 agreement over float32's greedy
continuations, teacher-forced through each worker precision and each GGUF (llama.cpp's own logits).

Where a step's time goes (``--profile``: one row, 128 cached positions, each part timed alone on the same inputs,
CPU ms; 2026-12-07, load average 10.4-11.7):

| weights | step | block products | head product | attention | cache writes | greedy pick | top-p 0.9 pick | glue |
|---|---|---|---|---|---|---|---|---|
| full | 57.5 | 37.3 | 9.6 | 0.63 | 0.13 | 0.05 | 0.25 | 9.9 |
| int8 | 27.1 | 15.5 | 2.2 | 0.66 | 0.13 | 0.05 | 0.21 | 8.6 |
| int4 | 18.5 | 9.3 | 2.3 | 0.63 | 0.15 | 0.05 | 0.75 | 6.2 |

"glue" is the step less its parts: the Python of 30 blocks and their small ops (RMSNorm, rotary, residual adds,
views, the bfloat16 casts around the int8/int4 kernels), 0.2-0.3 ms a block. torch.profiler on the int8 step
before this change: ``_weight_int8pack_mm`` 72% of the time (121 calls a step), SDPA 8%, then transpose / copy /
slice / view / cat at 2% each. Sampling and the cache writes are noise (0.3 ms together). llama.cpp's whole
token costs 9.8 ms (q8_0) and 6.9 ms (q4_0) of CPU here: the products alone (17.7 ms int8, 11.6 ms int4) are
slower than its whole step, so no amount of glue removal reaches it with torch's CPU kernels.

Levers since (2026-12-07 10:00-10:45 UTC, one thread, CPU time, load average 7-11):

* kept: int8 x int16 products (``engine/decoding/int8_dot.py``, a C kernel compiled once, AVX-512 VNNI
  ``vpdpwssd``, each activation row quantised to int16 with one scale; every float32 row of every int8 layer):
  a whole model's products (30 blocks + head, ms) 1 row 10.8 (compiled one-row) -> 8.6, 4 rows 29 (kernel) -> 18.5,
  8 rows 46 -> 25; quality against float32 KL 0.0051 / 94.8% top-1 (the bfloat16 kernel: 0.0055 / 93.5%). Reading
  the weight rows one after another matters: 4 rows interleaved ran at half the bandwidth (8 against 16-20 GB/s;
  a plain streaming read here: 16.5 GB/s). Not kept: int8 activations in blocks of 32 (llama.cpp's q8_0 ``x``
  side, ``vpdpbusd`` and a float multiply-add per block): slower (12.3 ms a model at one row) and further from
  float32 (KL 0.0086, 92.2%). With gcc 12 the VNNI intrinsic copies every accumulator around its tied operand (2x
  the instructions): the kernel uses inline assembly for it.
* kept: the whole step in C for plain int8 Llama-family models (``engine/decoding/native_step.py``: embedding,
  norms, the stacked products, rotary, cache writes, attention, SiLU, residuals, head; PEFT LoRA adapters added
  on the side in C, read live): one answer's step 27 -> 8-10 ms (the Python glue, 8.6 ms, gone), one answer 53
  -> 100 new tok/CPU-s and 8 answers 144 -> 177 in the same run (the products at 8 rows are compute-bound:
  ``vpdpwssd`` at about 2 cycles here). A 42-token prefill (the model's forward, 42 rows) costs 117-130 ms.
  Merged adapters, DoRA and other variants, dropout in training mode, int4 weights and drafted positions keep
  the Python step.
* kept: LoRA in the C step, A's and B's rows read once for all the batch's rows: 8 answers with a rank-16 adapter
  on every projection 128 -> 142 new tok/CPU-s (int8 alone 170 in that run).
* not kept: an int4 x int16 kernel (nibbles unpacked to int16 in registers, ``vpmaddwd``, a float multiply-add
  per group of 32 for its scale, the zero point through each group's activation sum): 6.6 ms against the int8
  kernel's 4.7 for the same number of weights at one row (113 M weights, C timing loop), 24 against 15 at 8 rows:
  the unpacking and the per-group float work make it compute-bound above int8's memory time, so int4 keeps torch's
  kernel and the Python step. Next: a layout that unpacks cheaper (llama.cpp's q4_0 x q8_0 runs at 6.9 ms a whole
  token here), and int8 activations for several rows (half the batched products' work, at a quality cost).

Levers for several answers (2026-12-07 13:00-13:30 UTC, one thread, CPU time, load average 1.3-5.5):

* kept: the int8 x int16 products read a packed copy of each weight (``int8_dot.packed``: blocks of 16 outputs,
  each pair of inputs' 16 x 2 bytes in order; one more byte a weight, made at the first product): the activation
  pair broadcast to 16 lanes, one lane per output, so no horizontal sums (at 8 rows a 576-input output had 18
  steps of 8 ``vpdpwssd`` and then 8 16-lane sums of about 10 instructions each), and the activations quantised
  16 at a time (``lrintf`` was a call per value). The same integer sums, so the same
  quality (KL 0.0051, 94.8% top-1, q8_0 0.0052 / 95.6%). A whole model's 121 products, C timing, in one process
  (row layout -> packed, ms): 1 row 7.2 -> 5.8, 2 rows 8.7 -> 6.4, 4 rows 15.5 -> 7.2, 8 rows 24.1 -> 14.2, 42
  rows (a prefill) 101 -> 63. 8 rows stay compute-bound (``vpdpwssd`` at about 1.5 cycles here).
* kept: the step's C compiled for AVX-512 (it had been SSE), attention's dot products 16 floats at a time, a row's
  weighted values in registers for heads of 64 and 128, each key read once for the 3 query heads that share it:
  8 rows at 106 cached positions 24.1 -> 20.7 (the target) -> 19.4 ms a step, 1 row 7.4 -> 6.3-6.6.
* kept: LoRA's B products 16 outputs at a time from B transposed (a copy refreshed where B changed in place):
  with a rank-16 adapter on every projection, 1 row 8.1 -> 7.5 ms a step, 8 rows 30 -> 23.5 (gathering B's
  columns instead of a copy: 9.5 at 1 row, slower).
* not kept: int8 activations with ``vpdpbusd`` (64 products an instruction, twice ``vpdpwssd``'s 32; the weight
  flipped to uint8 by one xor shared by the rows, ``- 128 * sum(q)`` per row exact in integers). Faster: a model's
  products at 8 rows 26.5 -> 20.5 ms in the row layout, and 15.0 -> 8.0 ms packed (4 inputs a lane; a standalone C
  timing loop, random data; 1 row 6.1 -> 6.6, memory-bound either way). But far from q8_0's quality: with the
  weights as they are, the activations rounded in torch as the kernel rounds them (the same 8 prompts x 48
  positions against float32; int16 per row there gives the kernel's 0.0051 / 94.5%), int8 with one scale a row
  costs KL 0.0442 / 87.8% top-1; scales per block of 32 / 64 / 128 / 256 inputs 0.0085 / 0.0110 / 0.0157 /
  0.0237 (and a float multiply-add per block and row: the block-32 kernel tried before was slower); int8 for all
  but one kind of product, that one int16: q/k/v 0.0237, down 0.0332, gate/up 0.0347, head 0.0404, o 0.0427,
  down and head 0.0313. Every product needs its 16 bits for q8_0's KL (0.0052), so the several-row products
  keep int16 and stay the same numbers as one row's (a batch's answers are each prompt's answers alone).
* kept: tiles of any 1 to 8 rows (they were 8, 4, 2 or 1): a prompt's leftover rows take one pass over the
  weights instead of up to three; the 8 chat prompts' prefills (37-43 tokens), one by one, 585-598 -> 538-568 ms.
* not done: the prompts' prefills as one forward. A 42-token prefill costs 68-73 ms of CPU (was 117-130), 63 of
  them its products, compute-bound per row at 8 rows a tile; the 8 prompts left-padded into one forward (344
  rows) took 454-458 ms against 538-568 one by one: about 3% of an 8-answer run, for which each prompt's numbers
  would depend on the batch (its padded attention), where now a batch's answers are each prompt's alone.

Where 8 answers' time goes now: 8 prefills, about 0.56 s (18%), then 128 steps of 8 rows at about 20 ms
(products 14-16, attention and the rest 4-5).

Levers for int4 (2026-12-07 13:40-14:00 UTC, one thread, CPU time, load average 3-6):

* kept: llama.cpp's own scheme, q4_0 x q8_0 (``engine/decoding/int4_dot.py``): the int4 codes (0..15) times
  the activations quantised to int8 in blocks of 32 with one float scale a block, ``vpdpbusd`` (u8 codes x s8
  activations, 64 products an instruction), the zero point and the ``- 8`` through each block's activation sum
  (exact in int32), two float multiply-adds per block of 32 and 16 outputs for the bfloat16 scale and zero. The
  layout unpacks with one AND and one shift-and-AND per 64-byte load (16 outputs x 8 inputs), and each block of
  16 outputs x 32 inputs carries its 16 (scale, zero) pairs in 64 bytes before its 256 bytes of codes: 5 bits a
  weight. A model's block products (30 blocks, no head), standalone C timing loop, one process, ms: 1 row 5.5 ->
  3.6 against the packed int8 x int16 kernel (the same products with the weights in cache: 3.4 -> 1.5, so one
  row is bound by memory traffic, 66 MB at about 18 GB/s), 4 rows 6.9 -> 5.1, 8 rows 13.9 -> 9.7. The int4
  model's whole step then runs in C (``native_step``, the head int8 x int16 as before): ``--profile`` 6.3 ms a
  step against int8's 7.9 (the Python step over the same products: 15.1). One answer x1.11 and x1.17 llama.cpp
  q4_0's new tokens per CPU-second in two runs (was x0.35); 4 and 8 answers batched x2.55 / x2.53. Quality
  (8 prompts x 48 positions against float32): KL 0.0341 / 90.1% top-1 against torch's int4 kernel's bfloat16
  activations 0.0317 / 90.9% on the same weights (and q4_0's 0.4271 / 70.6%): the int8 activations add 0.0024,
  about 0.5% of q4_0's cost. Torch's int4 kernel stays as the fallback (no AVX-512 VNNI, no compiler, other
  dtypes; ``int4.use_dot_products``).
* not kept: software prefetch in the int4 kernel (5 cache lines a block of 32 inputs, 640-5120 bytes ahead):
  1 row 5.0-5.6 ms against 4.1-4.3 without (separate processes one after the other, load about 4: the hardware
  prefetcher already follows the one stream), 8 rows 7.8-9.3 against 10.1 (not the goal; not measured further).
* not done: an int4 head (its KL cost, 0.044 measured before, is the head's alone) and 4.5 bits a weight as
  q4_0 (one scale, no zero: our asymmetric groups are what keep KL at 0.03 where q4_0 costs 0.43).

Earlier levers, each measured (one thread, CPU time, alternating, same run; load average 8-14):

* kept: the one-row int8 product compiled by inductor per weight shape (``int8.compile_row_products``, float32,
  the weight converted in registers) and called directly: the 49k x 576 head 4.6 -> 2.4 ms, a whole model's
  products 19.2 -> 13.9 ms; in the step, int8 29.7 -> 20.2 ms (x1.47) and int4 (whose head is int8) 20.9 -> 18.5
  ms (x1.11). Through ``torch.compile``'s wrapper instead (22 us a call against 7, 121 calls a step) it gave only
  x1.11 for int8 (30.5 -> 27.6 ms; the profile above was taken then). Compile time, once per shape set: 6-36 s on
  this loaded machine at load (reported by the benchmark, 0 where an earlier precision in the same process
  compiled the shapes; inductor's disk cache makes later loads faster). 4 rows: slower than the kernel (41
  against 30 ms): batches keep the kernel. Greedy tokens equal the kernel's on the test model; adapters apply on
  top unchanged.
* not kept: the same compiled product for int4 (nibbles unpacked in inductor): 44 ms against the int4 kernel's
  9.2 for a model's products. An int4 head: its kernel (3.2-3.6 ms) is now slower than the compiled int8 head
  (2.2 ms), and it costs KL 0.044 (``quant_quality.py``). AOTInductor for the one-row products: 1.8 us a call,
  but 197 s to compile a shape (inductor's code called directly: 7 us, 5 s).
* an option, off by default: prompt-lookup drafting for greedy single answers (``decode(..., draft=4)``): up to 4
  tokens that followed the last 3- or 2-gram's latest earlier occurrence, checked in one forward over 5
  positions. Simulated on llama.cpp's greedy answers to 8 chat prompts: 1.36 tokens a forward (1.06-2.0). Measured,
  4 chat prompts x 96 tokens, tok/CPU-s, compiled one-row / kernel / kernel + drafts: int8 36-39 / 34-35 / 31-37,
  int4 51-53 / 45-46 / 49-51, float32 16-17 / 17 / 18.5-19 (x1.1, the same answers). It must use the kernel for
  one row too (its rows are computed alike whatever the rows around them; the compiled product's are not), so
  for int8/int4 it loses the compiled product's gain; and with the int8 head's bfloat16 logits, which tie often,
  its answers differed from one token per forward's for int8/int4 (float32: the same answers).
* already there: q/k/v and gate/up as one stacked product, the preallocated cache (the static buffers; CPU has no
  graph replay), top-p without sorting. Not retried: ``torch.compile`` of the whole step (RESULTS.md: 49 s to
  compile, then slower), one fused rotary.

Figures: benchmarks/RESULTS.md ("Decoding against llama.cpp").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quant_quality import PROMPTS  # noqa: E402  (the chat prompts the quality figures use)

STORY = PROMPTS[0]
GGUF_QUANTS = ("f16", "q8_0", "q4_0", "q4_1")
WORKER_WEIGHTS = ("full", "int8", "int4")
PAIRS = {"full": "f16", "int8": "q8_0", "int4": "q4_0"}  # comparable precisions, side by side


def cache_dir(model: str, steps: int) -> Path:
    name = "".join(c if c.isalnum() else "_" for c in model)[-60:]
    return Path(tempfile.gettempdir()) / "finetune-studio-decode-bench" / f"{name}-ft{steps}"


def finetuned(model: str, steps: int) -> Path:
    """``model`` fine-tuned ``steps`` full-parameter AdamW steps on the demo SFT data (4 conversations a step,
    learning rate 2e-5, float32), saved once as a model folder (the weights move off the GGUF grid the bundled
    model's float32 copy lies on, as any fine-tune's merged weights do). 0 steps: the model's own folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_studio.engine.models import resolve_model

    folder = resolve_model(model)
    if steps == 0:
        return folder
    target = cache_dir(model, steps)
    if (target / "config.json").is_file():
        return target
    tok = AutoTokenizer.from_pretrained(str(folder))
    net = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    net.train()
    rows = [json.loads(line) for line in (HERE.parent / "resources/datasets/demo_sft.jsonl").open(encoding="utf-8")]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-5, weight_decay=0.0)
    torch.manual_seed(0)
    for step in range(steps):
        batch = [rows[(step * 4 + i) % len(rows)]["messages"] for i in range(4)]
        texts = [tok.apply_chat_template(m, tokenize=False) for m in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = net(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"  fine-tune step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    tmp = target.with_name(target.name + ".tmp")
    net.eval().save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(target)
    return target


def gguf_files(folder: Path, quants) -> dict[str, Path]:
    """The model as GGUF files (the export's own writer), written once next to a fine-tuned folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_studio.engine.export.gguf import write_gguf

    out = cache_dir(str(folder), 0).parent / (folder.name + "-gguf")
    out.mkdir(parents=True, exist_ok=True)
    paths = {q: out / f"model-{q}.gguf" for q in quants}
    missing = [q for q, p in paths.items() if not p.is_file()]
    if missing:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(folder))
        for q in missing:
            tmp = paths[q].with_suffix(".tmp")
            write_gguf(model, tok, tmp, q, base_folder=folder)
            tmp.rename(paths[q])
    return paths


def chat_ids(tok, text: str) -> list[int]:
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return list(tok(chat, add_special_tokens=False)["input_ids"])


def load_worker_model(folder: Path, weights: str):
    """The model as the worker loads it (``weights``: full / int8 / int4); returns (model, compile seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_studio.engine.decoding.int4 import quantize_linears_int4
    from finetune_studio.engine.decoding.int8 import compile_row_products, quantize_linears_int8

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.config.use_cache = True
    compiled = 0.0
    if weights == "int8":
        quantize_linears_int8(model)
    elif weights == "int4":
        quantize_linears_int4(model)
    if weights != "full":
        compiled = compile_row_products(model)
    return model, compiled


def attach_lora(model, rank: int, seed: int = 0):
    """A LoRA adapter of ``rank`` on every projection of ``model`` (PEFT, injected as the worker attaches one; B
    random rather than zero, so that it changes the answers), switched to inference; returns ``model``."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    peft.eval()
    return model  # the worker decodes with the base model, the adapter layers injected into it


def worker_run(model, prompts: list[list[int]], new_tokens: int, **options) -> tuple[int, float, float, list]:
    """Greedy answers to ``prompts`` (one batch), ``new_tokens`` each (end-of-text ignored): (new tokens, wall s,
    CPU s, the answers)."""
    from finetune_studio.engine.decoding.decode import decode_batch
    from finetune_studio.engine.decoding.token_sampling import Sampler

    answers: list[list[int]] = [[] for _ in prompts]

    def taker(i):
        def on_tokens(tokens):
            answers[i].append(tokens[0])
            return [False]

        return on_tokens

    n = len(prompts)
    start, cpu = time.perf_counter(), time.process_time()
    decode_batch(
        model,
        prompts,
        [1] * n,
        [new_tokens] * n,
        Sampler(temperature=0),
        [taker(i) for i in range(n)],
        list(range(n)),
        **options,
    )
    return sum(len(a) for a in answers), time.perf_counter() - start, time.process_time() - cpu, answers


def llama_run(llm, prompt: list[int], new_tokens: int) -> tuple[int, float, float, list[int]]:
    """llama.cpp's greedy answer to ``prompt`` (prefill and ``new_tokens`` steps), as :func:`worker_run`."""
    out: list[int] = []
    start, cpu = time.perf_counter(), time.process_time()
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) >= new_tokens:
            break
    return len(out), time.perf_counter() - start, time.process_time() - cpu, out


def quality(models: dict, files: dict, prompts: list[list[int]], new_tokens: int) -> list[tuple[str, float, float]]:
    """Mean KL(float32 || side) and top-1 agreement over float32's greedy continuation of each prompt, teacher-forced
    through each worker model and each llama.cpp file (its logits for every position)."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    refs = []
    with torch.inference_mode():
        for prompt in prompts:
            cont = worker_run(models["full"], [prompt], new_tokens)[3][0]
            ids = torch.tensor([prompt + cont[:-1]])
            refs.append((prompt, cont, models["full"](ids).logits[0, len(prompt) - 1 :].float().log_softmax(-1)))
    rows = []
    sides = [(f"worker {w}", m, None) for w, m in models.items() if w != "full" and "LoRA" not in w]
    sides += [
        (f"llama.cpp {q}", None, Llama(model_path=str(path), n_threads=1, n_ctx=1024, logits_all=True, verbose=False))
        for q, path in files.items()
    ]
    for name, model, llm in sides:
        kls, agree = [], []
        for prompt, cont, ref in refs:
            if model is not None:
                with torch.inference_mode():
                    logits = model(torch.tensor([prompt + cont[:-1]])).logits[0, len(prompt) - 1 :].float()
            else:
                llm.reset()
                llm.eval(prompt + cont[:-1])
                logits = torch.from_numpy(np.asarray(llm.scores[len(prompt) - 1 : len(prompt) + len(cont) - 1]))
            logp = logits.float().log_softmax(-1)
            kls.append((ref.exp() * (ref - logp)).sum(-1).mean().item())
            agree.append((ref.argmax(-1) == logp.argmax(-1)).float().mean().item())
        rows.append((name, sum(kls) / len(kls), sum(agree) / len(agree)))
    return rows


def profile_step(model, prompt: list[int], context: int = 128, repeats: int = 30) -> dict[str, float]:
    """Where one decoding step's CPU time goes (one row, the fast step, a cache of ``context`` positions), in ms:
    the step as the loop runs it, and each part alone with the same inputs (the block products, the head, the
    attention, the cache writes, greedy and top-p sampling); "glue" is the step minus its parts (the Python of 30
    blocks and their small ops: norms, rotary, residuals, views, dtype casts)."""
    import torch

    from finetune_studio.engine.decoding.decode import _cache_classes, _expand_cache, _fast_step
    from finetune_studio.engine.decoding.token_sampling import Sampler

    def cpu_ms(fn) -> float:
        fn()
        start = time.thread_time()
        for _ in range(repeats):
            fn()
        return (time.thread_time() - start) / repeats * 1e3

    inner, hidden = model.model, model.config.hidden_size
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), cache=_cache_classes()[0](config=model.config), use_cache=True)
        cache = _expand_cache(out.cache, 1, len(prompt) + context + 2 * repeats + 8)
        step, python_step = _fast_step(model, cache), _fast_step(model, cache, native=False)
        ids = torch.tensor([[prompt[-1]]])
        while cache.layers[0].length < context:
            step(ids)
        layers = cache.layers
        parts: dict[str, float] = {}
        parts["step"] = cpu_ms(lambda: step(ids))  # in C where the model is plain int8 (native_step)
        for layer in layers:  # back to the context length
            layer.truncate(context)
        parts["Python step"] = cpu_ms(lambda: python_step(ids))
        for layer in layers:  # back to the context length the parts are measured at
            layer.truncate(context)
        x, wide = torch.randn(1, 1, hidden), torch.randn(1, 1, model.config.intermediate_size)

        def blocks() -> None:
            for block in inner.layers:
                a, m = block.self_attn, block.mlp
                for proj in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj):
                    proj(x)
                m.down_proj(wide)

        def stacked_blocks() -> None:
            from finetune_studio.engine.decoding.int4 import int4_matmul, stacked_int4
            from finetune_studio.engine.decoding.int8 import int8_matmul, stacked

            for block in inner.layers:
                for parent, name in ((block.self_attn, "qkv"), (block.mlp, "gate_up")):
                    s8, s4 = stacked(parent, f"int8_{name}"), stacked_int4(parent, f"int4_{name}")
                    if s8 is not None:
                        int8_matmul(x, *s8[:3])
                    elif s4 is not None:
                        int4_matmul(x, *s4[:4])
                    else:
                        for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                            if hasattr(parent, proj):
                                getattr(parent, proj)(x)
                block.self_attn.o_proj(x)
                block.mlp.down_proj(wide)

        stack = (
            stacked_blocks
            if hasattr(inner.layers[0].self_attn, "int8_qkv_weight")
            or hasattr(inner.layers[0].self_attn, "int4_qkv_weight")
            else blocks
        )
        parts["block products"] = cpu_ms(stack)
        parts["head product"] = cpu_ms(lambda: model.lm_head(x))
        a0 = inner.layers[0].self_attn
        heads, kv, d = model.config.num_attention_heads, model.config.num_key_value_heads, a0.head_dim
        q = torch.randn(1, heads, 1, d)
        keys, values = layers[0].keys, layers[0].values
        sdpa = torch.nn.functional.scaled_dot_product_attention
        parts["attention"] = cpu_ms(
            lambda: [sdpa(q, keys, values, scale=a0.scaling, enable_gqa=heads != kv) for _ in inner.layers]
        )
        k1 = torch.randn(1, kv, 1, d)

        def writes() -> None:
            for layer in layers:
                layer.k_buf[:, :, context : context + 1] = k1
                layer.v_buf[:, :, context : context + 1] = k1

        parts["cache writes"] = cpu_ms(writes)
        logits = model.lm_head(x)[:, -1, :]
        parts["sampling, greedy"] = cpu_ms(lambda: Sampler(temperature=0).sample(logits))
        gen = torch.Generator().manual_seed(0)
        parts["sampling, top-p 0.9"] = cpu_ms(lambda: Sampler(temperature=0.7, top_p=0.9).sample(logits, gen))
    measured = ("block products", "head product", "attention", "cache writes", "sampling, greedy")
    parts["glue"] = parts["Python step"] + parts["sampling, greedy"] - sum(parts[k] for k in measured)
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--weights", nargs="+", default=list(WORKER_WEIGHTS), choices=WORKER_WEIGHTS)
    parser.add_argument("--quality-prompts", type=int, default=8)
    parser.add_argument("--quality-tokens", type=int, default=48)
    parser.add_argument("--profile", action="store_true", help="only where a decoding step's time goes")
    parser.add_argument("--int4-gguf", default="q4_0", choices=["q4_0", "q4_1"], help="llama.cpp's side of int4")
    parser.add_argument("--lora", type=int, default=16, help="rank of an adapter on int8 as one more side (0: none)")
    args = parser.parse_args(argv)
    PAIRS["int4"] = args.int4_gguf
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from transformers import AutoTokenizer

    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama.cpp's Python binding is missing: pip install -e '.[gguf-check]'") from None
    torch.set_num_threads(args.threads)
    folder = finetuned(args.model, args.finetune_steps)
    tok = AutoTokenizer.from_pretrained(str(folder))
    files = gguf_files(folder, [PAIRS[w] for w in args.weights])
    print(f"model {args.model} fine-tuned {args.finetune_steps} steps ({folder}); {args.threads} thread(s); greedy, ")
    print(f"{args.new_tokens} new tokens per answer (end-of-text ignored), prefill included; best of {args.repeats}")
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    models, llms = {}, {}
    for w in args.weights:
        start = time.perf_counter()
        models[w], compiled = load_worker_model(folder, w)
        print(
            f"  worker {w}: loaded in {time.perf_counter() - start:.1f} s (compiling its one-row products: "
            f"{compiled:.1f} s)",
            flush=True,
        )
        if w == "int8" and args.lora and not args.profile:
            side = f"int8 + LoRA r{args.lora}"
            models[side] = attach_lora(load_worker_model(folder, "int8")[0], args.lora)
            PAIRS[side] = "q8_0"
        if args.profile:
            continue
        q = PAIRS[w]
        llms[q] = Llama(
            model_path=str(files[q]), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024, verbose=False
        )
    story = chat_ids(tok, STORY)
    if args.profile:
        print(
            "\nOne decoding step, one row, 128 cached positions, CPU ms (the step does not sample; sampling is a step"
        )
        print("of the loop), each part measured alone:")
        found = {w: profile_step(models[w], story) for w in args.weights}
        print("| weights | " + " | ".join(found[args.weights[0]]) + " |")
        print("|---|" + "---|" * len(found[args.weights[0]]))
        for w, parts in found.items():
            print(f"| {w} | " + " | ".join(f"{v:.2f}" for v in parts.values()) + " |")
        print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        return 0
    batch_prompts = [chat_ids(tok, p) for p in PROMPTS]
    sides = [w for w in models if w in args.weights or "LoRA" in w]
    for w in sides:  # warm-up (first calls allocate)
        worker_run(models[w], [story], 4)
        llama_run(llms[PAIRS[w]], story, 4)
    results: dict[str, list[tuple[float, float]]] = {}

    def record(key: str, made: int, wall: float, cpu: float) -> None:
        results.setdefault(key, []).append((made / wall, made / cpu))

    for r in range(args.repeats):  # alternating sides, each measurement once per round
        for w in sides:
            record(f"llama.cpp {PAIRS[w]} x1", *llama_run(llms[PAIRS[w]], story, args.new_tokens)[:3])
            record(f"worker {w} x1", *worker_run(models[w], [story], args.new_tokens)[:3])
            for b in args.batches:
                record(f"worker {w} x{b}", *worker_run(models[w], batch_prompts[:b], args.new_tokens)[:3])
        print(f"  round {r + 1}/{args.repeats} done, load {os.getloadavg()[0]:.1f}", flush=True)
    best = {k: (max(v[0] for v in runs), max(v[1] for v in runs)) for k, runs in results.items()}
    print()
    print("| side | answers | new tok/s (wall) | new tok/CPU-s | vs llama.cpp one answer (CPU) |")
    print("|---|---|---|---|---|")
    for w in sides:
        base = best[f"llama.cpp {PAIRS[w]} x1"][1]
        if "LoRA" not in w:
            print(f"| llama.cpp {PAIRS[w]} | 1 | {best[f'llama.cpp {PAIRS[w]} x1'][0]:.1f} | {base:.1f} | x1.00 |")
        for b in [1, *args.batches]:
            wall, cpu = best[f"worker {w} x{b}"]
            print(f"| worker {w} | {b} | {wall:.1f} | {cpu:.1f} | x{cpu / base:.2f} |")
    print(f"load average at end of timings: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.quality_prompts and "full" in models:
        qp = [chat_ids(tok, p) for p in PROMPTS[: args.quality_prompts]]
        print()
        print(f"Quality against float32 ({len(qp)} prompts, float32's greedy {args.quality_tokens} tokens each):")
        print("| side | mean KL(f32 ‖ side) nats | top-1 agreement |")
        print("|---|---|---|")
        for name, kl, agree in quality(models, files, qp, args.quality_tokens):
            print(f"| {name} | {kl:.4f} | {100 * agree:.1f}% |")
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--prepare-only"]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    f = finetuned("default", 20)
    print(f, gguf_files(f, GGUF_QUANTS))
elif __name__ == "__main__":
    sys.exit(main())
