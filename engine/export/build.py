"""The trained model (base + adapter) as training saw it, its answers to the check's prompts, and the merged model.

A LoRA/DoRA adapter is merged onto the 16/32-bit base, one adapted layer at a time (PEFT's ``merge``), and each
layer's merged weight is compared with its base weight to measure what rounding to a 16-bit dtype would keep of the
update: of the elements the update changed, the share whose rounded value still differs from the rounded base value
(:class:`UpdateRounding`). A LoRA update is often smaller than bfloat16's spacing (8 significant bits), so bfloat16
can round most of the training away; float16 (11 bits) keeps far more, float32 keeps it all. The merged model's
dtype is chosen from these figures (:func:`choose_dtype`), and a dtype that would lose more than ``MAX_LOST`` of the
update in some layer is refused.

A QLoRA adapter was trained on the NF4-quantised base, so it is merged onto that base de-quantised (each 4-bit
weight expanded back to floats), not onto the original weights; the difference this makes is measured and reported.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_studio.engine.export.errors import ExportError
from finetune_studio.engine.export.prompts import FIXED_PROMPT, CheckPrompts, check_prompts
from finetune_studio.engine.models import FULL_MODEL_MARKER, is_full_model_folder, load_causal_lm

log = logging.getLogger(__name__)

CHECK_MESSAGES = FIXED_PROMPT
MAX_NEW_TOKENS = 32
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROUNDED = ("bfloat16", "float16")  # the 16-bit dtypes whose rounding is measured
MAX_LOST = 0.01  # a dtype that rounds the update away in more than this share of a layer's changed elements is refused


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with (``<|im_end|>`` for ChatML)."""
    probe = "\u2063probe\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [CHECK_MESSAGES[0], {"role": "assistant", "content": probe}], tokenize=False
        )
    except Exception:
        return tokenizer.eos_token_id
    tail = text[text.rfind(probe) + len(probe) :]
    ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    special = set(tokenizer.all_special_ids)
    for tid in ids:
        if tid in special:
            return tid
    return tokenizer.eos_token_id


def prompt_ids(tokenizer, messages=CHECK_MESSAGES) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def greedy(model, ids: list[int], stop_ids: set[int], max_new: int = MAX_NEW_TOKENS) -> list[int]:
    """The greedy answer to ``ids``, up to and including a stop token."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    out: list[int] = []
    past = None
    with torch.no_grad():
        for _ in range(max_new):
            res = model(input_ids=x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].float().argmax())
            out.append(nxt)
            if nxt in stop_ids:
                break
            x = torch.tensor([[nxt]], device=device)
    return out


def sequence_logits(model, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


# --- what rounding keeps of the update ------------------------------------------------------------


@dataclass
class UpdateRounding:
    """Per adapted layer: how many weight elements the update changed, and how many of those changes survive
    rounding the merged weight to each 16-bit dtype (the rounded merged value differs from the rounded base value).
    """

    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"changed": n, "kept": {dtype: n}}
    beyond_float16: int = 0  # merged elements too large for float16 (they would become infinite)

    def add(self, name: str, before: torch.Tensor, after: torch.Tensor) -> None:
        changed = after != before
        kept = {d: int(((after.to(DTYPES[d]) != before.to(DTYPES[d])) & changed).sum()) for d in ROUNDED}
        self.layers[name] = {"changed": int(changed.sum()), "kept": kept}
        self.beyond_float16 += int((after.abs() > torch.finfo(torch.float16).max).sum())

    @property
    def changed(self) -> int:
        return sum(layer["changed"] for layer in self.layers.values())

    def kept_share(self, dtype: str) -> float:
        """The share of all changed elements whose change survives ``dtype`` (1.0 for float32 or no change)."""
        if dtype not in ROUNDED or not self.changed:
            return 1.0
        return sum(layer["kept"][dtype] for layer in self.layers.values()) / self.changed

    def worst_layer(self, dtype: str) -> tuple[str, float]:
        """(layer, share kept) of the layer that keeps the least of its update in ``dtype``."""
        if dtype not in ROUNDED:
            return "", 1.0
        shares = [
            (layer["kept"][dtype] / layer["changed"], name) for name, layer in self.layers.items() if layer["changed"]
        ]
        if not shares:
            return "", 1.0
        share, name = min(shares)
        return name, share

    def holds(self, dtype: str) -> bool:
        """Whether ``dtype`` keeps the update: no layer loses more than ``MAX_LOST`` of it, and nothing overflows."""
        if dtype == "float16" and self.beyond_float16:
            return False
        return 1.0 - self.worst_layer(dtype)[1] <= MAX_LOST

    def report(self, chosen: str, requested: str) -> dict:
        """check.json's ``merge`` entry."""
        return {
            "dtype": chosen,
            "requested": requested,
            "max_lost": MAX_LOST,
            "changed_elements": self.changed,
            "kept": {d: self.kept_share(d) for d in (*ROUNDED, "float32")},
            "worst_layer": {d: dict(zip(("layer", "kept"), self.worst_layer(d))) for d in ROUNDED},
            "beyond_float16": self.beyond_float16,
            "layers": {
                name: {
                    "changed": layer["changed"],
                    "kept": {d: (layer["kept"][d] / layer["changed"] if layer["changed"] else 1.0) for d in ROUNDED},
                }
                for name, layer in self.layers.items()
            },
        }

    def describe(self, dtype: str) -> str:
        """'keeps the update in 99.8 % of the changed weights (worst layer ...: 98.9 %)' for one dtype."""
        if dtype == "float32" or not self.changed:
            return "keeps the whole update"
        if dtype == "float16" and self.beyond_float16:
            return f"overflows: {self.beyond_float16} merged weights are beyond float16's range"
        layer, worst = self.worst_layer(dtype)
        return (
            f"keeps the update in {self.kept_share(dtype):.1%} of the changed weights (least in {layer}: {worst:.1%})"
        )


