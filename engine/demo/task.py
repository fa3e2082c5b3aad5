"""``python -m finetune_studio.engine demo``: fine-tune the default model on the demo task, score before and after.

The task (see ``resources/datasets/make_demo.py``): extract a person's name, age
and city from a sentence and answer with ONLY a JSON object
``{"name": str, "age": int, "city": str, "job": str | null}``. The held-out score is the share of
answers that are exactly that object with the right values (strict: no prose,
no code fence, the age a number); the format-validity rate is the share that
are such an object at all, whatever the values.

    python -m finetune_studio.engine demo                        SFT with LoRA, default settings (minutes on a CPU)
    python -m finetune_studio.engine demo --objective dpo        DPO on the preference pairs instead
    python -m finetune_studio.engine demo --json                 one JSON object on stdout instead of the summary
    python -m finetune_studio.engine demo --loop                 SFT, sample, label with the scorer, DPO (loop.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_studio.core.protocol.demo_report import DemoReport

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "resources" / "datasets"
SFT_FILE = DATA_DIR / "demo_sft.jsonl"
PREFERENCE_FILE = DATA_DIR / "demo_preference.jsonl"
EVAL_FILE = DATA_DIR / "demo_eval.jsonl"
KEYS = ("name", "age", "city", "job")

# Defaults chosen to finish in a few minutes on a 2-core CPU and clearly lift the score.
DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"steps": 20, "learning_rate": 1e-3, "batch_size": 4, "lora_rank": 8, "max_length": 128},
    "dpo": {"steps": 20, "learning_rate": 5e-4, "batch_size": 4, "lora_rank": 8, "max_length": 144},
}
MAX_NEW_TOKENS = 48


# --- scoring (pure Python) ----------------------------------------------------------------------------------------
def parse_answer(text: str) -> dict | None:
    """The answer as ``{"name": str, "age": int, "city": str, "job": str | None}``, or None when it is not one.

    Strict: the whole answer (surrounding white space aside) must be one JSON object with exactly those keys,
    the name and city strings, the age an integer (not a string, a float or a bool), the job a string or null.
    """
    try:
        obj = json.loads(text.strip())
    except (ValueError, TypeError):
        return None
    if not isinstance(obj, dict) or set(obj) != set(KEYS):
        return None
    if not isinstance(obj["name"], str) or not isinstance(obj["city"], str):
        return None
    if not isinstance(obj["age"], int) or isinstance(obj["age"], bool):
        return None
    if obj["job"] is not None and not isinstance(obj["job"], str):
        return None
    return obj


def score_answer(text: str, expected: dict) -> tuple[bool, bool]:
    """(format valid, exact match) for one answer."""
    obj = parse_answer(text)
    if obj is None:
        return False, False
    exact = all(obj[k] == expected[k] for k in KEYS)
    return True, exact


@dataclass
class Score:
    exact: float  # share of exactly right answers (the headline score)
    valid: float  # share of answers in the required format, right or wrong
    n: int
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "exact": round(self.exact, 4),
            "valid": round(self.valid, 4),
            "n": self.n,
            "seconds": round(self.seconds, 1),
        }


def score_answers(answers: list[str], expected: list[dict]) -> Score:
    if len(answers) != len(expected):
        raise ValueError("one answer per expected object")
    results = [score_answer(a, e) for a, e in zip(answers, expected)]
    n = len(results)
    return Score(exact=sum(e for _v, e in results) / max(n, 1), valid=sum(v for v, _e in results) / max(n, 1), n=n)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --- generation ---------------------------------------------------------------------------------------------------
def generate_answers(
    model, tokenizer, prompts: list[str], *, batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS
) -> list[str]:
    """Greedy answers to user ``prompts``, rendered with the chat template as in training, batched, left-padded."""
    import torch

    from finetune_studio.engine.datasets.render import render_text
    from finetune_studio.engine.datasets.schema import Message

    texts = [render_text(tokenizer, (Message("user", p),), add_generation_prompt=True) for p in prompts]
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in stop:
        stop.append(im_end)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    model.eval()
    try:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chunk]
            width = max(len(e) for e in enc)
            ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in enc])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop or None,
                    pad_token_id=pad_id,
                )
            for row in out[:, width:].tolist():
                cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return answers


def evaluate(model, tokenizer, rows: list[dict], **kw) -> tuple[Score, list[str]]:
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], **kw)
    score = score_answers(answers, [r["expected"] for r in rows])
    score.seconds = time.perf_counter() - start
    return score, answers


# --- the command ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m finetune_studio.engine demo",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--objective",
        choices=("sft", "dpo"),
        default="sft",
        help="sft trains on demo_sft.jsonl, dpo on demo_preference.jsonl (default: sft)",
    )
    p.add_argument("--method", choices=("lora", "qlora", "dora", "qdora"), default="lora")
    p.add_argument(
        "--steps",
        type=int,
        help="optimizer steps (default: {})".format(", ".join(f"{k} {v['steps']}" for k, v in DEFAULTS.items())),
    )
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--model", default="default", help="model to fine-tune (default: the bundled SmolLM2-135M)")
    p.add_argument("--eval-limit", type=int, default=0, help="score only the first N held-out prompts (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--examples", type=int, default=3, help="answers to show before/after in the summary")
    p.add_argument("--skip-before", action="store_true", help="do not score the base model (saves time)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    return p


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(event) -> None:
    """In-process listener for the engine's events: a short line per step on stderr."""
    kind = getattr(event, "type", "")
    if kind == "step":
        extra = f"  margin {event.reward_margin:+.3f}" if getattr(event, "reward_margin", None) is not None else ""
        _say(f"  step {event.step:>3}/{event.total_steps}  loss {event.loss:.4f}{extra}  ({event.elapsed_s:.0f} s)")
    elif kind == "started":
        _say(
            f"  run {event.run_id} on {event.device}: {event.total_steps} steps, "
            f"{event.trainable_params:,} trainable parameters"
        )
    elif kind == "failed":
        _say(f"  failed: {event.message}")


