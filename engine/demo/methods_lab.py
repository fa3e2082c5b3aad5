"""``python -m finetune_studio.engine methods`` (``finetune-engine methods``): the PEFT methods lab.

One dataset, one step budget, the chosen methods at sensible settings each (``LAB_SETTINGS``), each trained as a run
of its own in the store (so they overlay in Runs) and in a process of its own (so each one's measured peak is its
own). For each: the trainable parameters, the memory above the loaded model (estimated before the run and
measured), tokens per second, training time, the final and held-out loss, and, on the demo task, the share of
held-out prompts answered exactly right.

    python -m finetune_studio.engine methods                       every 16-bit method on the demo task, 20 steps
    python -m finetune_studio.engine methods --methods lora,ia3,houlsby --steps 50
    python -m finetune_studio.engine methods --dataset my.jsonl   your data (no task score)
    python -m finetune_studio.engine methods --json                one methods_lab_report JSON line
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from finetune_studio.core import methods as table
from finetune_studio.core import paths
from finetune_studio.core.config import ConfigError, TrainConfig, parse_overrides
from finetune_studio.core.protocol import events as ev
from finetune_studio.core.protocol.memory_report import MemoryReport
from finetune_studio.core.protocol.methods_lab import MethodRow, MethodsLabReport
from finetune_studio.engine.demo import task

# Each method at settings that suit it (the rest of the budget is shared): learning rates from the methods' papers
# scaled to a short run with AdamW; prompt-learning methods train unpacked (core.methods says why).
LAB_SETTINGS: dict[str, dict[str, Any]] = {
    "lora": {"learning_rate": 1e-3},
    "qlora": {"learning_rate": 1e-3, "method": "qlora"},
    "dora": {"learning_rate": 1e-3},
    "qdora": {"learning_rate": 1e-3},
    "pissa": {"method": "lora", "lora_init": "pissa", "learning_rate": 1e-3},
    "olora": {"method": "lora", "lora_init": "olora", "learning_rate": 1e-3},
    "loraplus": {"method": "lora", "loraplus_lr_ratio": 16.0, "learning_rate": 5e-4},
    "loftq": {"method": "qlora", "lora_init": "loftq", "learning_rate": 1e-3},
    "vera": {"lora_rank": 256, "learning_rate": 1e-2},
    "ia3": {"learning_rate": 1e-2},
    "bitfit": {"learning_rate": 1e-3},
    "prompt_tuning": {"learning_rate": 3e-2, "packing": False},
    "p_tuning": {"learning_rate": 3e-3, "packing": False},
    "prefix_tuning": {"learning_rate": 1e-2, "packing": False},
    "houlsby": {"learning_rate": 1e-3},
    "pfeiffer": {"learning_rate": 1e-3},
    "full": {"learning_rate": 5e-5},  # every weight: the usual full fine-tuning rate, far below an adapter's
}
DEFAULT_METHODS = tuple(n for n in LAB_SETTINGS if n not in ("qlora", "qdora", "loftq"))  # 16-bit bases


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m finetune_studio.engine methods",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated: {', '.join(LAB_SETTINGS)}, or 'all' (default: every one on a 16-bit base)",
    )
    p.add_argument("--dataset", default="", help="training data (default: the demo task's)")
    p.add_argument("--objective", choices=("sft", "dpo"), default="sft")
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per method (the shared budget)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=20, help="held-out prompts the demo task scores (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=task.MAX_NEW_TOKENS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config field for every method")
    p.add_argument("--json", action="store_true", help="print one methods_lab_report JSON line")
    return p


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def lab_config(name: str, args: argparse.Namespace, dataset: str, stamp: str) -> TrainConfig:
    """The config of ``name``'s run: the shared budget, then the method's own settings, then ``--set``."""
    settings = dict(LAB_SETTINGS[name])
    data: dict[str, Any] = {
        "model": args.model,
        "dataset": dataset,
        "method": settings.pop("method", name),
        "objective": args.objective,
        "run_name": f"methods lab {stamp}: {name}",
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lora_rank": 8,
        "lora_alpha": 16.0,
        "seed": args.seed,
        "warmup_steps": max(1, args.steps // 10),
        "validation_fraction": 0.1,
        "eval_every": 0,  # one held-out evaluation, after the last step
        "checkpoint_every": 0,
        "sample_prompts": 0,
        **settings,
    }
    data.update(parse_overrides(args.set))
    return TrainConfig.from_dict(data)


MEASURED = "measured.json"  # what train_one measured: the resident size once the model was loaded, and the peak


def train_one(config_file: str) -> int:
    """One method's run in this process (the lab's child): the events on stdout as ``engine train`` writes them, and
    beside the config the resident size when training begins (the model loaded) and the process's peak after it."""
    import psutil

    from finetune_studio.engine.train.memory_budget import resident_peak
    from finetune_studio.engine.train.recipe import TrainingFailed, train_run
    from finetune_studio.engine.train.reporting import Reporter

    at_start: list[int] = []

    def listen(event: ev.Event) -> None:
        if isinstance(event, ev.Started):  # set-up done: the model, its adapters and the data are loaded
            with contextlib.suppress(OSError):  # Linux: the peak from here on is training's, not loading's
                Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
            at_start.append(psutil.Process().memory_info().rss)

    config = TrainConfig.load(config_file)
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # libraries' prints go to the log, the events alone to stdout
    try:
        train_run(config, reporter=Reporter(stream=events, extra=listen))
    except (TrainingFailed, ConfigError):
        return 1  # the failed event says why
    measured = {"loaded": at_start[0] if at_start else 0, "peak": resident_peak()}
    paths.atomic_write_text(Path(config_file).with_name(MEASURED), json.dumps(measured))
    return 0


