"""Reading a dataset end to end: source -> rows -> detected layout -> examples, with every problem recorded.

Public API: :func:`load_dataset` (everything in memory, what the trainer calls) and :func:`open_dataset` (a
stream of examples for large conversions). The layout is detected from the first rows by majority; the user's
mapping can rename columns and roles or name the layout outright.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path

from finetune_studio.engine.datasets.bound import char_budget, cut_example
from finetune_studio.engine.datasets.formats import FORMATS, describe_columns, detect
from finetune_studio.engine.datasets.messages import Mapping
from finetune_studio.engine.datasets.problems import ProblemLog, RowError
from finetune_studio.engine.datasets.readers import NESTED, Row, read_file
from finetune_studio.engine.datasets.schema import (
    Conversation,
    DatasetError,
    LoadedDataset,
    PreferencePair,
    example_to_dict,
)
from finetune_studio.engine.datasets.sources import resolve_source

DETECT_ROWS = 64  # rows looked at to decide the layout


class DatasetStream:
    """The examples of one dataset, read lazily. ``format``/``kind`` are known on construction; ``log`` fills
    up while iterating. Iterate once.

    With ``max_length`` (tokens), text far beyond what training keeps is cut as it is read (``bound``), so
    neither memory nor tokenising grows with a row's length; each cut is reported with its line."""

    def __init__(self, path: str | Path, mapping: dict | None = None, max_length: int | None = None):
        self.path = str(path)
        self.mapping = Mapping.parse(mapping)
        self.budget = char_budget(max_length) if max_length else None
        self.log = ProblemLog()
        self.files = resolve_source(path, self.log, self.mapping.split)
        self._rows = chain.from_iterable(read_file(f, self.log) for f in self.files)
        self._head = list(islice(self._rows, DETECT_ROWS))
        self.format = self._decide_format()
        self.kind = FORMATS[self.format].kind
        self.usable = 0
        self._seen: dict[bytes, int | None] = {}

    def _decide_format(self) -> str:
        head = [self.mapping.apply(r.data) for r in self._head]
        if not head:
            problems = self.log.problems()
            if self.log.dropped:
                first = next((p for p in problems if p.level == "dropped"), None)
                where = f" (first: line {first.line}: {first.message})" if first and first.line else ""
                raise DatasetError(f"no usable rows in {Path(self.path).name}: every row is malformed{where}", problems)
            raise DatasetError(f"{Path(self.path).name} holds no rows", problems)
        columns = {c for r in self._head for c in r.data}
        missing = [c for c in self.mapping.columns.values() if c not in columns]
        if missing:
            raise DatasetError(
                f"the mapping names column '{missing[0]}', but the data has columns: "
                f"{describe_columns([r.data for r in self._head])}"
            )
        if self.mapping.format:
            if self.mapping.format not in FORMATS:
                raise DatasetError(
                    f"unknown format '{self.mapping.format}' in the mapping; formats are: {', '.join(FORMATS)}"
                )
            return self.mapping.format
        votes = Counter(name for name in map(detect, head) if name)
        if not votes:
            hint = ""
            if Path(self.files[0]).suffix.lower() in (".csv", ".tsv", ".tab"):
                hint = " If the first line is data rather than a header, add a header row naming the columns."
            raise DatasetError(
                f"could not recognise the layout of {Path(self.path).name}: columns are "
                f"{describe_columns([r.data for r in self._head])}. Known layouts use e.g. instruction/output "
                "(alpaca), conversations (ShareGPT), messages (OpenAI), prompt/completion, text, "
                "prompt/chosen/rejected (preference) or prompt/completion/label (KTO). Give a mapping to name your "
                'columns, e.g. {"prompt": "question", "completion": "answer"}.' + hint
            )
        name, count = votes.most_common(1)[0]
        if len(votes) > 1:
            others = ", ".join(f"{n} ({c})" for n, c in votes.items() if n != name)
            self.log.add(
                f"rows in several layouts among the first {len(head)}: read as {name} ({count}); others: {others}",
                level="note",
            )
        return name

    def __iter__(self) -> Iterator:
        normalise = FORMATS[self.format].normalise
        for row in chain(self._head, self._rows):
            self._head = []
            try:
                example = self._one(row, normalise)
            except RecursionError:  # a value nested hundreds of levels deep
                self.log.drop(NESTED, row.line, file=row.file, kind="rows nested too deeply")
                continue
            if example is not None:
                self.usable += 1
                yield example

    def _one(self, row: Row, normalise):
        def warn(message: str, kind: str) -> None:
            self.log.add(message, row.line, file=row.file, kind=kind)

        try:
            data = self.mapping.apply(row.data)
            example = normalise(data, self.mapping, row.line, warn)
        except RowError as exc:
            self.log.drop(str(exc), row.line, file=row.file, kind=exc.kind)
            return None
        if isinstance(example, Conversation):  # the plain columns travel with it (an RL objective's rewards read them)
            kept = tuple((str(k), v) for k, v in data.items() if isinstance(v, str | int | float | bool))
            example = dataclasses.replace(example, columns=kept) if kept else example
        if isinstance(example, PreferencePair) and example.chosen == example.rejected:
            self.log.drop(
                "chosen and rejected are identical: the pair teaches nothing",
                row.line,
                file=row.file,
                kind="pairs whose chosen and rejected are identical",
            )
            return None
        cut = 0
        if self.budget is not None:
            example, cut = cut_example(example, self.budget)
            if cut:
                warn(
                    f"text cut to {self.budget:,} characters per part before tokenising ({cut:,} characters "
                    "left out; training keeps only max_length tokens)",
                    "rows cut before tokenising",
                )
        digest = hashlib.blake2b(
            json.dumps([example_to_dict(example), cut], sort_keys=True, default=str).encode(), digest_size=12
        ).digest()
        if digest in self._seen:
            first = self._seen[digest]
            warn(
                f"exact duplicate of line {first}" if first else "exact duplicate of an earlier row", "exact duplicates"
            )
        else:
            self._seen[digest] = row.line
        return example

    def result(self, examples: list) -> LoadedDataset:
        """The LoadedDataset for ``examples`` (this stream's output); raises when none is usable."""
        problems = self.log.problems()
        if not examples:
            reasons = "; ".join(f"{n} {kind}" for kind, n in self.log.dropped.most_common(3))
            raise DatasetError(
                f"no usable rows in {Path(self.path).name} ({self.format} layout): "
                f"{sum(self.log.dropped.values())} dropped: {reasons}",
                problems,
            )
        return LoadedDataset(
            format=self.format,
            kind=self.kind,
            examples=examples,
            problems=problems,
            path=self.path,
            rows_read=len(examples) + sum(self.log.dropped.values()),
            dropped=dict(self.log.dropped),
        )


def open_dataset(path: str | Path, mapping: dict | None = None, max_length: int | None = None) -> DatasetStream:
    """A lazy stream of examples; raises DatasetError at once when the source or its layout is unusable."""
    return DatasetStream(path, mapping, max_length)


def load_dataset(path: str | Path, mapping: dict | None = None, max_length: int | None = None) -> LoadedDataset:
    """Every usable example of ``path`` in internal form, with the detected layout and the problems found.
    ``max_length`` (tokens) cuts text that training would never reach (see :class:`DatasetStream`).

    Raises DatasetError (with an actionable message) when the file cannot be used at all.
    """
    stream = open_dataset(path, mapping, max_length)
    return stream.result(list(stream))
