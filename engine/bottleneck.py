"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021) on a frozen causal LM, and their saved form.

An adapter is ``h + up(f(down(h)))``: a down-projection to ``hidden / reduction_factor``, a non-linearity ``f``, an
up-projection back, and a residual around them. It is put on a sublayer's output, before the decoder layer adds
that output to its residual stream:

- Houlsby: after each layer's attention and after its MLP (two adapters a layer);
- Pfeiffer: after each layer's MLP only (one a layer).

``up`` starts at zero, so the model at step 0 is the base. The adapters run as forward hooks on the attention and
MLP modules, so the base's modules and weight names stay as they are (the engine's fused ops still apply).

Saved form (a folder; written by :meth:`BottleneckModel.save_pretrained`, read by :func:`load_bottlenecks`):

- ``bottleneck_config.json``: ``{"format": "finetune-studio-bottleneck", "version": 1, "placement": "houlsby" |
  "pfeiffer", "reduction_factor": int, "non_linearity": "relu" | "gelu" | "silu" | "tanh", "hidden_size": int,
  "sites": ["layers.0.attn", "layers.0.mlp", ...], "base_model_name_or_path": str}``;
- ``adapter_model.safetensors``: for each site ``<site>.down.weight`` [b, h], ``<site>.down.bias`` [b],
  ``<site>.up.weight`` [h, b], ``<site>.up.bias`` [h] (b = h // reduction_factor), float32.

To use one elsewhere: build the base causal LM, then ``load_bottlenecks(base, folder)``; its ``forward`` and
``generate`` are the base's with the adapters on.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "finetune-studio-bottleneck"
VERSION = 1
CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class BottleneckConfig:
    placement: str  # houlsby | pfeiffer
    reduction_factor: int = 16
    non_linearity: str = "relu"
    hidden_size: int = 0  # filled in when the adapters are made
    sites: tuple[str, ...] = ()  # "layers.<i>.attn" / "layers.<i>.mlp", filled in when the adapters are made
    base_model_name_or_path: str = ""
    format: str = field(default=FORMAT)
    version: int = field(default=VERSION)

    def to_json(self) -> str:
        data = asdict(self)
        data["sites"] = list(self.sites)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: str | Path) -> BottleneckConfig:
        data = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{folder}: not a bottleneck adapter of format {FORMAT} version {VERSION}")
        data["sites"] = tuple(data.get("sites", ()))
        return cls(**data)


def is_bottleneck_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


class Bottleneck(nn.Module):
    """``h + up(f(down(h)))`` over the last dimension; ``up`` zero at the start."""

    def __init__(self, hidden: int, width: int, non_linearity: str):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.act = _ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(width, hidden)
        nn.init.normal_(self.down.weight, std=1e-2)  # near-identity start (Houlsby et al.)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        x = h.to(self.down.weight.dtype)
        return (x + self.up(self.act(self.down(x)))).to(dtype)


