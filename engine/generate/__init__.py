"""Generation: sampling answers from a base model and its adapters, in-process or as the generation worker.

Holds the engine side (``generator``) and the worker that speaks ``core.protocol.generation`` on stdin/stdout
(``serve``: ``engine serve``). The batched decode loop, next-token sampling and the int8 and int4 layers live one
layer down in ``engine.decoding``, which training shares.

May import: ``decoding``, ``datasets``, the shared engine modules (models, checkpoint, logs), core, and the ML
stack; never ``train`` or ``export`` (its siblings), ``demo`` or the CLI (import-linter: "The engine is layered").
"""
