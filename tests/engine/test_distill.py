"""Knowledge distillation: the chunked loss against a direct full-vocabulary computation, and the objective."""

from __future__ import annotations

import pytest
import torch

from finetune_studio.kernels.distill_logits import distill_losses

# --- the loss ------------------------------------------------------------------------------------------------------


def direct_kl(zs: torch.Tensor, zt: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """The divergence per row written out from its definition on the full [N, V] probabilities."""
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    if divergence == "forward_kl":
        return (pt * (pt.log() - ps.log())).sum(-1)
    if divergence == "reverse_kl":
        return (ps * (ps.log() - pt.log())).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (pt.log() - m.log())).sum(-1) + (1 - beta) * (ps * (ps.log() - m.log())).sum(-1)


def direct_losses(hs, ws, ht, wt, targets, divergence, temperature, alpha, beta):
    zs = hs @ ws.t()
    zt = (ht @ wt.t()).detach()
    kl = direct_kl(zs / temperature, zt / temperature, divergence, beta)
    ce = -torch.log_softmax(zs, -1).gather(-1, targets[:, None]).squeeze(-1)
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("impl,chunk", [("torch", 0), ("chunked", 1), ("chunked", 7), ("chunked", 64)])
@pytest.mark.parametrize("train_head", [False, True])
def test_loss_and_gradients_equal_the_direct_full_vocabulary_computation(divergence, impl, chunk, train_head):
    torch.manual_seed(3)
    n, h, ht_size, v = 37, 16, 24, 101  # the teacher wider than the student; sizes not multiples of the chunk
    hs = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    ws = (torch.randn(v, h, dtype=torch.float64) * 0.5).requires_grad_(train_head)
    ht = torch.randn(n, ht_size, dtype=torch.float64)
    wt = torch.randn(v, ht_size, dtype=torch.float64) * 0.5
    targets = torch.randint(0, v, (n,))
    weights = torch.rand(n, dtype=torch.float64)  # an arbitrary upstream gradient per position
    opts = dict(divergence=divergence, temperature=2.0, alpha=0.7, beta=0.3)
    wanted = (hs, ws) if train_head else (hs,)

    loss, kl, ce = direct_losses(hs, ws, ht, wt, targets, **opts)
    expected_grads = torch.autograd.grad((loss * weights).sum(), wanted)
    out = distill_losses(hs, ws, ht, wt, targets, impl=impl, chunk=chunk or 512, **opts)
    grads = torch.autograd.grad((out.loss * weights).sum(), wanted)

    assert torch.allclose(out.loss, loss, atol=1e-10)
    assert torch.allclose(out.kl, kl, atol=1e-10) and torch.allclose(out.ce, ce, atol=1e-10)
    assert (out.kl >= -1e-12).all() and not out.kl.requires_grad and not out.ce.requires_grad
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-9)


def test_jsd_equals_trls_generalised_jsd(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    torch.manual_seed(0)
    zs, zt = torch.randn(9, 50, dtype=torch.float64), torch.randn(9, 50, dtype=torch.float64)
    eye = torch.eye(50, dtype=torch.float64)  # hidden = logits through an identity head
    for beta in (0.1, 0.5, 0.9):
        ours = distill_losses(zs, eye, zt, eye, torch.zeros(9, dtype=torch.long), divergence="jsd", beta=beta, alpha=1)
        trl = GKDTrainer.generalized_jsd_loss(zs[None], zt[None], beta=beta, temperature=1.0, reduction="sum")
        assert torch.allclose(ours.kl.sum(), trl, atol=1e-10)


def test_the_kl_is_zero_when_the_student_is_the_teacher():
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 8), torch.randn(40, 8)
    targets = torch.randint(0, 40, (20,))
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        out = distill_losses(hidden, weight, hidden, weight, targets, divergence=divergence, chunk=6)
        assert out.kl.abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_close_to_float64(dtype):
    torch.manual_seed(1)
    hs, ws = torch.randn(30, 16), torch.randn(64, 16) * 0.2
    ht, wt = torch.randn(30, 16), torch.randn(64, 16) * 0.2
    targets = torch.randint(0, 64, (30,))
    exact = distill_losses(hs.double(), ws.double(), ht.double(), wt.double(), targets, impl="torch")
    h = hs.to(dtype).requires_grad_()
    out = distill_losses(h, ws.to(dtype), ht.to(dtype), wt.to(dtype), targets, chunk=8)
    out.loss.sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert out.loss.dtype == torch.float32
    assert torch.allclose(out.loss.double(), exact.loss, atol=tol)
    assert h.grad is not None and h.grad.dtype == dtype


