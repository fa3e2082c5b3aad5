"""Padding-free packing: a packed batch gives the padded batch's loss and adapter gradients, and a packed run the
padded run's loss curve."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import Recorder, micro_step_loss, tiny_config

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory.estimate import DataLengths, ModelShape, batch_lengths, estimate_training_memory
from finetune_studio.core.store import Store
from finetune_studio.engine.datasets.render import IGNORE, Tokenized, TokenizedPair
from finetune_studio.engine.train.adapters import add_adapters
from finetune_studio.engine.train.batches import make_batch
from finetune_studio.engine.train.memory_budget import longest_batch
from finetune_studio.engine.train.model_patches import fused_ops as patching
from finetune_studio.engine.train.recipe import StopFlag, train_run
from finetune_studio.engine.train.reporting import Reporter

VOCAB = 256
SHAPE = dict(
    hidden_size=48,
    intermediate_size=136,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
LENGTHS = (9, 31, 5, 22)  # uneven on purpose: the padded batch pads three rows of four


def _row(n: int, seed: int) -> Tokenized:
    """A random row whose second half is trained."""
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Tokenized(ids, [IGNORE] * (n // 2) + ids[n // 2 :])


def _examples(objective: str) -> list:
    if objective == "sft":
        return [_row(n, i) for i, n in enumerate(LENGTHS)]
    # a shared prompt, answers of different lengths
    return [
        TokenizedPair(_row(n, i), _row(max(4, n - 3 * i + 5), 100 + i), prompt_tokens=0) for i, n in enumerate(LENGTHS)
    ]


def _model(arch: str, config: TrainConfig, *, fused: bool, routed: bool, **extra):
    import transformers

    cfg_cls, lm_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(0)
    base = lm_cls(cfg_cls(**{**SHAPE, **extra}, attn_implementation="sdpa"))
    base.config.use_cache = False
    for p in base.parameters():
        p.requires_grad_(False)
    model = add_adapters(base, config)
    with torch.no_grad():  # B = 0 at the start would give A no gradient: give B values
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    patching.apply_memory_patches(model, fused)
    if routed:
        patching.apply_packed_attention(model)
    model.train()
    return model


def _loss_and_grads(model, config: TrainConfig, examples: list, packed: bool):
    """The engine's loss for one micro-batch (Recipe._micro_step) and the adapter gradients."""
    model.zero_grad(set_to_none=True)
    batch = make_batch(examples, list(range(len(examples))), pad_id=0, packed=packed)
    loss = micro_step_loss(model, config.objective, batch)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(padded, packed):
    (loss0, grads0), (loss1, grads1) = padded, packed
    assert loss1 == pytest.approx(loss0, rel=1e-6, abs=1e-7)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name, g in grads0.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (grads1[name] - g).abs().max().item() <= 5e-5 * scale + 1e-9, name  # float32 sums, another order


