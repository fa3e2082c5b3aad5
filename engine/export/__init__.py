"""Exporting a run: the PEFT adapter with its model card, and optionally the merged model, GGUF files and an
Ollama Modelfile, then a check in a fresh process that each written form answers like the trained model.

Holds the entry point ``writer.export(ExportRequest)`` (and ``find_source``, which adapter a run exports), the
errors every part raises (``errors``), the trained and merged model (``build``), the model card (``card``), the
check (``check``, also the fresh process's ``-m`` entry point) and the two formats (``gguf``, ``ollama``). This
``__init__`` imports nothing: ``python -m finetune_studio.engine.export.check`` imports the package first, and
must not find ``check`` imported already.

May import: ``datasets``, the shared engine modules (models, checkpoint, logs), core, and the ML stack; never
``train`` or ``generate`` (its siblings), ``demo`` or the CLI (import-linter: "The engine is layered").
"""
