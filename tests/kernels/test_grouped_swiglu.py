"""gate/up's grouped product, its low-rank epilogue and SwiGLU in one node (``kernels.grouped_swiglu``): the C passes
against the torch path, today's separate ops and the float32 reference; the fused ops' MLP wired through it."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tiny_model import FAMILY_SHAPE, tiny_bf16_mixed_model

from finetune_studio.engine.train.model_patches import fused_ops, kernel_wiring
from finetune_studio.kernels import grouped_swiglu as gs
from finetune_studio.kernels.grouped_lora_linear import grouped_lora_linear, stack_group
from finetune_studio.kernels.swiglu import swiglu

needs_c = pytest.mark.skipif(not gs.available(), reason="the grouped SwiGLU's C passes do not run on this CPU")


def _problem(rows: int, n_in: int, out: int, ranks: tuple[int, int], x_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(out, n_in, generator=gen) * 0.2).to(torch.bfloat16) for _ in ranks]
    stacked, _ = stack_group(weights, list(ranks))
    x = torch.randn(3, rows, n_in, generator=gen).to(x_dtype)
    lora_as = [torch.randn(r, n_in, generator=gen) * 0.2 for r in ranks]
    lora_bs = [torch.randn(out, r, generator=gen) * 0.3 for r in ranks]
    grad = torch.randn(3, rows, out, generator=gen).to(torch.bfloat16)
    return weights, stacked, x, lora_as, lora_bs, grad


def _run(fn, x, lora_as, lora_bs, grad):
    """fn's output and the gradients of x, both A and both B for the output gradient ``grad``."""
    x = x.clone().requires_grad_()
    a = [t.clone().requires_grad_() for t in lora_as]
    b = [t.clone().requires_grad_() for t in lora_bs]
    out = fn(x, a, b)
    out.backward(grad.to(out.dtype))
    return [out.detach().float(), x.grad.float(), *(t.grad for t in a), *(t.grad for t in b)], (x.grad, a, b)


SCALINGS = (0.5, 2.0)
SHAPES = [(37, 72, 50, (5, 3)), (16, 48, 136, (4, 4)), (1, 40, 19, (16, 16)), (455, 64, 96, (16, 16))]


@needs_c
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "n_in", "out", "ranks"), SHAPES)
def test_the_c_passes_match_the_torch_path_and_the_float32_reference(rows, n_in, out, ranks, x_dtype):
    weights, stacked, x, lora_as, lora_bs, grad = _problem(rows, n_in, out, ranks, x_dtype)

    def node(impl):
        return lambda x, a, b: gs.grouped_swiglu(x, stacked, a, b, SCALINGS, impl=impl)[0]

    native, (gx, ga, gb) = _run(node("auto"), x, lora_as, lora_bs, grad)
    torch_path, _ = _run(node("torch"), x, lora_as, lora_bs, grad)
    reference, _ = _run(
        lambda x, a, b: gs.grouped_swiglu_reference(x, weights, a, b, SCALINGS), x, lora_as, lora_bs, grad
    )
    assert gx.dtype == x_dtype and all(t.grad.dtype == torch.float32 for t in (*ga, *gb))
    for got, same_steps, want in zip(native, torch_path, reference, strict=True):
        scale = want.abs().max()
        # the torch path: the same steps in torch's ops (an exponential a few ulps apart, the r sums in another order)
        assert (got - same_steps).abs().max() <= 1e-2 * scale
        # float32 throughout: bf16 products and a bf16 h and gradient buffer
        assert (got - want).abs().max() <= 3e-2 * scale


