"""The DoRA weight norm without the weight-sized temporary (PyTorch paths), its wiring into peft, the config switch.

The Triton paths of the same ops are in test_kernels_triton.py (they need the triton package)."""

import subprocess
import sys

import pytest
import torch
from peft_dora import assert_same_as_peft, dora_model

from finetune_studio.core import kernel_choice
from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.memory.estimate import chunked_dora_norm
from finetune_studio.engine.train.model_patches import kernel_wiring
from finetune_studio.kernels import selection
from finetune_studio.kernels.dora_norm import dora_weight_norm, dora_weight_norm_reference


def _lora(out_f, in_f, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g).to(dtype)
    a = (torch.randn(r, in_f, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(out_f, r, generator=g) * 0.3).to(dtype).requires_grad_()
    return weight, a, b


def _reference_grads(weight, a, b, scaling, grad):
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = dora_weight_norm_reference(weight.double(), ad, bd, scaling)
    return (ref, *torch.autograd.grad((ref * grad.double()).sum(), (ad, bd)))


@pytest.mark.parametrize("out_f,in_f,r,chunk", [(1, 3, 1, 4), (37, 45, 5, 7), (64, 16, 16, 64), (130, 24, 3, 256)])
def test_chunked_float64_equals_reference(out_f, in_f, r, chunk):
    weight, a, b = _lora(out_f, in_f, r, torch.float64, seed=out_f)
    grad = torch.randn(out_f, dtype=torch.float64)
    ref = dora_weight_norm_reference(weight, a, b, 1.7)
    ra, rb = torch.autograd.grad((ref * grad).sum(), (a, b))
    out = dora_weight_norm(weight, a, b, 1.7, impl="chunked", chunk=chunk)
    ga, gb = torch.autograd.grad((out * grad).sum(), (a, b))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ga, ra, atol=1e-11, rtol=0)
    torch.testing.assert_close(gb, rb, atol=1e-11, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_chunked_low_precision_accumulates_in_float32(dtype, tol):
    weight, a, b = _lora(37, 45, 5, dtype)
    grad = torch.randn(37)
    ref, ra, rb = _reference_grads(weight, a, b, 2.0, grad)
    out = dora_weight_norm(weight, a, b, 2.0, impl="chunked", chunk=8)
    ga, gb = torch.autograd.grad((out * grad).sum(), (a, b))
    assert out.dtype == torch.float32 and ga.dtype == dtype and gb.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-6)  # float32 sums of the rounded inputs
    torch.testing.assert_close(ga.double(), ra, atol=tol, rtol=tol)  # the gradients come back in the inputs' dtype
    torch.testing.assert_close(gb.double(), rb, atol=tol, rtol=tol)


def test_transposed_weight_and_an_all_zero_row():
    weight, a, b = _lora(9, 12, 4, torch.float32)
    weight[3] = 0
    with torch.no_grad():
        b[3] = 0
    grad = torch.randn(9)
    ref = dora_weight_norm_reference(weight, a, b, 0.5)
    ra, rb = torch.autograd.grad((ref * grad).sum(), (a, b))
    out = dora_weight_norm(weight.t().contiguous().t(), a, b, 0.5, impl="chunked", chunk=2)  # a strided view
    ga, gb = torch.autograd.grad((out * grad).sum(), (a, b))
    assert out[3] == 0 and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)


