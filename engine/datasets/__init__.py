"""Reading datasets of every common format into the internal form (see ``schema``).

Public API: :func:`load_dataset` (path, optional mapping) -> :class:`LoadedDataset`. Holds where rows come from
(``sources``, ``readers``), their layouts (``formats``, ``messages``, ``preference``), the internal form
(``schema``), checks and reports (``problems``, ``report``, ``bound``, ``preview``), the split, conversion to other
formats (``convert``), rendering through the chat template (``render``) and the preference store as training data
(``pairs``).

May import: the shared engine modules (models, checkpoint, logs), core, and the ML stack (transformers'
tokenizers, pyarrow, datasets); never ``train``, ``generate``, ``export``, ``demo`` or the CLI
(import-linter: "The engine is layered").
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
