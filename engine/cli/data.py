"""``python -m finetune_studio.engine data``: inspect a dataset before training, or convert it to another format.

    python -m finetune_studio.engine data inspect FILE [--json] [--model MODEL] [--max-length N] [--mapping JSON]
                                       [--loss-on assistant|all] [--row N] [--trust-remote-code]
    python -m finetune_studio.engine data convert FILE OUT --to trl|trl-conversational|llama-factory|messages
                                        [--mapping JSON] [--force]

``inspect`` prints the detected format and kind, the usable rows, every problem (with its line), token statistics
under the model's tokenizer and one example rendered exactly as training sees it, trained parts marked.
``convert`` never replaces an existing OUT unless ``--force``; OUT only ever holds a complete file.
``--json`` prints exactly one JSON line on stdout (logs go to stderr): a ``dataset_report`` event
(:class:`core.protocol.dataset_report.DatasetReport`; ``convert``: ``DatasetConverted``), or a ``failed`` event when
the data cannot be used. Exit status: 0 when the data is usable (problems or not), 1 when it is not, 2 for a usage
error. FILE may also be a folder saved by ``datasets`` or a hub dataset id already in the local Hugging Face cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune_studio.core.protocol.dataset_report import DatasetConverted, DatasetReport, ExamplePreview, Problem
from finetune_studio.core.protocol.events import Failed, FailureKind
from finetune_studio.engine.cli.argparsing import UsageErrorParser
from finetune_studio.engine.datasets import pairs
from finetune_studio.engine.datasets.convert import TARGETS, llama_factory_info, write_examples
from finetune_studio.engine.datasets.loader import DatasetStream, open_dataset
from finetune_studio.engine.datasets.preview import preview_example
from finetune_studio.engine.datasets.problems import ProblemLog
from finetune_studio.engine.datasets.report import (
    LengthBias,
    answer_chars,
    template_warnings,
    token_report,
    uses_tools,
    warn_length_bias,
)
from finetune_studio.engine.datasets.schema import DatasetError, PreferencePair

STATS_LIMIT = 20000  # rows tokenised for the statistics


def _parser() -> argparse.ArgumentParser:
    parser = UsageErrorParser(prog="python -m finetune_studio.engine data", description="Inspect or convert a dataset.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=UsageErrorParser)
    ins = sub.add_parser("inspect", help="detect the format, check the rows, preview one as the model sees it")
    ins.add_argument("file", help="data file, `datasets` folder, or hub id in the local cache")
    ins.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ins.add_argument("--model", default="default", help="model whose tokenizer and chat template to use")
    ins.add_argument("--max-length", type=int, default=512, help="longest sequence in tokens (as in training)")
    ins.add_argument("--mapping", help="column/role mapping as JSON text or a .json file")
    ins.add_argument(
        "--loss-on",
        choices=("assistant", "all"),
        default="assistant",
        help="SFT: train on assistant turns only, or on every token",
    )
    ins.add_argument("--row", type=int, default=1, help="which usable row to preview (1-based)")
    ins.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running Python code shipped with the model's tokenizer (never asked otherwise)",
    )
    ins.add_argument("--stats-limit", type=int, default=STATS_LIMIT, help="rows tokenised for the statistics")
    ins.set_defaults(func=cmd_inspect)
    conv = sub.add_parser("convert", help="write the dataset in another format")
    conv.add_argument("file")
    conv.add_argument("out")
    conv.add_argument("--to", required=True, choices=TARGETS)
    conv.add_argument("--mapping", help="column/role mapping as JSON text or a .json file")
    conv.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    conv.add_argument("--force", action="store_true", help="replace OUT when it exists")
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.func(args)
    except DatasetError as exc:
        return _fail(args, str(exc), exc.problems)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug of ours must still read as a message, not a traceback
        return _fail(args, f"unexpected error while reading {args.file}: {type(exc).__name__}: {exc}", [])


def _fail(args, message: str, problems: list[Problem]) -> int:
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        detail = "\n".join(p.where + p.message for p in problems)
        print(Failed(message=message, kind=FailureKind.DATA, detail=detail).to_json())
    else:
        _print_problems(problems, sys.stderr)
    return 1


def _mapping(text: str | None) -> dict | None:
    if not text:
        return None
    source = text
    if not text.lstrip().startswith("{") and Path(text).is_file():
        source = Path(text).read_text(encoding="utf-8")
    try:
        value = json.loads(source)
    except ValueError as exc:
        raise DatasetError(f'--mapping is not valid JSON ({exc}); e.g. \'{{"prompt": "question"}}\'') from None
    if not isinstance(value, dict):
        raise DatasetError('--mapping must be a JSON object, e.g. \'{"prompt": "question"}\'')
    return value


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """The tokenizer of ``model``: a local model folder directly, anything else through ``engine.models``.
    Custom tokenizer code is never run (nor asked about on the terminal) unless ``trust_remote_code``."""
    from finetune_studio.engine.models import CUSTOM_CODE, LoadOptions
    from finetune_studio.engine.models import load_tokenizer as resolve

    path = Path(model).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise RuntimeError(CUSTOM_CODE) from None
            raise
    return resolve(model, LoadOptions(trust_remote_code=trust_remote_code))


def cmd_inspect(args) -> int:
    # One pass over a stream: only the rows measured for the statistics (cut to what max_length can reach) and
    # the preview row are kept, so memory does not grow with the file.
    stream: DatasetStream | pairs.StoreStream
    if pairs.is_store_dataset(args.file):  # the preference store's pairs, as training reads them
        stream = pairs.StoreStream(args.file)
    else:
        stream = open_dataset(args.file, _mapping(args.mapping), max_length=args.max_length)
    log = ProblemLog()
    try:
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    except Exception as exc:
        tokenizer = None
        log.add(
            f"no tokenizer for model '{args.model}' ({exc}): token statistics and the token-level preview are left out",
            level="note",
            kind="no tokenizer",
        )
    measured: list = []
    chosen_chars, rejected_chars = [], []
    preview = with_tools = None
    for i, ex in enumerate(stream, 1):
        if len(measured) < args.stats_limit:
            measured.append(ex)
        if i <= max(args.row, 1):
            preview = ex
        if with_tools is None and uses_tools(ex):
            with_tools = ex
        if isinstance(ex, PreferencePair):
            chosen_chars.append(answer_chars(ex.chosen))
            rejected_chars.append(answer_chars(ex.rejected))
    if preview is None:
        stream.result([])  # raises the reader's own explanation
    rows = stream.usable
    bias = LengthBias.of("characters", chosen_chars, rejected_chars)
    tokens = None
    if tokenizer is not None:
        template_warnings([with_tools] if with_tools else [], tokenizer, log)
        tokens = token_report(measured, tokenizer, args.max_length, args.loss_on, log)
        bias = tokens.length_bias or bias
        if tokens.measured < rows:
            log.add(f"token statistics cover the first {tokens.measured} of {rows} rows", level="note")
    warn_length_bias(bias, log)
    example = _example(preview, args, tokenizer, log)
    report = DatasetReport(
        file=str(args.file),
        format=stream.format,
        kind=stream.kind,
        rows=rows,
        rows_read=rows + sum(stream.log.dropped.values()),
        dropped=dict(stream.log.dropped),
        problems=tuple(stream.log.problems() + log.problems()),
        example=example,
        model=args.model if tokens is not None else "",
        loss_on=args.loss_on if tokens is not None else "",
        tokens=tokens,
        length_bias=bias,
    )
    if args.json:
        print(report.to_json())
    else:
        _print_report(report)
    return 0


def _example(example, args, tokenizer, log: ProblemLog) -> ExamplePreview:
    from finetune_studio.engine.datasets.render import RenderError

    try:
        return preview_example(example, tokenizer, args.max_length, args.loss_on)
    except RenderError as exc:
        log.add(f"the preview row cannot be rendered: {exc}", example.source_line)
        return preview_example(example)


def cmd_convert(args) -> int:
    out = Path(args.out)
    if out.exists() and out.resolve() == Path(args.file).resolve():
        raise DatasetError("OUT must be a different file from FILE")
    if out.is_dir():
        raise DatasetError(f"{out} is a folder: give the name of the file to write, e.g. {out / 'converted.jsonl'}")
    if (out.exists() or out.is_symlink()) and not args.force:
        raise DatasetError(f"{out} already exists: give a new file name, or add --force to replace it")
    stream = open_dataset(args.file, _mapping(args.mapping))
    log = ProblemLog()
    try:
        written = write_examples(stream, args.out, args.to, log)
    except DatasetError:
        if stream.usable == 0:
            stream.result([])  # raises the reader's own explanation
        raise
    problems = stream.log.problems() + log.problems()
    info = {}
    if args.to == "llama-factory":
        info = {Path(args.out).stem: llama_factory_info(stream.kind, Path(args.out).name)}
        print("add to LLaMA-Factory's data/dataset_info.json:\n" + json.dumps(info, indent=2), file=sys.stderr)
    result = DatasetConverted(
        file=str(args.file),
        out=str(args.out),
        to=args.to,
        format=stream.format,
        kind=stream.kind,
        rows_written=written,
        problems=tuple(problems),
        dataset_info=info,
    )
    if args.json:
        print(result.to_json())
    else:
        print(f"wrote {written} rows ({stream.format} -> {args.to}) to {args.out}")
        _print_problems(problems, sys.stdout)
    return 0


def _print_problems(problems: list[Problem], out) -> None:
    if not problems:
        return
    print(f"problems ({len(problems)}):", file=out)
    for p in problems:
        print(f"  [{p.level}] {p.where}{p.message}", file=out)


def _print_report(r: DatasetReport) -> None:
    print(f"file:    {r.file}")
    print(f"format:  {r.format} ({r.kind})")
    print(f"rows:    {r.rows} usable of {r.rows_read} read")
    for reason, n in r.dropped.items():
        print(f"         {n} dropped: {reason}")
    _print_problems(list(r.problems), sys.stdout)
    if r.tokens is not None and r.tokens.lengths is not None:
        L = r.tokens.lengths
        print(
            f"tokens:  min {L.min}, median {L.median:g}, p95 {L.p95}, max {L.max} "
            f"({r.tokens.over_max_length} rows over max_length {r.tokens.max_length})"
        )
    bias = r.length_bias
    if bias:
        print(
            f"length:  chosen {bias.mean_chosen:g} vs rejected {bias.mean_rejected:g} {bias.unit} on "
            f"average; chosen longer in {bias.chosen_longer_share:.0%} of pairs"
        )
    ex = r.example
    assert ex is not None  # inspect always previews a row
    print(f"\nexample (line {ex.line}), trained text between [[ and ]]:")
    if ex.sequence is not None:
        print(ex.sequence.marked())
    elif ex.chosen is not None and ex.rejected is not None:
        for side, seq in (("chosen", ex.chosen), ("rejected", ex.rejected)):
            print(f"--- {side} ---\n{seq.marked()}")
    else:
        print(json.dumps(ex.data, ensure_ascii=False, indent=2))