def decoder_layers(causal_lm: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (a ModuleList of at least one layer holding an attention and an MLP)."""
    for module in causal_lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) and _site_module(module[0], "mlp") is not None:
            if _site_module(module[0], "attn") is not None:
                return list(module)
    raise ValueError(f"{type(causal_lm).__name__}: no decoder layers with an attention and an MLP module found")


def _site_module(layer: nn.Module, kind: str) -> nn.Module | None:
    for name in _ATTENTION_NAMES if kind == "attn" else _MLP_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _key(site: str) -> str:
    return site.replace(".", "_")  # ModuleDict keys cannot hold dots


class BottleneckModel(nn.Module):
    """A causal LM with bottleneck adapters; the base frozen, the adapters trainable (or not: ``is_trainable``).

    Offers what the engine uses of a PEFT model: ``get_base_model``, ``disable_adapter``, ``save_pretrained``,
    ``generate``, ``get_nb_trainable_parameters``."""

    def __init__(self, base: nn.Module, config: BottleneckConfig, is_trainable: bool = True):
        super().__init__()
        if config.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {config.placement!r}")
        hidden = int(getattr(base.config, "hidden_size", 0) or getattr(base.config, "n_embd", 0))
        width = max(1, hidden // config.reduction_factor)
        layers = decoder_layers(base)
        sites = tuple(f"layers.{i}.{kind}" for i in range(len(layers)) for kind in PLACEMENTS[config.placement])
        self.config_ = BottleneckConfig(
            placement=config.placement,
            reduction_factor=config.reduction_factor,
            non_linearity=config.non_linearity,
            hidden_size=hidden,
            sites=sites,
            base_model_name_or_path=str(getattr(base.config, "_name_or_path", "") or config.base_model_name_or_path),
        )
        self.base_model = base
        for p in base.parameters():
            p.requires_grad_(False)
        param = next(base.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        self.bottlenecks = nn.ModuleDict({_key(s): Bottleneck(hidden, width, config.non_linearity) for s in sites}).to(
            device=param.device, dtype=torch.float32 if dtype == torch.float16 else dtype
        )
        self.bottlenecks.requires_grad_(is_trainable)
        self._enabled = True
        self._hooks = []
        for site in sites:
            _, index, kind = site.split(".")
            module = _site_module(layers[int(index)], kind)
            assert module is not None
            self._hooks.append(module.register_forward_hook(self._hook(self.bottlenecks[_key(site)])))

    def _hook(self, adapter: nn.Module) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if not self._enabled:
                return output
            if isinstance(output, tuple):  # an attention module: (output, weights, ...)
                return (adapter(output[0]), *output[1:])
            return adapter(output)

        return hook

    @property
    def bottleneck_config(self) -> BottleneckConfig:
        return self.config_

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
        """Run the base alone (DPO's reference), then the adapters again."""
        before, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = before

    def remove(self) -> nn.Module:
        """Take the adapters off; the base model as it was."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        return self.base_model

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters' weights under their saved names (``<site>.down.weight`` ...), float32 on the CPU."""
        out = {}
        for site in self.config_.sites:
            for name, tensor in self.bottlenecks[_key(site)].state_dict().items():
                out[f"{site}.{name}"] = tensor.detach().float().cpu().contiguous()
        return out

    def load_adapter_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Weights saved by :meth:`save_pretrained` into this model's adapters (every one, names checked)."""
        wanted = set(self.adapter_state_dict())
        missing, unexpected = sorted(wanted - set(weights)), sorted(set(weights) - wanted)
        if missing or unexpected:
            raise ValueError(
                f"the bottleneck weights do not match these adapters (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]})"
            )
        with torch.no_grad():
            for site in self.config_.sites:
                for name, tensor in self.bottlenecks[_key(site)].state_dict().items():
                    tensor.copy_(weights[f"{site}.{name}"])

    def save_pretrained(
        self, folder: str | Path, selected_adapters: list[str] | None = None, state_dict: dict | None = None
    ) -> None:
        """Write the saved form (see the module's docstring) into ``folder``; ``state_dict``: weights to write
        instead of this model's (names as :meth:`adapter_state_dict`'s)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = state_dict if state_dict is not None else self.adapter_state_dict()
        tmp = folder / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
        save_file(weights, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, folder / WEIGHTS_FILE)
        tmp_config = folder / f".{CONFIG_FILE}.{os.getpid()}.tmp"
        tmp_config.write_text(self.config_.to_json(), encoding="utf-8")
        os.replace(tmp_config, folder / CONFIG_FILE)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())


def add_bottlenecks(base: nn.Module, config: BottleneckConfig) -> BottleneckModel:
    """``base`` with fresh, trainable bottleneck adapters (the base frozen)."""
    return BottleneckModel(base, config, is_trainable=True)


def load_bottlenecks(base: nn.Module, folder: str | Path, is_trainable: bool = False) -> BottleneckModel:
    """The adapters saved in ``folder`` on ``base`` (a causal LM of the model they were trained on)."""
    from safetensors.torch import load_file

    config = BottleneckConfig.read(folder)
    model = BottleneckModel(base, config, is_trainable=is_trainable)
    if model.bottleneck_config.sites != config.sites or model.bottleneck_config.hidden_size != config.hidden_size:
        raise ValueError(
            f"{folder}: these adapters were made for a model with hidden size {config.hidden_size} and "
            f"{len(config.sites)} sites, not this one ({model.bottleneck_config.hidden_size}, "
            f"{len(model.bottleneck_config.sites)})"
        )
    model.load_adapter_weights(load_file(str(Path(folder) / WEIGHTS_FILE)))
    return model


def parameter_count(hidden: int, layers: int, placement: str, reduction_factor: int) -> int:
    """Trainable parameters: per adapter ``2 h b + b + h`` (b = h // reduction_factor), one or two a layer."""
    b = max(1, hidden // reduction_factor)
    return layers * len(PLACEMENTS[placement]) * (2 * hidden * b + b + hidden)


def load_adapter_folder(base: nn.Module, folder: str | Path, is_trainable: bool = False) -> Any:
    """``base`` with the adapter saved in ``folder``: a bottleneck adapter (this module's form) or a PEFT one."""
    if is_bottleneck_folder(folder):
        return load_bottlenecks(base, folder, is_trainable=is_trainable)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)
