"""File formats: JSON Lines, JSON lists, CSV/TSV, Parquet and Arrow, read as a stream of rows.

Every reader yields :class:`Row` objects one at a time, so a large file is never held in memory whole:
JSON Lines line by line, a JSON list element by element (an incremental parser), CSV record by record,
Parquet and Arrow batch by batch. A malformed row is recorded in the :class:`ProblemLog` with its line number
and skipped; a file that cannot be read at all raises :class:`DatasetError` with a message saying what to do.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune_studio.engine.datasets.problems import ProblemLog
from finetune_studio.engine.datasets.schema import DatasetError

TEXT_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
BINARY_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow"}
SUPPORTED = "JSON Lines (.jsonl), JSON (.json), CSV (.csv), TSV (.tsv), Parquet (.parquet), Arrow (.arrow)"
MALFORMED = "malformed row"
NESTED = "JSON nested too deeply to read (hundreds of levels of lists or objects)"
_CHUNK = 1 << 20
_MAX_ELEMENT = 256 << 20  # one JSON list element larger than this is refused
MAX_LINE = 64 << 20  # a text line longer than this is dropped unread: no training row needs it
_WRAPPER_KEYS = ("data", "train", "rows", "examples", "instances", "records")


@dataclass(frozen=True)
class Row:
    """One record of the file: a mapping of column name to value, and where it came from."""

    data: dict
    line: int | None  # 1-based line of a text file where the row starts; 1-based row for Parquet/Arrow
    file: str = ""


def sniff(path: Path) -> str:
    """The reader for ``path`` ('jsonl', 'json', 'csv', 'tsv', 'parquet', 'arrow'), or a DatasetError saying why."""
    name = path.name
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        raise DatasetError(f"{name} is empty (0 bytes): there is nothing to train on")
    if head[:4] == b"PAR1":
        return "parquet"
    if head[:6] == b"ARROW1" or head[:4] == b"\xff\xff\xff\xff":
        return "arrow"
    if head[:2] == b"\x1f\x8b":
        raise DatasetError(f"{name} is gzip-compressed: decompress it first (e.g. `gunzip {name}`)")
    if head[:4] == b"PK\x03\x04":
        raise DatasetError(f"{name} is a zip archive: extract it and point to the data file inside")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DatasetError(f"{name} is UTF-16 text: save it as UTF-8 (in most editors: Save As, encoding UTF-8)")
    suffix = path.suffix.lower()
    if suffix in BINARY_SUFFIXES:
        raise DatasetError(
            f"{name} is named {suffix} but is not a {BINARY_SUFFIXES[suffix].title()} file "
            "(its first bytes are wrong): it may be damaged or mislabelled"
        )
    if b"\x00" in head:
        raise DatasetError(f"{name} is a binary file, not text: expected {SUPPORTED}")
    text = _decode_head(head, name)
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise DatasetError(f"{name} contains only whitespace: there is nothing to train on")
    if suffix in TEXT_SUFFIXES:
        return TEXT_SUFFIXES[suffix]
    if stripped[0] in "[{":
        return "json"
    raise DatasetError(f"{name}: unknown file type '{suffix or '(no extension)'}'; expected {SUPPORTED}")


def _decode_head(head: bytes, name: str) -> str:
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(head) - 3 and len(head) == 1 << 16:  # a character cut by the 64 KiB window
            return head[: exc.start].decode("utf-8")
        raise _utf8_error(name, head, exc, 0) from None


def _utf8_error(name: str, data: bytes, exc: UnicodeDecodeError, line_base: int) -> DatasetError:
    line = line_base + data.count(b"\n", 0, exc.start) + 1
    col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    bad = data[exc.start : exc.start + 1].hex()
    return DatasetError(
        f"{name} is not valid UTF-8 text (byte 0x{bad} at line {line}, column {col}): "
        "save it as UTF-8 (in most editors: Save As, encoding UTF-8)"
    )


def _lines(fh, path: Path, log: ProblemLog | None) -> Iterator[bytes]:
    """The file's lines; one longer than MAX_LINE is skipped without being held, recorded, and read as ''."""
    lineno = 0
    while True:
        raw = fh.readline(MAX_LINE + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            size = len(raw)
            while raw and not raw.endswith(b"\n"):
                raw = fh.readline(_CHUNK)
                size += len(raw)
            if log is not None:
                log.drop(
                    f"line is {size / (1 << 20):.0f} MiB long (more than {MAX_LINE >> 20} MiB): left out unread",
                    lineno,
                    file=str(path),
                    kind="lines too long to read",
                )
            raw = b"\n"
        yield raw


def _text_lines(path: Path, log: ProblemLog | None = None) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) pairs; invalid UTF-8 raises a DatasetError naming the line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(_lines(fh, path, log), 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _utf8_error(path.name, raw, exc, lineno - 1) from None


def read_jsonl(path: Path, log: ProblemLog) -> Iterator[Row]:
    """One JSON object per line; blank lines are skipped, malformed lines recorded and skipped."""
    for lineno, line in _text_lines(path, log):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            log.drop(
                f"not valid JSON ({exc.msg} at column {exc.colno})",
                lineno,
                file=str(path),
                kind="lines that are not valid JSON",
            )
            continue
        except RecursionError:
            log.drop(NESTED, lineno, file=str(path), kind="lines nested too deeply")
            continue
        if not isinstance(value, dict):
            log.drop(
                f"expected a JSON object, found {_json_type(value)}",
                lineno,
                file=str(path),
                kind="lines that are not JSON objects",
            )
            continue
        if _may_hold_surrogate(line) and _dropped_for_surrogate(value, lineno, str(path), log):
            continue
        yield Row(value, lineno, str(path))


def _may_hold_surrogate(text: str) -> bool:
    """Whether JSON text may decode to a lone surrogate: only a ``\\uD800``-``\\uDFFF`` escape makes one (decoded
    UTF-8 never holds one)."""
    return "\\ud" in text or "\\uD" in text


def _lone_surrogate(value, where: str = "") -> tuple[str, str] | None:
    """The first lone surrogate in ``value``'s strings (keys too): (where, as an escape), or None."""
    if isinstance(value, str):
        for c in value:
            if "\ud800" <= c <= "\udfff":
                return where or "a value", f"\\u{ord(c):04x}"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, f"a field name ({where or 'the row'})") or _lone_surrogate(
                item, f"{where}.{key}" if where else f"'{key}'"
            )
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{where or 'the row'}[{i}]")
            if found:
                return found
    return None


