"""How far the worker's quantised weights (``weights: int8`` / ``int4``) move the default model from float32.

    python benchmarks/quant_quality.py [--model default] [--threads 1] [--new-tokens 48] [--prompts 20]

For each of ``--prompts`` chat prompts (through the chat template), float32 greedy-decodes ``--new-tokens``
tokens; that continuation is then teacher-forced through each variant (one forward over prompt + continuation)
and the next-token distributions at the continuation's positions are compared with float32's: mean
KL(float32 || variant) in nats, and top-1 agreement (the variant's most likely token is float32's). Each variant
also greedy-decodes on its own (the worker's decode loop, ``engine.decoding.decode``): the identical-prefix length is
how
many of its first tokens equal float32's (mean over prompts, and how many prompts match all the way).
Variants: int8 (per-channel, every linear layer), int4 with groups of 32/64 (the head in int8, and layers the
int4 kernel does not take: those whose input size is not a multiple of the group size), int4 g32 with an int4
head too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain photosynthesis to a ten-year-old.",
    "What are three tips for staying focused while studying?",
    "Give me a recipe for a simple tomato soup.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How does a bicycle stay upright?",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "Suggest a name for a coffee shop run by cats.",
    "Explain what a prime number is, with examples.",
    "Write a polite email asking a colleague to review my report.",
    "Why is the sky blue?",
    "List some healthy breakfast ideas.",
    "How do I convert Celsius to Fahrenheit?",
    "Describe the water cycle.",
    "What should I pack for a weekend camping trip?",
    "Write a limerick about a forgetful wizard.",
    "Explain recursion in programming simply.",
    "What are the benefits of regular exercise?",
    "Tell me a fun fact about octopuses.",
]


def variants():
    """(name, function quantising a float32 model in place, or None for float32 itself)."""
    from finetune_studio.engine.decoding.int4 import quantize_linears_int4
    from finetune_studio.engine.decoding.int8 import quantize_linears_int8

    yield "float32", None
    yield "int8", quantize_linears_int8
    for g in (32, 64):  # 128: the default model's 576 hidden features fit no group of 128 (nearly all int8)
        yield f"int4 g{g}, head int8", lambda m, g=g: quantize_linears_int4(m, group_size=g, head="int8")
    yield "int4 g32, head int4", lambda m: quantize_linears_int4(m, group_size=32, head="int4")


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    from finetune_studio.engine.decoding.decode import decode
    from finetune_studio.engine.decoding.token_sampling import Sampler

    out: list[int] = []

    def on_tokens(tokens):
        out.append(tokens[0])
        return [False]

    decode(model, prompt, 1, new_tokens, Sampler(temperature=0.0), on_tokens)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_studio.engine.models import resolve_model

    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(str(folder))
    prompts = []
    for text in PROMPTS[: args.prompts]:
        chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        prompts.append(tok(chat, add_special_tokens=False)["input_ids"])
    print(f"model {args.model} ({folder}), {len(prompts)} prompts, {args.new_tokens} greedy tokens each")
    reference: list[tuple[list[int], torch.Tensor]] = []  # (float32 continuation, its log-probabilities)
    rows = []
    for name, quantise in variants():
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        if quantise is not None:
            quantise(model)
        kls, agree, prefix, whole = [], [], [], 0
        with torch.inference_mode():
            for i, prompt in enumerate(prompts):
                own = greedy(model, prompt, args.new_tokens)
                cont = own if quantise is None else reference[i][0]
                ids = torch.tensor([prompt + cont[:-1]])
                logp = model(ids).logits[0, len(prompt) - 1 :].float().log_softmax(-1)  # predicts cont
                if quantise is None:
                    reference.append((own, logp))
                    continue
                ref = reference[i][1]
                kls.append((ref.exp() * (ref - logp)).sum(-1).mean().item())
                agree.append((ref.argmax(-1) == logp.argmax(-1)).float().mean().item())
                same = next((j for j, (a, b) in enumerate(zip(own, cont, strict=True)) if a != b), len(cont))
                prefix.append(same)
                whole += same == len(cont)
        if quantise is not None:
            rows.append((name, sum(kls) / len(kls), sum(agree) / len(agree), sum(prefix) / len(prefix), whole))
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
        del model
    print()
    print(f"| weights | mean KL(f32 ‖ q) nats | top-1 agreement | greedy identical prefix (of {args.new_tokens}) |")
    print("|---|---|---|---|")
    for name, kl, ag, pre, whole in rows:
        print(f"| {name} | {kl:.4f} | {100 * ag:.1f}% | {pre:.1f} ({whole}/{len(prompts)} all {args.new_tokens}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
