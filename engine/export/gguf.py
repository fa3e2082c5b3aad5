"""A merged Llama-family model as a GGUF file, written with the ``gguf`` package.

Tensor names and the rotary permutation of the query/key projections follow llama.cpp's layout for the
``llama`` architecture (transformers' GGUF reader undoes the same permutation on loading). The tokenizer
(byte-level BPE: vocabulary, token types, merges), the special tokens, the end-of-turn token and the chat
template go into the metadata, so llama.cpp, Ollama and transformers know when an answer ends, and so does whether
the tokenizer starts text with its BOS token (``add_bos_token``), so they build the same prompt tokens.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from finetune_studio.engine.export.build import end_of_turn_id
from finetune_studio.engine.export.errors import ExportError

QUANTS = ("f32", "f16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


class GGUFExportError(ExportError):
    """This model or tokenizer cannot be written as GGUF; the message says what can."""


def check_quants(quants) -> None:
    bad = [q for q in quants if q not in QUANTS]
    if bad or not quants:
        raise ExportError(f"--quant takes {', '.join(QUANTS)} (the types the gguf package can write), not {bad}")


def _file_type(quant: str):
    import gguf

    t = gguf.LlamaFileType
    return {
        "f32": t.ALL_F32,
        "f16": t.MOSTLY_F16,
        "q8_0": t.MOSTLY_Q8_0,
        "q5_0": t.MOSTLY_Q5_0,
        "q5_1": t.MOSTLY_Q5_1,
        "q4_0": t.MOSTLY_Q4_0,
        "q4_1": t.MOSTLY_Q4_1,
    }[quant]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (halves) to llama.cpp's (interleaved pairs), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        inner = ".".join(parts[3:-1])
        if inner in _LAYER:
            return f"blk.{parts[2]}.{_LAYER[inner]}.weight"
    return None


def _check_architecture(config) -> None:
    model_type = getattr(config, "model_type", "")
    if model_type != "llama":
        raise GGUFExportError(
            f"GGUF export maps Llama-family models (model_type llama); this model is {model_type!r}. "
            f"Export the adapter or the merged model instead"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("GGUF export does not map Llama models with bias terms yet")
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", None):
        raise GGUFExportError(f"GGUF export does not map rope scaling {kind!r} yet")


def preflight(base_folder: Path) -> None:
    """Refuse before anything is written when the base model's layout has no GGUF mapping here."""
    from types import SimpleNamespace

    try:
        config = json.loads((Path(base_folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise GGUFExportError(f"cannot read {base_folder}/config.json to check the model's architecture") from None
    _check_architecture(SimpleNamespace(**config.get("text_config", config)))


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _pre_tokenizer(tok_json: dict, base_folder: Path | None) -> str:
    """llama.cpp's name for how text is split before BPE: the source GGUF's when the base came from one."""
    source = Path(base_folder or "") / "source.json"
    if source.is_file():
        try:
            from gguf import GGUFReader

            field = GGUFReader(json.loads(source.read_text(encoding="utf-8"))["gguf"]).fields.get("tokenizer.ggml.pre")
            if field is not None:
                return str(field.contents())
        except (OSError, ValueError, KeyError):
            pass
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for the GPT-2 split (it refuses "gpt2")
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])]
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    return "default"


def _add_tokenizer(writer, tokenizer, vocab_size: int, base_folder: Path | None) -> dict:
    import gguf

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        tok_json = json.loads((Path(scratch) / "tokenizer.json").read_text(encoding="utf-8"))
        model = tok_json.get("model", {})
        byte_level = "ByteLevel" in json.dumps(tok_json.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
            tok_json.get("decoder")
        )
        if model.get("type") != "BPE" or not byte_level:
            raise GGUFExportError("GGUF export writes byte-level BPE tokenizers only (GPT-2/Llama-3/SmolLM style)")
        special = gguf.SpecialVocab(scratch, load_merges=True, n_vocab=vocab_size)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok_json, base_folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_special_token.pop("bos", None)  # recorded below from what the tokenizer does
    special.add_to_gguf(writer, quiet=True)  # merges, bos/eos/unk/pad ids, add_eos flag, chat template
    add_bos = adds_bos(tokenizer)
    writer.add_add_bos_token(add_bos)
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(eot)
    if not special.chat_template and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return {"eot_id": eot, "chat_template": bool(special.chat_template or tokenizer.chat_template), "add_bos": add_bos}


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts encoded text with its BOS token (GGUF's ``tokenizer.ggml.add_bos_token``, which
    tells llama.cpp and Ollama to do the same); measured, since tokenizer configs often leave it unsaid."""
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer("a").input_ids[:1]) == [bos]


def write_gguf(model, tokenizer, path: Path, quant: str, *, base_folder: Path | None = None) -> None:
    """Write ``model`` (a merged ``LlamaForCausalLM``) and ``tokenizer`` to ``path`` as ``quant``."""
    import gguf

    config = model.config
    _check_architecture(config)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(Path(path).stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size, base_folder)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q5_0": gguf.GGMLQuantizationType.Q5_0,
        "q5_1": gguf.GGMLQuantizationType.Q5_1,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
    }[quant]
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = gguf_name(hf_name)
        if name is None:
            if "rotary_emb" in hf_name:
                continue
            raise GGUFExportError(f"no GGUF name for tensor {hf_name}; this model's layout is not plain Llama")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("attn_q.weight"):
            data = _permute(data, n_head)
        elif name.endswith("attn_k.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
            continue
        this = qtype
        block = gguf.GGML_QUANT_SIZES[this][0]
        if data.shape[-1] % block:
            this = gguf.GGMLQuantizationType.F16  # rows not divisible into blocks
        packed = gguf.quants.quantize(data, this)
        writer.add_tensor(name, packed, raw_dtype=this)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
