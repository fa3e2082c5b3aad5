"""The dataset report: one typed, versioned event that the engine writes and the studio reads."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from studio_support import fake_engine

from finetune_studio.core.protocol.dataset_report import (
    DatasetReport,
    ExamplePreview,
    LengthBias,
    LengthStats,
    Problem,
    RenderedSequence,
    Segment,
    TokenStats,
)
from finetune_studio.core.protocol.events import PROTOCOL_VERSION, Log, ProtocolError, parse_event


def _sequence(prompt: str, answer: str) -> RenderedSequence:
    segs = (Segment(prompt, False, 5), Segment(answer, True, 2))
    return RenderedSequence(prompt + answer, segs, tokens=7, trained_tokens=2, truncated=False)


REPORT = DatasetReport(
    file="prefs.jsonl",
    format="trl",
    kind="preference",
    rows=2,
    rows_read=3,
    dropped={"missing 'rejected'": 1},
    problems=(Problem("missing 'rejected'", line=3, level="dropped"), Problem("read 1 file", level="note")),
    example=ExamplePreview(
        line=1,
        kind="preference",
        data={"prompt": [{"role": "user", "content": "2+2?"}]},
        chosen=_sequence("<user>2+2?", "4"),
        rejected=_sequence("<user>2+2?", "5"),
        prompt_tokens=5,
    ),
    model="tiny",
    loss_on="assistant",
    tokens=TokenStats(
        max_length=64,
        measured=2,
        lengths=LengthStats(2, 7, 7.5, 8, 8),
        trained=LengthStats(2, 1, 1.5, 2, 2),
        over_max_length=0,
        no_trained_tokens=0,
        difference_truncated=0,
        render_failures=0,
        length_bias=LengthBias("tokens", 2, 2.0, 1.0, 1.0),
    ),
    length_bias=LengthBias("tokens", 2, 2.0, 1.0, 1.0),
)


def test_round_trip():
    line = REPORT.to_json()
    body = json.loads(line)
    assert (body["v"], body["type"]) == (PROTOCOL_VERSION, "dataset_report")
    assert parse_event(line) == REPORT == DatasetReport.from_json(line.encode())
    assert DatasetReport.from_json(line).example.chosen.marked() == "<user>2+2?[[4]]"
    bare = DatasetReport(file="x", format="text", kind="text", rows=0)
    assert DatasetReport.from_json(bare.to_json()) == bare


def test_unknown_fields_are_ignored():
    body = json.loads(REPORT.to_json())
    body["added_later"] = {"anything": 1}
    body["example"]["extra"] = True
    assert DatasetReport.from_json(json.dumps(body)) == REPORT


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda b: b.update(v=PROTOCOL_VERSION + 1), "protocol version"),
        (lambda b: b.pop("v"), "protocol version"),
        (lambda b: b.update(type="dataset_summary"), "unknown event type"),
        (lambda b: b.pop("rows"), "bad dataset_report event"),
        (lambda b: b.update(rows="24"), "rows must be int"),
        (lambda b: b.update(rows=True), "not a boolean"),
        (lambda b: b.update(problems={"message": "x"}), "problems must be a list"),
        (lambda b: b["problems"].append("just text"), "Problem must be a JSON object"),
        (lambda b: b["example"]["chosen"].update(segments="ab"), "segments must be a list"),
        (lambda b: b["example"].update(data=None), "may not be null"),
        (lambda b: b["tokens"]["lengths"].pop("median"), "median"),
    ],
)
def test_a_malformed_report_is_a_protocol_error(change, match):
    body = json.loads(REPORT.to_json())
    change(body)
    with pytest.raises(ProtocolError, match=match):
        DatasetReport.from_json(json.dumps(body))


def test_another_event_is_not_a_report():
    with pytest.raises(ProtocolError, match="expected a dataset_report"):
        DatasetReport.from_json(Log(level="info", message="hi").to_json())


def test_the_engine_writes_exactly_this_message(tmp_path):
    from finetune_studio.engine.cli.data import main

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n" + json.dumps({"instruction": "x"}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", str(path), "--json", "--model", str(tmp_path / "no-model")]) == 0
    line = out.getvalue().strip()
    report = DatasetReport.from_json(line)
    assert (report.format, report.kind, report.rows, report.rows_read) == ("alpaca", "sft", 1, 2)
    assert [p.line for p in report.problems if p.level == "dropped"] == [2]
    assert report.example.data and not report.example.rendered
    assert json.loads(report.to_json()) == json.loads(line)  # nothing lost or invented on the way


@pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")
@pytest.mark.parametrize(
    "body,match",
    [
        ("emit(v=2, type='dataset_report', file='x', format='text', kind='text', rows=1)", "protocol version 2"),
        ("print(json.dumps({'ok': True, 'format': 'messages', 'rows': 3}))", "protocol version None"),
    ],
)
def test_the_studio_refuses_a_reply_in_another_protocol(qtbot, body, match):
    from PySide6.QtWidgets import QWidget

    from finetune_studio.studio.services.jobs import EngineJob

    owner = QWidget()
    qtbot.addWidget(owner)
    job = EngineJob(owner)
    job.command = fake_engine(body)
    done = []
    job.done.connect(done.append)
    with qtbot.waitSignal(job.failed, timeout=20_000) as failed:
        job.run("data", "inspect", "x")
    assert match in failed.args[0] and "not understood" in failed.args[0] and done == []
