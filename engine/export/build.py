"""The trained model (base + adapter) as training saw it, its answer to the check's prompt, and the merged model.

A LoRA/DoRA adapter is merged with PEFT's ``merge_and_unload`` onto the 16/32-bit base. A QLoRA adapter was
trained on the NF4-quantised base, so it is merged onto that base de-quantised (each 4-bit weight expanded
back to floats), not onto the original weights; the difference this makes is measured and reported.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from finetune_studio.engine.models import load_causal_lm

log = logging.getLogger(__name__)

CHECK_MESSAGES = [{"role": "user", "content": "What is 2 plus 2? Answer in one short sentence."}]
MAX_NEW_TOKENS = 32
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


class Builder:
    """Loads the tokenizer and the trained model once; gives the reference answer and the merged model."""

    def __init__(self, source, base_folder: Path):
        from transformers import AutoTokenizer

        self.source = source
        self.base_folder = Path(base_folder)
        self.qlora = source.config.get("method") == "qlora"
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_folder))
        self._trained: Any = None
        self.reference: dict | None = None

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
        if self._trained is None:
            from peft import PeftModel

            base = load_causal_lm(self.base_folder, dtype=torch.float32, device="cpu", quantize_4bit=self.qlora)
            self._trained = PeftModel.from_pretrained(base, str(self.source.folder)).eval()
        return self._trained

    def compute_reference(self) -> dict:
        """The trained model's answer to the check's prompt and its logits along prompt + answer."""
        if self.reference is None:
            tok = self.tokenizer
            eot = end_of_turn_id(tok)
            stops = {eot} if eot is not None else set()
            ids = prompt_ids(tok)
            answer = greedy(self.trained(), ids, stops)
            full = ids + answer
            self.reference = {
                "prompt_ids": ids,
                "answer_ids": answer,
                "eot_id": eot,
                "eot_token": tok.convert_ids_to_tokens(eot) if eot is not None else None,
                "ended_at_eot": bool(answer) and answer[-1] in stops,
                "text": tok.decode(answer, skip_special_tokens=True),
                "logits": sequence_logits(self.trained(), full),
            }
        return self.reference

    def merged_model(self):
        """(merged plain float32 model, note for the report). The trained model is consumed."""
        ref = self.compute_reference()
        if self.qlora:
            merged = self._merge_qlora()
        else:
            merged = self.trained().merge_and_unload()
            self._trained = None
        diff = float((sequence_logits(merged, ref["prompt_ids"] + ref["answer_ids"]) - ref["logits"]).abs().max())
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
        return PeftModel.from_pretrained(base, str(self.source.folder)).eval().merge_and_unload()

    def save_merged(self, merged, folder: Path, dtype_name: str) -> str:
        """Save ``merged`` rounded to ``dtype_name`` (in place) with tokenizer and chat template; returns a note."""
        merged = merged.to(DTYPES[dtype_name])
        ref = self.compute_reference()
        diff = float((sequence_logits(merged, ref["prompt_ids"] + ref["answer_ids"]) - ref["logits"]).abs().max())
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
