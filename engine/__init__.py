"""The training engine: runs one training run in its own process and speaks JSON-line events.

Importing ``engine`` is cheap; torch and transformers load only when a command needs them.
"""