def test_bad_settings_are_refused_by_name():
    hs, ws, targets = torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="beta"):
        distill_losses(hs, ws, hs, ws, targets, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="divergence"):
        distill_losses(hs, ws, hs, ws, targets, divergence="kl")
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill_losses(hs, ws, hs, torch.randn(6, 4), targets)


# --- the objective, on tiny models -------------------------------------------------------------------------------


@pytest.fixture
def teacher_run(tiny_model_dir, tmp_path):
    """A tuned teacher: 6 SFT steps on the tiny model, by run id."""
    from engine_helpers import tiny_config, write_sft

    from finetune_studio.engine.train.recipe import train_run

    data = write_sft(tmp_path / "teach.jsonl")
    run = train_run(tiny_config(tiny_model_dir, data, max_steps=6, learning_rate=3e-2, compute_dtype="float32"))
    assert run.status == "completed"
    return run.run_id, data


def test_the_students_kl_to_the_teacher_falls(tiny_model_dir, teacher_run):
    """The student (the base with a fresh adapter) learns the teacher (the base with the run's adapter, by run id)."""
    from engine_helpers import Recorder, tiny_config

    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    run_id, data = teacher_run
    rec = Recorder()
    config = tiny_config(
        tiny_model_dir,
        data,
        objective="distill",
        distill_teacher=run_id,
        distill_alpha=1.0,
        max_steps=12,
        learning_rate=1e-2,
        eval_every=4,
        compute_dtype="float32",
    )
    assert train_run(config, reporter=Reporter(extra=rec)).status == "completed"
    steps = rec.of("step")
    kl = [s.metrics["kl"] for s in steps]
    assert all(s.metrics["ce"] > 0 for s in steps)
    assert [s.loss for s in steps] == pytest.approx(kl, rel=1e-5)  # alpha 1, T 1: the loss is the KL
    assert kl[0] > 5e-3  # the teacher is the tuned model, not the base the student starts as
    assert sum(kl[-3:]) < 0.5 * sum(kl[:3])
    evals = [e.metrics["kl"] for e in rec.of("eval")]  # the same held-out tokens at steps 4, 8 and 12
    assert len(evals) == 3 and evals[2] <= evals[1] <= evals[0] and evals[2] < evals[0]


def test_against_its_own_base_the_kl_starts_at_zero(tiny_model_dir, tmp_path):
    """The first step's loss is computed before any update, the student's fresh adapter a no-op: the student is then
    the teacher, and the divergence is 0 (the chunked heads, the trained positions and the teacher's pass agree)."""
    from engine_helpers import Recorder, tiny_config, write_sft

    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        rec = Recorder()
        config = tiny_config(
            tiny_model_dir,
            write_sft(tmp_path / "d.jsonl"),
            objective="distill",
            distill_teacher=str(tiny_model_dir),
            distill_divergence=divergence,
            distill_temperature=2.0,
            max_steps=1,
            compute_dtype="float32",
        )
        train_run(config, reporter=Reporter(extra=rec))
        assert rec.of("step")[0].metrics["kl"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("on_policy", [False, True])
def test_resume_reproduces_the_curve(tiny_model_dir, tmp_path, on_policy):
    """Off-policy, and on-policy (each prompt's sample seeded by the run's seed and the example's index)."""
    from engine_helpers import Recorder, tiny_config, write_sft
    from tiny_model import build_tiny_model_dir

    from finetune_studio.engine.train.recipe import StopFlag, train_run
    from finetune_studio.engine.train.reporting import Reporter

    teacher = build_tiny_model_dir(tmp_path / "teacher", seed=5, hidden_size=96, layers=3)  # wider, deeper
    config = tiny_config(
        tiny_model_dir,
        write_sft(tmp_path / "d.jsonl"),
        objective="distill",
        distill_teacher=str(teacher),
        distill_divergence="jsd",
        distill_temperature=2.0,
        distill_on_policy=on_policy,
        max_steps=6,
        batch_size=3,
        gradient_accumulation_steps=2,
        compute_dtype="float32",
    )
    full = Recorder()
    train_run(config, reporter=Reporter(extra=full))
    stop, first = StopFlag(), Recorder()

    def stop_at_three(event):
        first(event)
        if event.type == "step" and event.step == 3:
            stop.set()

    stopped = train_run(config, reporter=Reporter(extra=stop_at_three), stop=stop)
    assert stopped.status == "stopped" and stopped.step == 3
    second = Recorder()
    resumed = train_run(resume=stopped.run_id, reporter=Reporter(extra=second))
    assert resumed.status == "completed"
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-5)
    kl = [s.metrics["kl"] for s in first.of("step") + second.of("step")]
    assert kl == pytest.approx([s.metrics["kl"] for s in full.of("step")], abs=1e-6)


