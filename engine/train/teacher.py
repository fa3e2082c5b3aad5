"""The distillation teacher: found from ``distill_teacher``, loaded frozen, checked against the student's tokenizer.

``distill_teacher`` names a model (``default``, a model folder, a ``.gguf`` file, a hub id in the cache) or a tuned
model: a run id (its final adapter), ``RUN:best``, ``RUN:step-000050`` or an adapter folder, on the base that run
trained (an adapter folder outside any run: the base its ``adapter_config.json`` names). The teacher is loaded in the
run's compute dtype, in 16 bits or in 4-bit NF4 (``distill_teacher_precision``), an adapter merged into it where the
base is not 4-bit, every parameter frozen, in eval mode.

Its hidden states at the trained positions are computed without gradients (:meth:`Teacher.hidden`); its output head
is applied chunk by chunk inside the loss (``kernels.distill_logits``), so its [N, V] logits never exist whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.store import Store
from finetune_studio.engine.models import LoadOptions, ModelError, load_causal_lm, load_tokenizer, resolve_model
from finetune_studio.engine.train import init_adapter
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.forward import LogprobModel

FIELD = "distill_teacher"
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass(frozen=True)
class TeacherSource:
    base: Path  # the model folder (resolved)
    adapter: Path | None  # a PEFT adapter on it, or None
    description: str  # for the log


def _base_of_adapter(adapter: Path, run_model: str | None, options: LoadOptions) -> Path:
    spec = run_model
    if spec is None:
        cfg = json.loads((adapter / init_adapter.ADAPTER_CONFIG).read_text(encoding="utf-8"))
        spec = cfg.get("base_model_name_or_path") or ""
        if not spec:
            raise ConfigError(FIELD, f"{adapter} does not say which base model it was trained on")
    try:
        return resolve_model(spec, options)
    except ModelError as exc:
        raise ConfigError(FIELD, f"the base model of {adapter} ({spec}) cannot be used: {exc}") from None


def resolve(ref: str, store: Store, options: LoadOptions) -> TeacherSource:
    """Where the teacher named ``ref`` is: a model, or a base and an adapter."""
    ref = ref.strip()
    folder = Path(ref).expanduser()
    looks_like_run = not folder.exists() and "/" not in ref and ref != "default" and not ref.endswith(".gguf")
    a_run = looks_like_run and store.find_run(ref.partition(":")[0]) is not None
    if a_run:  # a full fine-tune's run: its saved folder is the whole model
        whole = _full_model_of_run(ref, store)
        if whole is not None:
            return TeacherSource(whole, None, f"the fully tuned model {ref}")
    if a_run or (folder / init_adapter.ADAPTER_CONFIG).is_file():
        try:
            start = init_adapter.resolve(ref, store)
        except ConfigError as exc:
            raise ConfigError(FIELD, str(exc).removeprefix("init_adapter: ")) from None
        run = store.find_run(start.parent_run_id) if start.parent_run_id else None
        run_model = json.loads(run["config"]).get("model") if run else None
        base = _base_of_adapter(start.path, run_model, options)
        return TeacherSource(base, start.path, f"{start.description} on {base.name}")
    try:
        base = resolve_model(ref, options)
    except ModelError as exc:
        raise ConfigError(FIELD, f"{exc} (a model, or a run id / adapter folder of a tuned model)") from None
    return TeacherSource(base, None, f"the model {base.name}")


def _full_model_of_run(ref: str, store: Store) -> Path | None:
    """The model folder a full fine-tune's run saved (``RUN``, ``RUN:best``, ``RUN:step-000050``), or None."""
    from finetune_studio.engine import checkpoint
    from finetune_studio.engine.train.methods import full

    run_ref, _, which = ref.partition(":")
    run = store.find_run(run_ref)
    if run is None:
        return None
    run_dir = Path(run["run_dir"])
    if not which:
        path = run_dir / "adapter"
    elif which == "best":
        path = run_dir / "best"
    else:
        name = which if which.startswith("step-") else f"step-{int(which):06d}" if which.isdigit() else which
        path = checkpoint.checkpoints_dir(run_dir) / name
    inside = path.resolve().is_relative_to(run_dir.resolve())
    return path if inside and full.is_full_model_folder(path) else None