def choose_dtype(requested: str, rounding: UpdateRounding) -> str:
    """The merged model's dtype: ``auto`` takes float16 when it keeps the update, float32 otherwise; a named 16-bit
    dtype that would lose more than ``MAX_LOST`` of the update in a layer raises :class:`ExportError`."""
    if requested == "auto":
        return "float16" if rounding.holds("float16") else "float32"
    if requested in ROUNDED and not rounding.holds(requested):
        other = "float16" if requested == "bfloat16" and rounding.holds("float16") else "float32"
        lost = 1.0 - rounding.kept_share(requested)
        layer, worst = rounding.worst_layer(requested)
        raise ExportError(
            f"the merged model in {requested} would lose the training: rounding to {requested} removes the update "
            f"from {lost:.1%} of the weights it changed (in {layer}, {1.0 - worst:.1%}); more than "
            f"{MAX_LOST:.0%} in a layer is refused. Choose {other} ({rounding.describe(other)}), or auto to let the "
            f"export choose"
        )
    return requested


def merge_measuring(model) -> tuple[Any, UpdateRounding]:
    """Merge every adapted layer of a PEFT ``model`` into its base weight, measuring each layer's update; returns
    (the plain merged model, the measurements)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    rounding = UpdateRounding()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "base_layer"):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        if weight is None:
            module.merge()
            continue
        before = weight.detach().float().clone()
        module.merge()
        after = weight.detach().float()  # merge changes the parameter's data in place
        rounding.add(name.removeprefix("base_model.model."), before, after)
    with warnings.catch_warnings():  # every layer is merged already: merge_and_unload only unwraps them
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    return merged, rounding


def full_rounding(model, folder: Path) -> UpdateRounding:
    """A full fine-tune's update, weight by weight: the trained weights against the start weights (the model its
    ``full_finetune.json`` names, when it is on this machine with the same weights; else against zero, so the whole
    weight is the update)."""
    import json

    from safetensors.torch import load_file

    start: dict[str, torch.Tensor] = {}
    record = json.loads((Path(folder) / FULL_MODEL_MARKER).read_text(encoding="utf-8"))
    origin = Path(str(record.get("base_model_name_or_path") or ""))
    if str(origin) and origin.is_dir():
        for file in sorted(origin.glob("*.safetensors")):
            start.update(load_file(str(file)))
    rounding = UpdateRounding()
    for name, p in model.named_parameters():
        after = p.detach().float()
        before = start.get(name)
        if before is None or before.shape != after.shape:
            before = torch.zeros_like(after)
        rounding.add(name, before.float(), after)
    return rounding


# --- the trained model, its answers, the merge ----------------------------------------------------


class Builder:
    """Loads the tokenizer and the trained model once; gives the reference answers and the merged model."""

    def __init__(self, source, base_folder: Path):
        from transformers import AutoTokenizer

        self.source = source
        self.base_folder = Path(base_folder)
        self.qlora = source.config.get("method") == "qlora"
        self.full = is_full_model_folder(source.folder)  # a full fine-tune: the saved folder is the model
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_folder))
        self._trained: Any = None
        self._prompts: CheckPrompts | None = None
        self.reference: dict | None = None
        self.rounding: UpdateRounding | None = None

    @property
    def prompts(self) -> CheckPrompts:
        if self._prompts is None:
            self._prompts = check_prompts(self.source.config)
        return self._prompts

    def copy_tokenizer_if_changed(self, out: Path) -> bool:
        """Tokenizer files go with the adapter only when they differ from the base's (training never changes
        the tokenizer here, so normally nothing is copied and PEFT users load the base's)."""
        run_tok = self.source.folder
        changed = [
            n
            for n in ("tokenizer.json", "tokenizer_config.json")
            if (run_tok / n).is_file() and (run_tok / n).read_bytes() != _bytes(self.base_folder / n)
        ]
        for name in TOKENIZER_COPY if changed else ():
            if (run_tok / name).is_file():
                shutil.copy2(run_tok / name, out / name)
        return bool(changed)

    def trained(self):
        """Base (NF4 for QLoRA, as trained) + the exported adapter, in evaluation mode on the CPU."""
        if self._trained is None and self.full:
            self._trained = load_causal_lm(
                self.source.folder, dtype=torch.float32, device="cpu", quantize_4bit=False
            ).eval()
        if self._trained is None:
            from finetune_studio.engine.bottleneck import load_adapter_folder

            base = load_causal_lm(self.base_folder, dtype=torch.float32, device="cpu", quantize_4bit=self.qlora)
            self._trained = load_adapter_folder(base, self.source.folder).eval()
        return self._trained

    def compute_reference(self) -> dict:
        """The trained model's greedy answer to each check prompt, and its logits along prompt + answer."""
        if self.reference is None:
            tok = self.tokenizer
            eot = end_of_turn_id(tok)
            stops = {eot} if eot is not None else set()
            items, logits = [], []
            for messages in self.prompts.conversations:
                ids = prompt_ids(tok, messages)
                answer = greedy(self.trained(), ids, stops)
                items.append(
                    {
                        "messages": messages,
                        "prompt_ids": ids,
                        "answer_ids": answer,
                        "ended_at_eot": bool(answer) and answer[-1] in stops,
                        "text": tok.decode(answer, skip_special_tokens=True),
                    }
                )
                logits.append(sequence_logits(self.trained(), ids + answer))
            self.reference = {
                "items": items,
                "logits": logits,
                "eot_id": eot,
                "eot_token": tok.convert_ids_to_tokens(eot) if eot is not None else None,
                "prompts": self.prompts.description,
            }
        return self.reference

    def max_logit_diff(self, model) -> float:
        """The largest |logit difference| from the trained model over every check prompt and answer position."""
        ref = self.compute_reference()
        return max(
            float((sequence_logits(model, item["prompt_ids"] + item["answer_ids"]) - want).abs().max())
            for item, want in zip(ref["items"], ref["logits"])
        )

    def merged_model(self):
        """(merged plain float32 model, note for the report). The trained model is consumed; the update's
        rounding figures are kept as ``self.rounding``."""
        self.compute_reference()
        if self.full:  # nothing to merge: the trained weights measured against the start weights
            merged, self.rounding = self.trained(), full_rounding(self.trained(), self.source.folder)
            self._trained = None
            return merged, "a full fine-tune: the trained model itself (float32), nothing to merge"
        if self.qlora:
            merged, self.rounding = self._merge_qlora()
        else:
            merged, self.rounding = merge_measuring(self.trained())
            self._trained = None
        diff = self.max_logit_diff(merged)
        if self.qlora:
            return merged, (
                "QLoRA: merged onto the de-quantised NF4 base the adapter was trained on (not the original "
                f"weights); max |logit difference| from the trained 4-bit model, in float32: {diff:.3g}"
            )
        return merged, f"merged (float32): max |logit difference| from the trained model {diff:.3g}"

    def _merge_qlora(self):
        import bitsandbytes as bnb
        from peft import PeftModel

        trained = self.trained()
        dequantised = {}
        for name, module in trained.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight, state = module.weight.data, module.weight.quant_state  # type: ignore[attr-defined]
                if getattr(state, "packing_format_for_cpu", False):
                    # bitsandbytes repacks 4-bit weights in place for its CPU kernel on the first eval-mode
                    # forward; dequantize_4bit reads the standard packing only, so undo it first.
                    weight, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight, state)
                w = bnb.functional.dequantize_4bit(weight, state)
                key = name.removeprefix("base_model.model.").removesuffix(".base_layer")
                dequantised[key] = w.float().cpu()
        self._trained = None
        base = load_causal_lm(self.base_folder, dtype=torch.float32, device="cpu", quantize_4bit=False)
        modules = dict(base.named_modules())
        for key, w in dequantised.items():
            modules[key].weight.data.copy_(w)
        return merge_measuring(PeftModel.from_pretrained(base, str(self.source.folder)).eval())

    def save_merged(self, merged, folder: Path, dtype_name: str) -> str:
        """Save ``merged`` rounded to ``dtype_name`` (in place) with tokenizer and chat template; returns a note."""
        merged = merged.to(DTYPES[dtype_name])
        diff = self.max_logit_diff(merged)
        merged.config.use_cache = True
        merged.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        gen = getattr(merged, "generation_config", None)
        eot = end_of_turn_id(self.tokenizer)
        if gen is not None and eot is not None:
            ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
            gen.eos_token_id = [i for i in ids if i is not None] + ([eot] if eot not in ids else [])
            gen.save_pretrained(folder)
        return f"merged in {dtype_name}: max |logit difference| from the trained model {diff:.3g}"


TOKENIZER_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