class _Calls:
    """Counts the calls of the per-sequence attention (the real op runs)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = patching.packed_attention

        def counted(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(patching, "packed_attention", counted)


def test_a_packed_batch_is_one_row_with_positions_restarting_per_sequence():
    examples = _examples("sft")
    padded = make_batch(examples, [2, 0, 3], pad_id=0)
    packed = make_batch(examples, [2, 0, 3], pad_id=0, packed=True)
    lengths = [LENGTHS[2], LENGTHS[0], LENGTHS[3]]
    assert packed.input_ids.shape == (1, sum(lengths)) and padded.input_ids.shape == (3, max(lengths))
    assert packed.packed and not padded.packed
    assert packed.position_ids[0].tolist() == [p for n in lengths for p in range(n)]
    assert packed.sequence_index[0].tolist() == [s for s, n in enumerate(lengths) for _ in range(n)]
    assert packed.sequences == padded.sequences == 3
    assert packed.sequence_lengths == padded.sequence_lengths == lengths
    assert packed.tokens == padded.tokens == sum(lengths)
    assert packed.trained_tokens == padded.trained_tokens
    # the same tokens in the same order; no sequence's first label is trained (nothing before it in its sequence)
    assert packed.input_ids[0].tolist() == [t for i in (2, 0, 3) for t in examples[i].input_ids]
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert all(packed.labels[0, s].item() == IGNORE for s in starts)
    assert packed.indices == padded.indices == (2, 0, 3)


def test_a_packed_dpo_batch_holds_the_chosen_answers_then_the_rejected():
    examples = _examples("dpo")
    packed = make_batch(examples, [1, 3], pad_id=0, packed=True)
    order = [examples[1].chosen, examples[3].chosen, examples[1].rejected, examples[3].rejected]
    assert packed.pairs == 2 and packed.sequences == 4
    assert packed.input_ids[0].tolist() == [t for row in order for t in row.input_ids]
    assert packed.sequence_lengths == [len(row.input_ids) for row in order]
    assert packed.to("cpu").position_ids is not None


CASES = [
    (arch, objective, fused, checkpointing)
    for arch in ("llama", "qwen2")
    for objective in ("sft", "dpo")
    for fused in (False, True)
    for checkpointing in (False, True)
]


@pytest.mark.parametrize("arch, objective, fused, checkpointing", CASES)
def test_packed_batch_gives_the_padded_loss_and_adapter_gradients(arch, objective, fused, checkpointing, monkeypatch):
    config = TrainConfig(objective=objective, lora_rank=4, gradient_checkpointing=checkpointing)
    model = _model(arch, config, fused=fused, routed=True)
    examples = _examples(objective)
    padded = _loss_and_grads(model, config, examples, packed=False)
    calls = _Calls(monkeypatch)
    packed = _loss_and_grads(model, config, examples, packed=True)
    _assert_same(padded, packed)
    # every layer's attention ran sequence by sequence: the forward (DPO: the reference's too), and the policy's
    # again in backward when checkpointed
    passes = (2 if objective == "dpo" else 1) + (1 if checkpointing else 0)
    assert calls.n == SHAPE["num_hidden_layers"] * passes


@pytest.mark.parametrize("fused, kv_heads", [(False, 2), (True, 6)])
def test_without_the_routing_transformers_block_diagonal_mask_gives_the_same(fused, kv_heads, monkeypatch):
    """Attention modules routed neither by apply_packed_attention (a model set up without packing) nor by the fused
    ops (they route grouped-query attention only) get transformers' mask built from the position ids: slower, the
    same numbers."""
    config = TrainConfig(lora_rank=4)
    model = _model("mistral", config, fused=fused, routed=False, num_key_value_heads=kv_heads)
    examples = _examples("sft")
    padded = _loss_and_grads(model, config, examples, packed=False)
    calls = _Calls(monkeypatch)
    _assert_same(padded, _loss_and_grads(model, config, examples, packed=True))
    assert calls.n == 0


def test_a_sliding_window_shorter_than_a_sequence_keeps_transformers_mask(monkeypatch):
    """Mistral with a window of 8 tokens: sequences longer than it take transformers' windowed mask."""
    config = TrainConfig(lora_rank=4)
    model = _model("mistral", config, fused=True, routed=True, sliding_window=8)
    examples = _examples("sft")
    padded = _loss_and_grads(model, config, examples, packed=False)
    calls = _Calls(monkeypatch)
    _assert_same(padded, _loss_and_grads(model, config, examples, packed=True))
    assert calls.n == 0


def test_packing_must_be_true_or_false():
    with pytest.raises(ConfigError, match="packing"):
        TrainConfig(packing="yes").validate()


def test_the_estimate_counts_the_tokens_a_packed_batch_holds():
    lengths = DataLengths.of_rows([400, 380, 40, 30, 20, 20], [200, 190, 20, 15, 10, 10])
    padded = batch_lengths(TrainConfig(batch_size=4, max_length=1024, packing=False), lengths)
    packed = batch_lengths(TrainConfig(batch_size=4, max_length=1024, packing=True), lengths)
    assert (padded.rows, padded.seq, padded.packed) == (4, 400, False)
    assert (packed.rows, packed.seq, packed.packed) == (1, 400 + 380 + 40 + 30, True)
    assert packed.trained_tokens == padded.trained_tokens
    assert "packed into one row of 850 tokens" in packed.description
    cut = batch_lengths(TrainConfig(batch_size=4, max_length=256, packing=True), lengths)
    assert cut.seq == 256 + 256 + 40 + 30
    worst = batch_lengths(TrainConfig(batch_size=2, max_length=64, objective="dpo", packing=True))
    assert (worst.rows, worst.seq, worst.trained_tokens) == (1, 4 * 64, 4 * 63)


