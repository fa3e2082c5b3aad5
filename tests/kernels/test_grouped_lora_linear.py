"""kernels.grouped_lora_linear and its wiring: q/k/v and gate/up as one stacked bf16 product each, the numbers of
the layers one by one (the input gradient to bf16 rounding), nothing more kept, adapters saved as before."""

from __future__ import annotations

import pytest
import torch
from tiny_model import FAMILY_SHAPE, step_with_nodes, tiny_bf16_mixed_model

from finetune_studio.core.config import TrainConfig
from finetune_studio.engine.train.model_patches import fused_ops, kernel_wiring
from finetune_studio.engine.train.model_patches.fused_ops import apply_memory_patches
from finetune_studio.engine.train.model_patches.mixed_precision import apply_mixed
from finetune_studio.kernels import grouped_qkv_rotary
from finetune_studio.kernels.grouped_lora_linear import (
    grouped_lora_linear,
    grouped_lora_linear_reference,
    rows_of,
    stack_group,
)
from finetune_studio.kernels.lora_linear import lora_linear

OUTS, RANKS, SCALINGS = (48, 16, 16), (4, 4, 8), (1.5, 2.0, 0.7)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _inputs(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 19, 40, generator=g).requires_grad_()
    weights = [torch.randn(o, 40, generator=g).bfloat16() for o in OUTS]
    biases = [torch.randn(o, generator=g) if bias and i == 1 else None for i, o in enumerate(OUTS)]
    lora_as = [(torch.randn(r, 40, generator=g) * 0.3).requires_grad_() for r in RANKS]
    lora_bs = [(torch.randn(o, r, generator=g) * 0.3).requires_grad_() for o, r in zip(OUTS, RANKS)]
    return x, weights, biases, lora_as, lora_bs


def _run(fn, x, lora_as, lora_bs, used=(True, True, True)):
    outs = fn()
    g = torch.Generator().manual_seed(9)
    loss = sum((y * torch.randn(y.shape, generator=g)).sum() for y, u in zip(outs, used) if u)
    return outs, torch.autograd.grad(loss, [x, *lora_as, *lora_bs], allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("bias", [False, True])
def test_outputs_and_adapter_gradients_are_the_layers_own_and_the_input_gradient_their_sum(bias):
    """Against ``lora_linear`` one member at a time over each member's own [W; A] rows: the outputs and A's and B's
    gradients to float32 rounding (here bit for bit: the same dot products); the input gradient, summed inside one
    bf16 product instead of three rounded ones, to bf16 rounding, and as close to float32's as theirs."""
    x, weights, biases, lora_as, lora_bs = _inputs(bias)
    stacked, members = stack_group(weights, RANKS)
    views = [m[:o] for m, o in zip(members, OUTS)]
    assert all(torch.equal(v, w) for v, w in zip(views, weights))
    grouped = _run(lambda: grouped_lora_linear(x, stacked, biases, lora_as, lora_bs, SCALINGS), x, lora_as, lora_bs)
    layers = _run(
        lambda: tuple(
            lora_linear(x, v, b, a, bb, s, adapter_dtype=torch.bfloat16, stacked=m)
            for v, b, a, bb, s, m in zip(views, biases, lora_as, lora_bs, SCALINGS, members)
        ),
        x,
        lora_as,
        lora_bs,
    )
    ref = _run(
        lambda: grouped_lora_linear_reference(x, weights, biases, lora_as, lora_bs, SCALINGS), x, lora_as, lora_bs
    )
    tight = dict(atol=1e-6, rtol=1e-6)
    for got, want in zip(grouped[0], layers[0]):
        assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, **tight)
    for got, want in zip(grouped[1][1:], layers[1][1:]):
        torch.testing.assert_close(got, want, **tight)
    gx, layers_gx, ref_gx = grouped[1][0], layers[1][0], ref[1][0]
    assert 0 < _rel(gx, layers_gx) < 1e-2
    assert _rel(gx, ref_gx) < 1.5 * _rel(layers_gx, ref_gx) + 1e-4
    for got, want in zip((*grouped[0], *grouped[1]), (*ref[0], *ref[1])):  # float32 throughout: bf16 rounding
        assert _rel(got, want) < 2e-2
    for member, a in zip(members, lora_as):  # each A written under its W
        assert torch.equal(member[-a.shape[0] :], a.detach().bfloat16())


