"""The bundled demo task: fine-tune the default model to extract a person's details as strict JSON, scored.

Holds the task, its scorer and the plain demo (``task``: ``demo``) and the whole SFT -> sample -> label -> DPO loop
(``loop``: ``demo --loop``), which reuses the task's scorer, and the distilled half-depth student (``distill``:
``demo --distill``); the CLI chooses between them.

May import: ``train``, ``generate``, ``export``, ``datasets``, the shared engine modules, core, and the ML stack;
not the CLI (import-linter: "The engine is layered").
"""
