"""The studio's memory budget: fitted to the dataset report when there is one (and saying so), and the runs
table's estimate, measured peak and error."""

from __future__ import annotations

from PySide6.QtCore import Qt

from finetune_studio.core.config import TrainConfig
from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory.estimate import GIB, ModelShape
from finetune_studio.core.protocol.dataset_report import DatasetReport, TokenStats
from finetune_studio.core.protocol.memory_report import memory_report
from finetune_studio.core.store import Store
from finetune_studio.studio.services import estimate
from finetune_studio.studio.widgets.runs_model import COLUMNS, RunsModel

CPU = DeviceInfo("cpu", "Test CPU", 16 * GIB, 12 * GIB, True)
TOKENS = TokenStats(
    512, 400, None, None, 0, 0, 0, 0, longest_rows=(126, 120, 118, 110, 90), most_trained_rows=(30,) * 5
)
REPORT = DatasetReport(file="demo.jsonl", format="messages", kind="sft", rows=400, tokens=TOKENS)  # as parsed


def test_estimate_is_fitted_to_the_dataset_report():
    config = TrainConfig(dataset="demo.jsonl", batch_size=4, max_length=512, packing=False)
    fitted = estimate.estimate(config, None, CPU, REPORT)
    worst = estimate.estimate(config, None, CPU, None)
    assert fitted.lengths.startswith("Fitted to the data") and "126 tokens" in fitted.lengths
    assert worst.lengths.startswith("Worst case")
    assert fitted.total_bytes < 0.7 * worst.total_bytes  # the demo's rows are a quarter of max_length
    expected = memory_report(ModelShape.for_model_spec("default"), config, CPU, estimate.data_lengths(REPORT))
    assert fitted.total_bytes == expected.total_bytes
    no_dataset = estimate.estimate(config.replace(dataset=""), None, CPU, REPORT)  # a stale report is not used
    assert no_dataset.lengths.startswith("Worst case")
    old_report = DatasetReport(  # an older engine's report, without the longest rows
        file="d.jsonl", format="messages", kind="sft", rows=10, tokens=TokenStats(512, 10, None, None, 0, 0, 0, 0)
    )
    assert estimate.estimate(config, None, CPU, old_report).lengths.startswith("Worst case")


def test_runs_table_shows_estimate_peak_and_error(qtbot):
    store = Store()
    config = TrainConfig(dataset="demo.jsonl")
    report = memory_report(ModelShape.for_model_spec("default"), config, CPU)
    run_id = store.create_run(config.to_dict(), name="r")
    peak = int(report.total_bytes / 1.05)
    store.update_run(
        run_id,
        memory_budget_bytes=report.total_bytes,
        memory_estimate=report.to_json(),
        memory_peak_bytes=peak,
        status="completed",
    )
    store.create_run(config.to_dict(), name="no memory yet")
    model = RunsModel()
    model.set_runs(store.list_runs(order_by="created_at"))
    col = {key: i for i, (key, _) in enumerate(COLUMNS)}

    def cell(row: int, key: str, role=Qt.ItemDataRole.DisplayRole):
        return model.data(model.index(row, col[key]), role)

    assert cell(0, "memory_error") == "+5.0%"
    assert cell(0, "memory_budget_bytes").endswith("GiB") and cell(0, "memory_peak_bytes").endswith("GiB")
    tip = cell(0, "memory_error", Qt.ItemDataRole.ToolTipRole)
    assert "worst case" in tip and "resident peak" in tip and "activations" in tip
    assert cell(1, "memory_error") == "" and cell(1, "memory_peak_bytes") == ""
    store.close()


def test_model_panel_counts_an_unknown_architecture_with_the_engine(qtbot, tmp_path):
    """GPT-2 (fused Conv1D) is not in the formula: the panel asks the engine to count its parameters on the meta
    device for the chosen method, caches them, and the estimate uses them."""
    import transformers

    from finetune_studio.studio.state.setup import SetupState
    from finetune_studio.studio.widgets.model_panel import ModelPanel

    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300)
    ).save_pretrained(folder)
    state = SetupState({"model": str(folder), "dataset": "", "method": "dora", "lora_rank": "8"})
    panel = ModelPanel(state)
    qtbot.addWidget(panel)
    panel.resolve()
    qtbot.waitUntil(lambda: getattr(state.model_info, "counted_for", "") == "dora r=8 all-linear", timeout=180_000)
    info = state.model_info
    from finetune_studio.engine.train.memory_budget import meta_param_counts

    config = TrainConfig(model=str(folder), dataset="d.jsonl", method="dora", lora_rank=8)
    counts = meta_param_counts(folder, config)
    assert (info.total_params, info.trainable_params) == (counts.total_params, counts.trainable_params)
    assert estimate.counted_params(config, info) == counts
    shape = ModelShape.from_model_dir(folder)
    assert (
        estimate.estimate(config, info, CPU).total_bytes == memory_report(shape, config, CPU, counts=counts).total_bytes
    )
    assert estimate.counted_params(config.replace(lora_rank=4), info) is None  # counted for another rank
    assert (str(folder), "dora r=8 all-linear") in panel.counts  # cached: a second look needs no engine
    panel.count_job.cancel()
