"""Full fine-tuning: every weight of the model trained, no adapter.

:class:`FullModel` wraps the causal LM and offers what the engine uses of a PEFT model (``get_base_model``,
``disable_adapter``, ``save_pretrained``, ``generate``, ``get_nb_trainable_parameters``, ``load_adapter_weights``),
so the recipe, the objectives, checkpoints and the decode loop take it as they take an adapter:

- every parameter trains, in float32 (a 16-bit compute dtype is CUDA autocast over float32 weights: updates to
  16-bit weights would be rounded away);
- ``disable_adapter()`` is the model training started from, which DPO and GRPO compare with: a frozen copy of the
  start weights, kept only for those objectives (``keeps_reference``), swapped in for the reference pass (the
  tensors are exchanged, nothing is copied) and out again;
- ``save_pretrained(folder)`` writes an ordinary model folder (``config.json``, ``generation_config.json``,
  ``model.safetensors``, the tokenizer of the model it started from, and ``full_finetune.json`` saying so), written
  to a temporary folder and renamed by its callers (the recipe's final ``adapter/`` folder, a checkpoint);
  transformers loads it as any model (:func:`is_full_model_folder` tells it from an adapter's);
- a checkpoint holds that folder and the optimizer's states; ``load_adapter_weights`` puts its weights back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_studio.core.config import TrainConfig
from finetune_studio.engine.models import FULL_MODEL_MARKER, is_full_model_folder

__all__ = ["MARKER", "FullModel", "build", "is_full_model_folder", "keeps_reference"]

MARKER = FULL_MODEL_MARKER  # in a saved folder: written by a full fine-tune (a whole model, not an adapter)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def keeps_reference(config: TrainConfig) -> bool:
    """The objectives that compare the model with the one training started from: DPO, and GRPO with a KL term."""
    return config.objective == "dpo" or (config.objective == "grpo" and config.grpo_beta > 0)


class FullModel(nn.Module):
    """A causal LM whose every parameter trains; see the module's docstring."""

    def __init__(self, base: nn.Module, keep_reference: bool = False):
        super().__init__()
        self.base_model = base
        for p in base.parameters():
            p.requires_grad_(True)
        self.source = str(getattr(base.config, "_name_or_path", "") or "")
        # the start weights, a plain list (no parameters, no buffers: not trained, not saved, not counted)
        self._reference: list[torch.Tensor] | None = (
            [p.detach().clone() for p in base.parameters()] if keep_reference else None
        )

    @property
    def config(self) -> Any:
        return self.base_model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        generate: Any = self.base_model.generate
        return generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The model training started from (DPO's and GRPO's reference): the frozen start weights swapped in, then
        the trained ones back. Only under ``torch.no_grad`` and with no graph alive (the objectives' reference pass
        comes before the policy's forward)."""
        if self._reference is None:
            raise RuntimeError("this full fine-tune kept no copy of its start weights (only DPO and GRPO keep one)")
        if torch.is_grad_enabled():
            raise RuntimeError("the reference weights are for a pass without gradients (torch.no_grad)")
        params = list(self.base_model.parameters())
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    def _swap(self, params: list[nn.Parameter]) -> None:
        assert self._reference is not None
        if len(params) != len(self._reference):
            raise RuntimeError("the model's parameters changed since its start weights were kept")
        for i, p in enumerate(params):
            p.data, self._reference[i] = self._reference[i], p.data

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The weights as the saved folder names them (tied weights once)."""
        return {k: v.detach() for k, v in self.base_model.state_dict().items()}

    def save_pretrained(
        self, folder: str | Path, selected_adapters: list[str] | None = None, state_dict: dict | None = None
    ) -> None:
        """The whole model into ``folder`` (see the module's docstring); ``selected_adapters`` is ignored (there is
        no adapter), ``state_dict``: weights to write instead of this model's."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save: Any = self.base_model.save_pretrained
        save(folder, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
        source = Path(self.source)
        if source.is_dir():
            for name in TOKENIZER_FILES:
                if (source / name).is_file() and not (folder / name).exists():
                    shutil.copy2(source / name, folder / name)
        tmp = folder / f".{MARKER}.{os.getpid()}.tmp"
        tmp.write_text(
            json.dumps({"method": "full", "base_model_name_or_path": self.source}, indent=1), encoding="utf-8"
        )
        os.replace(tmp, folder / MARKER)

    def load_adapter_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Weights saved by :meth:`save_pretrained` back into this model (a resumed run); every one must match."""
        expected = self.base_model.state_dict()
        unexpected = sorted(set(weights) - set(expected))
        missing = [k for k in expected if k not in weights and not _tied_to_loaded(k, expected, weights)]
        if missing or unexpected:
            raise ValueError(
                f"the saved weights do not match this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                expected[name].copy_(tensor)

    def load_saved_folder(self, folder: str | Path) -> None:
        """The weights of a folder :meth:`save_pretrained` wrote (one file, or transformers' shards)."""
        from safetensors.torch import load_file

        files = sorted(Path(folder).glob("model*.safetensors"))
        if not files:
            raise ValueError(f"{folder} holds no model weights (model.safetensors)")
        weights: dict[str, torch.Tensor] = {}
        for file in files:
            weights.update(load_file(str(file)))
        self.load_adapter_weights(weights)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())


def _tied_to_loaded(name: str, expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> bool:
    """``name`` shares its storage with a weight that is loaded (a tied output head)."""
    ptr = expected[name].data_ptr()
    return any(expected[k].data_ptr() == ptr for k in weights if k in expected and k != name)


def build(base: nn.Module, config: TrainConfig) -> FullModel:
    """``base`` with every weight trainable; a frozen copy of the start weights where the objective compares with
    them (:func:`keeps_reference`)."""
    return FullModel(base, keep_reference=keeps_reference(config))