def test_a_teacher_with_another_tokenizer_is_refused_by_name(tiny_model_dir, tmp_path):
    from engine_helpers import tiny_config, write_sft
    from tiny_model import build_tiny_model_dir
    from transformers import AutoTokenizer

    from finetune_studio.engine.train.recipe import TrainingFailed, train_run

    other = build_tiny_model_dir(tmp_path / "other")
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})  # one token more
    tok.save_pretrained(other)
    config = tiny_config(
        tiny_model_dir, write_sft(tmp_path / "d.jsonl"), objective="distill", distill_teacher=str(other)
    )
    with pytest.raises(TrainingFailed, match="distill_teacher: .*another tokenizer"):
        train_run(config)
    # the same vocabulary, another end-of-text token
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(other)
    with pytest.raises(
        TrainingFailed, match="distill_teacher: .*eos_token '<.endoftext.>', the student's '<.im_end.>'"
    ):
        train_run(config)
    unknown = tiny_config(
        tiny_model_dir, write_sft(tmp_path / "e.jsonl"), objective="distill", distill_teacher="nosuchrun"
    )
    with pytest.raises(TrainingFailed, match="distill_teacher: model not found: 'nosuchrun'.*run id / adapter folder"):
        train_run(unknown)


def test_the_config_names_bad_distillation_settings():
    from finetune_studio.core.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="distill_teacher"):
        TrainConfig(objective="distill")
    for field, value in (
        ("distill_alpha", 1.5),
        ("distill_temperature", 0.0),
        ("distill_divergence", "kl"),
        ("distill_jsd_beta", 1.0),
        ("distill_teacher_precision", "8-bit"),
        ("distill_on_policy", "yes"),
    ):
        with pytest.raises(ConfigError, match=field):
            TrainConfig(objective="distill", distill_teacher="default", **{field: value})


# --- the memory estimate -----------------------------------------------------------------------------------------


def test_the_estimate_counts_the_teacher(tiny_model_dir, teacher_run):
    """The teacher's weights join the base weights (its own dtype, 16 bits or NF4), both heads' chunks replace the
    output head's term; a teacher named by run id is found through its run; an unknown one is said to be unknown."""
    from finetune_studio.core.config import TrainConfig
    from finetune_studio.core.devices import DeviceInfo
    from finetune_studio.core.memory import estimate as est
    from finetune_studio.kernels.distill_logits import DEFAULT_CHUNK

    assert est.DISTILL_CHUNK == DEFAULT_CHUNK
    gpu = DeviceInfo("cuda", "Test GPU", 8 * 2**30, 8 * 2**30, True)
    shape = est.ModelShape.for_model_spec(str(tiny_model_dir))
    assert shape is not None
    sft = est.estimate_training_memory(shape, TrainConfig(model=str(tiny_model_dir)), gpu)
    run_id, _data = teacher_run
    for teacher, precision, weight_bytes in (
        (str(tiny_model_dir), "auto", 2),  # bf16 on this GPU
        (str(tiny_model_dir), "16-bit", 2),
        (run_id, "auto", 2),  # the run's base: the tiny model
    ):
        config = TrainConfig(
            model=str(tiny_model_dir),
            objective="distill",
            distill_teacher=teacher,
            distill_teacher_precision=precision,
        )
        e = est.estimate_training_memory(shape, config, gpu)
        assert e.base_weights - sft.base_weights == shape.parameter_count * weight_bytes
        n = e.batch.trained_tokens
        assert e.logits == 8 * 4 * shape.vocab_size * min(n, 256) + n * (2 * 64 * 2 + 64 * 2 + 48)
        assert any("teacher" in note for note in e.notes)
    quarter = est.estimate_training_memory(
        shape,
        TrainConfig(
            model=str(tiny_model_dir), objective="distill", distill_teacher=run_id, distill_teacher_precision="4-bit"
        ),
        gpu,
    )
    assert quarter.base_weights - sft.base_weights == est.base_weight_bytes(shape, True, 2)
    unknown = est.estimate_training_memory(
        shape, TrainConfig(model=str(tiny_model_dir), objective="distill", distill_teacher="no-such-run"), gpu
    )
    assert unknown.base_weights == sft.base_weights and any("unknown" in note for note in unknown.notes)


