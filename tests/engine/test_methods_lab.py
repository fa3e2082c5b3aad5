"""``engine methods``: each chosen method a run of its own in the store, its row in the table and the JSON report;
a method whose settings cannot work is a refused row naming the field."""

import json
import subprocess
import sys

from engine_helpers import write_sft

from finetune_studio.core.protocol.events import parse_event
from finetune_studio.core.protocol.methods_lab import MethodRow, MethodsLabReport
from finetune_studio.core.store import Store


def test_the_lab_trains_each_method_as_a_run_and_reports_its_row(tiny_model_dir, tmp_path):
    data = write_sft(tmp_path / "sft.jsonl")
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "methods", "--methods", "ia3,pfeiffer,prompt_tuning"]
        + ["--steps", "2", "--dataset", str(data), "--model", str(tiny_model_dir), "--json"]
        + ["--set", "packing=true"],  # prompt tuning cannot: refused before it loads anything
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # the report says which row was refused
    lines = proc.stdout.strip().splitlines()
    progress = [parse_event(line) for line in lines[:-1]]  # which method of how many, for the app's dialog
    assert [(p.done, p.total) for p in progress] == [(0, 3), (1, 3)]  # prompt tuning refused before training
    report = parse_event(lines[-1])
    assert isinstance(report, MethodsLabReport) and report.steps == 2 and report.scorer == ""
    rows = {r.method: r for r in report.rows}
    assert rows["prompt_tuning"].status == "refused" and "packing" in rows["prompt_tuning"].message
    store = Store()
    for name in ("ia3", "pfeiffer"):
        row = rows[name]
        assert row.status == "completed", row.message
        run = store.get_run(row.run_id)
        assert run is not None and run.status == "completed" and name in run.name
        assert json.loads(run.config)["method"] == name
        assert row.trainable_params > 0 and row.estimated_bytes > 0 and row.measured_bytes > 0
        assert row.tokens_per_s > 0 and row.final_loss is not None and row.eval_loss is not None
        assert row.exact is None  # no scorer for this dataset
    store.close()
    assert rows["pfeiffer"].trainable_params == 2 * (2 * 64 * 4 + 4 + 64)  # 2 layers, h 64, bottleneck 64 // 16


def test_the_report_round_trips():
    report = MethodsLabReport(steps=3, rows=(MethodRow("ia3", "completed", run_id="r1", exact=0.5),))
    assert parse_event(report.to_json()) == report
