"""New tokens per second of a teacher and its pruned (and distilled) students, timed in turn on the same prompts.

    python benchmarks/distill_speed.py --teacher RUN [--model default] --student FOLDER [--student-run RUN]
                                       [--also FOLDER ...] [--prompts 6] [--new-tokens 48] [--threads 1]
                                       [--decode generate|engine|int8]

The teacher is ``--model`` with the adapter of run ``--teacher`` merged in (as it would be served); the students are
the pruned folder ``--student`` as it is and, with ``--student-run``, with that distillation run's adapter merged in;
``--also`` adds more model folders (other prunings: fewer layers, a narrower MLP; ``FOLDER@RUN`` with that run's
adapter merged). ``--decode engine``
times the generation worker's decode loop instead of ``generate`` (float32), ``--decode int8`` that loop on int8
weights with the compiled one-row products (the worker's fastest CPU mode); both make every answer ``--new-tokens``
long.
Greedy, one prompt at a time (what a person waiting on one answer sees), through transformers' ``generate`` in
float32; the models take turns prompt by prompt, one untimed warm-up answer each first, so that a machine busy with
other work slows them alike (``engine.demo.distill.speeds``). Printed per wall-clock second and per CPU second of
this process, with the ratios to the teacher.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--teacher", required=True, help="the teacher's run (its adapter on --model)")
    p.add_argument("--student", required=True, help="the pruned model folder")
    p.add_argument("--student-run", default="", help="a distillation run of the student: its adapter merged in")
    p.add_argument(
        "--also", action="append", default=[], help="another model folder (FOLDER@RUN: with that run's adapter merged)"
    )
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--decode",
        choices=("generate", "engine", "int8"),
        default="generate",
        help="generate: transformers' generate in float32 (stops at the end of the answer); engine: the generation "
        "worker's decode loop in float32; int8: that loop on int8 weights with the compiled one-row products, as the "
        "worker serves (both: every answer --new-tokens long)",
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from peft import PeftModel

    from finetune_studio.core.store import Store
    from finetune_studio.engine.demo.distill import speeds
    from finetune_studio.engine.demo.task import EVAL_FILE, read_jsonl
    from finetune_studio.engine.models import load_causal_lm, load_tokenizer, resolve_model
    from finetune_studio.engine.train import init_adapter

    torch.set_num_threads(args.threads)
    store = Store()
    teacher_adapter = init_adapter.resolve(args.teacher, store).path
    student_adapter = init_adapter.resolve(args.student_run, store).path if args.student_run else None
    store.close()
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(str(folder))

    def load(path: object) -> torch.nn.Module:
        return load_causal_lm(path, dtype=torch.float32, device="cpu", quantize_4bit=False)

    models = {"teacher": PeftModel.from_pretrained(load(folder), str(teacher_adapter)).merge_and_unload()}
    models["pruned student"] = load(args.student)
    if student_adapter is not None:
        models["distilled student"] = PeftModel.from_pretrained(
            load(args.student), str(student_adapter)
        ).merge_and_unload()
    for extra in args.also:  # FOLDER, or FOLDER@RUN: that run's adapter merged in
        path, _, run = extra.partition("@")
        name = os.path.basename(os.path.normpath(path)) + (" + adapter" if run else "")
        models[name] = load(path)
        if run:
            store = Store()
            adapter = init_adapter.resolve(run, store).path
            store.close()
            models[name] = PeftModel.from_pretrained(models[name], str(adapter)).merge_and_unload()
    prompts = [r["prompt"] for r in read_jsonl(EVAL_FILE)[: args.prompts]]
    if args.decode == "generate":
        timed = speeds(models, tokenizer, prompts, args.new_tokens)
    else:
        timed = decode_speeds(models, tokenizer, prompts, args.new_tokens, int8=args.decode == "int8")
    wall0, cpu0 = timed["teacher"]
    print(
        f"load average {os.getloadavg()[0]:.1f}; {len(prompts)} prompts, up to {args.new_tokens} new tokens, "
        f"{args.threads} thread(s), {args.decode}"
    )
    print(f"{'':<20} {'layers':>6} {'params':>7} {'tokens/s':>9} {'ratio':>6} {'tokens/CPU-s':>13} {'ratio':>6}")
    for name, (wall, cpu) in timed.items():
        layers = models[name].config.num_hidden_layers
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        print(
            f"{name:<20} {layers:>6} {params:>6.1f}M {wall:>9.1f} {wall / wall0:>6.2f} {cpu:>13.1f} {cpu / cpu0:>6.2f}"
        )


def decode_speeds(models: dict, tokenizer, prompts: list[str], new_tokens: int, int8: bool) -> dict:
    """As ``engine.demo.distill.speeds``, through the generation worker's decode loop (each answer exactly
    ``new_tokens`` long); with ``int8`` the weights as the worker's int8 mode makes them (compiled first, untimed)."""
    import time

    import torch

    from finetune_studio.engine.datasets.render import render_text
    from finetune_studio.engine.datasets.schema import Message
    from finetune_studio.engine.decoding.decode import decode
    from finetune_studio.engine.decoding.int8 import compile_row_products, quantize_linears_int8
    from finetune_studio.engine.decoding.token_sampling import Sampler

    for model in models.values():
        model.eval()
        model.config.use_cache = True
        if int8:
            quantize_linears_int8(model)
            compile_row_products(model)
    ids = [
        tokenizer(render_text(tokenizer, (Message("user", p),), add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        for p in prompts
    ]
    totals = {name: [0, 0.0, 0.0] for name in models}
    for i, prompt in enumerate([ids[0], *ids]):
        for name, model in models.items():
            got: list[int] = []

            def on_tokens(tokens: list[int], got: list[int] = got) -> list[bool]:
                got.append(tokens[0])
                return [False]

            wall, cpu = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                decode(model, prompt, 1, new_tokens, Sampler(temperature=0), on_tokens)
            if i:
                totals[name][0] += len(got)
                totals[name][1] += time.perf_counter() - wall
                totals[name][2] += time.process_time() - cpu
    return {name: (n / max(w, 1e-9), n / max(c, 1e-9)) for name, (n, w, c) in totals.items()}


if __name__ == "__main__":
    main()
