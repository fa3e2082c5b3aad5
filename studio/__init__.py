"""Finetune Studio's desktop app (PySide6). Never imports torch, transformers, bitsandbytes or kernels."""