def _dropped_for_surrogate(value: dict, line: int | None, file: str, log: ProblemLog) -> bool:
    """Drop (and record) a row holding a lone surrogate: half of a UTF-16 pair is no character, and a tokenizer or
    the database refuses the text."""
    try:
        found = _lone_surrogate(value)
    except RecursionError:
        log.drop(NESTED, line, file=file, kind="lines nested too deeply")
        return True
    if found is None:
        return False
    where, escape = found
    log.drop(
        f"{where} holds the escape {escape}, half of a UTF-16 surrogate pair without its other half (no character); "
        "fix or remove it",
        line,
        file=file,
        kind="rows holding a lone surrogate escape",
    )
    return True


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number"
    )


class _JsonText:
    """A UTF-8 file decoded chunk by chunk, with line counting for the positions handed out."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.eof = False
        self._line_at = 1  # line number of buf[self._counted]
        self._counted = 0

    def more(self) -> bool:
        """Append the next chunk to the buffer; False at the end of the file."""
        if self.eof:
            return False
        raw = self.fh.read(_CHUNK)
        self.eof = not raw
        try:
            text = self.decoder.decode(raw, final=self.eof)
        except UnicodeDecodeError as exc:
            raise _utf8_error(self.path.name, raw, exc, self.line(len(self.buf)) - 1) from None
        if not self.buf and not self._counted and text.startswith("\ufeff"):
            text = text[1:]
        self.buf += text
        return bool(raw)

    def line(self, pos: int) -> int:
        """1-based line of buffer position ``pos`` (positions must be asked for in increasing order)."""
        self._line_at += self.buf.count("\n", self._counted, pos)
        self._counted = pos
        return self._line_at

    def skip_ws(self, pos: int) -> int:
        """Position of the next non-whitespace character, reading more as needed; len(buf) at the end."""
        while True:
            while pos < len(self.buf) and self.buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(self.buf) or not self.more():
                return pos

    def trim(self, pos: int) -> int:
        """Drop the consumed text before ``pos``; returns the new position (0)."""
        self.line(pos)
        self.buf = self.buf[pos:]
        self._counted = 0
        return 0

    def close(self) -> None:
        self.fh.close()


def _decode_at(src: _JsonText, pos: int):
    """Decode one JSON value at ``pos``, reading more of the file while the value is incomplete."""
    decoder = json.JSONDecoder()
    while True:
        try:
            value, end = decoder.raw_decode(src.buf, pos)
        except RecursionError:
            raise DatasetError(f"{src.path.name}: the element at line {src.line(pos)} is {NESTED}") from None
        except json.JSONDecodeError as exc:
            incomplete = exc.pos >= len(src.buf) - 32 or exc.msg.startswith("Unterminated string")
            if incomplete and len(src.buf) - pos < _MAX_ELEMENT and src.more():
                continue
            line = src.line(exc.pos)
            col = exc.pos - (src.buf.rfind("\n", 0, exc.pos) + 1) + 1
            raise DatasetError(f"{src.path.name} is not valid JSON: {exc.msg} at line {line}, column {col}") from None
        if end >= len(src.buf) - 1 and not src.eof and src.more():
            continue  # a number cut by the chunk boundary would decode short: decode again with more text
        return value, end


def read_json(path: Path, log: ProblemLog) -> Iterator[Row]:
    """A JSON list of objects, parsed element by element; JSON Lines saved as .json are read as such."""
    src = _JsonText(path)
    try:
        pos = src.skip_ws(0)
        if src.buf[pos] == "{":
            value, end = _decode_at(src, pos)
            if src.skip_ws(end) < len(src.buf):  # more after the first object: JSON Lines named .json
                log.add(f"{path.name} holds one JSON object per line (JSON Lines); read it as such", level="note")
                src.close()
                yield from read_jsonl(path, log)
                return
            yield from _single_object(path, value, log)
            return
        if src.buf[pos] != "[":
            value, _ = _decode_at(src, pos)
            raise DatasetError(
                f"{path.name}: the JSON holds {_json_type(value)}, not a list of objects; "
                "expected [{...}, {...}] or one object per line (.jsonl)"
            )
        yield from _json_list(src, pos + 1, log)
    finally:
        src.close()


def _json_list(src: _JsonText, pos: int, log: ProblemLog) -> Iterator[Row]:
    name, index = src.path.name, 0
    pos = src.skip_ws(pos)
    while True:
        if pos >= len(src.buf):
            raise DatasetError(f"{name} is not valid JSON: the list is not closed with ']' (file cut short?)")
        if src.buf[pos] == "]":
            break
        line = src.line(pos)
        value, end = _decode_at(src, pos)
        index += 1
        if isinstance(value, dict):
            if not (_may_hold_surrogate(src.buf[pos:end]) and _dropped_for_surrogate(value, line, str(src.path), log)):
                yield Row(value, line, str(src.path))
        elif index == 1:
            raise DatasetError(
                f'{name}: expected a list of objects like {{"instruction": ..., "output": ...}}, '
                f"but the first element is {_json_type(value)}"
            )
        else:
            log.drop(
                f"element {index} is {_json_type(value)}, not an object",
                line,
                file=str(src.path),
                kind="list elements that are not objects",
            )
        pos = src.skip_ws(end)
        if pos < len(src.buf) and src.buf[pos] == ",":
            pos = src.skip_ws(pos + 1)
            if pos < len(src.buf) and src.buf[pos] == "]":
                log.add(
                    "trailing comma before the closing ']' (not strict JSON); ignored",
                    src.line(pos),
                    file=str(src.path),
                    level="note",
                )
        elif pos < len(src.buf) and src.buf[pos] != "]":
            line = src.line(pos)
            raise DatasetError(f"{name} is not valid JSON: expected ',' or ']' at line {line}")
        if pos > _CHUNK:
            pos = src.trim(pos)
    if src.skip_ws(pos + 1) < len(src.buf):
        raise DatasetError(
            f"{name} is not valid JSON: extra text after the closing ']' at line {src.line(src.skip_ws(pos + 1))}"
        )


def _single_object(path: Path, value: dict, log: ProblemLog) -> Iterator[Row]:
    """A file holding one object: accept ``{"data": [...]}``-style wrappers, refuse the rest clearly."""
    for key in _WRAPPER_KEYS:
        rows = value.get(key)
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            log.add(
                f"{path.name} is one object; read the list under '{key}' (row numbers are list positions)", level="note"
            )
            for i, row in enumerate(rows, 1):
                if not _dropped_for_surrogate(row, i, str(path), log):
                    yield Row(row, i, str(path))
            return
    raise DatasetError(
        f"{path.name} holds a single JSON object, not a list of objects: wrap the rows in "
        "[ ... ] or write one object per line (.jsonl)"
    )


def _looks_like_data(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return len(cell) > 64


def read_delimited(path: Path, log: ProblemLog, delimiter: str = ",") -> Iterator[Row]:
    """CSV or TSV with a header row naming the columns; each following record becomes a row."""
    what = "TSV" if delimiter == "\t" else "CSV"
    csv.field_size_limit(2**31 - 1)
    record_text: list[str] = []  # the raw lines of the record being read (an unterminated quote swallows many)

    def feed() -> Iterator[str]:
        for _n, text in _text_lines(path, log):
            record_text.append(text)
            yield text

    reader = csv.reader(feed(), delimiter=delimiter)
    try:
        header = next(reader, None)
        while header == []:
            header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path.name} has no rows")
        header = [h.strip() for h in header]
        bad = [h for h in header if not h or _looks_like_data(h)]
        if bad or len(set(header)) != len(header):
            why = f"cell '{bad[0][:40]}'" if bad else "repeated column names"
            raise DatasetError(
                f"{path.name}: the first line does not look like a header ({why}). {what} files need a header "
                f"row naming the columns, e.g. instruction{delimiter}input{delimiter}output"
            )
        last = reader.line_num
        record_text.clear()
        for record in reader:
            start, last = last + 1, reader.line_num
            raw, multiline = "".join(record_text), last > start
            record_text.clear()
            if not record or all(not c.strip() for c in record):
                continue
            if multiline and raw.count('"') % 2:  # quotes pair up ("" inside a quoted field) unless one is open
                log.drop(
                    f'a quote (") opened here is never closed: lines {start} to {last} were read as one record; '
                    "close the quote, or double a quote inside a quoted cell",
                    start,
                    file=str(path),
                    kind=f"{what} records with an unterminated quote",
                )
                continue
            if len(record) != len(header):
                hint = f' (it runs over lines {start}-{last}: check for a stray quote ")' if multiline else ""
                log.drop(
                    f"has {len(record)} fields, the header has {len(header)}{hint}",
                    start,
                    file=str(path),
                    kind=f"{what} records with the wrong number of fields",
                )
                continue
            yield Row(dict(zip(header, record)), start, str(path))
    except csv.Error as exc:
        raise DatasetError(f"{path.name}: cannot read as {what} at line {reader.line_num}: {exc}") from None


def read_parquet(path: Path, log: ProblemLog) -> Iterator[Row]:
    """Parquet, batch by batch (pyarrow): memory stays bounded by one batch."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield Row(record, row, str(path))
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
        raise DatasetError(f"{path.name} is not a readable Parquet file: {exc}") from None


def read_arrow(path: Path, log: ProblemLog) -> Iterator[Row]:
    """Arrow IPC, stream or file form (``datasets.save_to_disk`` writes the stream form)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                batches = iter(pa.ipc.open_stream(source))
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            row = 0
            for batch in batches:
                for record in batch.to_pylist():
                    row += 1
                    yield Row(record, row, str(path))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path.name} is not a readable Arrow file: {exc}") from None


def read_file(path: Path, log: ProblemLog) -> Iterator[Row]:
    """Rows of one data file, whatever its type."""
    kind = sniff(path)
    if kind == "jsonl":
        return read_jsonl(path, log)
    if kind == "json":
        return read_json(path, log)
    if kind in ("csv", "tsv"):
        return read_delimited(path, log, "\t" if kind == "tsv" else ",")
    if kind == "parquet":
        return read_parquet(path, log)
    return read_arrow(path, log)
