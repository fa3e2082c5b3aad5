"""Generation: sampling answers from a base model and its adapters, in-process or as the generation worker.

Holds the engine side (``generator``), the worker that speaks ``core.protocol.generation`` on stdin/stdout
(``serve``: ``engine serve``), the batched decode loop with its KV cache (``decode``), next-token sampling
(``token_sampling``) and weight-only int8 and int4 layers for CPU decoding (``int8``, ``int4``).

May import: ``datasets``, the shared engine modules (models, checkpoint, logs), core, and the ML stack; never
``train`` or ``export`` (its siblings), ``demo`` or the CLI (import-linter: "The engine is layered").
"""
