"""Annotate's candidates: 10 prompts x 2 answers x 64 new tokens, one prompt at a time against prompts batched.

    python benchmarks/annotate_bench.py [--model default] [--prompts 10] [--new-tokens 64] [--threads 0]
                                        [--weights full int8 int4] [--adapter RUN] [--skip-quality]

What Annotate asks the generation worker for a session of ``--prompts`` prompts with one pair per prompt: side A's
answer (seed 1) and side B's (seed 2) to every prompt, sampled as Annotate samples (temperature 0.8, top-p 0.95),
at most ``--new-tokens`` new tokens each. Both sides are the base model unless ``--adapter`` names a run (or an
adapter folder) for side A. Timed as a caller sees it (a real ``serve`` subprocess, from the first request to the
last final reply; the model already loaded):

* **one by one**: a ``generate`` per prompt and side (20 requests), what Annotate sent before ``generate_batch``;
* **batched**: a ``generate_batch`` per side (2 requests of 10 prompts), what Annotate sends now.

for every ``--weights`` option. Then the quality cost of each option, in this process: every prompt's greedy
answer (``--new-tokens`` tokens, decoded as one batch) against the full weights' one: the identical prefix (tokens,
mean over prompts, and how many prompts are identical all the way) and the token-level top-1 agreement with the full
weights' continuation teacher-forced. It also checks on this model that the batch's greedy answers are those of each
prompt decoded alone (full weights). The load average is printed: on a shared machine the wall-clock figures
measure the neighbours too; the goal (under 30 s for the session) is for a quiet 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other benchmarks, run as scripts
from quant_quality import PROMPTS  # the same prompts as the weights' quality figures

SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 0}  # Annotate's defaults (studio.state.annotation.Sampling)
SIDES = (("a", 1), ("b", 2))  # (side, seed)


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def time_session(client, prompts: list[str], new_tokens: int, batched: bool, adapter_a: str, tag: str):
    """(seconds, new tokens made) for side A's and side B's answers to every prompt."""
    from finetune_studio.core.protocol import generation as gp

    requests: list[gp.Request] = []
    for side, seed in SIDES:
        adapter = "side-a" if side == "a" and adapter_a else gp.BASE
        common = {"max_new_tokens": new_tokens, "adapter": adapter, **SAMPLING}
        if batched:
            items = [gp.BatchPrompt(prompt=p, n=1, seed=seed) for p in prompts]
            requests.append(gp.GenerateBatch(id=f"{tag}-{side}", prompts=items, **common))
        else:
            requests += [
                gp.Generate(id=f"{tag}-{side}-{i}", prompt=p, seed=seed, **common) for i, p in enumerate(prompts)
            ]
    start, made = time.perf_counter(), 0
    for request in requests:
        final = client.call(request)[-1]
        if not isinstance(final, gp.Generated):
            raise SystemExit(f"the worker failed: {final}")
        made += final.new_tokens
    return time.perf_counter() - start, made


def quality(folder, prompts: list[str], new_tokens: int, options: list[str]) -> dict[str, tuple[float, int, float]]:
    """{weights: (identical greedy prefix, prompts identical all the way, top-1 agreement)} against full weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_studio.engine.decoding.decode import decode_batch
    from finetune_studio.engine.decoding.int4 import quantize_linears_int4
    from finetune_studio.engine.decoding.int8 import quantize_linears_int8
    from finetune_studio.engine.decoding.token_sampling import Sampler

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = []
    for text in prompts:
        chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids.append(tok(chat, add_special_tokens=False)["input_ids"])

    def greedy(model, batch: list[list[int]]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in batch]

        def handler(i):
            def on_tokens(tokens):
                out[i].append(tokens[0])
                return [False]

            return on_tokens

        n = len(batch)
        decode_batch(model, batch, [1] * n, [new_tokens] * n, Sampler(0.0), [handler(i) for i in range(n)], [0] * n)
        return out

    results: dict[str, tuple[float, int, float]] = {}
    reference: list[list[int]] = []
    reference_top: list[torch.Tensor] = []
    for weights in ["full", *[w for w in options if w != "full"]]:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        if weights == "int8":
            quantize_linears_int8(model)
        elif weights == "int4":
            quantize_linears_int4(model)
        with torch.inference_mode():
            own = greedy(model, ids)
            if weights == "full":
                alone = [greedy(model, [p])[0] for p in ids]
                same = sum(a == b for a, b in zip(own, alone, strict=True))
                print(f"  greedy, full weights: batch of {len(ids)} = each prompt alone for {same}/{len(ids)} prompts")
                reference = own
                for p, cont in zip(ids, own, strict=True):
                    logits = model(torch.tensor([p + cont[:-1]])).logits[0, len(p) - 1 :]
                    reference_top.append(logits.argmax(-1))
                results["full"] = (float(new_tokens), len(ids), 1.0)
            else:
                prefix, whole, agree = [], 0, []
                for p, mine, cont, top in zip(ids, own, reference, reference_top, strict=True):
                    same_len = next((j for j, (a, b) in enumerate(zip(mine, cont, strict=True)) if a != b), len(cont))
                    prefix.append(same_len)
                    whole += same_len == len(cont)
                    logits = model(torch.tensor([p + cont[:-1]])).logits[0, len(p) - 1 :]
                    agree.append((logits.argmax(-1) == top).float().mean().item())
                results[weights] = (sum(prefix) / len(prefix), whole, sum(agree) / len(agree))
        print(f"  quality of {weights}: {time.perf_counter() - start:.0f} s", flush=True)
        del model
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="the worker's CPU threads (0: its default)")
    parser.add_argument("--weights", nargs="+", default=["full", "int8", "int4"], choices=["full", "int8", "int4"])
    parser.add_argument("--adapter", default="", help="a run id or adapter folder for side A (default: the base)")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from finetune_studio.core.protocol import generation as gp
    from finetune_studio.core.protocol.generation_client import GenerationClient
    from finetune_studio.engine.models import resolve_model

    folder = resolve_model(args.model)
    prompts = PROMPTS[: args.prompts]
    print(
        f"model {args.model} ({folder}): {len(prompts)} prompts x 2 answers (side A seed 1, side B seed 2) x "
        f"{args.new_tokens} new tokens at most, temperature 0.8, top-p 0.95; side A: {args.adapter or 'the base'}"
    )
    print(f"load average at start: {load_avg()} on {os.cpu_count()} CPUs")
    times: dict[tuple[str, bool], tuple[float, int]] = {}
    with GenerationClient(threads=args.threads) as client:
        ready = client.start()
        print(f"worker: {ready.threads} CPU thread(s)")
        for weights in args.weights:
            loaded = client.call(gp.LoadModel(id=f"load-{weights}", model=str(folder), device="cpu", weights=weights))
            if not isinstance(loaded[-1], gp.Loaded):
                raise SystemExit(f"the worker could not load the model: {loaded[-1]}")
            if args.adapter:
                attached = client.call(gp.AttachAdapter(id=f"at-{weights}", name="side-a", source=args.adapter))[-1]
                if not isinstance(attached, gp.AdapterAttached):
                    raise SystemExit(f"the worker could not attach {args.adapter!r}: {attached}")
            client.call(gp.Generate(id=f"warm-{weights}", prompt="Hi", max_new_tokens=4))
            for batched in (False, True):
                tag = f"{weights}-{'batch' if batched else 'one'}"
                seconds, made = time_session(client, prompts, args.new_tokens, batched, args.adapter, tag)
                times[weights, batched] = seconds, made
                how = "batched   " if batched else "one by one"
                print(
                    f"weights {weights:>4}  {how}  {seconds:6.1f} s  {made:5d} new tokens  {made / seconds:6.1f} tok/s"
                    f"   (load {load_avg()})",
                    flush=True,
                )
    print()
    base = times.get(("full", False))
    print("| weights | one by one (s) | batched (s) | batched vs one by one | batched vs full one by one |")
    print("|---|---|---|---|---|")
    for weights in args.weights:
        one, batch = times[weights, False][0], times[weights, True][0]
        against = f"x{base[0] / batch:.2f}" if base else "-"
        print(f"| {weights} | {one:.1f} | {batch:.1f} | x{one / batch:.2f} | {against} |")
    print(f"load average at the end of the timings: {load_avg()}")
    if not args.skip_quality:
        print()
        print(f"quality: greedy {args.new_tokens}-token answers to the {len(prompts)} prompts against full weights")
        figures = quality(folder, prompts, args.new_tokens, args.weights)
        print(f"| weights | identical greedy prefix (of {args.new_tokens}) | top-1 agreement (teacher-forced) |")
        print("|---|---|---|")
        for weights, (prefix, whole, agree) in figures.items():
            print(f"| {weights} | {prefix:.1f} ({whole}/{len(prompts)} all the way) | {100 * agree:.1f}% |")
        print(f"load average at the end: {load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
