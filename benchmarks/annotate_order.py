"""Labelling order on the demo task: how many labelled pairs DPO needs with the queue ordered "least sure first"
against a random queue, the task's scorer standing in for the person.

    python benchmarks/annotate_order.py [--model default] [--sft-steps 20] [--prompts 48] [--candidates 4]
                                        [--sizes 8 16 32] [--dpo-steps 12] [--eval-limit 24] [--random-seeds 1]
                                        [--home DIR] [--sft-run RUN] [--resume] [--ignore-memory-check]

The loop of ``finetune-engine demo --loop`` (``engine/demo/loop.py``), with the labelling in an order:

1. SFT on the demo data (or ``--sft-run``, a run in ``--home``); score the held-out prompts.
2. Sample ``--candidates`` answers per training prompt from the SFT adapter (the loop's sampling); every pair of
   different answers to a prompt is a pair to label, and the task's scorer labels it as the loop does (an exact
   answer beats a valid one beats an invalid one; equal scores are ties, which give no DPO pair).
3. The model's prediction for every pair: the implicit reward of the SFT adapter against its base,
   beta * sum over the answer's tokens of log pi_sft - log pi_base (the ``implicit_dpo`` scorer of the generation
   worker; beta = the loop's DPO beta), margin = r(first) - r(second).
4. The queue in each order (``core.label_queue.order``, the app's own): ``least_sure`` (smallest |margin| first) and
   ``random`` (``--random-seeds`` shuffles). For each size n in ``--sizes`` and all pairs: the first n pairs of
   the queue are labelled; DPO from the SFT adapter (the loop's settings) on their non-tie pairs; the held-out exact
   match. The x axis counts labelled pairs, ties included: a tie costs the person as much time as a pick.
5. Prints both curves, the pairs each order needs to reach the score of DPO on all pairs (the loop's DPO score in
   this run), the time and the load average (a shared machine measures its neighbours too).

Everything is written under a data home of its own (``--home``, default a new temporary folder, kept: its path is
printed; ``--home DIR --sft-run RUN`` reuses its SFT run, ``--home DIR --resume`` continues a run that stopped, from
the pairs, predictions and finished cells it kept in ``annotate-order.json``). On a quiet 2-core CPU the defaults
should take about half an hour (an estimate: SFT took 2 minutes at load 3; at load 10-15, below, sampling took 13
minutes and each cell 6-7).

Measured 2026-12-07 on the shared 2-core CPU (load average 10-15: other work ran; about 7 min per cell, 1 h 30 in
all), the bundled SmolLM2-135M-Instruct, the defaults with ``--random-seeds 2``: 140 pairs to label from 48 prompts x 4
answers, 64 of them ties; after SFT 66.7% exact (24 held-out prompts; one prompt is 4.2 points). Held-out exact match
after DPO on the first n labelled pairs (DPO pairs among them in brackets):

    order                              8            16            32     all 140
    least sure first            83.3% (7)    50.0% (10)    75.0% (19)    79.2% (76)
    random, shuffle 1           83.3% (5)    83.3% (9)     83.3% (18)    79.2% (76)
    random, shuffle 2           75.0% (5)    75.0% (8)     not run       79.2% (76)

The run stopped at shuffle 2's 16 pairs (the engine's memory check refused DPO: 2.2 GiB free on the busy machine);
that cell was measured afterwards on the same DPO data (``--resume`` with ``--ignore-memory-check``), 32 was not.
Both orders reach the all-pairs score (79.2%; the loop's README figure is 83.3% on 43 pairs) with 8 labelled
pairs; no advantage of the ordered queue shows at this resolution, and DPO on 7-19 pairs moves by up to 33 points
between neighbouring sizes. What the order did change: fewer labels went to ties (7 of the first 8 labels made a DPO
pair, against 5 for both shuffles). Details in ``benchmarks/RESULTS.md`` ("Labelling order").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}, load {load_avg()}] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Pair:
    prompt: str
    first: str
    second: str
    decision: str  # 'a': first better, 'b': second better, 'tie'
    key: str  # stable name (for the random order)

    def dpo_row(self) -> dict[str, str] | None:
        if self.decision == "tie":
            return None
        chosen, rejected = (self.first, self.second) if self.decision == "a" else (self.second, self.first)
        return {"prompt": self.prompt, "chosen": chosen, "rejected": rejected}


def answer_logps(model, tokenizer, prompt: str, answers: list[str], batch_size: int = 8) -> list[float]:
    """Sum of the log-probs of each answer's tokens (its end-of-turn included) after the chat-rendered prompt."""
    import torch

    from finetune_studio.engine.datasets.render import render_text
    from finetune_studio.engine.datasets.schema import Message

    head = tokenizer(
        render_text(tokenizer, (Message("user", prompt),), add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    rows = []
    for answer in answers:
        full = render_text(tokenizer, (Message("user", prompt), Message("assistant", answer)))
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if ids[: len(head)] != head:
            raise SystemExit("the chat template does not render the prompt as a prefix of the conversation")
        rows.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        for i, r in enumerate(chunk):
            out.append(float(logps[i, len(head) - 1 : len(r) - 1].sum()))
    return out


def implicit_rewards(tuned, tokenizer, prompt: str, answers: list[str], beta: float) -> list[float]:
    """beta * (log pi_adapter - log pi_base) of each answer (the adapter switched off for the base)."""
    policy = answer_logps(tuned, tokenizer, prompt, answers)
    with tuned.disable_adapter():
        reference = answer_logps(tuned, tokenizer, prompt, answers)
    return [beta * (p - r) for p, r in zip(policy, reference, strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--sft-run", default="", help="an SFT run already in --home (skips step 1's training)")
    p.add_argument("--prompts", type=int, default=48, help="training prompts to sample answers for")
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32], help="labelled pairs (all pairs are added)")
    p.add_argument("--dpo-steps", type=int, default=12)
    p.add_argument("--dpo-learning-rate", type=float, default=2e-5)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--eval-limit", type=int, default=24, help="held-out prompts scored (0: all 64)")
    p.add_argument("--random-seeds", type=int, default=1, help="random queues (each its own shuffle)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--home", default="", help="data home (default: a new temporary folder)")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--resume", action="store_true", help="continue the run kept in --home (annotate-order.json)")
    p.add_argument("--ignore-memory-check", action="store_true", help="start DPO runs whatever memory is free")
    args = p.parse_args(argv)

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="annotate-order-"))
    os.environ["FINETUNE_STUDIO_HOME"] = str(home)  # before the store is opened: the runs go there
    started = time.perf_counter()
    say(f"data home {home}")

    import torch
    from peft import PeftModel

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.core.label_queue import order
    from finetune_studio.core.store import Store
    from finetune_studio.engine.demo.loop import decisions, label, sample_candidates
    from finetune_studio.engine.demo.task import DEFAULTS, EVAL_FILE, MAX_NEW_TOKENS, SFT_FILE, evaluate, read_jsonl
    from finetune_studio.engine.models import compute_dtype, load_causal_lm, load_tokenizer, pick_device, resolve_model
    from finetune_studio.engine.train.recipe import TrainingFailed, train_run

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_jsonl(EVAL_FILE)[: args.eval_limit or None]
    held_out = {r["prompt"] for r in rows}
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(str(folder))
    device = pick_device()
    d = DEFAULTS["sft"]
    common = dict(model=args.model, seed=args.seed, validation_fraction=0.0, eval_every=0, checkpoint_every=0)

    def fresh_base():
        return load_causal_lm(folder, dtype=compute_dtype("auto", device), device=device, quantize_4bit=False)

    kept = home / "annotate-order.json"  # what --resume continues from (written as the run goes)
    saved: dict = json.loads(kept.read_text(encoding="utf-8")) if args.resume and kept.exists() else {}
    if args.resume and not saved:
        raise SystemExit(f"nothing to resume in {home} (no annotate-order.json)")

    def save() -> None:
        tmp = kept.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved) + "\n", encoding="utf-8")
        os.replace(tmp, kept)

    def step_1_to_3() -> tuple[str, dict, list[Pair], list[float | None], int]:
        """SFT, the answers sampled and labelled, and their predicted margins (kept for --resume)."""
        # 1. SFT
        if args.sft_run:
            store = Store()
            run = store.find_run(args.sft_run)
            store.close()
            if run is None:
                raise SystemExit(f"no run {args.sft_run!r} in {home}")
            sft_id, sft_adapter = run.id, Path(run.adapter_dir or Path(run.run_dir) / "adapter")
            say(f"1/5 SFT run {sft_id} reused")
        else:
            say(f"1/5 SFT, {args.sft_steps} steps")
            sft = TrainConfig(
                dataset=str(SFT_FILE),
                run_name="annotate order: SFT",
                max_steps=args.sft_steps,
                learning_rate=d["learning_rate"],
                batch_size=d["batch_size"],
                max_length=d["max_length"],
                lora_rank=d["lora_rank"],
                lora_alpha=float(2 * d["lora_rank"]),
                warmup_steps=max(1, args.sft_steps // 10),
                **common,
            )
            result = train_run(sft)
            sft_id, sft_adapter = result.run_id, result.adapter_dir
        tuned = PeftModel.from_pretrained(fresh_base(), str(sft_adapter))
        say(f"   scoring {len(rows)} held-out prompts after SFT")
        after_sft, _ = evaluate(tuned, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS)

        # 2. candidates, labelled by the task's scorer
        train_rows = []
        for r in read_jsonl(SFT_FILE):
            prompt, answer = r["messages"][0]["content"], r["messages"][-1]["content"]
            if prompt not in held_out:
                train_rows.append((prompt, json.loads(answer)))
        train_rows = train_rows[: args.prompts]
        say(f"2/5 sampling {args.candidates} answers for {len(train_rows)} training prompts from the SFT adapter")
        sampled = sample_candidates(
            tuned,
            tokenizer,
            [q for q, _ in train_rows],
            args.candidates,
            seed=args.seed,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=MAX_NEW_TOKENS,
        )

        # 3. the SFT adapter's implicit reward of every answer
        say("3/5 the SFT adapter's implicit reward of every answer, and the task's scorer's labels")
        pairs: list[Pair] = []
        margins: list[float | None] = []
        for (prompt, expected), answers in zip(train_rows, sampled, strict=True):
            texts = list(dict.fromkeys(text for text, _ in answers))  # the same answer twice is one candidate
            if len(texts) < 2:
                continue
            rewards = implicit_rewards(tuned, tokenizer, prompt, texts, args.dpo_beta)
            scores = [label(t, expected) for t in texts]
            for i, j, decision in decisions(scores):
                pairs.append(Pair(prompt, texts[i], texts[j], decision, f"{len(pairs)}|{prompt}|{texts[i]}|{texts[j]}"))
                margins.append(rewards[i] - rewards[j])
        del tuned
        sft_score = {"exact": after_sft.exact, "valid": after_sft.valid}
        saved.update(
            sft_run=sft_id,
            after_sft=sft_score,
            train_prompts=len(train_rows),
            candidates=args.candidates,
            pairs=[asdict(pr) for pr in pairs],
            margins=margins,
            results={},
        )
        save()
        return sft_id, sft_score, pairs, margins, len(train_rows)

    if saved:
        sft_id, after_sft, pairs = saved["sft_run"], saved["after_sft"], [Pair(**pr) for pr in saved["pairs"]]
        margins: list[float | None] = saved["margins"]
        n_prompts = saved["train_prompts"]
        args.candidates = saved.get("candidates", args.candidates)
        say(f"1-3/5 resumed: SFT run {sft_id}, {len(pairs)} pairs, {len(saved['results'])} cells done")
    else:
        sft_id, after_sft, pairs, margins, n_prompts = step_1_to_3()
    ties = sum(pr.decision == "tie" for pr in pairs)
    say(f"   {len(pairs)} pairs to label ({ties} of them ties)")
    if not pairs:
        raise SystemExit("every prompt's answers were the same: raise --temperature or --candidates")

    # 4. DPO on the first n pairs of each queue
    queues: dict[str, list[int]] = {"least_sure": order("least_sure", margins)}
    keys = [pr.key for pr in pairs]
    for s in range(args.random_seeds):
        queues[f"random{'' if args.random_seeds == 1 else f' #{s + 1}'}"] = order("random", margins, keys, seed=s)
    sizes = sorted({n for n in args.sizes if 0 < n < len(pairs)} | {len(pairs)})
    results: dict[tuple[str, int], dict] = {}
    cache: dict[frozenset[int], dict] = {}
    data_dir = home / "order-data"
    data_dir.mkdir(exist_ok=True)
    for name, queue in queues.items():
        for n in sizes:
            chosen = frozenset(queue[:n])
            if chosen in cache:  # all pairs: the same set for every order
                results[(name, n)] = cache[chosen]
                continue
            if f"{name}|{n}" in saved["results"]:  # finished before a --resume
                results[(name, n)] = cache[chosen] = saved["results"][f"{name}|{n}"]
                continue
            dpo_rows = [row for i in sorted(chosen) if (row := pairs[i].dpo_row()) is not None]
            t0 = time.perf_counter()
            if not dpo_rows:
                score = after_sft
                say(f"4/5 {name}, {n} labelled: only ties, no DPO pair (the SFT score)")
            else:
                path = data_dir / f"{name.replace(' ', '').replace('#', 's')}-{n}.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in dpo_rows), encoding="utf-8")
                say(f"4/5 {name}, {n} labelled: DPO on {len(dpo_rows)} pairs, {args.dpo_steps} steps")
                dpo = TrainConfig(
                    dataset=str(path),
                    objective="dpo",
                    init_adapter=sft_id,
                    run_name=f"annotate order: {name} {n}",
                    max_steps=args.dpo_steps,
                    learning_rate=args.dpo_learning_rate,
                    dpo_beta=args.dpo_beta,
                    batch_size=4,
                    max_length=d["max_length"] + 32,
                    warmup_steps=max(1, args.dpo_steps // 10),
                    ignore_memory_check=args.ignore_memory_check,
                    **common,
                )
                try:
                    run = train_run(dpo)
                except TrainingFailed as exc:  # e.g. refused for memory on a busy machine: the other cells go on
                    say(f"   {name}, {n} labelled: DPO failed: {exc}")
                    results[(name, n)] = {"labelled": n, "dpo_pairs": len(dpo_rows), "failed": str(exc)}
                    continue
                model = PeftModel.from_pretrained(fresh_base(), str(run.adapter_dir))
                tuned_score, _ = evaluate(model, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS)
                del model
                score = {"exact": tuned_score.exact, "valid": tuned_score.valid}
            entry = {
                "labelled": n,
                "dpo_pairs": len(dpo_rows),
                "exact": score["exact"],
                "valid": score["valid"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
            say(f"   {name}, {n} labelled ({len(dpo_rows)} DPO pairs): {entry['exact']:.1%} exact")
            results[(name, n)] = cache[chosen] = entry
            saved["results"][f"{name}|{n}"] = entry
            save()

    # 5. the curves (a failed cell reads "failed"; the orders' curves skip it)
    def exact(e: dict) -> float | None:
        return e.get("exact")

    def cell(e: dict) -> str:
        return f"{e['exact']:>8.1%} ({e['dpo_pairs']:>3})" if "exact" in e else f"{'failed':>14}"

    target = exact(results[(next(iter(queues)), len(pairs))])
    lines = [
        f"Labelling order on the demo task: {len(pairs)} pairs to label ({ties} ties) from {n_prompts} prompts x "
        f"{args.candidates} answers; DPO {args.dpo_steps} steps, lr {args.dpo_learning_rate:g}, "
        f"beta {args.dpo_beta:g}; {len(rows)} held-out prompts; after SFT "
        + (f"{after_sft['exact']:.1%} exact" if after_sft.get("exact") is not None else "not scored"),
        "held-out exact match (DPO pairs among the labelled) by labelled pairs:",
        f"{'order':<14}" + "".join(f"{n:>14}" for n in sizes) + f"{'to reach all':>14}",
    ]
    summary: dict[str, dict] = {}

    def reached(points: list[tuple[int, float | None]]) -> int | None:
        if target is None:
            return None
        return next((n for n, e in points if e is not None and e >= target - 1e-9), None)

    for name in queues:
        curve = [results[(name, n)] for n in sizes]
        reach = reached([(n, exact(e)) for n, e in zip(sizes, curve, strict=True)])
        summary[name] = {"curve": curve, "pairs_to_reach_all": reach}
        lines.append(f"{name:<14}{''.join(cell(e) for e in curve)}{(str(reach) if reach else '-'):>14}")
    shuffles = [name for name in queues if name.startswith("random")]
    if len(shuffles) > 1:  # the random queues' mean curve (over the cells that finished)
        mean: list[float | None] = []
        for n in sizes:
            done = [x for name in shuffles if (x := exact(results[(name, n)])) is not None]
            mean.append(sum(done) / len(done) if done else None)
        reach = reached(list(zip(sizes, mean, strict=True)))
        summary["random (mean)"] = {"curve": mean, "pairs_to_reach_all": reach}
        cells = "".join(f"{e:>8.1%}      " if e is not None else f"{'failed':>14}" for e in mean)
        lines.append(f"{'random (mean)':<14}{cells}{(str(reach) if reach else '-'):>14}")
    total = time.perf_counter() - started
    lines.append(
        f"target (DPO on all {len(pairs)} labelled pairs): "
        + (f"{target:.1%} exact" if target is not None else "failed")
        + f"; {total / 60:.1f} min in this process; "
        f"load average at the end {load_avg()} (2 cores)"
    )
    print("\n".join(lines))
    if args.json:
        report = {
            "pairs": len(pairs),
            "ties": ties,
            "after_sft": after_sft["exact"],
            "target": target,
            "orders": summary,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "minutes": round(total / 60, 1),
        }
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