def check_same_tokenizer(student: Any, teacher: Any, description: str) -> None:
    """Refuse a teacher whose tokenizer differs from the student's (the vocabulary, or a special token)."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        differs = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])
        token = differs[0][0] if differs else "?"
        raise ConfigError(
            FIELD,
            f"{description} uses another tokenizer than the student: vocabulary of {len(t_vocab):,} tokens against "
            f"the student's {len(s_vocab):,} (first difference: {token!r}); distillation needs the same tokenizer "
            "(a teacher and student of one model family)",
        )
    for name in SPECIAL_TOKENS:
        if getattr(student, name, None) != getattr(teacher, name, None):
            raise ConfigError(
                FIELD,
                f"{description}'s tokenizer has {name} {getattr(teacher, name, None)!r}, the student's "
                f"{getattr(student, name, None)!r}: distillation needs the same tokenizer",
            )
    if list(student.all_special_tokens) != list(teacher.all_special_tokens):
        raise ConfigError(
            FIELD,
            f"{description}'s tokenizer has the special tokens {teacher.all_special_tokens}, the student's "
            f"{student.all_special_tokens}: distillation needs the same tokenizer",
        )


def teacher_dtype(precision: str, run_dtype: torch.dtype, device: str) -> torch.dtype:
    """The teacher's weights' dtype: the run's (auto, 4-bit's compute dtype on the CPU) or a 16-bit one."""
    if precision == "16-bit" or (precision == "4-bit" and device == "cuda"):
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return run_dtype


class Teacher:
    """A frozen causal LM whose hidden states at the trained positions feed the distillation loss."""

    def __init__(self, model: Any, description: str):
        self.model = model
        self.description = description
        self.forward = LogprobModel(model, kernels="torch")
        if not self.forward.fused:
            raise ConfigError(
                FIELD, f"{description}: its output head is not a plain linear layer, which distillation needs"
            )
        self.weight: torch.Tensor = self.forward.head.weight
        self.softcap: float | None = self.forward.softcap

    @torch.no_grad()
    def hidden(self, batch: Batch) -> torch.Tensor:
        """[N, H] the teacher's last hidden states at ``batch``'s trained positions."""
        return self.forward.trained_hidden(batch)[0]


def load(
    config: TrainConfig,
    student_tokenizer: Any,
    device: str,
    run_dtype: torch.dtype,
    store: Store,
    progress: Any = None,
) -> Teacher:
    """The teacher ``config.distill_teacher`` names, frozen on ``device``, after the tokenizer check."""
    options = LoadOptions(allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)
    source = resolve(config.distill_teacher, store, options)
    check_same_tokenizer(student_tokenizer, load_tokenizer(str(source.base), options), source.description)
    quantize = config.distill_teacher_precision == "4-bit"
    if quantize and device == "mps":
        raise ConfigError("distill_teacher_precision", "a 4-bit teacher needs a CUDA GPU or the CPU; choose auto")
    if progress is not None:
        progress("teacher", 0, 1, f"Loading the teacher: {source.description}")
    dtype = teacher_dtype(config.distill_teacher_precision, run_dtype, device)
    model = load_causal_lm(source.base, dtype=dtype, device=device, quantize_4bit=quantize, options=options)
    if source.adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(source.adapter), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(FIELD, f"{source.description}: the adapter does not fit its base: {exc}") from None
        if not quantize:
            model = model.merge_and_unload()  # one plain model: its head and decoder as the student's are
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if progress is not None:
        progress("teacher", 1, 1, f"Teacher loaded: {source.description}")
    return Teacher(model, source.description)
