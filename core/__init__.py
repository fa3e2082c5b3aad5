"""Pure-Python pieces shared by the studio (GUI) and the engine.

Nothing here imports torch, transformers, bitsandbytes, kernels or Qt: the
config, the event protocol, the SQLite store, the memory estimator, paths.
"""
