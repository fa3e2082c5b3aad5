"""bf16-mixed compute: the frozen base's matrix products in bfloat16, everything that learns kept in float32.

Plain bfloat16 autocast on the CPU is 1.4-1.6x faster per step but learns more slowly than float32 (measured in
``benchmarks/RESULTS.md``, "bf16 mixed compute on the CPU"): PEFT adds the LoRA delta ``s * B A x`` to the base
layer's output and casts the sum back to the base output's dtype, so under autocast a delta smaller than about
1/256 of the base output is rounded away, and the early updates (B starts at zero) are lost.

This mode keeps the model in float32 (adapters, DoRA magnitudes and norms, the sum with the base output, the
residual stream, RMSNorm, attention, the output head) and only swaps the frozen decoder linears for
``BF16FrozenLinear``: the weight stored in bfloat16 (converted after a float32 load) and ``kernels.frozen_linear``
for the product (x rounded to bf16, bf16 GEMM, float32 out; its backward gives grad_x the same way). For the
default model those products are nearly all of a step's FLOPs. A frozen float32 output head keeps its float32
weight and float32 logits; its gradient product (``d logp / d hidden``) runs in bf16
(``kernels.linear_logprobs.set_head_grad_dtype``; no bf16 copy of the head is kept), and so, where
``kernels.bf16_head`` runs (AVX-512 BF16), does its logits' product, with a float32 result (``set_head_logits_dtype``:
the hidden states and the head rounded to bf16, the logits not). Each attention module is marked for bf16 products
(``kernels.attention.set_products_dtype``): with ``kernels.cpu_attention.BF16_PRODUCTS`` set (off by default: it
moves the loss curves outside float32's seed spread, see that module) and AVX512_BF16, q k^T, P v and the
backward's products take bf16-rounded operands with float32 sums, softmax and results, as flash-attn multiplies on
a GPU; otherwise attention multiplies in float32. Over these bf16 bases a plain
LoRA layer's own rank-r products run in bf16 as well (``kernel_wiring.install_lora_linear``'s
``low_precision_adapters``, installed by ``install_kernels``): the adapter weights, their gradients, the optimizer
and the sum of the low-rank part with the base output stay float32, so no update is rounded away; measured
3-5% faster a step, the loss curves within float32's seed spread (``benchmarks/RESULTS.md``, "The share of the
CPU's matrix-product peak").

A 4-bit (QLoRA) base is loaded with a float32 model around it too; its bitsandbytes ``Linear4bit`` layers get
``compute_dtype`` bfloat16: they dequantise the NF4 weight to bf16 and multiply bf16 x (x rounded from float32),
their output cast back to float32 (bitsandbytes' own ``Linear4bit.forward``), and nothing else changes.
Measured on a 2-core AVX-512 BF16 CPU, SmolLM2-135M, batch 4, one thread (``benchmarks/step_ab.py --method
qlora --bnb-compute bfloat16``): 2.5 CPU s per step against 4.4 in float32; over 20 steps
(``benchmarks/mixed_precision_check.py curve --method qlora``) |bf16-mixed - float32 seed 1| averaged 0.0007
(at most 0.0029) against float32's own seed-to-seed spread of 0.0012 (at most 0.0026).

``auto`` picks it on a CPU with AVX-512 BF16 or AMX (``uses_mixed``), for LoRA/DoRA and for a 4-bit base, in one
process; elsewhere the CPU stays float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from finetune_studio.kernels.attention import is_attention_module, set_products_dtype
from finetune_studio.kernels.frozen_linear import frozen_linear
from finetune_studio.kernels.linear_logprobs import set_head_grad_dtype, set_head_logits_dtype

MIXED = "bf16-mixed"


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX tiles: the CPU multiplies bf16 matrices at about twice its float32 rate."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def uses_mixed(name: str, device: str, distributed: bool = False) -> bool:
    """Whether a run with ``compute_dtype=name`` on ``device`` computes in bf16-mixed.

    Explicit ``bf16-mixed``: yes, on any device. ``auto``: on the CPU with fast bf16, for 16/32-bit and 4-bit bases,
    in one process (DDP / FSDP over bf16 and float32 parameters side by side is untested; FSDP refuses 4-bit
    weights computing in bf16 on the CPU, ``engine.train.distributed.ranks.check_shardable``).
    """
    if name == MIXED:
        return True
    return name == "auto" and device == "cpu" and not distributed and cpu_has_fast_bf16()


class BF16FrozenLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored in bfloat16 and whose output is in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)


def _adapter_modules(model: nn.Module) -> set[int]:
    """ids of PEFT's own adapter sub-layers (lora_A / lora_B, trainable or a frozen reference): never swapped."""
    out: set[int] = set()
    for name, module in model.named_modules():
        if any(part.startswith("lora_") for part in name.split(".")):
            out.add(id(module))
    return out


def _is_4bit_linear(module: nn.Module) -> bool:
    """bitsandbytes' ``Linear4bit`` (and its FP4/NF4 subclasses), without importing bitsandbytes."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def apply_mixed(model: Any, dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every frozen plain ``nn.Linear`` of the decoder (LoRA/DoRA base layers included) for
    ``BF16FrozenLinear`` in place, and set every 4-bit ``Linear4bit``'s compute dtype to ``dtype``; the output
    head and embeddings stay as they are. Returns the count of layers changed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    skip = _adapter_modules(model)
    tied = {id(p) for m in (head, base.get_input_embeddings()) if m is not None for p in m.parameters()}
    n = 0
    for module in base.modules():
        if _is_4bit_linear(module):
            module.compute_dtype = dtype  # bitsandbytes casts x to it, dequantises to it, casts the output back
            module.compute_type_is_set = True  # else its first forward resets it to the input's float32
            n += 1
            continue
        if type(module) is not nn.Linear or module is head or id(module) in skip:
            continue
        if module.weight.requires_grad or id(module.weight) in tied or not module.weight.is_floating_point():
            continue
        if module.bias is not None and module.bias.requires_grad:
            continue
        module.weight.data = module.weight.data.to(dtype)
        module.__class__ = BF16FrozenLinear
        n += 1
    low = dtype in (torch.bfloat16, torch.float16)
    if low and type(head) is nn.Linear and head.weight.dtype == torch.float32 and not head.weight.requires_grad:
        set_head_grad_dtype(head.weight, dtype)  # the head's d logp / d hidden product in bf16
        if dtype == torch.bfloat16:  # its logits from bf16 inputs, a float32 result (kernels.bf16_head, if it runs)
            set_head_logits_dtype(head.weight, dtype)
    if dtype == torch.bfloat16:  # attention's products from bf16 operands where kernels.cpu_attention runs them
        for module in base.modules():
            if is_attention_module(module):
                set_products_dtype(module, dtype)
    return n
