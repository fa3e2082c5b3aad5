"""The Runs page's methods lab: it asks the engine's ``methods --json`` for the chosen methods, shows which one
trains, fills the table from the report (a refused method with its reason) and refreshes the runs list."""

from PySide6.QtCore import Qt
from studio_support import IGNORE_OFFSCREEN, fake_engine

from finetune_studio.core import methods
from finetune_studio.studio.widgets.methods_lab_dialog import COLUMNS

pytestmark = IGNORE_OFFSCREEN  # the dialog is shown


def test_the_lab_runs_the_chosen_methods_and_shows_each_row(qtbot, window):
    win = window
    dialog = win.runs_page.open_methods_lab()
    assert dialog.isVisible()
    labels = {dialog.methods.item(i).text(): dialog.methods.item(i) for i in range(dialog.methods.count())}
    assert "QLoRA" not in labels and {"IA3", "Houlsby adapter", "Prompt tuning"} <= set(labels)
    assert labels["IA3"].toolTip() == methods.method("ia3").summary  # the one sentence of core.methods
    for item in labels.values():
        item.setCheckState(Qt.CheckState.Unchecked)
    labels["IA3"].setCheckState(Qt.CheckState.Checked)
    labels["Prompt tuning"].setCheckState(Qt.CheckState.Checked)
    dialog.steps.setValue(7)
    assert dialog.arguments() == ["methods", "--json", "--methods", "ia3,prompt_tuning", "--steps", "7"]
    calls: list[tuple[str, ...]] = []
    body = fake_engine(
        """
        emit(type="progress", stage="methods", done=0, total=2, message="Training ia3")
        time.sleep(0.5)
        emit(type="methods_lab_report", dataset="d.jsonl", steps=7, scorer="exact match (demo task)", rows=[
            dict(method="ia3", status="completed", run_id="r1", trainable_params=57600, estimated_bytes=2**20,
                 measured_bytes=3 * 2**20, tokens_per_s=70.0, seconds=12.0, final_loss=0.5, eval_loss=0.6, exact=0.25),
            dict(method="prompt_tuning", status="refused", message="packing: set packing to false")])
        """
    )
    dialog.job.command = lambda *args: calls.append(args) or body(*args)
    refreshed: list[int] = []
    original = win.runs_page.refresh
    win.runs_page.refresh = lambda: refreshed.append(1) or original()
    with qtbot.waitSignal(dialog.job.progress, timeout=20_000):
        dialog.start_button.click()
    assert "Training ia3 (1 of 2)" in dialog.status.text() and not dialog.start_button.isEnabled()
    with qtbot.waitSignal(dialog.finished_report, timeout=20_000):
        pass
    assert calls == [("methods", "--json", "--methods", "ia3,prompt_tuning", "--steps", "7")]
    cells = [[dialog.table.item(r, c).text() for c in range(len(COLUMNS))] for r in range(dialog.table.rowCount())]
    assert cells[0] == ["IA3", "57,600", "1.0 / 3.0", "70", "12", "0.500", "0.600", "25%"]
    assert cells[1][:2] == ["Prompt tuning", "refused: packing: set packing to false"]
    assert "1 of 2 methods trained on the demo task, 7 steps each" in dialog.status.text()
    assert refreshed and dialog.start_button.isEnabled()
