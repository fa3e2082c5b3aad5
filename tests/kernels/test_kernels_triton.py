"""The Triton kernels against their eager references, forward and backward, over dtypes and odd shapes.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, i.e. when a kernel module is first
imported, so it is set here before anything imports them: the kernels then run on CPU tensors through Triton's
interpreter. On a machine with a GPU, ``TRITON_INTERPRET=0 pytest tests/kernels/test_kernels_triton.py`` runs the same
tests compiled, on CUDA tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton")

import torch  # noqa: E402

from finetune_studio.engine.train.model_patches import kernel_wiring  # noqa: E402
from finetune_studio.kernels import selection  # noqa: E402
from finetune_studio.kernels.dora_norm import dora_weight_norm, dora_weight_norm_reference  # noqa: E402
from finetune_studio.kernels.linear_logprobs import token_logprobs, token_logprobs_reference  # noqa: E402

DEVICE = "cpu" if selection.interpreting() else "cuda"
SMALL = {"block_n": 16, "block_v": 32, "block_h": 16, "splits": 3}  # small tiles: tiny shapes span several
# the gradients come back in the inputs' dtype: their rounding bounds the error (relative to the largest entry)
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(got, want, tol):
    """max |got - want| within tol x max(1, max |want|), in float64."""
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 1.0)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def head_case(n, h, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    grad = torch.randn(n, generator=g).to(DEVICE)
    return hidden, weight, targets, grad


def head_reference(hidden, weight, targets, grad, softcap):
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = token_logprobs_reference(hd, wd, targets, softcap)
    return (ref, *torch.autograd.grad((ref * grad.double()).sum(), (hd, wd)))


# N, H, V: none a multiple of the 16 / 32 / 16 tiles, one below every tile, one of one row
@pytest.mark.parametrize("n,h,v", [(1, 8, 5), (37, 24, 101), (70, 40, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_kernel_matches_reference(n, h, v, dtype):
    hidden, weight, targets, grad = head_case(n, h, v, dtype, seed=n + v)
    ref, rh, rw = head_reference(hidden, weight, targets, grad, None)
    hidden.requires_grad_(), weight.requires_grad_()
    out = token_logprobs(hidden, weight, targets, impl="triton", blocks=SMALL)
    gh, gw = torch.autograd.grad((out * grad).sum(), (hidden, weight))
    assert out.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    close(out, ref, 1e-5)  # float32 accumulation of the (exact) products of the rounded inputs
    close(gh, rh, GRAD_TOL[dtype])
    close(gw, rw, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_kernel_with_softcap(dtype):
    hidden, weight, targets, grad = head_case(29, 20, 70, dtype, seed=3)
    hidden = hidden * 4  # logits well past the cap, where tanh bends
    ref, rh, rw = head_reference(hidden, weight, targets, grad, 5.0)
    hidden.requires_grad_(), weight.requires_grad_()
    out = token_logprobs(hidden, weight, targets, impl="triton", softcap=5.0, blocks=SMALL)
    gh, gw = torch.autograd.grad((out * grad).sum(), (hidden, weight))
    close(out, ref, 1e-5)
    close(gh, rh, GRAD_TOL[dtype])
    close(gw, rw, GRAD_TOL[dtype])


def test_head_kernel_default_tiles_frozen_head_and_strided_hidden():
    hidden, weight, targets, grad = head_case(40, 48, 150, torch.float32, seed=7)
    ref, rh, _ = head_reference(hidden, weight, targets, grad, None)
    strided = hidden.t().contiguous().t().requires_grad_()  # column-major: strides (1, N)
    out = token_logprobs(strided, weight, targets, impl="triton")  # the default (GPU) tile sizes
    out.backward(grad)
    assert weight.grad is None  # a frozen head gets no gradient (and the kernel computes none)
    close(out, ref, 1e-5)
    close(strided.grad, rh, GRAD_TOL[torch.float32])


def test_head_kernel_trained_head_only_and_no_rows():
    hidden, weight, targets, grad = head_case(10, 16, 20, torch.float16, seed=1)
    ref, _, rw = head_reference(hidden, weight, targets, grad, None)
    weight.requires_grad_()
    out = token_logprobs(hidden, weight, targets, impl="triton", blocks=SMALL)
    (gw,) = torch.autograd.grad((out * grad).sum(), (weight,))
    close(gw, rw, GRAD_TOL[torch.float16])
    empty = token_logprobs(hidden[:0].requires_grad_(), weight, targets[:0], impl="triton", blocks=SMALL)
    assert empty.shape == (0,)
    empty.sum().backward()
    assert weight.grad is not None and weight.grad.abs().max() == 0


def test_head_kernel_refuses_float64_and_mixed_dtypes():
    hidden, weight, targets, _ = head_case(4, 8, 6, torch.float64, seed=0)
    with pytest.raises(ValueError, match="impl='chunked'"):
        token_logprobs(hidden, weight, targets, impl="triton")
    with pytest.raises(ValueError, match="one dtype"):
        token_logprobs(hidden.float(), weight.half(), targets, impl="triton")


def test_auto_picks_triton_only_from_the_measured_table(monkeypatch):
    hidden, weight, targets, _ = head_case(5, 8, 6, torch.float32, seed=0)
    hidden.requires_grad_()
    assert type(token_logprobs(hidden, weight, targets).grad_fn).__name__ == "_ChunkedLogprobsBackward"
    monkeypatch.setitem(selection.MEASURED_FASTER, ("linear_logprobs", selection.device_kind(DEVICE)), "triton")
    assert type(token_logprobs(hidden, weight, targets).grad_fn).__name__ == "TritonLogprobsBackward"


def test_logprob_model_with_triton_kernels_matches_torch(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune_studio.engine.train.batches import Batch
    from finetune_studio.engine.train.forward import LogprobModel

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(DEVICE)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    fused, plain = LogprobModel(model, kernels="triton"), LogprobModel(model, kernels="torch")
    assert fused.fused
    params = [p for p in model.parameters() if p.requires_grad]  # the head's weight among them
    got, want = fused(batch).logps, plain(batch).logps
    assert got.shape == (2 * 8,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


# --- the DoRA weight norm ----------------------------------------------------------------------------------


def dora_case(out_f, in_f, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g).to(dtype).to(DEVICE)
    a = (torch.randn(r, in_f, generator=g) * 0.3).to(dtype).to(DEVICE).requires_grad_()
    b = (torch.randn(out_f, r, generator=g) * 0.3).to(dtype).to(DEVICE).requires_grad_()
    return weight, a, b, torch.randn(out_f, generator=g).to(DEVICE)


# out, in, rank: odd against the 16 x 32 tiles; rank 1, rank 20 (padded to 32), rank 16 exactly
@pytest.mark.parametrize("out_f,in_f,r", [(3, 130, 1), (37, 45, 20), (16, 16, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dora_norm_kernel_matches_reference(out_f, in_f, r, dtype):
    weight, a, b, grad = dora_case(out_f, in_f, r, dtype, seed=out_f + r)
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = dora_weight_norm_reference(weight.double(), ad, bd, 1.5)
    ra, rb = torch.autograd.grad((ref * grad.double()).sum(), (ad, bd))
    out = dora_weight_norm(weight, a, b, 1.5, impl="triton", blocks={"block_o": 16, "block_i": 32})
    ga, gb = torch.autograd.grad((out * grad).sum(), (a, b))
    assert out.dtype == torch.float32 and ga.dtype == dtype and gb.dtype == dtype
    close(out, ref, 1e-5)
    close(ga, ra, GRAD_TOL[dtype])
    close(gb, rb, GRAD_TOL[dtype])


def test_dora_norm_kernel_transposed_weight_zero_row_default_tiles():
    weight, a, b, grad = dora_case(70, 40, 8, torch.float32, seed=5)
    weight[2] = 0
    with torch.no_grad():
        b[2] = 0
    ref = dora_weight_norm_reference(weight, a, b, 0.5)
    ra, rb = torch.autograd.grad((ref * grad).sum(), (a, b))
    out = dora_weight_norm(weight.t().contiguous().t(), a, b, 0.5, impl="triton")  # a strided view
    ga, gb = torch.autograd.grad((out * grad).sum(), (a, b))
    assert out[2] == 0
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)


def test_patched_dora_layer_with_the_kernel_matches_peft():
    from peft_dora import assert_same_as_peft, dora_model

    assert_same_as_peft("triton", dropout=0.1, device=DEVICE)
    model = dora_model()
    notes = kernel_wiring.install_kernels(model, "triton", DEVICE)
    assert len(notes) == 2 and "2 layers" in notes[1]
    assert all(layer.__dict__["_norm_impl"] == "triton" for layer in kernel_wiring.dora_layers(model))


def test_a_dora_run_with_triton_kernels_follows_the_torch_run(tiny_model_dir, tmp_path):
    from engine_helpers import Recorder, tiny_config, write_sft

    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    data = write_sft(tmp_path / "d.jsonl")
    losses, logs = {}, {}
    for kernels in ("torch", "triton"):
        rec = Recorder()
        config = tiny_config(
            tiny_model_dir,
            data,
            method="dora",
            kernels=kernels,
            max_steps=2,
            batch_size=2,
            max_length=64,
            sample_prompts=0,
            compute_dtype="float32",  # on a GPU too: both runs do the same float32 maths
        )
        assert train_run(config, reporter=Reporter(extra=rec)).status == "completed"
        losses[kernels] = rec.losses
        logs[kernels] = " ".join(e.message for e in rec.of("log"))
    assert "DoRA weight norms of" in logs["triton"] and "DoRA weight norms of" not in logs["torch"]
    assert len(losses["triton"]) == 2
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-4)