def test_a_packed_estimate_is_below_the_padded_one_for_uneven_rows():
    shape = ModelShape.for_model_spec("default")  # SmolLM2-135M
    lengths = DataLengths.of_rows([400, 60, 40, 30], [200, 30, 20, 15])
    cpu = DeviceInfo("cpu", "cpu", 16 * 2**30, 8 * 2**30, True)
    for checkpointing in (False, True):
        configs = [
            TrainConfig(batch_size=4, max_length=512, gradient_checkpointing=checkpointing, packing=packing)
            for packing in (False, True)
        ]
        padded, packed = (estimate_training_memory(shape, c, cpu, lengths).activations for c in configs)
        assert packed < padded * 0.5, checkpointing  # 530 tokens present of 1600 padded positions


def test_the_longest_packed_batch_is_the_one_with_the_most_tokens():
    pairs = [
        TokenizedPair(_row(30, 0), _row(5, 1), 0),  # longest row
        TokenizedPair(_row(25, 2), _row(24, 3), 0),  # most tokens
        TokenizedPair(_row(10, 4), _row(10, 5), 0),
    ]
    assert longest_batch(pairs, 1) == [0]
    assert longest_batch(pairs, 1, packed=True) == [1]


def _uneven_sft(path, n: int = 24):
    """Answers from a few words to a few dozen: padded batches are mostly padding."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Count {i}."},
                {"role": "assistant", "content": " ".join(str(j) for j in range(1 + (i * 7) % 40))},
            ]
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_a_packed_run_has_the_padded_runs_loss_curve(tiny_model_dir, tmp_path, objective):
    if objective == "sft":
        data = _uneven_sft(tmp_path / "d.jsonl")
    else:
        data = tmp_path / "p.jsonl"
        rows = [
            {"prompt": f"Give {i}.", "chosen": f'{{"n": {i}}}', "rejected": " ".join(["no"] * (1 + i % 9))}
            for i in range(24)
        ]
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    curves, evals = [], []
    for packing in (False, True):
        rec = Recorder()
        config = tiny_config(
            tiny_model_dir,
            data,
            objective=objective,
            max_steps=5,
            eval_every=2,
            validation_fraction=0.2,
            compute_dtype="float32",
            gradient_accumulation_steps=2,
            batch_size=3,
            packing=packing,
        )
        result = train_run(config, reporter=Reporter(extra=rec))
        assert result.status == "completed"
        curves.append(rec.losses)
        evals.append([e.eval_loss for e in rec.of("eval")])
    assert len(curves[0]) == 5 and len(evals[0]) >= 2
    assert curves[1] == pytest.approx(curves[0], abs=1e-5)
    assert evals[1] == pytest.approx(evals[0], abs=1e-5)


def test_a_resumed_packed_run_matches_the_uninterrupted_one(tiny_model_dir, tmp_path):
    config = tiny_config(
        tiny_model_dir,
        _uneven_sft(tmp_path / "d.jsonl"),
        max_steps=6,
        batch_size=3,
        lora_dropout=0.1,
        packing=True,
        longest_batch_first="on",
    )
    full = Recorder()
    train_run(config, reporter=Reporter(extra=full))
    stop, first = StopFlag(), Recorder()

    def stop_at_two(event):
        first(event)
        if event.type == "step" and event.step == 2:
            stop.set()

    stopped = train_run(config, reporter=Reporter(extra=stop_at_two), stop=stop)
    assert stopped.status == "stopped" and stopped.step == 2
    second = Recorder()
    resumed = train_run(resume=stopped.run_id, reporter=Reporter(extra=second))
    assert resumed.status == "completed" and second.of("started")[0].resumed_from_step == 2
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-5)
    assert [m["loss"] for m in Store().metrics(stopped.run_id)] == pytest.approx(full.losses, abs=1e-5)


def test_only_decoders_whose_masks_follow_restarting_positions_take_packed_rows():
    """Llama and Qwen2 build their masks with transformers' create_causal_mask; Mamba has no attention to confine
    (its state would run on from one sequence into the next): a packing run pads Mamba's batches."""
    import transformers

    from finetune_studio.engine.train.forward import takes_packed_rows

    config = TrainConfig(lora_rank=4)
    assert takes_packed_rows(_model("llama", config, fused=True, routed=True))
    assert takes_packed_rows(_model("qwen2", config, fused=False, routed=False))
    mamba = transformers.MambaForCausalLM(
        transformers.MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, state_size=4)
    )
    assert not takes_packed_rows(mamba)