def test_on_policy_trains_on_the_students_own_answers(tiny_model_dir, tmp_path):
    """On-policy: the answers are sampled by the student; each sample's tokens are averaged, then the samples."""
    from engine_helpers import Recorder, tiny_config, write_sft

    from finetune_studio.engine.train.objectives.distill import Distill
    from finetune_studio.engine.train.recipe import TrainingFailed, train_run
    from finetune_studio.engine.train.reporting import Reporter

    sampled: list = []
    original = Distill.on_policy

    def spy(self, batch):
        out = original(self, batch)
        sampled.append((batch, out))
        return out

    rec = Recorder()
    config = tiny_config(
        tiny_model_dir,
        write_sft(tmp_path / "d.jsonl"),
        objective="distill",
        distill_teacher=str(tiny_model_dir),
        distill_on_policy=True,
        max_steps=2,
        compute_dtype="float32",
    )
    Distill.on_policy = spy
    try:
        assert train_run(config, reporter=Reporter(extra=rec)).status == "completed"
    finally:
        Distill.on_policy = original
    assert len(sampled) == 2 and all(s.metrics["kl"] >= 0 and s.metrics["ce"] > 0 for s in rec.of("step"))
    for given, made in sampled:
        assert made.sequences == given.sequences
        for row in range(made.sequences):
            labels = made.labels[row][made.attention_mask[row].bool()]
            trained = (labels != -100).nonzero()[:, 0]
            assert len(trained) > 0
            # the prompt is the dataset's, untrained; every sampled token is trained
            assert (labels[: trained[0]] == -100).all() and (labels[trained[0] :] != -100).all()
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join('{"text": "plain text with no prompt"}' for _ in range(12)) + "\n")
    plain = tiny_config(
        tiny_model_dir, text, objective="distill", distill_teacher=str(tiny_model_dir), distill_on_policy=True
    )
    with pytest.raises(TrainingFailed, match="distill_on_policy: needs prompts"):
        train_run(plain)


def test_the_demo_report_round_trips_and_reads_as_a_summary():
    from finetune_studio.core.protocol.distill_report import DemoDistillReport
    from finetune_studio.core.protocol.events import parse_event
    from finetune_studio.engine.demo.distill import summary

    figures = {"exact": 0.5, "valid": 1.0, "n": 24, "tokens_per_s": 10.0, "tokens_per_cpu_s": 12.0, "layers": 30}
    report = {
        "eval_prompts": 24,
        "teacher": figures,
        "student_before": {**figures, "exact": 0.0, "tokens_per_s": 19.0, "layers": 15},
        "student_after": {**figures, "exact": 0.45, "tokens_per_s": 20.0, "tokens_per_cpu_s": 25.0, "layers": 15},
        "kept_layers": [0, 2],
        "teacher_run": "r1",
        "distill_run": "r2",
        "settings": {"steps": 30},
        "total_seconds": 12.0,
    }
    event = DemoDistillReport.from_fields(report)
    assert parse_event(event.to_json()) == event
    assert event.student_after is not None and event.student_after.tokens_per_cpu_s == 25.0
    text = summary(report)
    assert "keeps 90% of the teacher's exact-match score at 2.00x its speed (2.08x per CPU second" in text
