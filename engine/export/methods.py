"""What an export may make of each method's adapter (``core.methods``): the merged model and GGUF only where the
adapter folds into the weights, refused with the reason before any work."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_studio.core import methods
from finetune_studio.engine.export.errors import ExportError

FOLDED = ("merged", "gguf", "ollama")  # the forms made from the merged weights


def refuse_unfoldable(method: str, formats: list[str], adapter: Path, base_folder: Path | None) -> None:
    """ExportError when ``formats`` asks for merged weights that ``method``'s adapter cannot give."""
    wanted = [f for f in formats if f in FOLDED]
    if not wanted:
        return
    entry = methods.BY_NAME.get(method)
    if entry is None:
        return
    why = entry.refusal(methods.MERGE)
    if not why and entry.family == "bias" and base_folder is not None:
        missing = layers_without_bias(adapter, base_folder)
        if missing:
            why = (
                f"the base's layers have no bias of their own ({missing[0]} and {len(missing) - 1} more), so the "
                "trained biases have nowhere to fold: export the adapter (PEFT loads it)"
            )
    if why:
        raise ExportError(f"{entry.label} cannot be exported as {' / '.join(wanted)}: {why}")


def layers_without_bias(adapter: Path, base_folder: Path) -> list[str]:
    """The linears of a bias-tuning (BEFT) adapter whose base layer has no bias tensor, by the base's weight names."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(base_folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            names.update(fh.keys())
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as fh:
        trained = list(fh.keys())
    missing = []
    for key in trained:  # base_model.model.<module>.beft_bias
        module = key.removeprefix("base_model.model.").rsplit(".beft_bias", 1)[0]
        if f"{module}.bias" not in names:
            missing.append(module)
    return missing


def method_of(adapter: Path, config: dict) -> str:
    """The run's method (its config), or the adapter folder's own kind for a folder without a run."""
    if config.get("method"):
        return str(config["method"])
    cfg = adapter / "adapter_config.json"
    if cfg.is_file():
        kind = str(json.loads(cfg.read_text(encoding="utf-8")).get("peft_type", "LORA")).lower()
        return {"beft": "bitfit", "prompt_encoder": "p_tuning", "p_tuning": "p_tuning"}.get(kind, kind)
    return "houlsby"