def test_a_member_without_a_gradient_and_an_input_without_one():
    x, weights, biases, lora_as, lora_bs = _inputs(False, seed=1)
    stacked, members = stack_group(weights, RANKS)
    used = (True, False, True)
    grouped = _run(
        lambda: grouped_lora_linear(x, stacked, biases, lora_as, lora_bs, SCALINGS), x, lora_as, lora_bs, used
    )
    ref = _run(
        lambda: grouped_lora_linear_reference(x, weights, biases, lora_as, lora_bs, SCALINGS), x, lora_as, lora_bs, used
    )
    assert grouped[1][2].abs().max() == 0 and grouped[1][5].abs().max() == 0  # k's A and B: no gradient
    for got, want in zip(grouped[1], ref[1]):
        assert _rel(got, want) < 2e-2 if want.abs().max() > 0 else got.abs().max() == 0
    xd = x.detach()
    outs = grouped_lora_linear(xd, stacked, biases, lora_as, lora_bs, SCALINGS)
    got = torch.autograd.grad(sum(y.sum() for y in outs), [*lora_as, *lora_bs])
    want = torch.autograd.grad(
        sum(y.sum() for y in grouped_lora_linear_reference(xd, weights, biases, lora_as, lora_bs, SCALINGS)),
        [*lora_as, *lora_bs],
    )
    assert all(_rel(g, w) < 2e-2 for g, w in zip(got, want))


def test_keeps_x_and_the_low_rank_products_only():
    x, weights, biases, lora_as, lora_bs = _inputs(True)
    stacked, _ = stack_group(weights, RANKS)
    kept: list[tuple[tuple[int, ...], torch.dtype]] = []
    ignore = {id(t) for t in (stacked, *lora_as, *lora_bs)}

    def pack(t):
        if id(t) not in ignore:
            kept.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grouped_lora_linear(x, stacked, biases, lora_as, lora_bs, SCALINGS)
    # the layers one by one keep x and a [tokens, r] bf16 product each: the same bytes
    assert sorted(kept) == sorted([((2, 19, 40), torch.float32), ((38, sum(RANKS)), torch.bfloat16)])


def test_member_rows_are_views_with_their_own_version_counter():
    weights = [torch.randn(o, 8).bfloat16() for o in (6, 4)]
    stacked, members = stack_group(weights, (2, 3))
    assert stacked.shape == (15, 8) and stacked.dtype == torch.bfloat16
    assert members[1].data_ptr() == stacked[8:].data_ptr() and members[1].shape == (7, 8)
    assert torch.equal(stacked[:6], weights[0]) and stacked[6:8].abs().max() == 0
    before = members[0]._version
    members[1][4:].fill_(1.0)  # A written into one member's rows
    assert members[0]._version == before and torch.equal(stacked[12:], torch.ones(3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="outside"):
        rows_of(stacked, 10, 6)


def test_bad_calls_are_named():
    x, weights, biases, lora_as, lora_bs = _inputs(False)
    stacked, _ = stack_group(weights, RANKS)
    with pytest.raises(ValueError, match="rows"):
        grouped_lora_linear(x, stacked[:-1], biases, lora_as, lora_bs, SCALINGS)
    with pytest.raises(ValueError, match="x's dtype"):
        grouped_lora_linear(x, stacked, biases, [a.detach().double() for a in lora_as], lora_bs, SCALINGS)
    with pytest.raises(ValueError, match="frozen"):
        grouped_lora_linear(x, stacked.clone().requires_grad_(), biases, lora_as, lora_bs, SCALINGS)
    with pytest.raises(ValueError, match="16-bit"):
        grouped_lora_linear(x, stacked.float(), biases, lora_as, lora_bs, SCALINGS)
    with pytest.raises(ValueError, match="one bias"):
        grouped_lora_linear(x, stacked, biases[:2], lora_as, lora_bs, SCALINGS)


# --- wired into a model: fused ops + bf16-mixed, as engine.train.recipe sets a run up ---

SHAPE = FAMILY_SHAPE


def _model(arch: str = "llama", dropout: float = 0.0, method: str = "lora"):
    return tiny_bf16_mixed_model(arch, TrainConfig(lora_rank=4, lora_dropout=dropout, method=method))


IDS = torch.randint(0, SHAPE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))


def _step(model, grouped: bool, monkeypatch):
    """Loss, adapter gradients and the names of the LoRA autograd nodes of one forward and backward."""
    monkeypatch.setattr(kernel_wiring, "GROUPED", grouped)
    monkeypatch.setattr(grouped_qkv_rotary, "NATIVE", False)  # q/k/v through this node, not the fused one
    loss, grads, nodes = step_with_nodes(model, IDS)
    return loss, grads, {n for n in nodes if "Lora" in n}