def train_in_own_process(config: TrainConfig, folder: Path) -> tuple[list[ev.Event], str]:
    """Train ``config`` in a fresh process (:func:`train_one`): its events, and the end of its log."""
    cfg = folder / "config.json"
    paths.atomic_write_text(cfg, config.to_json())
    log = folder / "engine.log"
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.run(
            [*paths.python_argv(), "-m", "finetune_studio.engine", "methods", "--train-one", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            check=False,
        )
    events = []
    for line in proc.stdout.splitlines():
        try:
            events.append(ev.parse_event(line))
        except ev.ProtocolError:
            continue
    return events, log.read_text(encoding="utf-8", errors="replace")[-2000:]


def row_from_events(
    name: str, config: TrainConfig, events: list[ev.Event], log_tail: str, measured_file: Path | None = None
) -> MethodRow:
    """The lab's row for one run from its events, the store's record (the estimate) and what :func:`train_one`
    measured: memory above the model = the peak less the resident size once the model was loaded."""
    from finetune_studio.core.store import Store

    settings = {k: v for k, v in LAB_SETTINGS[name].items()}
    failed = [e for e in events if isinstance(e, ev.Failed)]
    started = next((e for e in events if isinstance(e, ev.Started)), None)
    steps = [e for e in events if isinstance(e, ev.Step)]
    evals = [e for e in events if isinstance(e, ev.Eval)]
    finished = next((e for e in events if isinstance(e, ev.Finished)), None)
    if failed or finished is None or started is None:
        message = failed[0].message if failed else f"the run ended without a result: {log_tail.strip()[-300:]}"
        status = "refused" if failed and failed[0].kind == ev.FailureKind.CONFIG else "failed"
        run_id = started.run_id if started else ""
        return MethodRow(name, status, run_id=run_id, settings=settings, message=message)
    store = Store()
    try:
        run = store.get_run(started.run_id)
    finally:
        store.close()
    estimated = measured = 0
    if run is not None and run.memory_estimate:
        report = MemoryReport.from_json(run.memory_estimate)
        below = report.terms.get("base_weights", 0) + report.terms.get("runtime_overhead", 0)
        if LAB_SETTINGS.get(name, {}).get("method", name) == "full":  # its trained weights are the loaded model
            below += report.terms.get("adapter_weights", 0)
        estimated = report.total_bytes - report.terms.get("allocator_slack", 0) - below
    if measured_file is not None and measured_file.is_file():
        figures = json.loads(measured_file.read_text(encoding="utf-8"))
        measured = max(0, int(figures["peak"]) - int(figures["loaded"])) if figures.get("loaded") else 0
    warm = steps[1:] or steps
    return MethodRow(
        name,
        "completed",
        run_id=started.run_id,
        trainable_params=started.trainable_params,
        estimated_bytes=estimated,
        measured_bytes=measured,
        tokens_per_s=sum(s.tokens_per_s for s in warm) / max(1, len(warm)),
        seconds=steps[-1].elapsed_s if steps else 0.0,
        final_loss=finished.final_loss,
        eval_loss=evals[-1].eval_loss if evals else None,
        settings=settings,
    )


def score_on_demo(row: MethodRow, adapter_dir: str, model: str, rows: list[dict], max_new_tokens: int) -> MethodRow:
    """The demo task's exact-match share of the held-out prompts, answered by the base with ``adapter_dir``."""
    from finetune_studio.engine.bottleneck import load_adapter_folder
    from finetune_studio.engine.models import (
        compute_dtype,
        is_full_model_folder,
        load_causal_lm,
        load_tokenizer,
        pick_device,
        resolve_model,
    )

    folder = resolve_model(model)
    tokenizer = load_tokenizer(str(folder))
    device = pick_device()
    if is_full_model_folder(adapter_dir):  # a full fine-tune saved the whole model
        tuned = load_causal_lm(
            Path(adapter_dir), dtype=compute_dtype("auto", device), device=device, quantize_4bit=False
        )
    else:
        base = load_causal_lm(folder, dtype=compute_dtype("auto", device), device=device, quantize_4bit=False)
        tuned = load_adapter_folder(base, adapter_dir)
    score, _answers = task.evaluate(tuned, tokenizer, rows, max_new_tokens=max_new_tokens)
    return replace(row, exact=score.exact)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--train-one"] and len(argv) == 2:  # the lab's child process (train_in_own_process)
        return train_one(argv[1])
    args = build_parser().parse_args(argv)
    names = list(LAB_SETTINGS) if args.methods.strip() == "all" else [m.strip() for m in args.methods.split(",")]
    unknown = [n for n in names if n not in LAB_SETTINGS]
    if unknown or not names:
        _say(
            f"methods: unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(LAB_SETTINGS)}"
        )
        return 2
    demo = not args.dataset
    dataset = args.dataset or str(task.SFT_FILE if args.objective == "sft" else task.PREFERENCE_FILE)
    eval_rows = task.read_jsonl(task.EVAL_FILE) if demo else []
    if demo and args.eval_limit > 0:
        eval_rows = eval_rows[: args.eval_limit]
    stamp = time.strftime("%Y-%m-%d %H:%M")
    rows: list[MethodRow] = []
    device = ""
    with tempfile.TemporaryDirectory(prefix="methods-lab-") as tmp:
        for name in names:
            try:
                config = lab_config(name, args, dataset, stamp)
            except ConfigError as exc:
                rows.append(MethodRow(name, "refused", settings=LAB_SETTINGS[name], message=str(exc)))
                _say(f"{name}: refused: {exc}")
                continue
            _say(f"{name}: training {config.max_steps} steps ({table.method(config.method).label})...")
            if args.json:  # for the app's dialog: which method of how many
                done = len(rows)
                print(ev.Progress(stage="methods", done=done, total=len(names), message=f"Training {name}").to_json())
                sys.stdout.flush()
            folder = Path(tmp) / name
            folder.mkdir()
            events, tail = train_in_own_process(config, folder)
            row = row_from_events(name, config, events, tail, folder / MEASURED)
            started = next((e for e in events if isinstance(e, ev.Started)), None)
            device = device or (started.device if started else "")
            finished = next((e for e in events if isinstance(e, ev.Finished)), None)
            if row.status == "completed" and demo and eval_rows and finished and finished.adapter_dir:
                _say(f"{name}: scoring {len(eval_rows)} held-out prompts...")
                row = score_on_demo(row, finished.adapter_dir, args.model, eval_rows, args.max_new_tokens)
            _say(f"{name}: {row.status} {row.message}".rstrip())
            rows.append(row)
    report = MethodsLabReport(
        dataset=dataset,
        model=args.model,
        objective=args.objective,
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        scorer="exact match (demo task)" if demo else "",
        eval_prompts=len(eval_rows),
        device=device,
        rows=tuple(rows),
    )
    print(report.to_json() if args.json else table_text(report))
    return 0  # each row's status is in the report


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table_text(report: MethodsLabReport) -> str:
    """The lab's table in Markdown (what the README shows)."""
    score = report.scorer and "exact"
    head = ["method", "trainable", "MiB above model (est / measured)", "tokens/s", "time s", "loss", "held-out loss"]
    head += ["exact"] if score else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        if r.status != "completed":
            lines.append(f"| {r.method} | {r.status}: {r.message} |" + " |" * (len(head) - 2))
            continue
        cells = [
            r.method,
            f"{r.trainable_params:,}",
            f"{_mib(r.estimated_bytes)} / {_mib(r.measured_bytes)}",
            f"{r.tokens_per_s:.0f}",
            f"{r.seconds:.0f}",
            f"{r.final_loss:.3f}" if r.final_loss is not None else "-",
            f"{r.eval_loss:.3f}" if r.eval_loss is not None else "-",
        ]
        if score:
            cells.append(f"{r.exact:.0%}" if r.exact is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    where = f"{report.objective.upper()} on {Path(report.dataset).name}, {report.steps} steps of batch "
    where += f"{report.batch_size}, max_length {report.max_length}, {report.model} on {report.device or 'cpu'}"
    if score:
        where += f"; exact: share of {report.eval_prompts} held-out prompts answered exactly right"
    return where + "\n\n" + "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
