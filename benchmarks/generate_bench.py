"""New tokens per second: the generation worker (``engine serve``) against plain transformers ``generate``.

    python benchmarks/generate_bench.py [--model default] [--threads 1] [--new-tokens 48] [--repeats 2]
                                        [--weights full int8 int4]

Both sides use the same model, CPU threads, prompt (through the chat template), sampling settings and seed, for
1 and 4 candidates; plain ``generate`` runs in float32 (the CPU's default), in this process. The worker is measured
as a caller sees it: a real ``serve`` subprocess, time from sending the request to its final reply (JSON lines,
streaming every 4 tokens included), with ``weights: full`` (float32, the same computation as plain ``generate``),
``weights: int8`` (weight-only int8 linear layers) and ``weights: int4`` (group-wise int4, the head int8). The
worker decodes with its own loop (``engine.decoding.decode``: one prefill shared by the candidates, a preallocated KV
cache) and sampler (``engine.decoding.token_sampling``: the same kept tokens as transformers' warpers, another random
stream),
so its texts differ from plain ``generate``'s for one seed, and candidates may end at other lengths: the figures
count the new tokens each side made. Each figure is the best of ``--repeats`` runs.
Besides wall-clock tokens/s, tokens per CPU-second of the generating process are printed: on a shared machine
(see the load average) wall-clock figures mostly measure the neighbours, CPU time much less so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROMPT = "Write a short story about a robot who learns to paint."


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of this process, or of ``pid`` (Linux: /proc)."""
    if pid is None:
        return time.process_time()
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain_generate(folder, n: int, new_tokens: int, seed: int, cache: dict) -> tuple[int, float, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not cache:
        cache["tok"] = AutoTokenizer.from_pretrained(str(folder))
        cache["model"] = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok, model = cache["tok"], cache["model"]
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    torch.manual_seed(seed)
    start, cpu = time.perf_counter(), cpu_seconds()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            top_k=0,
            max_new_tokens=new_tokens,
            num_return_sequences=n,
            pad_token_id=tok.pad_token_id,
        )
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    made = sum(
        next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in out[:, ids.shape[1] :].tolist()
    )
    return made, elapsed, cpu


def worker_generate(client, n: int, new_tokens: int, seed: int, rid: str) -> tuple[int, float, float]:
    from finetune_studio.core.protocol import generation as gp

    request = gp.Generate(id=rid, prompt=PROMPT, n=n, seed=seed, temperature=0.7, top_p=0.9, max_new_tokens=new_tokens)
    pid = client.ready.pid
    start, cpu = time.perf_counter(), cpu_seconds(pid)
    final = client.call(request)[-1]
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    if not isinstance(final, gp.Generated):
        raise SystemExit(f"worker failed: {final}")
    return final.new_tokens, elapsed, cpu


def _best(runs) -> tuple[float, float]:
    """(best wall-clock tokens/s, best tokens per CPU-second)."""
    return max(m / t for m, t, _ in runs), max(m / c for m, _, c in runs if c > 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--weights", nargs="+", default=["full", "int8"], choices=["full", "int8", "int4"])
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    from finetune_studio.core.protocol import generation as gp
    from finetune_studio.core.protocol.generation_client import GenerationClient
    from finetune_studio.engine.models import resolve_model

    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    print(f"model {args.model} ({folder}), {args.threads} thread(s), {args.new_tokens} new tokens per candidate")
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    cache: dict = {}
    plain_generate(folder, 1, 4, 0, cache)  # warm-up
    plain = {
        n: _best([plain_generate(folder, n, args.new_tokens, r, cache) for r in range(args.repeats)])
        for n in args.candidates
    }
    for n in args.candidates:
        print(f"plain generate float32  n={n}  {plain[n][0]:7.1f} tok/s  {plain[n][1]:7.1f} tok/CPU-s", flush=True)
    del cache
    with GenerationClient(threads=args.threads) as client:
        for weights in args.weights:
            req = gp.LoadModel(id=f"load-{weights}", model=str(folder), device="cpu", weights=weights)
            loaded = client.call(req)[-1]
            if not isinstance(loaded, gp.Loaded):
                raise SystemExit(f"worker could not load the model: {loaded}")
            worker_generate(client, 1, 4, 0, f"warm-{weights}")
            for n in args.candidates:
                runs = [
                    worker_generate(client, n, args.new_tokens, r, f"{weights}-{n}-{r}") for r in range(args.repeats)
                ]
                wall, cpu = _best(runs)
                print(
                    f"worker {weights:>4} {loaded.dtype:>8}  n={n}  {wall:7.1f} tok/s  {cpu:7.1f} tok/CPU-s"
                    f"   vs plain: x{wall / plain[n][0]:.2f} wall, x{cpu / plain[n][1]:.2f} CPU",
                    flush=True,
                )
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
