"""``python -m finetune_studio.engine demo --loop``: the whole SFT -> sample -> label -> DPO loop on the demo task.

1. SFT on ``demo_sft.jsonl`` (as the plain demo); score the held-out prompts.
2. Sample ``--candidates`` answers per prompt from the SFT adapter for ``--prompts`` training prompts (never the
   held-out ones); every prompt and candidate goes into the preference store with its sampling settings.
3. Label every pair of candidates with the task's scorer standing in for a person: an exact answer beats a valid
   one, a valid one beats an invalid one; equal scores are ties (left out of DPO data).
4. DPO from the SFT adapter (the reference is the SFT model) on exactly those pairs (a store snapshot).
5. Score the held-out prompts after DPO.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from finetune_studio.core.protocol.demo_report import DemoLoopReport
from finetune_studio.engine.demo.task import (
    DEFAULTS,
    EVAL_FILE,
    MAX_NEW_TOKENS,
    SFT_FILE,
    _progress,
    _say,
    evaluate,
    read_jsonl,
    score_answer,
)

SOURCE = "demo-loop"


def label(answer: str, expected: dict) -> int:
    """The scorer as a person: 2 exact, 1 well-formed but wrong, 0 not the required JSON object."""
    valid, exact = score_answer(answer, expected)
    return 2 if exact else 1 if valid else 0


def decisions(scores: list[int]) -> list[tuple[int, int, str]]:
    """(i, j, decision) for every pair of candidates i < j: 'a' when i scores higher, 'b' when j does, else 'tie'."""
    return [
        (i, j, "a" if scores[i] > scores[j] else "b" if scores[j] > scores[i] else "tie")
        for i, j in itertools.combinations(range(len(scores)), 2)
    ]


def sample_candidates(
    model,
    tokenizer,
    prompts: list[str],
    k: int,
    *,
    seed: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[list[tuple[str, int]]]:
    """``k`` sampled answers (text, new tokens) per prompt: one ``generate`` per batch of prompts, k rows each."""
    import torch

    from finetune_studio.engine.datasets.render import render_text
    from finetune_studio.engine.datasets.schema import Message

    stop = [t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if isinstance(t, int)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    out: list[list[tuple[str, int]]] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = [
            tokenizer(
                render_text(tokenizer, (Message("user", p),), add_generation_prompt=True), add_special_tokens=False
            )["input_ids"]
            for p in chunk
        ]
        width = max(len(e) for e in enc)
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        torch.manual_seed(seed + start)
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                num_return_sequences=k,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop,
                pad_token_id=pad_id,
            )
        rows = gen[:, width:].tolist()
        for p in range(len(chunk)):
            answers = []
            for row in rows[p * k : (p + 1) * k]:
                cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                answers.append((tokenizer.decode(row[:cut], skip_special_tokens=True), cut))
            out.append(answers)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune_studio.engine demo --loop", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--sft-steps", type=int, default=DEFAULTS["sft"]["steps"])
    p.add_argument("--dpo-steps", type=int, default=12)
    p.add_argument("--dpo-learning-rate", type=float, default=2e-5, help="2e-4 and 1e-4 lowered the score (see README)")
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--prompts", type=int, default=48, help="training prompts to sample candidates for")
    p.add_argument("--candidates", type=int, default=4, help="candidates per prompt (2-4)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--eval-limit", type=int, default=0, help="score only the first N held-out prompts (0: all)")
    p.add_argument("--max-length", type=int, default=DEFAULTS["sft"]["max_length"], help="SFT; DPO gets 32 more")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip-before", action="store_true", help="do not score the base model (saves time)")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str]) -> int:
    from finetune_studio.engine.train.recipe import TrainingFailed

    try:
        return _loop(build_parser().parse_args(argv))
    except TrainingFailed as exc:
        _say(f"demo: training failed: {exc}")
        return 1


def _loop(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.core.store import Store
    from finetune_studio.engine.models import compute_dtype, load_causal_lm, load_tokenizer, pick_device, resolve_model
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    started = time.perf_counter()
    rows = read_jsonl(EVAL_FILE)[: args.eval_limit or None]
    held_out = {r["prompt"] for r in rows}
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(str(folder))
    device = pick_device()
    d = DEFAULTS["sft"]
    common = dict(model=args.model, seed=args.seed, validation_fraction=0.0, eval_every=0, checkpoint_every=0)
    sft = TrainConfig(
        dataset=str(SFT_FILE),
        run_name="demo loop: SFT",
        max_steps=args.sft_steps,
        learning_rate=d["learning_rate"],
        batch_size=d["batch_size"],
        max_length=args.max_length,
        lora_rank=d["lora_rank"],
        lora_alpha=float(2 * d["lora_rank"]),
        warmup_steps=max(1, args.sft_steps // 10),
        **common,
    )
    base = load_causal_lm(folder, dtype=compute_dtype("auto", device), device=device, quantize_4bit=False)
    before = None
    if not args.skip_before:
        _say(f"0/5 scoring {len(rows)} held-out prompts with the base model")
        before, _ = evaluate(base, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS)
    _say(f"1/5 SFT, {sft.max_steps} steps")
    sft_run = train_run(sft, reporter=Reporter(extra=_progress))
    tuned = PeftModel.from_pretrained(base, str(sft_run.adapter_dir))
    _say(f"   scoring {len(rows)} held-out prompts after SFT")
    after_sft, _ = evaluate(tuned, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS)

    train_rows = []
    for r in read_jsonl(SFT_FILE):
        prompt, answer = r["messages"][0]["content"], r["messages"][-1]["content"]
        if prompt not in held_out:
            train_rows.append((prompt, json.loads(answer)))
    train_rows = train_rows[: args.prompts]
    _say(f"2/5 sampling {args.candidates} candidates for {len(train_rows)} training prompts from the SFT adapter")
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": MAX_NEW_TOKENS}
    sampled = sample_candidates(
        tuned,
        tokenizer,
        [p for p, _ in train_rows],
        args.candidates,
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=MAX_NEW_TOKENS,
    )

    _say("3/5 labelling every pair of candidates with the task's scorer")
    store = Store()
    prefs = store.preferences
    counts = {"a": 0, "b": 0, "tie": 0}
    for (prompt, expected), answers in zip(train_rows, sampled, strict=True):
        pid = prefs.add_prompt(prompt, source=SOURCE)
        ids, scores = [], []
        for n, (text, tokens) in enumerate(answers):
            cid = prefs.add_candidate(
                pid,
                text,
                model=args.model,
                adapter=str(sft_run.adapter_dir),
                run_id=sft_run.run_id,
                seed=args.seed,
                sampling={**sampling, "sample": n},
                token_count=tokens,
                source=SOURCE,
            )
            if cid not in ids:  # the same answer sampled twice is one candidate
                ids.append(cid)
                scores.append(label(text, expected))
        for i, j, decision in decisions(scores):
            prefs.compare(ids[i], ids[j], decision, annotator="demo-scorer", source=SOURCE)
            counts[decision] += 1
    snap = prefs.snapshot(note="demo --loop", source=SOURCE)
    store.close()
    _say(f"   {snap.pairs} pairs ({counts['tie']} ties left out), snapshot {snap.id}")
    if not snap.pairs:
        _say("demo: every candidate scored the same; nothing to learn from (raise --temperature or --candidates)")
        return 1

    dpo = TrainConfig(
        dataset=f"pairs:{snap.id}",
        objective="dpo",
        init_adapter=sft_run.run_id,
        run_name="demo loop: DPO",
        max_steps=args.dpo_steps,
        learning_rate=args.dpo_learning_rate,
        dpo_beta=args.dpo_beta,
        batch_size=4,
        max_length=args.max_length + 32,
        warmup_steps=max(1, args.dpo_steps // 10),
        **common,
    )
    _say(f"4/5 DPO from the SFT adapter, {dpo.max_steps} steps, lr {dpo.learning_rate:g}, beta {dpo.dpo_beta:g}")
    dpo_run = train_run(dpo, reporter=Reporter(extra=_progress))
    tuned = PeftModel.from_pretrained(
        load_causal_lm(folder, dtype=compute_dtype("auto", device), device=device, quantize_4bit=False),
        str(dpo_run.adapter_dir),
    )
    _say("5/5 scoring the held-out prompts after DPO")
    after_dpo, _ = evaluate(tuned, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS)
    report = {
        "eval_prompts": len(rows),
        "before": before.to_dict() if before else None,
        "after_sft": after_sft.to_dict(),
        "after_dpo": after_dpo.to_dict(),
        "pairs": snap.pairs,
        "ties": counts["tie"],
        "snapshot": snap.id,
        "sft_run": sft_run.run_id,
        "dpo_run": dpo_run.run_id,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:  # one typed event (core.protocol.demo_report)
        print(DemoLoopReport.from_fields(report).to_json())
    else:
        print(
            f"\nDemo loop on {len(rows)} held-out prompts ({report['total_seconds']:.0f} s)\n"
            + (f"  base model: {before.exact:6.1%} exact, {before.valid:6.1%} valid\n" if before else "")
            + f"  after SFT:  {after_sft.exact:6.1%} exact, {after_sft.valid:6.1%} valid\n"
            f"  after DPO:  {after_dpo.exact:6.1%} exact, {after_dpo.valid:6.1%} valid "
            f"({snap.pairs} pairs from {len(train_rows)} prompts x {args.candidates} candidates)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
