"""New tokens per second of a teacher and its pruned (and distilled) students, timed in turn on the same prompts.

    python benchmarks/distill_speed.py --teacher RUN [--model default] --student FOLDER [--student-run RUN]
                                       [--also FOLDER ...] [--prompts 6] [--new-tokens 48] [--threads 1]

The teacher is ``--model`` with the adapter of run ``--teacher`` merged in (as it would be served); the students are
the pruned folder ``--student`` as it is and, with ``--student-run``, with that distillation run's adapter merged in;
``--also`` adds more model folders as they are (other prunings: fewer layers, a narrower MLP).
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
    p.add_argument("--also", action="append", default=[], help="another model folder to time as it is (repeatable)")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
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
    for extra in args.also:
        models[os.path.basename(os.path.normpath(extra))] = load(extra)
    prompts = [r["prompt"] for r in read_jsonl(EVAL_FILE)[: args.prompts]]
    timed = speeds(models, tokenizer, prompts, args.new_tokens)
    wall0, cpu0 = timed["teacher"]
    print(
        f"load average {os.getloadavg()[0]:.1f}; {len(prompts)} prompts, up to {args.new_tokens} new tokens, "
        f"{args.threads} thread(s)"
    )
    print(f"{'':<20} {'layers':>6} {'params':>7} {'tokens/s':>9} {'ratio':>6} {'tokens/CPU-s':>13} {'ratio':>6}")
    for name, (wall, cpu) in timed.items():
        layers = models[name].config.num_hidden_layers
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        print(
            f"{name:<20} {layers:>6} {params:>6.1f}M {wall:>9.1f} {wall / wall0:>6.2f} {cpu:>13.1f} {cpu / cpu0:>6.2f}"
        )


if __name__ == "__main__":
    main()