def test_bad_input_is_refused_clearly():
    weight, a, b = _lora(5, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        dora_weight_norm(weight.requires_grad_(), a, b, 1.0)
    with pytest.raises(ValueError, match="do not chain"):
        dora_weight_norm(weight.detach(), a, b.t(), 1.0)
    with pytest.raises(ValueError, match="unknown impl"):
        dora_weight_norm(weight.detach(), a, b, 1.0, impl="cuda")


def test_triton_on_the_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = "runs on CUDA GPUs, not on cpu" if selection.triton_installed() else "needs the 'triton' package"
    with pytest.raises(RuntimeError, match=f"{why}.*kernels: auto"):
        selection.require_triton(torch.zeros(2))


def test_without_triton_the_kernels_import_and_triton_is_refused_clearly():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # what a machine without triton gives `import triton`
        "import torch\n"
        "from finetune_studio.kernels.linear_logprobs import token_logprobs\n"
        "h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])\n"
        "from finetune_studio.kernels import selection\n"
        "selection.MEASURED_FASTER[('linear_logprobs', 'cpu')] = 'triton'  # auto falls back without triton\n"
        "print(token_logprobs(h, w, t).shape[0])\n"
        "try:\n"
        "    token_logprobs(h, w, t, impl='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "3" and "needs the 'triton' package" in lines[1]


def test_config_kernels_field():
    assert TrainConfig().kernels == "auto"
    assert TrainConfig.from_dict({"kernels": "triton"}).kernels == "triton"
    with pytest.raises(ConfigError, match="kernels: must be one of auto, triton, torch"):
        TrainConfig(kernels="cuda")
    assert TrainConfig.field_help()["kernels"]["choices"] == ("auto", "triton", "torch")


def test_auto_uses_a_kernel_only_where_measured(monkeypatch):
    # measured: the chunked norm on the CPU (a whole DoRA step); no Triton kernel anywhere yet
    assert kernel_choice.MEASURED_FASTER == {("dora_norm", "cpu"): "chunked"}
    assert selection.MEASURED_FASTER == kernel_choice.MEASURED_FASTER  # the ops' own auto: the same measurements
    assert kernel_wiring.dora_norm_impl("auto", "cpu") == "chunked"
    assert kernel_wiring.dora_norm_impl("auto", "meta") is None  # unmeasured device: peft's norm
    assert kernel_wiring.dora_norm_impl("torch", "cpu") is None
    assert kernel_wiring.dora_norm_impl("triton", "cpu") == "triton"
    assert kernel_wiring.logprobs_impl("torch") == "chunked"
    dora = TrainConfig(method="dora")
    assert chunked_dora_norm(dora, "cpu") and not chunked_dora_norm(dora, "cuda")  # the estimate counts the same
    monkeypatch.delitem(kernel_choice.MEASURED_FASTER, ("dora_norm", "cpu"))
    assert kernel_wiring.dora_norm_impl("auto", "cpu") is None
    assert not chunked_dora_norm(dora, "cpu")


# --- wiring into peft's DoRA layers --------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_patched_dora_layer_matches_peft(dropout):
    assert_same_as_peft("chunked", dropout)


def test_install_kernels_follows_the_config():
    model = dora_model()
    assert kernel_wiring.install_kernels(model, "torch", "cpu") == []
    assert all("forward" not in layer.__dict__ for layer in kernel_wiring.dora_layers(model))
    assert len(kernel_wiring.dora_layers(model)) == 2
    assert kernel_wiring.install_kernels(model, "auto", "cpu") == [
        "Kernels: DoRA weight norms of 2 layers via dora_weight_norm(impl='chunked')"
    ]
    assert all(layer._norm_impl == "chunked" for layer in kernel_wiring.dora_layers(model))


def test_a_run_asking_for_triton_where_it_cannot_run_fails_before_training(tiny_model_dir, tmp_path, monkeypatch):
    from engine_helpers import Recorder, tiny_config, write_sft

    from finetune_studio.engine.train.recipe import TrainingFailed, train_run
    from finetune_studio.engine.train.reporting import Reporter

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU and no interpreter: Triton has nowhere to run
    rec = Recorder()
    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), method="dora", kernels="triton")
    with pytest.raises(TrainingFailed):
        train_run(config, reporter=Reporter(extra=rec))
    assert not rec.of("step")
    (failed,) = rec.of("failed")
    assert failed.kind == "config" and failed.message.startswith("Invalid config: kernels: 'triton' cannot run here")
    assert "kernels: auto" in failed.message


@pytest.mark.parametrize("method", ["dora", "qdora"])
def test_patched_model_gives_peft_log_probs_on_the_engine_path(tiny_model_dir, method):
    from finetune_studio.engine.models import load_causal_lm
    from finetune_studio.engine.train.adapters import add_adapters
    from finetune_studio.engine.train.batches import Batch
    from finetune_studio.engine.train.forward import LogprobModel

    cfg = TrainConfig(model=str(tiny_model_dir), method=method, lora_rank=4, lora_alpha=8)
    base = load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu", quantize_4bit=cfg.quantized)
    model = add_adapters(base, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero; a trained-looking B makes the norm depend on it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    logps = LogprobModel(model)
    want = logps(batch).logps
    assert kernel_wiring.install_dora_norm(model, "chunked") > 0
    got = logps(batch).logps
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (got - logps(batch).logps).abs().max() == 0  # deterministic
