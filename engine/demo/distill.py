"""``python -m finetune_studio.engine demo --distill``: a half-depth student of the tuned demo model, distilled.

1. The teacher: an SFT adapter on the bundled model trained on ``demo_sft.jsonl`` (as the plain demo), or an
   existing run (``--teacher RUN``, e.g. the DPO run of ``demo --loop``).
2. The student: the teacher merged into its base and pruned to half its depth, the layers chosen on the training
   data as those whose absence changes the teacher's outputs least, and every kept MLP narrowed to ``--mlp-width``
   channels (1024 of 1536; the output head and embeddings stay whole, so half the layers alone give about 1.8x,
   not 2x) (``engine.train.prune``).
3. Distillation: the student trained with LoRA against the teacher (objective ``distill``) on ``demo_sft.jsonl``.
4. The held-out exact-match score and the generation speed (new tokens per second, greedy, one prompt at a time, the
   three models taking turns prompt by prompt; per wall-clock second and per CPU second) of the teacher, the pruned
   student before distillation and after it.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune_studio.core.protocol.distill_report import DemoDistillReport
from finetune_studio.engine.demo.task import (
    DEFAULTS,
    EVAL_FILE,
    MAX_NEW_TOKENS,
    SFT_FILE,
    _say,
    evaluate,
    read_jsonl,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m finetune_studio.engine demo --distill", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="default")
    p.add_argument("--teacher", default="", help="an existing run as the teacher (id, RUN:best); default: train SFT")
    p.add_argument("--teacher-steps", type=int, default=DEFAULTS["sft"]["steps"], help="SFT steps of the teacher")
    p.add_argument("--keep", type=float, default=0.5, help="share of the layers the student keeps (default: half)")
    p.add_argument("--measure-examples", type=int, default=4, help="training rows the layers are chosen on")
    p.add_argument("--search", choices=("greedy", "once"), default="once", help="how the layers are chosen (prune)")
    p.add_argument(
        "--mlp-width",
        type=int,
        default=1024,
        help="narrow every kept layer's MLP to this many channels, the most active on the measured rows (prune; "
        "default 1024 of the bundled model's 1536: about 2x the teacher's speed at half depth, README; 0: keep)",
    )
    p.add_argument("--steps", type=int, default=90, help="distillation steps (default 90; 30 were too few: README)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.5, help="distill_alpha: the divergence's share of the loss")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-limit", type=int, default=0, help="score only the first N held-out prompts (0: all)")
    p.add_argument("--speed-prompts", type=int, default=6, help="prompts timed one by one for tokens per second")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str]) -> int:
    from finetune_studio.core.config import ConfigError
    from finetune_studio.engine.train.recipe import TrainingFailed

    try:
        return _distill(build_parser().parse_args(argv))
    except TrainingFailed as exc:
        _say(f"demo: training failed: {exc}")
        return 1
    except ConfigError as exc:
        _say(f"demo: {exc}")
        return 2


def speeds(
    models: dict[str, Any], tokenizer: Any, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS
) -> dict[str, tuple[float, float]]:
    """New tokens per second of each model on the demo's prompts (rendered as a user turn), greedy, one prompt at a
    time, the models taking turns (``engine.train.distill_speed.time_generation``): (per wall-clock second, per CPU
    second of this process). Answers end at the end of the turn."""
    from finetune_studio.engine.datasets.render import render_text
    from finetune_studio.engine.datasets.schema import Message
    from finetune_studio.engine.train.distill_speed import time_generation

    stop = [t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if isinstance(t, int)]
    ids = [
        tokenizer(render_text(tokenizer, (Message("user", p),), add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        for p in prompts
    ]
    return time_generation(models, ids, max_new_tokens, stop=stop, pad_id=tokenizer.pad_token_id)


def _figures(model: Any, tokenizer: Any, rows: list[dict], label: str) -> dict[str, Any]:
    _say(f"   scoring {label} on {len(rows)} held-out prompts")
    score, _ = evaluate(model, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS)
    layers = int(model.config.num_hidden_layers)
    params = sum(p.numel() for p in model.parameters())
    _say(f"   {label}: {score.exact:.1%} exact, {score.valid:.1%} valid, {layers} layers")
    return {"exact": score.exact, "valid": score.valid, "n": score.n, "layers": layers, "params": params}


def _distill(args: argparse.Namespace) -> int:
    import torch
    from peft import PeftModel

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.core.store import Store
    from finetune_studio.engine.models import load_causal_lm, load_tokenizer, pick_device, resolve_model
    from finetune_studio.engine.train import init_adapter
    from finetune_studio.engine.train.prune import prune
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    rows = read_jsonl(EVAL_FILE)[: args.eval_limit or None]
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(str(folder))
    device = pick_device()
    d = DEFAULTS["sft"]
    common = dict(seed=args.seed, validation_fraction=0.0, eval_every=0, checkpoint_every=0, max_length=d["max_length"])

    teacher_ref = args.teacher
    if not teacher_ref:
        _say(f"1/4 the teacher: SFT on the bundled model, {args.teacher_steps} steps")
        sft = TrainConfig(
            model=args.model,
            dataset=str(SFT_FILE),
            run_name="demo distill: teacher (SFT)",
            max_steps=args.teacher_steps,
            learning_rate=d["learning_rate"],
            batch_size=d["batch_size"],
            lora_rank=d["lora_rank"],
            lora_alpha=float(2 * d["lora_rank"]),
            warmup_steps=max(1, args.teacher_steps // 10),
            **common,
        )
        teacher_ref = train_run(sft, reporter=Reporter(extra=_progress)).run_id
    else:
        _say(f"1/4 the teacher: {teacher_ref}")
    store = Store()
    try:
        start = init_adapter.resolve(teacher_ref, store)
    finally:
        store.close()
    base = load_causal_lm(folder, dtype=torch.float32, device=device, quantize_4bit=False)
    teacher = PeftModel.from_pretrained(base, str(start.path)).merge_and_unload()
    figures = {"teacher": _figures(teacher, tokenizer, rows, "the teacher")}

    work = Path(tempfile.mkdtemp(prefix="demo-distill-"))
    try:
        merged = work / "teacher-merged"
        teacher.save_pretrained(merged, safe_serialization=True)
        tokenizer.save_pretrained(merged)
        layers = int(teacher.config.num_hidden_layers)
        drop = layers - max(1, round(layers * args.keep))
        _say(f"2/4 the student: dropping {drop} of {layers} layers, chosen on {args.measure_examples} training rows")
        student_dir = _students_dir() / f"demo-distill-student-{int(time.time())}"
        pruned = prune(
            merged,
            student_dir,
            drop=drop,
            measure_on=SFT_FILE,
            examples=args.measure_examples,
            search=args.search,
            mlp_width=min(args.mlp_width, int(getattr(teacher.config, "intermediate_size", 0) or 0)),
            max_length=d["max_length"],
            progress=lambda _s, done, total, _m: _say(f"   round {done + 1}/{total}"),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(f"   kept layers {pruned.kept_layers} ({pruned.params_after:,} of {pruned.params_before:,} parameters)")
    student = load_causal_lm(student_dir, dtype=torch.float32, device=device, quantize_4bit=False)
    figures["student_before"] = _figures(student, tokenizer, rows, "the pruned student")
    before = copy.deepcopy(student)  # the adapter is merged into ``student`` below

    config = TrainConfig(
        model=str(student_dir),
        dataset=str(SFT_FILE),
        objective="distill",
        distill_teacher=teacher_ref,
        distill_alpha=args.alpha,
        distill_temperature=args.temperature,
        distill_divergence=args.divergence,
        run_name="demo distill: student",
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        lora_rank=args.lora_rank,
        lora_alpha=float(2 * args.lora_rank),
        warmup_steps=max(1, args.steps // 10),
        **common,
    )
    _say(f"3/4 distillation: {args.steps} steps, {args.divergence}, alpha {args.alpha:g}, T {args.temperature:g}")
    run = train_run(config, reporter=Reporter(extra=_progress))
    distilled = PeftModel.from_pretrained(student, str(run.adapter_dir)).merge_and_unload()
    _say("4/4 scoring the distilled student, then timing the three models in turn")
    figures["student_after"] = _figures(distilled, tokenizer, rows, "the distilled student")
    timed = speeds(
        {"teacher": teacher, "student_before": before, "student_after": distilled},
        tokenizer,
        [r["prompt"] for r in rows[: args.speed_prompts]],
    )
    for name, (wall, cpu) in timed.items():
        figures[name] |= {"tokens_per_s": wall, "tokens_per_cpu_s": cpu}

    report = {
        "eval_prompts": len(rows),
        **figures,
        "kept_layers": pruned.kept_layers,
        "teacher_run": start.parent_run_id or str(start.path),
        "distill_run": run.run_id,
        "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"student": str(student_dir)},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(DemoDistillReport.from_fields(report).to_json())
    else:
        print(summary(report))
    return 0


def _students_dir() -> Path:
    from finetune_studio.core import paths

    out = paths.models_dir() / "pruned"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _progress(event: Any) -> None:
    kind = getattr(event, "type", "")
    if kind == "step":
        extra = "".join(f"  {k} {v:.4f}" for k, v in (event.metrics or {}).items() if k in ("kl", "ce"))
        _say(f"  step {event.step:>3}/{event.total_steps}  loss {event.loss:.4f}{extra}  ({event.elapsed_s:.0f} s)")
    elif kind == "failed":
        _say(f"  failed: {event.message}")


def summary(r: dict[str, Any]) -> str:
    t, b, a = r["teacher"], r["student_before"], r["student_after"]
    lines = [
        f"\nDistillation demo on {r['eval_prompts']} held-out prompts ({r['total_seconds']:.0f} s)",
        "                          layers   exact    valid   new tokens/s   per CPU second",
    ]
    for label, f in (("teacher", t), ("pruned student", b), ("distilled student", a)):
        lines.append(
            f"  {label:<22} {f['layers']:>6}  {f['exact']:6.1%}   {f['valid']:6.1%}   {f['tokens_per_s']:10.1f}"
            f"   {f['tokens_per_cpu_s']:10.1f}"
        )
    keep = a["exact"] / t["exact"] if t["exact"] else float("nan")
    lines.append(
        f"  the distilled student keeps {keep:.0%} of the teacher's exact-match score at "
        f"{a['tokens_per_s'] / max(t['tokens_per_s'], 1e-9):.2f}x its speed "
        f"({a['tokens_per_cpu_s'] / max(t['tokens_per_cpu_s'], 1e-9):.2f}x per CPU second; "
        f"layers kept: {r['kept_layers']})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