def main(argv: list[str] | None = None) -> int:
    """The plain demo (``demo --loop`` is :func:`engine.demo.loop.main`, chosen by the CLI)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    defaults = DEFAULTS[args.objective]
    pick = lambda value, name: defaults[name] if value is None else value
    steps = pick(args.steps, "steps")
    rank = pick(args.lora_rank, "lora_rank")

    import torch

    from finetune_studio.core.config import ConfigError, TrainConfig
    from finetune_studio.engine.models import (
        ModelError,
        compute_dtype,
        load_causal_lm,
        load_tokenizer,
        pick_device,
        resolve_model,
    )
    from finetune_studio.engine.train.recipe import TrainingFailed, train_run
    from finetune_studio.engine.train.reporting import Reporter

    try:
        config = TrainConfig(
            model=args.model,
            dataset=str(SFT_FILE if args.objective == "sft" else PREFERENCE_FILE),
            method=args.method,
            objective=args.objective,
            run_name=f"demo {args.objective} ({args.method})",
            max_steps=steps,
            learning_rate=pick(args.learning_rate, "learning_rate"),
            batch_size=pick(args.batch_size, "batch_size"),
            max_length=pick(args.max_length, "max_length"),
            lora_rank=rank,
            lora_alpha=float(2 * rank),
            seed=args.seed,
            warmup_steps=max(1, steps // 10),
            validation_fraction=0.0,
            eval_every=0,
            checkpoint_every=0,
        )
    except ConfigError as exc:
        _say(f"demo: {exc}")
        return 2
    rows = read_jsonl(EVAL_FILE)
    if args.eval_limit > 0:
        rows = rows[: args.eval_limit]
    started = time.perf_counter()
    torch.manual_seed(args.seed)

    try:
        folder = resolve_model(args.model, progress=lambda _s, _d, _t, msg: _say(f"  {msg}") if msg else None)
        tokenizer = load_tokenizer(str(folder))
        device = pick_device()
        base = load_causal_lm(folder, dtype=compute_dtype("auto", device), device=device, quantize_4bit=False)
    except ModelError as exc:
        _say(f"demo: model problem: {exc}")
        return 1
    gen = {"max_new_tokens": args.max_new_tokens}

    if args.skip_before:
        before, before_answers = None, [""] * len(rows)
    else:
        _say(f"Scoring the base model on {len(rows)} held-out prompts...")
        before, before_answers = evaluate(base, tokenizer, rows, **gen)
        _say(f"  before: {before.exact:.0%} exact, {before.valid:.0%} valid format ({before.seconds:.0f} s)")

    _say(
        f"Training: {config.method} {config.objective}, {steps} steps, batch {config.batch_size}, "
        f"lr {config.learning_rate:g}, rank {rank}, max_length {config.max_length}"
    )
    t_train = time.perf_counter()
    try:
        result = train_run(config, reporter=Reporter(extra=_progress))
    except TrainingFailed as exc:
        _say(f"demo: training failed: {exc}")
        return 1
    train_seconds = time.perf_counter() - t_train
    if result.status != "completed" or result.adapter_dir is None:
        _say(f"demo: the run ended as {result.status}: {result.message}")
        return 1

    from finetune_studio.engine.bottleneck import load_adapter_folder

    _say("Scoring the fine-tuned model...")
    tuned = load_adapter_folder(base, result.adapter_dir)
    after, after_answers = evaluate(tuned, tokenizer, rows, **gen)
    total_seconds = time.perf_counter() - started

    examples = []
    for i in range(min(args.examples, len(rows))):
        examples.append(
            {
                "prompt": rows[i]["prompt"].rsplit("Text: ", 1)[-1],
                "expected": rows[i]["expected"],
                "before": before_answers[i],
                "after": after_answers[i],
            }
        )
    report = {
        "task": "strict JSON extraction (name, age, city, job)",
        "model": args.model,
        "objective": config.objective,
        "method": config.method,
        "steps": steps,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "lora_rank": rank,
        "max_length": config.max_length,
        "eval_prompts": len(rows),
        "before": before.to_dict() if before else None,
        "after": after.to_dict(),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "run_id": result.run_id,
        "run_dir": str(result.run_dir),
        "adapter_dir": str(result.adapter_dir),
        "final_loss": result.final_loss,
        "examples": examples,
    }
    if args.json:  # one typed event (core.protocol.demo_report)
        print(DemoReport.from_fields(report).to_json())
    else:
        print(_summary(report))
    return 0


def _summary(r: dict) -> str:
    a = r["after"]
    b = r["before"] or {}

    def pct(value) -> str:
        return f"{value:>6.1%}" if value is not None else "     -"

    lines = [
        "",
        f"Demo: {r['task']}, {r['eval_prompts']} held-out prompts",
        f"  {r['method']} {r['objective'].upper()}, {r['steps']} steps, trained in {r['train_seconds']:.0f} s "
        f"(total {r['total_seconds']:.0f} s)",
        "",
        "                 before    after",
        f"  exact match    {pct(b.get('exact'))}   {pct(a['exact'])}",
        f"  valid format   {pct(b.get('valid'))}   {pct(a['valid'])}",
    ]
    for ex in r["examples"]:
        lines += ["", f"  text:     {ex['prompt']}", f"  expected: {json.dumps(ex['expected'])}"]
        if r["before"]:
            lines.append(f"  before:   {ex['before']!r}")
        lines.append(f"  after:    {ex['after']!r}")
    lines += ["", f"  adapter: {r['adapter_dir']}"]
    return "\n".join(lines)
