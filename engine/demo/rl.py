"""``python -m finetune_studio.engine demo --rl``: SFT, then online RL (GRPO) with the task's verifier as reward.

1. SFT on ``demo_sft.jsonl`` as the plain demo and the loop (or ``--sft-run``: an earlier run's adapter); score
   the held-out prompts.
2. The loop's DPO from the SFT adapter (``engine.demo.loop``: candidates sampled for training prompts, every pair
   labelled by the task's scorer, DPO on those pairs; or ``--dpo-run``: an earlier run's adapter, or
   ``--no-dpo``; left out too when every candidate scores the same, so there are no pairs); score the held-out
   prompts.
3. GRPO from the SFT adapter (the SFT model is the KL's reference) on the training prompts: G answers sampled per
   prompt, each scored by the task's verifier (:data:`REWARDS`: 1 when the answer is exactly the expected object,
   else 0: ``json_fields`` in ``core.rewards``; the share of fields right is watched, not trained on), advantages
   against the group's; score the held-out prompts.

The held-out prompts are never trained on. ``--json`` prints one typed event (``core.protocol.demo_report``:
:class:`DemoRLReport`) with the scores, each stage's time and GRPO's curves (mean reward, its spread in a group,
KL, answer length, clipped fraction, per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune_studio.core.protocol.demo_report import DemoRLReport
from finetune_studio.engine.demo.task import (
    DEFAULTS,
    EVAL_FILE,
    MAX_NEW_TOKENS,
    SFT_FILE,
    Score,
    _progress,
    _say,
    evaluate,
    read_jsonl,
)

# The task's verifier as rewards (core.rewards): ``answer`` is the reference answer's column GRPO gives the rewards
# (the SFT row's assistant turn: the expected JSON object). The reward is the held-out score's own test, 1 for an
# answer exactly right and 0 otherwise; the share of fields right is reported (``reward/fields``) with weight 0.
# Partial credit is left out of the reward: the SFT model's commonest error is a job made up where the text gives none,
# which keeps 3 of 4 fields right, so in a group with no exact answer it rewarded the made-up jobs.
REWARDS: list[dict[str, Any]] = [
    {"kind": "json_fields", "column": "answer", "partial": False, "name": "exact"},
    {"kind": "json_fields", "column": "answer", "name": "fields", "weight": 0.0},
]
CURVE_KEYS = ("reward", "reward_std", "kl", "completion_length", "clip_fraction")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune_studio.engine demo --rl", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-limit", type=int, default=0, help="score only the first N held-out prompts (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="when scoring (greedy)")
    p.add_argument("--skip-before", action="store_true", help="do not score the base model (saves time)")
    p.add_argument("--json", action="store_true", help="print one JSON object (a demo_rl_report event)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads for training and scoring (0: the engine's choice)"
    )
    g = p.add_argument_group("SFT")
    g.add_argument("--sft-steps", type=int, default=DEFAULTS["sft"]["steps"])
    g.add_argument("--max-length", type=int, default=DEFAULTS["sft"]["max_length"])
    g.add_argument("--sft-run", help="start from this run's adapter (a run id or an adapter folder) instead of SFT")
    g = p.add_argument_group("the loop's DPO (engine.demo.loop's defaults)")
    g.add_argument("--no-dpo", action="store_true", help="leave the DPO stage out")
    g.add_argument("--dpo-run", help="score this run's adapter (a run id or a folder) instead of running DPO")
    g.add_argument("--dpo-steps", type=int, default=12)
    g.add_argument("--dpo-learning-rate", type=float, default=2e-5)
    g.add_argument("--dpo-prompts", type=int, default=48)
    g = p.add_argument_group("GRPO")
    g.add_argument("--grpo-steps", type=int, default=10, help="optimizer steps")
    g.add_argument("--grpo-prompts", type=int, default=4, help="prompts per batch of answers")
    g.add_argument(
        "--grpo-accumulation",
        type=int,
        default=4,
        help="batches of prompts per optimizer step (gradient_accumulation_steps): more prompts a step in the memory "
        "of one batch",
    )
    g.add_argument("--group-size", type=int, default=8, help="answers sampled per prompt (G)")
    g.add_argument("--grpo-learning-rate", type=float, default=1e-5)
    g.add_argument("--grpo-beta", type=float, default=0.04, help="KL weight to the SFT model")
    g.add_argument("--grpo-epsilon", type=float, default=0.2)
    g.add_argument("--grpo-temperature", type=float, default=0.7)
    g.add_argument("--grpo-loss", choices=("sequence", "token", "dr_grpo"), default="token")
    g.add_argument("--grpo-updates", type=int, default=1, help="optimizer steps per batch of answers (mu)")
    g.add_argument("--grpo-max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    g.add_argument(
        "--grpo-validation",
        type=int,
        default=32,
        help="training prompts held out of GRPO to choose its best step by their greedy answers' reward (never the "
        "held-out test prompts; 0: none, the last step's adapter is scored)",
    )
    g.add_argument("--grpo-eval-every", type=int, default=2, help="steps between those evaluations")
    g.add_argument("--grpo-run", help="score this GRPO run's adapter (a run id) instead of training one")
    return p


def main(argv: list[str]) -> int:
    from finetune_studio.core.config import ConfigError
    from finetune_studio.engine.train.recipe import TrainingFailed

    try:
        return _rl(build_parser().parse_args(argv))
    except ConfigError as exc:
        _say(f"demo: {exc}")
        return 2
    except TrainingFailed as exc:
        _say(f"demo: training failed: {exc}")
        return 1


def _adapter(ref: str) -> tuple[str, Path]:
    """(run id or '', adapter folder) of an earlier run's adapter (``engine.train.init_adapter``'s references)."""
    from finetune_studio.core.store import Store
    from finetune_studio.engine.train import init_adapter

    store = Store()
    try:
        start = init_adapter.resolve(ref, store)
    finally:
        store.close()
    return start.parent_run_id, start.path


def _configs(args: argparse.Namespace, prompts: Path, training_prompts: int = 0) -> tuple[Any, Any]:
    """The SFT and GRPO runs' configs (GRPO's ``init_adapter`` is filled in once SFT is done), checked before any
    work: a bad setting is refused at once, naming the field."""
    from finetune_studio.core.config import TrainConfig

    common: dict[str, Any] = dict(
        model=args.model,
        seed=args.seed,
        validation_fraction=0.0,
        eval_every=0,
        checkpoint_every=0,
        num_threads=args.threads,
    )
    d = DEFAULTS["sft"]
    sft = TrainConfig(
        dataset=str(SFT_FILE),
        run_name="demo rl: SFT",
        max_steps=args.sft_steps,
        learning_rate=d["learning_rate"],
        batch_size=d["batch_size"],
        max_length=args.max_length,
        lora_rank=d["lora_rank"],
        lora_alpha=float(2 * d["lora_rank"]),
        warmup_steps=max(1, args.sft_steps // 10),
        **common,
    )
    grpo = TrainConfig(
        dataset=str(prompts),
        objective="grpo",
        run_name="demo rl: GRPO",
        rewards=REWARDS,
        max_steps=args.grpo_steps,
        batch_size=args.grpo_prompts,
        gradient_accumulation_steps=args.grpo_accumulation,
        learning_rate=args.grpo_learning_rate,
        warmup_steps=max(1, args.grpo_steps // 10),
        max_length=args.max_length + args.grpo_max_new_tokens,
        grpo_group_size=args.group_size,
        grpo_max_new_tokens=args.grpo_max_new_tokens,
        grpo_temperature=args.grpo_temperature,
        grpo_beta=args.grpo_beta,
        grpo_epsilon=args.grpo_epsilon,
        grpo_loss=args.grpo_loss,
        grpo_updates_per_batch=args.grpo_updates,
        **{
            **common,
            # a validation split of the training prompts: each evaluation scores the greedy answers to it with the
            # rewards; the best step's adapter (early stopping's best/, never stopping) is the one scored
            **(
                dict(
                    validation_fraction=args.grpo_validation / max(training_prompts, 1),
                    eval_every=args.grpo_eval_every,
                    early_stopping_patience=args.grpo_steps,
                    max_eval_examples=args.grpo_validation,
                )
                if 0 < args.grpo_validation < training_prompts  # (0 training prompts: not counted, none held out)
                else {}
            ),
        },
    )
    return sft, grpo


def _rl(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="demo-rl-") as tmp:
        prompts = Path(tmp) / "grpo_prompts.jsonl"  # GRPO's training prompts (never the held-out ones)
        held_out = {r["prompt"] for r in read_jsonl(EVAL_FILE)}
        train = [r for r in read_jsonl(SFT_FILE) if r["messages"][0]["content"] not in held_out]
        prompts.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
        return _stages(args, *_configs(args, prompts, len({r["messages"][0]["content"] for r in train})))


def _stages(args: argparse.Namespace, sft: Any, grpo: Any) -> int:
    from finetune_studio.engine.models import compute_dtype, load_causal_lm, load_tokenizer, pick_device, resolve_model
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter
    from finetune_studio.engine.train.threads import apply_threads

    started = time.perf_counter()
    # Scoring runs with the threads training gets: torch's default (every core) crawls on a busy machine, where
    # its threads wait on each other at every op.
    apply_threads(args.threads)
    rows = read_jsonl(EVAL_FILE)[: args.eval_limit or None]
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(str(folder))
    device = pick_device()
    seconds: dict[str, float] = {}

    def base_model() -> Any:
        return load_causal_lm(folder, dtype=compute_dtype("auto", device), device=device, quantize_4bit=False)

    def score(stage: str, adapter: Path | None) -> Score:
        from peft import PeftModel

        t0 = time.perf_counter()
        model = base_model()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter))
        result, _ = evaluate(model, tokenizer, rows, max_new_tokens=args.max_new_tokens)
        seconds[f"score_{stage}"] = round(time.perf_counter() - t0, 1)
        _say(f"   {stage}: {result.exact:.1%} exact, {result.valid:.1%} valid on {result.n} held-out prompts")
        return result

    before = None
    if not args.skip_before:
        _say(f"0/3 scoring {len(rows)} held-out prompts with the base model")
        before = score("base", None)

    # 1. SFT -----------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if args.sft_run:
        sft_id, sft_adapter = _adapter(args.sft_run)
        _say(f"1/3 SFT: the adapter of {args.sft_run} ({sft_adapter})")
    else:
        _say(f"1/3 SFT, {sft.max_steps} steps")
        run = train_run(sft, reporter=Reporter(extra=_progress))
        if run.adapter_dir is None:
            _say(f"demo: the SFT run ended as {run.status}: {run.message}")
            return 1
        sft_id, sft_adapter = run.run_id, Path(run.adapter_dir)
    seconds["sft"] = round(time.perf_counter() - t0, 1)
    after_sft = score("after SFT", sft_adapter)
    init = sft_id or str(sft_adapter)

    # 2. the loop's DPO ------------------------------------------------------------------------------------------
    after_dpo, dpo_id, pairs = None, "", 0
    if args.dpo_run:
        dpo_id, dpo_adapter = _adapter(args.dpo_run)
        _say(f"2/3 DPO: the adapter of {args.dpo_run} ({dpo_adapter})")
        after_dpo = score("after DPO", dpo_adapter)
    elif not args.no_dpo:
        t0 = time.perf_counter()
        dpo = _loop_dpo(args, init, sft_adapter, base_model, tokenizer)
        seconds["dpo"] = round(time.perf_counter() - t0, 1)
        if dpo is not None:
            dpo_id, dpo_adapter, pairs = dpo
            after_dpo = score("after DPO", dpo_adapter)

    # 3. GRPO ----------------------------------------------------------------------------------------------------
    curves: dict[str, list[float]] = {}
    best_step = 0

    def on_event(event: Any) -> None:
        _progress(event)
        if getattr(event, "type", "") == "eval" and "eval_reward" in event.metrics:
            curves.setdefault("eval_step", []).append(float(event.step))
            curves.setdefault("eval_reward", []).append(round(float(event.metrics["eval_reward"]), 5))
            _say(f"        step {event.step}: validation reward {event.metrics['eval_reward']:.3f}")
        if getattr(event, "type", "") == "step":
            figures = {"loss": event.loss, **event.metrics}
            for key, value in figures.items():
                curves.setdefault(key, []).append(round(float(value), 5))
            shown = "  ".join(f"{k} {figures[k]:.3f}" for k in CURVE_KEYS if k in figures)
            _say(f"        {shown}")

    if args.grpo_run:
        grpo_id, grpo_adapter = _adapter(args.grpo_run)
        _say(f"3/3 GRPO: the adapter of {args.grpo_run} ({grpo_adapter}); its curves from the store")
        curves.update(_stored_curves(grpo_id))
    else:
        grpo = dataclasses.replace(grpo, init_adapter=init)
        _say(
            f"3/3 GRPO from the SFT adapter: {grpo.max_steps} steps x {grpo.batch_size} prompts x G "
            f"{grpo.grpo_group_size}, lr {grpo.learning_rate:g}, beta {grpo.grpo_beta:g}, temperature "
            f"{grpo.grpo_temperature:g}, loss {grpo.grpo_loss}"
        )
        t0 = time.perf_counter()
        grpo_run = train_run(grpo, reporter=Reporter(extra=on_event))
        seconds["grpo"] = round(time.perf_counter() - t0, 1)
        if grpo_run.adapter_dir is None:
            _say(f"demo: the GRPO run ended as {grpo_run.status}: {grpo_run.message}")
            return 1
        grpo_id, grpo_adapter = grpo_run.run_id, Path(grpo_run.adapter_dir)
        best = Path(grpo_run.run_dir) / "best"
        if grpo.early_stopping_patience and best.is_dir():  # the step with the highest validation reward
            best_step = int(json.loads((best / "trainer_state.json").read_text(encoding="utf-8"))["step"])
            _say(f"   GRPO's best step by the validation reward: {best_step} of {grpo_run.step}")
            grpo_adapter = best
    after_grpo = score("after GRPO", grpo_adapter)

    report = {
        "eval_prompts": len(rows),
        "before": before.to_dict() if before else None,
        "after_sft": after_sft.to_dict(),
        "after_dpo": after_dpo.to_dict() if after_dpo else None,
        "after_grpo": after_grpo.to_dict(),
        "sft_run": sft_id,
        "dpo_run": dpo_id,
        "grpo_run": grpo_id,
        "pairs": pairs,
        "grpo_best_step": best_step,
        "curves": curves,
        "seconds": seconds,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:  # one typed event (core.protocol.demo_report)
        print(DemoRLReport.from_fields(report).to_json())
    else:
        print(_summary(report))
    return 0


def _stored_curves(run_id: str) -> dict[str, list[float]]:
    """An earlier run's figures per step as the store keeps them (its loss and the objective's named figures)."""
    from finetune_studio.core.store import Store

    store = Store()
    try:
        losses = {m.step: m.loss for m in store.metrics(run_id) if m.loss is not None}
        named = store.named_metrics(run_id)
    finally:
        store.close()
    curves: dict[str, list[float]] = {}
    for step in sorted(set(losses) | set(named)):
        for key, value in {"loss": losses.get(step, 0.0), **named.get(step, {})}.items():
            curves.setdefault(key, []).append(round(float(value), 5))
    return curves


def _loop_dpo(
    args: argparse.Namespace, init: str, sft_adapter: Path, base_model: Any, tokenizer: Any
) -> tuple[str, Path, int] | None:
    """The loop's stages 2-4 (``engine.demo.loop``) from the SFT adapter: (DPO run id, its adapter, pairs)."""
    from peft import PeftModel

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.core.store import Store
    from finetune_studio.engine.demo.loop import SOURCE, decisions, label, sample_candidates
    from finetune_studio.engine.train.recipe import TrainingFailed, train_run
    from finetune_studio.engine.train.reporting import Reporter

    held_out = {r["prompt"] for r in read_jsonl(EVAL_FILE)}
    train_rows = []
    for r in read_jsonl(SFT_FILE):
        prompt, answer = r["messages"][0]["content"], r["messages"][-1]["content"]
        if prompt not in held_out:
            train_rows.append((prompt, json.loads(answer)))
    train_rows = train_rows[: args.dpo_prompts]
    candidates, temperature, top_p = 4, 1.0, 0.95  # the loop's defaults
    _say(f"2/3 the loop's DPO: {candidates} candidates for {len(train_rows)} training prompts, labelled by the scorer")
    tuned = PeftModel.from_pretrained(base_model(), str(sft_adapter))
    sampled = sample_candidates(
        tuned,
        tokenizer,
        [p for p, _ in train_rows],
        candidates,
        seed=args.seed,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": MAX_NEW_TOKENS}
    store = Store()
    try:
        prefs = store.preferences
        for (prompt, expected), answers in zip(train_rows, sampled, strict=True):
            pid = prefs.add_prompt(prompt, source=SOURCE)
            ids: list[Any] = []
            scores: list[int] = []
            for n, (text, tokens) in enumerate(answers):
                cid = prefs.add_candidate(
                    pid,
                    text,
                    model=args.model,
                    adapter=str(sft_adapter),
                    run_id=init,
                    seed=args.seed,
                    sampling={**sampling, "sample": n},
                    token_count=tokens,
                    source=SOURCE,
                )
                if cid not in ids:
                    ids.append(cid)
                    scores.append(label(text, expected))
            for i, j, decision in decisions(scores):
                prefs.compare(ids[i], ids[j], decision, annotator="demo-scorer", source=SOURCE)
        snap = prefs.snapshot(note="demo --rl", source=SOURCE)
    finally:
        store.close()
    if not snap.pairs:
        _say("   every candidate scored the same: no pairs, so no DPO (the loop needs candidates that differ)")
        return None
    dpo = TrainConfig(
        dataset=f"pairs:{snap.id}",
        objective="dpo",
        init_adapter=init,
        run_name="demo rl: DPO",
        max_steps=args.dpo_steps,
        learning_rate=args.dpo_learning_rate,
        dpo_beta=0.1,
        batch_size=4,
        max_length=args.max_length + 32,
        warmup_steps=max(1, args.dpo_steps // 10),
        model=args.model,
        seed=args.seed,
        validation_fraction=0.0,
        eval_every=0,
        checkpoint_every=0,
        num_threads=args.threads,
    )
    _say(f"   DPO from the SFT adapter on {snap.pairs} pairs, {dpo.max_steps} steps, lr {dpo.learning_rate:g}")
    run = train_run(dpo, reporter=Reporter(extra=_progress))
    if run.adapter_dir is None:
        raise TrainingFailed(dataclasses.replace(run, message=f"the DPO run ended as {run.status}: {run.message}"))
    return run.run_id, Path(run.adapter_dir), snap.pairs


def _summary(r: dict[str, Any]) -> str:
    def line(name: str, s: dict[str, Any] | None) -> str:
        return f"  {name:<11} {s['exact']:6.1%} exact, {s['valid']:6.1%} valid\n" if s else ""

    c, st = r["curves"], r["settings"]
    rewards = c.get("reward", [])
    curve = ""
    if rewards:
        k = max(1, len(rewards) // 10)
        curve = "  mean reward by step: " + " ".join(f"{x:.2f}" for x in rewards[::k]) + f" (every {k})\n"
    valid = ""
    if c.get("eval_reward"):
        pairs = zip(c["eval_step"], c["eval_reward"], strict=True)
        valid = "  validation reward by step: " + " ".join(f"{int(s)}: {x:.2f}" for s, x in pairs) + "\n"
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items())
    per_step = st["grpo_prompts"] * st.get("grpo_accumulation", 1)  # reports from before the setting have none
    return (
        f"\nDemo RL on {r['eval_prompts']} held-out prompts ({r['total_seconds']:.0f} s: {secs})\n"
        + line("base model", r["before"])
        + line("after SFT", r["after_sft"])
        + line("after DPO", r["after_dpo"])
        + line("after GRPO", r["after_grpo"])
        + f"  GRPO: {st['grpo_steps']} steps x {per_step} prompts x G {st['group_size']}, lr "
        f"{st['grpo_learning_rate']:g}, beta {st['grpo_beta']:g}, temperature {st['grpo_temperature']:g}"
        + (f"; scored at step {r['grpo_best_step']} (the best validation reward)" if r.get("grpo_best_step") else "")
        + "\n"
        + curve
        + valid
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
