"""A distillation run's generation speed (the ``distill_speed`` event): through the protocol and the store."""

from __future__ import annotations

from finetune_studio.core.protocol.distill_report import DistillSpeed
from finetune_studio.core.protocol.events import parse_event
from finetune_studio.core.store import Store

SPEED = DistillSpeed(
    prompts=4,
    new_tokens=48,
    teacher_tokens_per_s=10.5,
    teacher_tokens_per_cpu_s=12.25,
    student_tokens_per_s=19.0,
    student_tokens_per_cpu_s=23.5,
    teacher_layers=30,
    student_layers=15,
    teacher_params=134_515_008,
    student_params=81_413_568,
)


def test_the_event_round_trips_through_json():
    again = parse_event(SPEED.to_json())
    assert again == SPEED
    assert isinstance(again.prompts, int) and isinstance(again.student_params, int)
    assert again.speedup == 19.0 / 10.5 and again.speedup_cpu == 23.5 / 12.25


def test_the_store_keeps_one_per_run_and_a_run_without_one_reads_none(studio_home):
    store = Store()
    rid = store.create_run({"model": "m", "objective": "distill", "max_steps": 3})
    other = store.create_run({"model": "m", "objective": "distill", "max_steps": 3})
    assert store.distill_speed(rid) is None
    store.add_metrics(rid, "train", 1, {"loss": 1.0, "metrics": {"kl": 0.5, "ce": 2.0}})
    store.add_distill_speed(rid, SPEED)
    assert store.distill_speed(rid) == SPEED
    assert store.distill_speed(other) is None
    assert store.named_metrics(rid, "train") == {1: {"kl": 0.5, "ce": 2.0}}  # the step figures untouched
    store.delete_metrics_after(rid, 0)  # a resume from the start: the speed is measured again at the end
    faster = DistillSpeed(**{**SPEED.__dict__, "student_tokens_per_s": 25.0})
    store.add_distill_speed(rid, faster)
    store.close()
    assert Store().distill_speed(rid) == faster
