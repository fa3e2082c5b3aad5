"""The LoRA member's rank-r backward products in one C pass (``kernels.cpu_lora_backward``) against torch's products,
the exact (float64) values, and wired into the grouped and single LoRA linears of a tiny bf16-mixed model."""

from __future__ import annotations

import pytest
import torch
from tiny_model import FAMILY_SHAPE, tiny_bf16_mixed_model

from finetune_studio.kernels import cpu_lora_backward as lb
from finetune_studio.kernels.grouped_lora_linear import grouped_backward_products

needs_c = pytest.mark.skipif(not lb.available(), reason="the C pass needs AVX-512 BF16")
BF16_ULP = 2.0**-7  # a bf16 value's spacing, relative to it (at most)
F32_EPS = 2.0**-24


def _operands(n: int, out: int, r: int, wide: int, seed: int = 0):
    """g as a strided column block of a [n, wide] bf16 buffer (as in the group's gradient buffer), B float32, xa bf16
    (a column block of a wider buffer too)."""
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(n, wide, generator=gen).to(torch.bfloat16)
    xa_buf = torch.randn(n, r + 3, generator=gen).to(torch.bfloat16)
    b = torch.randn(out, r, generator=gen) * 0.3
    return buf, buf[:, 1 : 1 + out], b, xa_buf[:, 2 : 2 + r]


@needs_c
@pytest.mark.parametrize(
    ("n", "out", "r", "wide"),
    [(1, 50, 8, 60), (37, 136, 16, 150), (455, 576, 16, 600), (37, 50, 5, 51), (40, 33, 24, 40), (455, 136, 40, 137)],
)
def test_one_pass_matches_torch_products_and_the_exact_values(n, out, r, wide):
    buf, g, b, xa = _operands(n, out, r, wide)
    s = 1.5  # not a power of two: the scaled gb rounds once here, twice in torch's ops
    gcat = torch.full((n, r + 4), 7.0, dtype=torch.bfloat16)
    scaled, unscaled = gcat[:, 2 : 2 + r], torch.empty(n, r, dtype=torch.bfloat16)
    before = buf.clone()
    grad_b = lb.lora_backward_products(g, b, xa, s, scaled, unscaled)
    assert grad_b is not None and grad_b.dtype == torch.float32 and grad_b.shape == (out, r)
    assert torch.equal(buf, before) and (gcat[:, :2] == 7).all() and (gcat[:, 2 + r :] == 7).all()

    bl = b.to(torch.bfloat16)
    exact_gb = g.double() @ bl.double()
    bound_gb = 2 * out * F32_EPS * (g.double().abs() @ bl.double().abs())  # float32 sums in another order
    torch_gb = g @ bl
    # both are float32 sums of the same exact products rounded to bf16 once: within half an ulp of the exact value
    # each (plus the float32 sums' rounding), so at most one bf16 ulp apart
    assert ((unscaled.double() - exact_gb).abs() <= BF16_ULP / 2 * exact_gb.abs() + bound_gb).all()
    assert ((unscaled.double() - torch_gb.double()).abs() <= BF16_ULP * torch_gb.double().abs() + bound_gb).all()
    torch_scaled = torch.mul(torch_gb, s)  # torch's ops: bf16(s * bf16(g B))
    assert ((scaled.double() - s * exact_gb).abs() <= BF16_ULP / 2 * s * exact_gb.abs() + s * bound_gb).all()
    assert (
        (scaled.double() - torch_scaled.double()).abs() <= 2 * BF16_ULP * torch_scaled.double().abs() + s * bound_gb
    ).all()

    exact_b = s * (g.t().double() @ xa.double())
    bound_b = 2 * n * F32_EPS * s * (g.t().double().abs() @ xa.double().abs())
    assert ((grad_b.double() - exact_b).abs() <= F32_EPS * exact_b.abs() + bound_b).all()  # float32, not bf16
    torch_b = (g.t() @ xa).float() * s  # today's: rounded to bf16 before the scaling
    assert ((grad_b.double() - torch_b.double()).abs() <= BF16_ULP / 2 * torch_b.double().abs() + bound_b).all()


@needs_c
@needs_c
@pytest.mark.parametrize("n", [455, 926, 129])
def test_the_same_numbers_on_one_and_two_threads(n):
    """The rows go in parts shared among the threads, and B's gradient adds the parts' sums in order: one thread and
    two give the same bits."""
    _, g, b, xa = _operands(n, 1536, 16, 1540, seed=3)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            scaled, unscaled = torch.empty(n, 16, dtype=torch.bfloat16), torch.empty(n, 16, dtype=torch.bfloat16)
            grad_b = lb.lora_backward_products(g, b, xa, 0.5, scaled, unscaled)
            results.append((scaled, unscaled, grad_b))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other, strict=True))
    exact_b = 0.5 * (g.t().double() @ xa.double())
    bound_b = 2 * n * F32_EPS * 0.5 * (g.t().double().abs() @ xa.double().abs())
    assert ((results[0][2].double() - exact_b).abs() <= F32_EPS * exact_b.abs() + bound_b).all()


