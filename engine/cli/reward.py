"""``python -m finetune_studio.engine reward score``: a reward model's scores of answers to prompts.

    python -m finetune_studio.engine reward score --model FOLDER --prompt TEXT --candidate A --candidate B [--json]
    python -m finetune_studio.engine reward score --model FOLDER --input answers.jsonl [--json]

``--model`` (or ``--adapter``) is a reward model's folder (a reward run's ``adapter/``, a checkpoint of one, or a
copy) or a reward run's id. ``--input`` reads JSON Lines, one object per line: ``{"prompt": ..., "completion": ...}``
or ``{"prompt": ..., "candidates": [...]}``. The answer is one line per candidate (score, prompt, answer), or with
``--json`` one :class:`core.protocol.reward_scores.RewardScores` event on stdout; a ``failed`` event (and exit 2 for
bad input, 1 for a model that cannot be loaded) says why there is none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from finetune_studio.core.protocol.events import Failed, FailureKind
from finetune_studio.core.protocol.reward_scores import RewardScores, ScoredAnswer


class InputError(ValueError):
    """The prompts and answers given cannot be read; the message names the line or option."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("reward", help="reward models: score answers with one")
    rsub = p.add_subparsers(dest="reward_command", required=True)
    s = rsub.add_parser("score", help="score answers to prompts with a reward model")
    s.add_argument("--model", "--adapter", dest="model", required=True, help="reward model folder or reward run id")
    s.add_argument("--base-model", default=None, help="the base model, when the one it names is not on this machine")
    s.add_argument("--prompt", help="the prompt (a user message) the --candidate answers reply to")
    s.add_argument("--candidate", action="append", default=[], help="an answer to score (repeat for several)")
    s.add_argument("--input", help="JSON Lines: {prompt, completion} or {prompt, candidates: [...]} per line")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where to run the model")
    s.add_argument("--batch-size", type=int, default=8, help="answers per forward pass")
    s.add_argument("--json", action="store_true", help="print one reward_scores event (JSON line)")


def read_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from ``--prompt``/``--candidate`` and ``--input``, in order."""
    pairs: list[tuple[str, str]] = []
    if args.candidate and not args.prompt:
        raise InputError("--candidate needs --prompt: the prompt the answers reply to")
    if args.prompt is not None and not args.candidate:
        raise InputError("--prompt needs at least one --candidate to score")
    pairs += [(args.prompt, c) for c in args.candidate]
    if args.input:
        pairs += _read_jsonl(Path(args.input))
    if not pairs:
        raise InputError("nothing to score: give --prompt with --candidate answers, or --input FILE.jsonl")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, not {args.batch_size}")
    return pairs


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read --input {path}: {exc}") from None
    out: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{where}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise InputError(f"{where}: each line must be an object with a string 'prompt'")
        if isinstance(row.get("completion"), str):
            out.append((row["prompt"], row["completion"]))
        elif isinstance(row.get("candidates"), list) and all(isinstance(c, str) for c in row["candidates"]):
            out += [(row["prompt"], c) for c in row["candidates"]]
        else:
            raise InputError(f"{where}: give 'completion' (text) or 'candidates' (a list of texts)")
    return out


def cmd_reward(args: argparse.Namespace, stream: TextIO) -> int:
    """``stream``: the real stdout (the CLI points fd 1 at stderr so that libraries cannot corrupt it)."""
    try:
        pairs = read_pairs(args)
    except InputError as exc:
        return _fail(args, stream, Failed(message=f"Invalid request: {exc}", kind=FailureKind.CONFIG), 2)
    from finetune_studio.engine.models import ModelError, pick_device
    from finetune_studio.engine.reward_model import RewardModel, RewardModelError, is_reward_model

    try:
        folder = _reward_folder(args.model, is_reward_model)
        device = pick_device() if args.device == "auto" else args.device
        model = RewardModel.load(folder, base_model=args.base_model, device="cpu" if device == "mps" else device)
        scores = model.score([p for p, _ in pairs], [c for _, c in pairs], batch_size=args.batch_size)
    except (RewardModelError, ModelError) as exc:
        return _fail(args, stream, Failed(message=f"Model problem: {exc}", kind=FailureKind.MODEL), 1)
    answer = RewardScores(
        model=str(model.folder),
        base_model=model.info.base_model,
        items=tuple(ScoredAnswer(prompt=p, completion=c, score=s) for (p, c), s in zip(pairs, scores, strict=True)),
    )
    if args.json:
        stream.write(answer.to_json() + "\n")
        return 0
    for item in answer.items:
        stream.write(f"{item.score:+.4f}\t{_short(item.prompt)}\t{_short(item.completion)}\n")
    return 0


def _reward_folder(ref: str, is_reward_model: Any) -> Path:
    """The folder ``ref`` names, or the final adapter (else the newest checkpoint) of the run it names."""
    from finetune_studio.core.store import Store
    from finetune_studio.engine import checkpoint
    from finetune_studio.engine.reward_model import RewardModelError

    folder = Path(ref).expanduser()
    if folder.is_dir():
        return folder
    store = Store()
    try:
        run = store.find_run(ref)
    finally:
        store.close()
    if run is None:
        raise RewardModelError(f"no folder or run named {ref!r}: give a reward model's folder or a reward run's id")
    run_dir = Path(run["run_dir"])
    final = run_dir / "adapter"
    if is_reward_model(final):
        return final
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None and is_reward_model(latest):
        return latest
    raise RewardModelError(f"run {run['id']} has no reward model yet (its objective is {run['objective'] or 'sft'!r})")


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _fail(args: argparse.Namespace, stream: TextIO, failed: Failed, code: int) -> int:
    if args.json:
        stream.write(failed.to_json() + "\n")
    print(f"error: {failed.message}", file=sys.stderr)
    return code
