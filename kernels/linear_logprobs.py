"""Log-probabilities of target tokens through the output head, without materialising all the logits.

``token_logprobs(hidden, weight, targets)`` returns ``log softmax(hidden @ weight.T)[i, targets[i]]`` for
each row ``i``. The eager reference builds the full ``[N, V]`` logits in float32 (what transformers does:
often the peak of a fine-tuning step). The chunked implementation computes ``chunk`` rows at a time, so at
most ``chunk x V`` logits exist at once; with a frozen head it computes the gradient with respect to ``hidden``
in the same pass (as Liger's fused linear cross-entropy does), otherwise it recomputes the logits in backward.

Callers pass only the trained positions (assistant tokens, DPO completions), so prompt tokens never reach
the output head at all.

The gradient product of the frozen-head path (``G @ W``, the probabilities' gradient times the head) may run in a
16-bit dtype: ``set_head_grad_dtype(weight, torch.bfloat16)`` marks a float32 head weight so (bf16-mixed does, in
``engine.train.model_patches.mixed_precision``). The logits, the log-probs and so the loss stay float32; only
``d logp / d hidden`` is then a bf16 product: through ``kernels.bf16_head`` where it runs (``G`` and the head
rounded as they are read, the product float32), else torch's (``G`` and the head rounded to bf16
``GRAD_VOCAB_CHUNK`` vocabulary entries at a time, so no bf16 copy of either is made whole; each partial product
summed in float32): a relative error of about 3e-3 on a gradient, at about twice float32's speed on a CPU with
AVX-512 BF16. ``BF16_HEAD_KERNEL = False`` keeps both marks on torch's products (for comparisons).

The logits' product may take bf16 inputs and give a float32 result: ``set_head_logits_dtype(weight,
torch.bfloat16)`` (bf16-mixed sets it too) sends ``hidden @ weight.T`` of a float32 CPU head through
``kernels.bf16_head`` where that kernel runs (AVX-512 BF16; torch's CPU products have no float32 result for bf16
inputs): the hidden states and the head rounded to bf16, every product and sum float32, the logits never rounded
(about 0.01 off at 20, where bf16 logits would be 0.06 off), at about twice float32's speed. Elsewhere the mark
changes nothing.

Layering: reference (``token_logprobs_reference``) -> chunked autograd (``_ChunkedLogprobs``) ->
public op (``token_logprobs`` with ``impl='auto'|'chunked'|'torch'|'triton'``). The Triton kernel, which fuses
the head and the log-softmax gather, lives in ``triton_linear_logprobs`` and is imported only when chosen.
"""

from __future__ import annotations

import torch

from finetune_studio.kernels import bf16_head
from finetune_studio.kernels.selection import measured_choice, require_triton

DEFAULT_CHUNK = 1024
GRAD_VOCAB_CHUNK = 4096  # head rows cast to the gradient dtype at a time (see set_head_grad_dtype)
_GRAD_DTYPE_ATTR = "_fs_head_grad_dtype"
_LOGITS_DTYPE_ATTR = "_fs_head_logits_dtype"


