"""The engine's reporter keeps an objective's own figures (a Step's and an Eval's ``metrics``) in the database."""

from __future__ import annotations

from finetune_studio.core.store import Store


def test_the_engines_reporter_keeps_a_steps_and_an_evaluations_own_figures(studio_home, tmp_path):
    from finetune_studio.core.protocol.events import Eval, Step
    from finetune_studio.engine.train.reporting import Reporter

    store = Store()
    rid = store.create_run({"model": "m", "objective": "grpo", "max_steps": 1})
    reporter = Reporter()
    reporter.attach_run(store, rid, tmp_path)
    try:
        reporter.emit(
            Step(
                step=1,
                total_steps=1,
                loss=0.0,
                lr=1e-5,
                grad_norm=0.1,
                tokens_per_s=9.0,
                memory_used_bytes=1,
                memory_peak_bytes=1,
                metrics={"reward": 0.75, "reward/json_valid": 1.0, "kl": 0.002},
            )
        )
        reporter.emit(Eval(step=1, eval_loss=0.5, metrics={"accuracy": 0.9}))
    finally:
        reporter.close()
    assert store.named_metrics(rid) == {1: {"reward": 0.75, "reward/json_valid": 1.0, "kl": 0.002}}
    assert store.named_metrics(rid, "eval") == {1: {"accuracy": 0.9}}
    assert store.metrics(rid)[0].grad_norm == 0.1
