"""Changes made to a loaded model for training: the fused ops, the kernel choice, bf16-mixed compute.

Holds the memory patches that swap a supported model's MLP, RMSNorm and attention forwards for the kernels' fused
ops (``fused_ops``), the config's ``kernels: auto|triton|torch`` applied to the adapter layers (``kernel_wiring``)
and bf16-mixed compute (``mixed_precision``).

May import: kernels, the shared engine modules, core, torch and peft; like the rest of ``train``, never
``generate``, ``export``, ``demo`` or the CLI (import-linter: "The engine is layered").
"""
