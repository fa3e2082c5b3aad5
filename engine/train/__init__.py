"""Training: one run, set up, trained, checkpointed, reported (``recipe.train_run``).

Holds the recipe (``recipe``), its objectives (``objectives/``: SFT, DPO), batches and packing (``batches``), the
forward pass and losses (``forward``, ``losses``), adapters and the optimizer (``adapters``, ``init_adapter``),
early stopping, evaluation samples, checks before loading (``guard``), failures as events (``errors``), where
events go (``reporting``), the memory budget and thread count (``memory_budget``, ``threads``), the saved-tensor
census (``saved_tensors``), the model patches that wire in kernels and mixed precision (``model_patches/``) and a
run on several processes (``distributed/``).

May import: ``decoding``, ``datasets``, the shared engine modules (models, checkpoint, logs), kernels, core, and the
ML stack; never ``generate`` or ``export`` (its siblings), ``demo`` or the CLI (import-linter: "The engine is layered").
"""
