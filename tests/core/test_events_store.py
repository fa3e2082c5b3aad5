import dataclasses
import json
import os
import subprocess
import sys

import pytest

from finetune_studio.core.protocol import events as ev
from finetune_studio.core.run_status import RunStatus
from finetune_studio.core.store import METRIC_COLUMNS, MetricRow, RunRecord, Store


def test_every_event_round_trips_through_json():
    samples = [
        ev.Started(run_id="r", run_dir="/x", total_steps=3),
        ev.Progress(stage="convert", done=1, total=4, message="m"),
        ev.Step(
            step=1,
            total_steps=3,
            loss=1.5,
            lr=1e-4,
            grad_norm=0.3,
            tokens_per_s=10.0,
            memory_used_bytes=1,
            memory_peak_bytes=2,
            reward_margin=0.1,
        ),
        ev.Eval(step=1, eval_loss=2.0),
        ev.CheckpointSaved(step=1, path="/c"),
        ev.Log(level="info", message="hi"),
        ev.Finished(run_id="r", status="completed", step=3, final_loss=1.0),
        ev.Failed(message="lower batch_size", kind="oom"),
        ev.ModelReady(name="m", path="/m", parameters=10),
    ]
    for event in samples:
        line = event.to_json()
        assert json.loads(line)["v"] == ev.PROTOCOL_VERSION
        assert ev.parse_event(line) == event


@pytest.mark.parametrize(
    "line,match",
    [
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"v": 99, "type": "step"}', "protocol version"),
        ('{"v": 1, "type": "party"}', "unknown event type"),
        ('{"v": 1, "type": "step", "step": 1}', "bad step"),
    ],
)
def test_bad_lines_raise_protocol_error(line, match):
    with pytest.raises(ev.ProtocolError, match=match):
        ev.parse_event(line)


def test_unknown_extra_fields_are_ignored():
    line = json.dumps({"v": 1, "type": "eval", "step": 2, "eval_loss": 1.0, "new_field": 3})
    assert ev.parse_event(line) == ev.Eval(step=2, eval_loss=1.0)


def test_store_runs_metrics_and_liveness(studio_home):
    store = Store()
    rid = store.create_run(
        {"model": "default", "dataset": "d.jsonl", "method": "lora", "objective": "sft", "max_steps": 10}
    )
    store.update_run(rid, status="running", pid=os.getpid())
    for step in range(1, 4):
        store.add_metrics(rid, "train", step, {"loss": 3.0 - step, "lr": 1e-4, "not_a_metric": 1})
    store.add_metrics(rid, "train", 2, {"loss": 0.5})  # a resumed run rewrites a step
    assert [m.loss for m in store.metrics(rid)] == [2.0, 0.5, 0.0]
    assert [m.step for m in store.metrics(rid, since_step=2)] == [3]
    assert store.get_run(rid).status is RunStatus.RUNNING
    assert store.find_run(rid[:12]).id == rid
    # A second connection (the app) sees the engine's writes at once.
    other = Store()
    assert other.get_run(rid).model == "default"
    dead = subprocess.Popen([sys.executable, "-P", "-c", "pass"])
    dead.wait()
    store.update_run(rid, pid=dead.pid)
    assert other.get_run(rid).status is RunStatus.INTERRUPTED
    store.delete_metrics_after(rid, 1)
    assert len(store.metrics(rid)) == 1


def test_failure_kinds_and_finished_statuses_are_enums_of_the_stored_strings():
    failed = ev.parse_event('{"v": 1, "type": "failed", "message": "m", "kind": "cancelled"}')
    assert failed.kind is ev.FailureKind.CANCELLED and json.loads(failed.to_json())["kind"] == "cancelled"
    newer = ev.parse_event('{"v": 1, "type": "failed", "message": "m", "kind": "quota"}')  # a newer engine's kind
    assert newer.kind is ev.FailureKind.ERROR
    done = ev.parse_event('{"v": 1, "type": "finished", "run_id": "r", "status": "stopped", "step": 2}')
    assert done.status is RunStatus.STOPPED
    with pytest.raises(ev.ProtocolError, match="bad finished"):  # a run that ends normally never failed
        ev.parse_event('{"v": 1, "type": "finished", "run_id": "r", "status": "failed", "step": 2}')


def test_metric_columns_are_the_step_and_eval_figures_and_the_stored_schema(studio_home):
    # the schema every database has had: adding a figure to Step or Eval adds a column, nothing else does
    stored = (
        "loss lr grad_norm tokens_per_s memory_used_bytes memory_peak_bytes epoch elapsed_s reward_chosen "
        "reward_rejected reward_margin reward_accuracy eval_loss time"
    ).split()
    assert list(METRIC_COLUMNS) == stored
    assert list(Store().db["metrics"].columns_dict) == ["run_id", "kind", "step", *stored]
    assert [f.name for f in dataclasses.fields(MetricRow)] == ["run_id", "kind", "step", *stored]
    step_fields = {f.name for f in dataclasses.fields(ev.Step)} | {f.name for f in dataclasses.fields(ev.Eval)}
    assert set(stored) - {"time"} <= step_fields


def test_store_reads_rows_as_frozen_records(studio_home):
    store = Store()
    rid = store.create_run({"model": "m", "max_steps": 5, "run_name": "first"})
    store.db.execute("ALTER TABLE runs ADD COLUMN from_a_newer_app TEXT")  # an unknown column is ignored
    store.update_run(rid, status="completed", final_loss=0.25, from_a_newer_app="x")
    store.add_metrics(rid, "eval", 5, {"eval_loss": 1.5})
    store.add_samples(rid, 5, ["p"], ["a"])
    run = store.get_run(rid)
    assert isinstance(run, RunRecord) and run.status is RunStatus.COMPLETED and run.name == "first"
    assert run.total_steps == 5 and run.final_loss == 0.25 and run.config_dict()["model"] == "m"
    assert run.error == "" and run.best_step is None  # NULL columns: the field's default
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.status = RunStatus.FAILED
    assert run["id"] == rid and run.get("error") == "" and run.get("no_such_column", "-") == "-"  # as a dict read
    (row,) = store.metrics(rid, "eval")
    assert (row.step, row.eval_loss, row.loss) == (5, 1.5, None)
    (sample,) = store.samples(rid)
    assert (sample.step, sample.prompt, sample.answer) == (5, "p", "a")
    assert [r.id for r in store.list_runs(status="completed")] == [rid]


def test_store_uses_wal(studio_home):
    assert Store().db.journal_mode == "wal"


def test_shared_core_imports_no_ml_stack_or_qt():
    code = (
        "import sys, finetune_studio.core.config, finetune_studio.core.protocol.events, finetune_studio.core.store\n"
        "import finetune_studio.core.paths, finetune_studio.core.memory.estimate\n"
        "bad = [m for m in ('torch', 'transformers', 'bitsandbytes', 'peft', 'PySide6', 'finetune_studio.engine') "
        "if m in sys.modules]\nprint(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