@needs_c
@pytest.mark.parametrize(("rows", "n_in", "out", "ranks"), SHAPES[:3])
def test_the_node_gives_todays_separate_ops_numbers(rows, n_in, out, ranks):
    """grouped_lora_linear (float32 gate and up) then SwiGLU with a bf16 h: the same values to float32 rounding of
    gate and up (the low-rank sum in registers instead of an addmm)."""
    _, stacked, x, lora_as, lora_bs, grad = _problem(rows, n_in, out, ranks, torch.float32, seed=1)

    def today(x, a, b):
        gate, up = grouped_lora_linear(x, stacked, (None, None), a, b, SCALINGS)
        return swiglu(gate, up, out_dtype=torch.bfloat16)

    fused, _ = _run(lambda x, a, b: gs.grouped_swiglu(x, stacked, a, b, SCALINGS)[0], x, lora_as, lora_bs, grad)
    separate, _ = _run(today, x, lora_as, lora_bs, grad)
    for got, want in zip(fused, separate, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_the_rebuild_gives_h_bit_for_bit(impl):
    _, stacked, x, lora_as, lora_bs, _ = _problem(29, 56, 83, (4, 4), torch.float32, seed=2)
    a, b = [t.requires_grad_() for t in lora_as], [t.requires_grad_() for t in lora_bs]
    h, rebuild = gs.grouped_swiglu(x, stacked, a, b, SCALINGS, impl=impl)
    again = rebuild()
    assert h.dtype == again.dtype == torch.bfloat16 and h.shape == again.shape == (3, 29, 83)
    assert torch.equal(again.view(torch.int16), h.detach().view(torch.int16)) and not again.requires_grad


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_nothing_keeps_h_but_its_consumer(impl):
    """The rebuild (kept by ``kernels.recompute`` until the consumer's backward) holds gate and up, never h: once the
    consumer drops h, its memory is free (a rebuild that held h kept a [tokens, i] tensor a layer)."""
    _, stacked, x, lora_as, lora_bs, _ = _problem(9, 40, 33, (4, 4), torch.float32, seed=3)
    a, b = [t.requires_grad_() for t in lora_as], [t.requires_grad_() for t in lora_bs]
    h, rebuild = gs.grouped_swiglu(x, stacked, a, b, SCALINGS, impl=impl)
    kept = weakref.ref(h)
    del h
    gc.collect()
    assert kept() is None and rebuild().shape == (3, 9, 33)


def test_bad_arguments_get_clear_messages():
    _, stacked, x, lora_as, lora_bs, _ = _problem(4, 24, 16, (2, 2), torch.float32)
    with pytest.raises(ValueError, match="widths differ"):
        gs.grouped_swiglu(x, stacked, lora_as, [lora_bs[0], torch.zeros(15, 2)], SCALINGS)
    with pytest.raises(ValueError, match="features"):
        gs.grouped_swiglu(x[..., :-1], stacked, lora_as, lora_bs, SCALINGS)
    with pytest.raises(ValueError, match="bf16"):
        gs.grouped_swiglu(x, stacked.float(), lora_as, lora_bs, SCALINGS)
    with pytest.raises(ValueError, match="one A, B and scaling"):
        gs.grouped_swiglu(x, stacked, lora_as[:1], lora_bs[:1], SCALINGS[:1])
    with pytest.raises(ValueError, match="unknown impl"):
        gs.grouped_swiglu(x, stacked, lora_as, lora_bs, SCALINGS, impl="triton")


IDS = torch.randint(0, FAMILY_SHAPE["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(1))


def _model():
    return tiny_bf16_mixed_model()


def _step(model):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@needs_c
@pytest.mark.parametrize("norm_bf16", [True, False])
def test_the_wired_mlp_takes_the_node_with_the_separate_ops_loss_and_gradients(norm_bf16, monkeypatch):
    monkeypatch.setattr(fused_ops, "NORM_BF16", norm_bf16)  # the MLP's input: the norm's bf16 or float32 output
    model = _model()
    calls: list[torch.dtype] = []
    node = gs.grouped_swiglu

    def counted(x, *args, **kwargs):
        calls.append(x.dtype)
        return node(x, *args, **kwargs)

    monkeypatch.setattr(gs, "grouped_swiglu", counted)
    results = {}
    for on in (True, False):
        monkeypatch.setattr(gs, "ENABLED", on)
        calls.clear()
        results[on] = _step(model)
        assert calls == ([torch.bfloat16 if norm_bf16 else torch.float32] * FAMILY_SHAPE["num_hidden_layers"]) * on
    (loss_on, grads_on), (loss_off, grads_off) = results[True], results[False]
    assert loss_on == pytest.approx(loss_off, rel=1e-5)
    assert grads_on.keys() == grads_off.keys() and any("gate_proj" in n for n in grads_on)
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=1e-3, atol=1e-3 * float(g.abs().max()), msg=name)


@needs_c
def test_disabled_adapters_and_the_per_layer_path_keep_the_separate_ops(monkeypatch):
    monkeypatch.setattr(gs, "ENABLED", True)
    model = _model()
    calls = []
    node = gs.grouped_swiglu
    monkeypatch.setattr(gs, "grouped_swiglu", lambda *a, **k: calls.append(1) or node(*a, **k))
    with torch.no_grad(), model.disable_adapter():  # DPO's reference pass
        disabled = model(input_ids=IDS).logits
    assert not calls
    monkeypatch.setattr(kernel_wiring, "GROUPED", False)
    loss, grads = _step(model)
    assert not calls and torch.isfinite(torch.tensor(loss)) and grads
    with torch.no_grad():
        monkeypatch.setattr(kernel_wiring, "GROUPED", True)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=IDS).logits, disabled)
