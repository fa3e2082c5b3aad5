"""The engine's command line: each sub-command's parser and handler, run by ``engine/__main__.py``.

Holds the dispatcher for train, export, demo, model info, estimate, devices, slurm and serve (``commands``), the
commands with parsers of their own (``data``, ``db``, ``pairs``, ``runs``), each command's parser and handler
(``estimate``, ``export``, ``devices``, ``slurm``) and the parser that turns a usage error into a message
(``argparsing``). Config loading and ``--set`` parsing live below, in ``core.config``.

May import: everything in the engine below it, core, and the ML stack. Nothing imports it but ``engine.__main__``
(import-linter: "The engine is layered").
"""
