"""Reading datasets of every common format into the internal form (see ``schema``).

Public API: :func:`load_dataset` (path, optional mapping) -> :class:`LoadedDataset`.
"""

from finetune_studio.engine.datasets.loader import load_dataset
from finetune_studio.engine.datasets.schema import (
    Conversation,
    DatasetError,
    LoadedDataset,
    Message,
    PreferencePair,
    Problem,
    TextExample,
    UnpairedExample,
)

__all__ = [
    "load_dataset",
    "Conversation",
    "DatasetError",
    "LoadedDataset",
    "Message",
    "PreferencePair",
    "Problem",
    "TextExample",
    "UnpairedExample",
]
