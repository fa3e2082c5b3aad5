"""Our own fast ops, each with an eager reference and an ``impl='auto'|'triton'|'torch'`` switch.

Holds DoRA's weight norm and output (``dora_norm``, ``dora_output``), log-probabilities through the output head
without the full logits (``linear_logprobs``; its bf16 products with a float32 result on the CPU in
``bf16_head``), RMSNorm and SwiGLU (their float32 CPU passes in ``cpu_rms_norm``, ``cpu_swiglu``), grouped-query
attention, a frozen 16-bit linear, a LoRA linear over it in one autograd node (``lora_linear``; several that read
one input as one stacked product, ``grouped_lora_linear``), recomputation in backward (``recompute``), the choice
behind ``impl='auto'`` (``selection``), the Triton kernels (``triton_*``, importable only where triton is
installed) and the build of the C ones (``native_build``: compiled once with the system's compiler, loaded with
ctypes).

May import: torch and triton only: neither the rest of the project nor transformers (import-linter: "Kernels are
torch and triton only"), and never Qt.
"""
