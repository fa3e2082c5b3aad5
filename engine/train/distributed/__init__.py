"""One training run as several processes: torchrun, DDP or FSDP2, sharded checkpoints.

Holds the ranks' set-up, collectives and failure reports (``ranks``), checkpoints through
``torch.distributed.checkpoint`` (``checkpoint``) and torchrun's agent for ``train --nproc N`` with its arguments
(``launch``).

May import: the rest of ``train``, ``datasets``, the shared engine modules, core, and torch; never the CLI
(``--set`` is read by ``core.config``) (import-linter: "The engine is layered").
"""
