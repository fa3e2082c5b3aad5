"""DoRA's weight norm ``||W + s * B @ A||_2`` per output row, without the weight-sized ``B @ A``.

DoRA (https://arxiv.org/abs/2402.09353) scales each output row of the adapted weight by
``magnitude / ||W + s B A||``. peft builds ``B @ A`` (``[out, in]``, via ``lora_B(lora_A(eye))``) and the sum
``W + s B A`` for every forward: two weight-sized temporaries per DoRA layer. Here (shapes: W ``[out, in]``,
A ``[r, in]``, B ``[out, r]``, s a float):

    n_i = sqrt(sum_j (W_ij + s sum_k B_ik A_kj)^2)                         forward
    dn/dB = s (g / n)[:, None] * M @ A.T,  dn/dA = s B.T @ ((g / n)[:, None] * M),  M = W + s B A   backward

``W`` is frozen (no gradient). The chunked PyTorch path computes ``M`` for ``chunk`` rows at a time (and again in
backward), so at most ``chunk x in`` of it exists at once; the Triton path keeps ``M`` in tiles in registers.
The norm is accumulated in float32 (float64 for float64 inputs) and returned in that dtype.

Layering: reference (``dora_weight_norm_reference``) -> chunked autograd (``_ChunkedDoraNorm``) -> public op
(``dora_weight_norm`` with ``impl='auto'|'chunked'|'torch'|'triton'``); the kernels are in ``triton_dora_norm``.
"""

from __future__ import annotations

import torch

from finetune_studio.kernels.selection import measured_choice, require_triton

DEFAULT_CHUNK = 256
IMPLS = ("auto", "chunked", "torch", "triton")


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dora_weight_norm_reference(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Eager reference with the full temporary: weight [out, in], lora_A [r, in], lora_B [out, r] -> [out]."""
    acc = _acc_dtype(weight, lora_A, lora_B)
    return torch.linalg.norm(weight.to(acc) + scaling * (lora_B.to(acc) @ lora_A.to(acc)), dim=1)


def _coef(grad: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """g / n, with 0 for an all-zero row (the subgradient torch.linalg.norm takes there)."""
    return torch.where(norm > 0, grad / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))


class _ChunkedDoraNorm(torch.autograd.Function):
    """``chunk`` rows of ``M = W + s B A`` at a time, in both passes."""

    @staticmethod
    def forward(ctx, weight, lora_A, lora_B, scaling, chunk):
        acc = _acc_dtype(weight, lora_A, lora_B)
        a = lora_A.to(acc)
        norm = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
        for s in range(0, weight.shape[0], chunk):
            m = torch.addmm(weight[s : s + chunk].to(acc), lora_B[s : s + chunk].to(acc), a, alpha=scaling)
            norm[s : s + chunk] = torch.linalg.norm(m, dim=1)
        ctx.save_for_backward(weight, lora_A, lora_B, norm)
        ctx.scaling, ctx.chunk = scaling, chunk
        return norm

    @staticmethod
    def backward(ctx, grad_norm):
        weight, lora_A, lora_B, norm = ctx.saved_tensors
        scaling, chunk = ctx.scaling, ctx.chunk
        acc = norm.dtype
        a = lora_A.to(acc)
        coef = _coef(grad_norm.to(acc), norm)
        grad_a = torch.zeros_like(a) if ctx.needs_input_grad[1] else None
        grad_b = torch.empty(lora_B.shape, dtype=acc, device=lora_B.device) if ctx.needs_input_grad[2] else None
        for s in range(0, weight.shape[0], chunk):
            b = lora_B[s : s + chunk].to(acc)
            g = torch.addmm(weight[s : s + chunk].to(acc), b, a, alpha=scaling).mul_(coef[s : s + chunk, None])
            if grad_b is not None:
                grad_b[s : s + chunk] = scaling * (g @ a.t())
            if grad_a is not None:
                grad_a.addmm_(b.t(), g, alpha=scaling)
        return (
            None,
            grad_a.to(lora_A.dtype) if grad_a is not None else None,
            grad_b.to(lora_B.dtype) if grad_b is not None else None,
            None,
            None,
        )


def _check(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    if weight.ndim != 2 or lora_A.ndim != 2 or lora_B.ndim != 2:
        raise ValueError("weight [out, in], lora_A [r, in] and lora_B [out, r] must be matrices")
    out_f, in_f = weight.shape
    if lora_A.shape[1] != in_f or lora_B.shape != (out_f, lora_A.shape[0]):
        raise ValueError(
            f"shapes do not chain: weight {list(weight.shape)}, lora_A {list(lora_A.shape)}, "
            f"lora_B {list(lora_B.shape)}"
        )
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("dora_weight_norm treats the base weight as frozen; detach it or turn its requires_grad off")


def dora_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    impl: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    blocks: dict | None = None,
) -> torch.Tensor:
    """``||weight + scaling * lora_B @ lora_A||_2`` per row, differentiable in ``lora_A`` and ``lora_B``.

    ``impl``: 'torch' (eager reference: two [out, in] temporaries), 'chunked' (``chunk`` rows at a time),
    'triton' (tiles in registers; CUDA, or the CPU under ``TRITON_INTERPRET=1``), or 'auto': 'triton' where
    ``selection.MEASURED_FASTER`` says it won on this kind of device, else 'chunked'."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    _check(weight, lora_A, lora_B)
    if impl == "auto":
        impl = "chunked"
        if all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in (weight, lora_A, lora_B)):
            impl = measured_choice("dora_norm", weight.device, "chunked")
    if impl == "torch":
        return dora_weight_norm_reference(weight, lora_A, lora_B, scaling)
    if impl == "triton":
        require_triton(weight, lora_A, lora_B)
        from finetune_studio.kernels import triton_dora_norm as tk

        return tk.TritonDoraNorm.apply(weight, lora_A, lora_B, float(scaling), {**tk.DEFAULT_BLOCKS, **(blocks or {})})
    return _ChunkedDoraNorm.apply(weight, lora_A, lora_B, float(scaling), max(1, int(chunk)))
