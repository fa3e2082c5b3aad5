"""Decoding: the batched decode loop with its preallocated KV cache, shared by generation and training.

Holds the decode loop (``decode``: one prefill shared by the candidates, the fast step), next-token sampling
(``token_sampling``), weight-only int8 and int4 layers for CPU decoding (``int8``, ``int4``), their int8 x int16
products (``int8_dot``) and the whole decoding step in C for int8 models (``native_step``). Generation's
worker decodes with it, and so does training when an objective samples its own answers (GRPO's rollouts).

May import: ``datasets``, the shared engine modules (models, checkpoint, logs), core, and the ML stack; never
``train``, ``generate`` or ``export`` (the layer above it), ``demo`` or the CLI (import-linter: "The engine is
layered").
"""