def test_optional_outputs_and_bad_arguments():
    _, g, b, xa = _operands(9, 20, 4, 21)
    unscaled = torch.empty(9, 4, dtype=torch.bfloat16)
    assert lb.lora_backward_products(g, b, None, 2.0, None, unscaled) is None
    both = torch.empty(9, 4, dtype=torch.bfloat16)
    lb.lora_backward_products(g, b, xa, 2.0, None, both)
    assert torch.equal(unscaled, both)
    with pytest.raises(ValueError, match="xa must be"):
        lb.lora_backward_products(g, b, xa[:5], 2.0)
    with pytest.raises(ValueError, match="gb_out"):
        lb.lora_backward_products(g, b, xa, 2.0, None, torch.empty(9, 4))
    assert not lb.runs_on(g.float(), xa, 4) and not lb.runs_on(g, xa, lb.MAX_RANK + 1)
    assert not lb.runs_on(g.to(torch.float16), None, 4)


def _group(n: int = 23, n_in: int = 24, layout=((40, 4), (17, 8)), seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    width = sum(o + r for o, r in layout)
    stacked = (torch.randn(width, n_in, generator=gen) * 0.2).to(torch.bfloat16)
    gcat = torch.randn(n, width, generator=gen).to(torch.bfloat16)
    x = torch.randn(n, n_in, generator=gen)
    xa = torch.randn(n, sum(r for _, r in layout), generator=gen).to(torch.bfloat16)
    bs = [torch.randn(o, r, generator=gen) * 0.3 for o, r in layout]
    return gcat, x, xa, stacked, list(layout), bs, [2.0, 1.5]


def _todays_ops(gcat, x, xa, stacked, layout, bs, scalings):
    """The group's backward products as torch's ops computed them before the C pass."""
    gbs, grad_bs, col, rc = [], [], 0, 0
    for (out, r), b, s in zip(layout, bs, scalings):
        gl = gcat[:, col : col + out]
        gb = gl @ b.to(torch.bfloat16)
        grad_bs.append((gl.t() @ xa[:, rc : rc + r]).to(torch.float32).mul_(s))
        torch.mul(gb, s, out=gcat[:, col + out : col + out + r])
        gbs.append(gb)
        col, rc = col + out + r, rc + r
    ga = (torch.cat(gbs, 1).t() @ x.to(torch.bfloat16)).float()
    grad_as, rc = [], 0
    for (_, r), s in zip(layout, scalings):
        grad_as.append(ga[rc : rc + r].mul_(s))
        rc += r
    return (gcat @ stacked).float(), grad_as, grad_bs


@pytest.mark.parametrize("native", [False, True])
def test_grouped_backward_products_flag_off_is_todays_ops_bit_for_bit_and_on_to_rounding(native, monkeypatch):
    if native and not lb.available():
        pytest.skip("the C pass needs AVX-512 BF16")
    monkeypatch.setattr(lb, "NATIVE", native)
    gcat, x, xa, stacked, layout, bs, scalings = _group()
    want_x, want_a, want_b = _todays_ops(gcat.clone(), x, xa, stacked, layout, bs, scalings)
    got_x, got_a, got_b = grouped_backward_products(
        gcat, x, xa, stacked, layout, bs, scalings, True, [True, True], [True, True]
    )
    assert got_x is not None
    if not native:
        assert torch.equal(got_x, want_x)
        assert all(torch.equal(g, w) for g, w in zip(got_a, want_a) if g is not None)
        assert all(torch.equal(g, w) for g, w in zip(got_b, want_b) if g is not None)
        return
    # gcat's gb columns are at most one bf16 ulp apart: so is their part of the input gradient's sum
    torch.testing.assert_close(got_x, want_x, rtol=2 * BF16_ULP, atol=2 * BF16_ULP * float(want_x.abs().max()))
    for g, w in zip([*got_a, *got_b], [*want_a, *want_b]):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=BF16_ULP, atol=BF16_ULP * float(w.abs().max()))


IDS = torch.randint(0, FAMILY_SHAPE["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(1))


def _model():
    return tiny_bf16_mixed_model()


@needs_c
def test_wired_model_loss_and_gradients_on_and_off(monkeypatch):
    model = _model()
    calls = []
    kernel = lb.lora_backward_products
    monkeypatch.setattr(lb, "lora_backward_products", lambda *a, **k: calls.append(a[0].shape[1]) or kernel(*a, **k))
    results = {}
    for on in (True, False):
        monkeypatch.setattr(lb, "NATIVE", on)
        calls.clear()
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        results[on] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        # every LoRA member of every layer: q, k, v, o, gate, up, down
        assert len(calls) == 7 * FAMILY_SHAPE["num_hidden_layers"] * on
    (loss_on, grads_on), (loss_off, grads_off) = results[True], results[False]
    assert loss_on == loss_off  # the forward is not touched
    assert grads_on.keys() == grads_off.keys() and any("lora_B" in n for n in grads_on)
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=2e-2, atol=2e-2 * float(g.abs().max()), msg=name)