def _groups(model) -> list[str]:
    return [type(m).__name__ for m in model.modules() if "_fs_group" in m.__dict__]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_step_is_the_layers_one_by_one_to_rounding(arch, monkeypatch):
    """The same loss (the forward bit for bit), the adapter gradients to the input gradient's bf16 rounding: the
    last block's MLP, whose input gradient reaches no adapter after it, exactly; the rest closer to the per-layer
    gradients than those are to the adapter products in float32 (the rounding bf16-mixed accepts already)."""
    model = _model(arch)
    assert sorted(_groups(model)) == sorted([f"{arch.capitalize()}Attention", f"{arch.capitalize()}MLP"] * 2)
    loss1, grads1, nodes1 = _step(model, True, monkeypatch)
    loss0, grads0, nodes0 = _step(model, False, monkeypatch)
    assert nodes1 == {"_GroupedLoraLinearBackward", "_LoraLinearLowBackward"} and nodes0 == {"_LoraLinearLowBackward"}
    assert loss1 == loss0
    last = "layers.1.mlp."
    for name, g in grads0.items():
        if last in name:
            assert torch.equal(grads1[name], g), name
        else:
            assert _rel(grads1[name], g) < 2e-2, name
    for layer in kernel_wiring.lora_linears(model):  # the adapter products in float32: the yardstick
        layer._fs_adapter_dtype = None
    _, grads32, _ = _step(model, False, monkeypatch)
    apart = sum((grads1[n] - g).norm() ** 2 for n, g in grads0.items()) ** 0.5
    rounding = sum((grads32[n] - g).norm() ** 2 for n, g in grads0.items()) ** 0.5
    assert 0 < apart < 0.5 * rounding


def test_nothing_more_is_kept_for_backward(monkeypatch):
    from finetune_studio.engine.train.saved_tensors import SavedTensorCensus

    model = _model()
    saved = {}
    monkeypatch.setattr(fused_ops, "NORM_BF16", False)  # (with it the first norm's kept output is bf16: less)
    for grouped in (False, True):
        monkeypatch.setattr(kernel_wiring, "GROUPED", grouped)
        census = SavedTensorCensus(model)
        with census:
            loss = model(input_ids=IDS, labels=IDS).loss
        saved[grouped] = census.alive_bytes()
        loss.backward()
    assert saved[True] == saved[False] > 0


def test_the_frozen_weights_are_views_of_the_group_stacks():
    model = _model()
    attn = model.get_base_model().model.layers[0].self_attn
    group = attn._fs_group
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    storage = group.stacked.untyped_storage().data_ptr()
    rank = 4
    start = 0
    for layer in layers:
        weight = layer.get_base_layer().weight
        assert weight.untyped_storage().data_ptr() == storage
        assert weight.data_ptr() == group.stacked[start:].data_ptr() == layer._fs_stacked.data_ptr()
        start += weight.shape[0] + rank
    assert start == group.stacked.shape[0]
    before = group.stacked
    notes = kernel_wiring.install_kernels(model, "auto", "cpu", fused_ops=True)  # again: the groups are kept
    assert attn._fs_group.stacked is before
    assert any("4 groups of LoRA projections" in note for note in notes)


def test_disabled_adapters_dropout_and_dora_run_the_layers_own_path(monkeypatch):
    """DPO's reference pass (adapters disabled): the base alone, as without grouping; an active dropout and DoRA:
    no group is used (dropout) or made (DoRA), the per-layer paths run."""
    model = _model()
    with model.disable_adapter(), torch.no_grad():
        off = model(input_ids=IDS).logits
    kernel_wiring.uninstall_lora_linear(model)
    assert not _groups(model)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, off, atol=0, rtol=0)

    dropout = _model(dropout=0.5)
    assert _groups(dropout)  # made, but a dropout in training runs peft's forward layer by layer
    _, _, nodes = _step(dropout, True, monkeypatch)
    assert nodes == set()
    dora = _model(method="dora")
    assert not _groups(dora)


def test_a_saved_adapter_loads_in_plain_peft_and_gives_the_same_logits(tmp_path, monkeypatch):
    """Train two steps with grouping; the saved adapter is the trained parameters: peft loading it over the same
    bf16-rounded bases (and the same fused ops) gives the model's logits through peft's own forward exactly, and
    the grouped forward's (the per-layer one's bit for bit) to bf16 rounding."""
    from peft import PeftModel

    from finetune_studio.engine.checkpoint import save_adapter

    model = _model()
    monkeypatch.setattr(kernel_wiring, "GROUPED", True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        grouped = model(input_ids=IDS).logits
        monkeypatch.setattr(kernel_wiring, "GROUPED", False)
        torch.testing.assert_close(model(input_ids=IDS).logits, grouped, atol=0, rtol=0)  # the forward: bit for bit
    save_adapter(model, tmp_path / "adapter")
    kernel_wiring.uninstall_lora_linear(model)
    with torch.no_grad():
        trained = model(input_ids=IDS).logits  # peft's forward over the same weights

    import transformers

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, attn_implementation="sdpa"))
    plain = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    apply_memory_patches(plain, True)  # the same fused ops, peft's own LoRA forward
    apply_mixed(plain)
    plain.eval()
    with torch.no_grad():
        loaded = plain(input_ids=IDS).logits
    torch.testing.assert_close(loaded, trained, atol=0, rtol=0)
    assert _rel(grouped, loaded) < 2e-2  # the adapter products in bf16 against peft's float32
