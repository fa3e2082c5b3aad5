"""Pure-Python pieces shared by the studio (GUI) and the engine.

Holds the run config (``config``), the event and message protocols (``protocol/``), the memory estimate
(``memory/``), the SQLite stores (``store``, ``preferences``, ``db_recovery``), the run-status rules
(``run_status``), paths, model specs, devices found without torch, export targets, the engine's process
environment and the SLURM script.

May import: the standard library and small pure-Python libraries (yaml, platformdirs, sqlite_utils, psutil).
Never torch, transformers, bitsandbytes, peft, triton, datasets, Qt, nor the engine, kernels or studio
(import-linter: "Shared pieces are pure Python").
"""
