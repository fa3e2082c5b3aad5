"""The train page shows the engine's sample events (answers to fixed validation prompts at each evaluation) and,
under early stopping, the best checkpoint; a reopened run shows them from the database."""

from __future__ import annotations

import json

from finetune_studio.core.protocol.events import parse_event
from finetune_studio.core.store import Store


def _event(**kw):
    return parse_event(json.dumps({"v": 1, **kw}))


def test_samples_and_best_checkpoint_on_the_train_page(qtbot):
    from finetune_studio.studio.pages.train_page import TrainPage
    from finetune_studio.studio.state.run import MemoryState, RunState

    state = RunState()
    page = TrainPage(state, MemoryState())
    qtbot.addWidget(page)
    assert page.samples_view.toPlainText() == "" and page.best_label.isHidden()
    state.apply(_event(type="sample", step=10, prompts=["Say hi."], answers=["hi hi\nhi"]))
    state.apply(_event(type="eval", step=10, eval_loss=1.5, best_eval_loss=1.5, best_step=10, is_best=True))
    state.apply(_event(type="sample", step=20, prompts=["Say hi."], answers=["Hello!"]))
    state.apply(_event(type="eval", step=20, eval_loss=1.7, best_eval_loss=1.5, best_step=10))
    text = page.samples_view.toPlainText()
    assert text.index("Step 20") < text.index("Step 10  (best)")  # newest first, the best marked
    assert "  Q: Say hi.\n  A: Hello!" in text and "A: hi hi\n     hi" in text
    assert not page.best_label.isHidden() and "step 10, eval loss 1.5000" in page.best_label.text()
    state.apply(
        _event(type="finished", run_id="r", status="completed", step=20, best_checkpoint="/runs/r/best", best_step=10)
    )
    assert page.best_label.text().endswith("step 10, eval loss 1.5000: /runs/r/best")
    state.reset()
    assert page.samples_view.toPlainText() == "" and page.best_label.isHidden()


def test_a_reopened_run_shows_its_samples_and_best_step(qtbot):
    from finetune_studio.studio.services.run_controller import RunController
    from finetune_studio.studio.state.run import MemoryState, RunState

    store = Store()
    run_id = store.create_run({"model": "default", "dataset": "x.jsonl"}, name="r")
    store.add_samples(run_id, 5, ["Q1", "Q2"], ["A1", "A2"])
    store.update_run(run_id, status="completed", best_step=5, best_eval_loss=0.25, best_checkpoint="/b")
    state = RunState()
    controller = RunController(state, MemoryState(), store)
    assert controller.open_run(run_id)
    assert state.samples == {5: [("Q1", "A1"), ("Q2", "A2")]}
    assert (state.best_step, state.best_eval_loss, state.best_checkpoint) == (5, 0.25, "/b")
    controller.follow_timer.stop()
    store.close()
