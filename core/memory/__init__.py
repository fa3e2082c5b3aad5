"""The memory a training run will need, worked out before it starts, in pure Python (well under 1 ms).

Holds the one-process estimate (``estimate``: shapes, lengths, the per-component bytes, the verdict) and its
per-process split for a run on several processes (``parallel``). The message that carries the result is
``core.protocol.memory_report``.

May import: the standard library and other core modules (config, devices, model_spec, paths); pure Python like
the rest of core (import-linter: "Shared pieces are pure Python").
"""
