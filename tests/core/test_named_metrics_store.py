"""An objective's own figures (a Step's or Eval's ``metrics`` by name) kept in the database beside the columns."""

from __future__ import annotations

import math

from finetune_studio.core.store import Store


def test_named_figures_are_stored_read_back_by_step_and_dropped_after_a_resume_point(studio_home):
    store = Store()
    rid = store.create_run({"model": "m", "objective": "grpo", "max_steps": 3})
    for step in (1, 2, 3):
        figures = {"reward": step / 10, "reward/json_valid": 1.0, "kl": 0.01 * step, "bad": math.nan}
        store.add_metrics(rid, "train", step, {"loss": 1.0, "metrics": figures})
    store.add_metrics(rid, "eval", 3, {"eval_loss": 0.5, "metrics": {"accuracy": 0.75, "gap": 1.25}})
    store.add_metrics(rid, "train", 4, {"loss": 1.0})  # a step without figures of its own

    train = store.named_metrics(rid, "train")
    assert sorted(train) == [1, 2, 3]
    assert train[2] == {"reward": 0.2, "reward/json_valid": 1.0, "kl": 0.02}  # NaN is no figure
    assert store.named_metrics(rid, "train", since_step=2) == {3: train[3]}
    assert store.named_metrics(rid, "eval") == {3: {"accuracy": 0.75, "gap": 1.25}}
    assert [r.loss for r in store.metrics(rid)] == [1.0] * 4  # the columns as before

    store.add_metrics(rid, "train", 2, {"loss": 0.5, "metrics": {"reward": 0.9}})  # written again: replaced
    assert store.named_metrics(rid)[2]["reward"] == 0.9
    store.delete_metrics_after(rid, 1)  # a resume from step 1
    assert sorted(store.named_metrics(rid)) == [1] and store.named_metrics(rid, "eval") == {}
    store.close()
    assert Store().named_metrics(rid) == {1: train[1]}  # an existing database opens with its table
