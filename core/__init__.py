"""Pure-Python pieces shared by the studio (GUI) and the engine.

Holds the run config (``config``), the event and message protocols (``protocol/``), the memory estimate
(``memory/``), the SQLite stores (``store``, ``preferences``, ``db_recovery``), the run-status rules
(``run_status``), paths, model specs, devices found without torch, export targets, the engine's process
environment, the SLURM script and the rewards of online RL (``rewards/``: verifiers, a person's Python reward in a
sandboxed process, their weighted total).

May import: the standard library and small pure-Python libraries (yaml, platformdirs, sqlite_utils, psutil,
jsonschema).
Never torch, transformers, bitsandbytes, peft, triton, datasets, Qt, nor the engine, kernels or studio
(import-linter: "Shared pieces are pure Python").
"""
