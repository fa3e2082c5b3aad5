"""Finetune Studio's desktop app (PySide6): the window and everything it shows.

Holds the entry point and the window (``__main__``, ``app``, ``main_window``, ``theme``, ``compat``,
``db_guard``, ``probe``), the pages (``pages/``), the widgets they are built from (``widgets/``), the wrappers
around engine processes and short jobs (``services/``) and the state the pages show (``state/``). Layered from the
top: main window > pages > widgets > services > state (import-linter: "The studio is layered").

May import: core, Qt (PySide6, pyqtgraph) and numpy; never torch, transformers, bitsandbytes, peft, triton,
datasets, the engine or kernels: it speaks to the engine through processes (import-linter: "The GUI never
imports the ML stack, the engine or kernels").
"""