def set_head_grad_dtype(weight: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Let the frozen-head gradient product ``G @ weight`` of ``token_logprobs`` (chunked) run in ``dtype``
    (``torch.bfloat16``; None: in the inputs' dtype again). An attribute of this tensor object: other heads are
    unaffected, and so is everything but ``d logp / d hidden`` (the logits and log-probs stay float32)."""
    if dtype is None:
        weight.__dict__.pop(_GRAD_DTYPE_ATTR, None)
    elif dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"set_head_grad_dtype: a 16-bit dtype or None, not {dtype}")
    else:
        setattr(weight, _GRAD_DTYPE_ATTR, dtype)


def head_grad_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype ``set_head_grad_dtype`` gave this head weight, or None."""
    dtype: torch.dtype | None = getattr(weight, _GRAD_DTYPE_ATTR, None)
    return dtype


def set_head_logits_dtype(weight: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Let the logits' product ``hidden @ weight.T`` of ``token_logprobs`` (chunked) take ``dtype`` inputs
    (``torch.bfloat16``; None: float32 again) and give a float32 result, where ``kernels.bf16_head`` runs (a float32
    CPU head, a CPU with AVX-512 BF16); elsewhere the mark changes nothing. An attribute of this tensor object."""
    if dtype is None:
        weight.__dict__.pop(_LOGITS_DTYPE_ATTR, None)
    elif dtype != torch.bfloat16:
        raise ValueError(f"set_head_logits_dtype: torch.bfloat16 or None, not {dtype}")
    else:
        setattr(weight, _LOGITS_DTYPE_ATTR, dtype)


def head_logits_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype ``set_head_logits_dtype`` gave this head weight, or None."""
    dtype: torch.dtype | None = getattr(weight, _LOGITS_DTYPE_ATTR, None)
    return dtype


BF16_HEAD_KERNEL = True  # the bf16 marks use kernels.bf16_head where it runs (False: torch's products, to compare)


def _native(a: torch.Tensor, weight: torch.Tensor, low: torch.dtype | None) -> bool:
    """Whether a product of ``a`` and the head marked ``low`` goes through ``kernels.bf16_head``."""
    return (
        BF16_HEAD_KERNEL
        and low == torch.bfloat16
        and a.dtype == torch.float32
        and weight.dtype == torch.float32
        and a.device.type == "cpu"
        and weight.device.type == "cpu"
        and bf16_head.available()
    )


def _logits(h: torch.Tensor, weight: torch.Tensor, low: torch.dtype | None, acc: torch.dtype) -> torch.Tensor:
    """``h @ weight.T`` in ``acc``: marked bf16, through ``kernels.bf16_head`` where it runs (inputs rounded to bf16,
    a float32 result); else torch's product in the inputs' dtype."""
    if _native(h, weight, low):
        return bf16_head.bf16_logits(h, weight)
    return (h @ weight.t()).to(acc)


def _grad_product(
    g: torch.Tensor, weight: torch.Tensor, low: torch.dtype | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """``g @ weight`` ([n, V] x [V, H]); in ``low`` when given and the inputs are float32: through
    ``kernels.bf16_head`` where it runs (bf16 only), else g and the weight rounded a vocabulary chunk at a time (so
    no 16-bit copy of either is made whole) and the partial products summed in float32."""
    if low is None or weight.dtype != torch.float32 or g.dtype != torch.float32:
        return g.to(out_dtype) @ weight
    if _native(g, weight, low):  # both rounded as they are read, nothing of the product rounded
        return bf16_head.bf16_grad_product(g, weight).to(out_dtype)
    acc = torch.zeros(g.shape[0], weight.shape[1], dtype=torch.float32, device=g.device)
    for v in range(0, weight.shape[0], GRAD_VOCAB_CHUNK):
        part = slice(v, v + GRAD_VOCAB_CHUNK)
        acc += g[:, part].to(low) @ weight[part].to(low)
    return acc.to(out_dtype)


def _acc_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Logits are accumulated in float32, or float64 when the inputs are float64."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def token_logprobs_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """Eager reference: hidden [N, H], weight [V, H], targets [N] -> [N] in float32 (float64 for float64 input)."""
    logits = (hidden @ weight.t()).to(_acc_dtype(hidden))  # [N, V]
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward and backward chunk by chunk: d logp_i / d logits_i = onehot(t_i) - softmax(logits_i).

    When only ``hidden`` needs a gradient (the head is frozen, as in LoRA training), the forward pass also
    computes ``G_i = d logp_i / d hidden_i`` while each chunk's logits exist, and keeps ``G`` ([N, H], the size
    of ``hidden``, which then is not kept) instead of recomputing the logits in backward: since ``logp_i``
    depends on ``hidden_i`` alone, ``d loss / d hidden_i = grad_out_i * G_i`` whatever the loss is. Two head
    matrix products per chunk instead of three, and one softmax instead of two.
    When the head needs a gradient too, the logits are recomputed in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, softcap, grad_wanted, grad_dtype=None, logits_dtype=None):
        acc = _acc_dtype(hidden)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        in_forward = grad_wanted and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if in_forward else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            t = targets[s : s + chunk]
            raw = _logits(h, weight, logits_dtype, acc)
            logits = softcap * torch.tanh(raw / softcap) if softcap else raw
            picked = logits.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            out[s : s + chunk] = picked - _softmax_(logits)
            if grad_h is not None:
                g = _grad_logits(logits, t, raw, softcap)
                grad_h[s : s + chunk] = _grad_product(g, weight, grad_dtype, hidden.dtype)
                del g
            del raw, logits  # before the next chunk's are made: one chunk's logits alive at a time
        if grad_h is not None:
            ctx.save_for_backward(grad_h)
        else:
            ctx.save_for_backward(hidden, weight, targets)
        ctx.in_forward, ctx.chunk, ctx.softcap, ctx.logits_dtype = in_forward, chunk, softcap, logits_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.in_forward:
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad_out.unsqueeze(-1).to(grad_h.dtype), None, None, None, None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        chunk, softcap = ctx.chunk, ctx.softcap
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = _acc_dtype(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            raw = _logits(h, weight, ctx.logits_dtype, acc)
            logits = softcap * torch.tanh(raw / softcap) if softcap else raw
            _softmax_(logits)
            g = _grad_logits(logits, targets[s : s + chunk], raw, softcap)
            g.mul_(grad_out[s : s + chunk].unsqueeze(-1).to(acc))
            g = g.to(hidden.dtype)
            if grad_h is not None:  # need_h
                grad_h[s : s + chunk] = g @ weight
            if grad_w is not None:  # need_w
                grad_w.add_((g.t() @ h).to(acc))
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Turn one chunk's ``logits`` into their softmax in place and return their log-sum-exp, with no temporary
    of the chunk's size (``torch.logsumexp`` makes one: the chunk's peak would be twice its logits)."""
    top = logits.amax(dim=-1, keepdim=True)
    total = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
    logits.div_(total)
    return (top + total.log()).squeeze(-1)


def _grad_logits(probs, targets, raw, softcap) -> torch.Tensor:
    """d logp / d raw logits for one chunk from its softmax ``probs``: onehot(t) - softmax, through the softcap's
    tanh when there is one. Overwrites ``probs`` (its last use)."""
    g = probs.neg_()
    g.scatter_add_(-1, targets.unsqueeze(-1), torch.ones_like(g[:, :1]))
    if softcap:
        g.mul_(1 - torch.tanh(raw / softcap) ** 2)
    return g


IMPLS = ("auto", "chunked", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernel takes (one for both)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    impl: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    softcap: float | None = None,
    blocks: dict | None = None,
) -> torch.Tensor:
    """Public op. ``impl``: 'torch' (eager reference, full [N, V] float32 logits kept for backward),
    'chunked' (at most ``chunk x V`` logits alive at once, none kept for backward), 'triton' (one fused
    kernel each way, no logits in memory; CUDA, or the CPU under ``TRITON_INTERPRET=1``; ``blocks`` overrides
    its tile sizes), or 'auto': 'triton' where ``selection.MEASURED_FASTER`` says it won on this kind of
    device, else 'chunked'."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        impl = "chunked"
        if hidden.dtype in _TRITON_DTYPES and weight.dtype == hidden.dtype:
            impl = measured_choice("linear_logprobs", hidden.device, "chunked")
    if impl == "torch":
        return token_logprobs_reference(hidden, weight, targets, softcap)
    if impl == "triton":
        require_triton(hidden, weight, targets)
        from finetune_studio.kernels import triton_linear_logprobs as tk

        defaults = {**tk.DEFAULT_BLOCKS, **(tk.FLOAT32_BLOCKS if hidden.dtype == torch.float32 else {})}
        return tk.TritonLogprobs.apply(hidden, weight, targets, softcap, {**defaults, **(blocks or {})})
    return _ChunkedLogprobs.apply(
        hidden,
        weight,
        targets,
        chunk,
        softcap,
        torch.is_grad_enabled(),
        head_grad_dtype(weight),
        head_logits_dtype(weight),
    )
