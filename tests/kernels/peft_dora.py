"""A small peft DoRA model (two linears), one step through it, and the check that a model whose DoRA norm the
kernel wiring replaced gives peft's outputs and gradients: shared by the kernels' tests."""

from __future__ import annotations

import torch

from finetune_studio.engine.train.model_patches import kernel_wiring


class MLP(torch.nn.Module):
    """Two linears, 24 -> 40 -> 24: the layers DoRA adapts."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(24, 40)
        self.down = torch.nn.Linear(40, 24, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def dora_model(dropout=0.0, seed=0):
    """:class:`MLP` with peft DoRA adapters (rank 4) on both linears, non-zero from the start."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["up", "down"], use_dora=True, lora_dropout=dropout, init_lora_weights=False
    )
    return get_peft_model(MLP(), cfg)


def run_step(model, x, seed=1):
    """The output on ``x`` and the gradients of the trained parameters by name, dropout seeded by ``seed``."""
    torch.manual_seed(seed)  # the same dropout masks in both models
    out = model(x)
    loss = (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters() if p.requires_grad])
    return out, dict(zip(names, grads))


def assert_same_as_peft(impl, dropout=0.0, atol=1e-5, device="cpu"):
    """With the DoRA norm ``impl`` installed, the model gives peft's outputs and gradients; uninstalled, peft's own."""
    x = torch.randn(6, 24).to(device)
    ours, theirs = dora_model(dropout).to(device), dora_model(dropout).to(device)
    assert kernel_wiring.install_dora_norm(ours, impl) == 2
    out, grads = run_step(ours, x)
    ref, ref_grads = run_step(theirs, x)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("magnitude" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=1e-5, msg=name)
    kernel_wiring.uninstall_dora_norm(ours)
    torch.testing.assert_close(run_step(ours, x)[0], ref, atol=0, rtol=0)  # peft's own forward again
