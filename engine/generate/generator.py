"""Sampling from a base model and its adapters: the generation worker's engine side, usable in-process too.

One :class:`Session` holds a base model, its tokenizer, and any number of named LoRA / DoRA adapters attached
with PEFT (``load_adapter``), so switching adapters never reloads the base. "Base" generation runs inside
``disable_adapter()``: the adapter layers are really bypassed, not just scaled.

:meth:`Session.generate` decodes the ``n`` candidates as one batch with :func:`engine.decoding.decode.decode` (the
prompt run once, a preallocated KV cache, sampling without sorting the vocabulary:
:mod:`engine.decoding.token_sampling`); :meth:`Session.generate_batch` decodes several prompts' candidates as one
batch (:func:`engine.decoding.decode.decode_batch`). One streamer per prompt turns the new tokens into
:class:`~core.protocol.generation.Delta` events every few tokens and notices stop strings and per-candidate ends;
the loop checks the cancel flag every step. The per-step work outside the model is one ``.tolist()`` of the rows'
token ids plus a few list appends.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from finetune_studio.core.protocol import generation as gp

log = logging.getLogger(__name__)

Emit = Callable[[gp.Reply], None]


class GenerationError(Exception):
    """A request that cannot be served; ``kind`` is one of :data:`core.protocol.generation.ERROR_KINDS`."""

    def __init__(self, kind: gp.ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


# --- adapters --------------------------------------------------------------------------------------------------


PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def unservable_adapter(folder: Path) -> str:
    """Why the worker cannot answer with the adapter in ``folder`` ("" when it can): it serves adapters that live in
    the model's layers (PEFT's LoRA family, IA3, VeRA, bias tuning); its decode loop feeds no virtual tokens or
    prefix, and runs no bottleneck adapters."""
    from finetune_studio.engine import bottleneck
    from finetune_studio.engine.models import is_full_model_folder

    if is_full_model_folder(folder):
        return (
            f"{folder} holds a whole model (a full fine-tune), not an adapter: load that folder as the model "
            "instead of attaching it"
        )
    if bottleneck.is_bottleneck_folder(folder):
        return (
            f"{folder.name} is a bottleneck adapter (Houlsby / Pfeiffer), which this worker does not run: load it "
            "with engine.bottleneck.load_bottlenecks(base, folder) (its export's model card shows how)"
        )
    try:
        kind = str(json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type", ""))
    except (OSError, ValueError):
        return ""
    if kind in PROMPT_LEARNING:
        return (
            f"{folder.name} is a {kind.lower().replace('_', ' ')} adapter: its virtual tokens (or prefix) are extra "
            "inputs that this worker's decode loop does not feed; load it with PEFT (PeftModel.from_pretrained) and "
            "generate there"
        )
    return ""


def resolve_adapter(source: str, checkpoint: int | None = None) -> tuple[Path, str, int | None]:
    """(adapter folder, run id or "", checkpoint step or None) for an adapter folder, a run, or a run's checkpoint."""
    from finetune_studio.core.store import Store
    from finetune_studio.engine import checkpoint as ckpt

    path = Path(source).expanduser()
    if checkpoint is None and (path / "bottleneck_config.json").is_file():  # refused by name (unservable_adapter)
        return path.resolve(), "", _checkpoint_step(path)
    if checkpoint is None and (path / "adapter_config.json").is_file():
        if not (path / "adapter_model.safetensors").is_file():
            raise GenerationError("adapter", f"{path} has adapter_config.json but no adapter_model.safetensors")
        return path.resolve(), "", _checkpoint_step(path)
    store = Store()
    try:
        run = store.find_run(source)
    finally:
        store.close()
    run_dir = Path(run["run_dir"]) if run else path
    if not run and not (run_dir / "config.json").is_file():
        raise GenerationError(
            "adapter",
            f"no adapter or run named {source!r}: give a run id from the runs list, a run folder, "
            f"or a folder holding adapter_config.json",
        )
    run_id = run["id"] if run else run_dir.name
    if checkpoint is not None:
        folder = ckpt.checkpoints_dir(run_dir) / f"step-{checkpoint:06d}"
        if not (folder / "adapter_model.safetensors").is_file():
            steps = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(run_dir)]
            have = ", ".join(map(str, steps)) or "none"
            raise GenerationError("adapter", f"run {run_id} has no checkpoint at step {checkpoint} (it has: {have})")
        return folder, run_id, checkpoint
    final = run_dir / "adapter"
    if (final / "adapter_model.safetensors").is_file():
        return final, run_id, None
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        status = run.get("status", "unknown") if run else "unknown"
        raise GenerationError("adapter", f"run {run_id} ({status}) has no adapter yet: it saved no checkpoint")
    return latest, run_id, _checkpoint_step(latest)


def _checkpoint_step(folder: Path) -> int | None:
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text(encoding="utf-8"))["step"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


# --- the session -----------------------------------------------------------------------------------------------


class Session:
    """A loaded base model with its named adapters. Not thread-safe: one request at a time."""

    def __init__(self):
        self.base: Any = None  # the transformers model (adapter layers injected in place once one is attached)
        self.peft: Any = None  # the PeftModel wrapping ``base`` once an adapter is attached
        self.tokenizer: Any = None
        self.device = "cpu"
        self.context_length = 0
        self.active: str = gp.BASE
        self.adapters: dict[str, Path] = {}
        self.eos_ids: list[int] = []
        self.token_chars = 0  # the longest token's text in characters: bounds a prompt's length before tokenising
        self.reward: Any = None  # the reward model a score request loaded (engine.reward_model.RewardModel), kept

    # load / unload ---------------------------------------------------------------------------------------------

    def load(self, req: gp.LoadModel) -> gp.Loaded:
        from transformers import AutoTokenizer

        from finetune_studio.engine.models import (
            LoadOptions,
            ModelError,
            compute_dtype,
            describe,
            load_causal_lm,
            pick_device,
            resolve_model,
        )

        start = time.perf_counter()
        options = LoadOptions(allow_pickle=req.allow_pickle, trust_remote_code=req.trust_remote_code)
        device = pick_device() if req.device == "auto" else req.device
        if device == "mps":
            device = "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise GenerationError("model", "device 'cuda' was asked for, but torch sees no CUDA GPU here")
        if req.quantize_4bit and device != "cuda":
            raise GenerationError("model", "a 4-bit (QLoRA) base needs a CUDA GPU for generation; load it unquantised")
        weights = req.weights
        if weights in ("int8", "int4") and req.device == "auto" and device != "cpu" and not req.quantize_4bit:
            weights = "full"  # a CPU speed-up: on the GPU "auto" picked, the weights as loaded (Loaded says so)
        if weights in ("int8", "int4"):
            from finetune_studio.engine.decoding.int4 import int4_available
            from finetune_studio.engine.decoding.int8 import int8_available

            available = int8_available() and (weights == "int8" or int4_available())
            if device != "cpu" or req.quantize_4bit or not available:
                raise GenerationError(
                    "model", f"weights {req.weights!r} is a CPU speed-up (not for a GPU or a 4-bit base)"
                )
        self.unload(reward=False)
        try:
            folder = resolve_model(req.model, options)
            info = describe(folder)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=req.trust_remote_code)
            dtype = compute_dtype(req.dtype, device)
            model = load_causal_lm(folder, dtype=dtype, device=device, quantize_4bit=req.quantize_4bit, options=options)
            if weights == "int8":
                from finetune_studio.engine.decoding.int8 import quantize_linears_int8

                quantize_linears_int8(model)  # bfloat16 inside the int8 matmul (its fast path), float32 around it
            elif weights == "int4":
                from finetune_studio.engine.decoding.int4 import quantize_linears_int4

                quantize_linears_int4(model)  # int4 groups of 32, the head int8; bfloat16 products
            if weights in ("int8", "int4"):
                from finetune_studio.engine.decoding.int8 import compile_row_products

                # Where the VNNI products (engine.decoding.int8_dot) run this compiles nothing; elsewhere the one-row
                # int8 products are compiled per shape (seconds, once).
                compile_row_products(model)
        except ModelError as exc:
            raise GenerationError("model", f"cannot load {req.model!r}: {exc}") from None
        except Exception as exc:  # a broken folder raises whatever its reader raises
            raise GenerationError("model", f"cannot load {req.model!r}: {type(exc).__name__}: {exc}") from None
        model.eval()
        model.config.use_cache = True
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.base, self.tokenizer, self.device = model, tokenizer, device
        self.context_length = info.context_length or int(getattr(tokenizer, "model_max_length", 0) or 0)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.token_chars = _longest_token_chars(tokenizer)
        return gp.Loaded(
            id=req.id,
            model=req.model,
            path=str(folder),
            device=device,
            dtype=str(dtype).removeprefix("torch."),
            weights=weights,
            context_length=self.context_length,
            parameters=info.parameters,
            chat_template=bool(getattr(tokenizer, "chat_template", None)),
            elapsed_s=round(time.perf_counter() - start, 3),
        )

    def unload(self, reward: bool = True) -> None:
        """Free the model and its adapters, and the reward model a score request loaded (unless ``reward`` is
        False: loading another model keeps it)."""
        if reward:
            self.reward = None
        self.base = self.peft = self.tokenizer = None
        self.adapters.clear()
        self.active = gp.BASE
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _need_model(self) -> None:
        if self.base is None:
            raise GenerationError("no_model", "no model is loaded: send a 'load' request first")

    # adapters --------------------------------------------------------------------------------------------------

    def attach(self, req: gp.AttachAdapter) -> gp.AdapterAttached:
        self._need_model()
        folder, run_id, step = resolve_adapter(req.source, req.checkpoint)
        refusal = unservable_adapter(folder)
        if refusal:
            raise GenerationError("adapter", refusal)
        try:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GenerationError("adapter", f"cannot read {folder / 'adapter_config.json'}: {exc}") from None
        if req.name in self.adapters:
            self._drop(req.name)
        try:
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self.base, str(folder), adapter_name=req.name, is_trainable=False)
            else:
                self.peft.load_adapter(str(folder), adapter_name=req.name, is_trainable=False)
        except Exception as exc:  # peft raises many types for a mismatched adapter
            if self.peft is None:
                _strip_adapter_layers(self.base)  # injected before the weights failed to load
            elif not self.adapters:
                self._unwrap()
            elif self.peft is not None and req.name in getattr(self.peft, "peft_config", {}):
                try:  # a half-loaded adapter must not linger under this name
                    self.peft.delete_adapter(req.name)
                except Exception:
                    log.warning("could not remove the half-loaded adapter %r", req.name)
            raise GenerationError(
                "adapter", f"adapter {folder} does not fit the loaded model: {type(exc).__name__}: {exc}"
            ) from None
        self.peft.eval()
        self.adapters[req.name] = folder
        self.active = req.name
        self.peft.set_adapter(req.name)
        return gp.AdapterAttached(
            id=req.id,
            name=req.name,
            path=str(folder),
            run_id=run_id,
            step=step,
            base_model=str(config.get("base_model_name_or_path") or ""),
        )

    def set_active(self, req: gp.SetActive) -> gp.Active:
        self._need_model()
        self._check_adapter(req.adapter)
        self.active = req.adapter
        return gp.Active(id=req.id, adapter=self.active, attached=tuple(self.adapters))

    def detach(self, req: gp.DetachAdapter) -> gp.Active:
        self._need_model()
        if req.name not in self.adapters:
            raise GenerationError("adapter", self._unknown(req.name))
        self._drop(req.name)
        return gp.Active(id=req.id, adapter=self.active, attached=tuple(self.adapters))

    def _drop(self, name: str) -> None:
        del self.adapters[name]
        if self.active == name:
            self.active = gp.BASE
        if not self.adapters:
            self._unwrap()
        else:
            if self.peft.active_adapter == name:
                self.peft.set_adapter(next(iter(self.adapters)))
            self.peft.delete_adapter(name)

    def _unwrap(self) -> None:
        self.base = self.peft.unload()  # the adapter layers removed, the base modules back in place
        self.peft = None

    def _check_adapter(self, name: str) -> None:
        if name != gp.BASE and name not in self.adapters:
            raise GenerationError("adapter", self._unknown(name))

    def _unknown(self, name: str) -> str:
        have = ", ".join(repr(n) for n in self.adapters) or "none attached"
        return f"unknown adapter {name!r} (attached: {have}); attach it first, or use '' for the base model"

    # prompts ---------------------------------------------------------------------------------------------------

    def prompt_ids(self, req: gp.Generate | gp.BatchPrompt, raw: bool = False) -> list[int]:
        """The token ids of a prompt (a Generate or one prompt of a GenerateBatch; ``raw`` for the latter)."""
        tok = self.tokenizer
        if getattr(req, "raw", raw):
            return list(tok(req.prompt)["input_ids"])
        turns = list(req.messages) or [gp.ChatTurn(role="user", content=req.prompt)]
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template([asdict(t) for t in turns], tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja errors: a template that rejects these roles
                message = f"the model's chat template rejects this conversation: {exc}"
                raise GenerationError("bad_request", message) from None
            return list(tok(text, add_special_tokens=False)["input_ids"])
        text = "\n".join(t.content if t.role == "user" else f"{t.role}: {t.content}" for t in turns)
        return list(tok(text)["input_ids"])

    def _check_prompt_length(self, req: gp.Generate | gp.BatchPrompt, which: str = "") -> None:
        """Refuse, before tokenising it, a prompt too long in characters for the model's context to hold.

        Each token covers at most ``token_chars`` characters of text, so a prompt of more than context length x
        ``token_chars`` characters is over the context whatever its tokens (tokenising it would only cost memory:
        a 40 MB prompt grew the worker by gigabytes).
        """
        if not self.context_length or not self.token_chars:
            return
        chars = len(req.prompt) + sum(len(t.role) + len(t.content) for t in req.messages)
        most = self.context_length * self.token_chars
        if chars > most:
            raise GenerationError(
                "context",
                f"{which}the prompt is {chars:,} characters: far more than the model's context of "
                f"{self.context_length:,} tokens holds (at most {most:,} characters fit): shorten the prompt or the "
                "conversation",
            )

    # generation ------------------------------------------------------------------------------------------------

    def generate(self, req: gp.Generate, emit: Emit, cancel: threading.Event | None = None) -> gp.Generated:
        """Stream ``req``'s candidates through ``emit`` (deltas, then one Done each); return the final reply."""
        self._need_model()
        self._check_prompt_length(req)
        return self._generate(req, [req], [self.prompt_ids(req)], emit, cancel)

    def generate_batch(self, req: gp.GenerateBatch, emit: Emit, cancel: threading.Event | None = None) -> gp.Generated:
        """Stream the candidates of every prompt of ``req``, decoded as one batch; return the final reply."""
        self._need_model()
        for i, p in enumerate(req.prompts):
            self._check_prompt_length(p, f"prompt {i + 1}: " if len(req.prompts) > 1 else "")
        ids = [self.prompt_ids(p, req.raw) for p in req.prompts]
        return self._generate(req, list(req.prompts), ids, emit, cancel)

    def _generate(
        self,
        req: gp.Generate | gp.GenerateBatch,
        prompts: Sequence[gp.Generate | gp.BatchPrompt],
        ids: list[list[int]],
        emit: Emit,
        cancel: threading.Event | None,
    ) -> gp.Generated:
        adapter = self.active if req.adapter is None else req.adapter
        self._check_adapter(adapter)
        cancel = cancel or threading.Event()
        start = time.perf_counter()
        which = (lambda i: "") if len(ids) == 1 else (lambda i: f"prompt {i + 1}: ")
        max_new = []
        for i, prompt_ids in enumerate(ids):
            if not prompt_ids:
                raise GenerationError("bad_request", f"{which(i)}the prompt is empty after tokenising")
            budget = self.context_length - len(prompt_ids) if self.context_length else req.max_new_tokens
            if budget < 1:
                raise GenerationError(
                    "context",
                    f"{which(i)}the prompt is {len(prompt_ids)} tokens, and the model's context is "
                    f"{self.context_length}: shorten the prompt or the conversation",
                )
            max_new.append(min(req.max_new_tokens, budget))
        streamers = [
            CandidateStreamer(self.tokenizer, req, adapter, self.eos_ids, emit, start, p.n, p.seed, index)
            for index, p in enumerate(prompts)
        ]
        cancelled = cancel.is_set()
        if not cancelled:
            from finetune_studio.engine.decoding.decode import decode_batch
            from finetune_studio.engine.decoding.token_sampling import Sampler

            sampler = Sampler(req.temperature, req.top_k, req.top_p)
            pad = self.tokenizer.pad_token_id
            pad = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
            ns, seeds, steps = [p.n for p in prompts], [p.seed for p in prompts], [s.step for s in streamers]
            with self._adapter_mode(adapter):
                decode_batch(self.base, ids, ns, max_new, sampler, steps, seeds, cancel, pad)
            cancelled = cancel.is_set()
        for streamer in streamers:
            streamer.cancelled = cancelled
            streamer.finish_all()
        elapsed = time.perf_counter() - start
        new_tokens = sum(sum(s.counts) for s in streamers)
        return gp.Generated(
            id=req.id,
            candidates=sum(p.n for p in prompts),
            prompt_tokens=sum(len(x) for x in ids),
            new_tokens=new_tokens,
            elapsed_s=round(elapsed, 4),
            tokens_per_s=round(new_tokens / elapsed, 2) if elapsed > 0 else 0.0,
            cancelled=cancelled,
            prompts=len(ids),
        )

    # scoring ---------------------------------------------------------------------------------------------------

    def score(self, req: gp.Score) -> gp.Scores:
        """One score per candidate of ``req``: a reward model's, or an adapter's implicit DPO reward."""
        from finetune_studio.engine.datasets.schema import Message

        start = time.perf_counter()
        turns = list(req.messages) or [gp.ChatTurn(role="user", content=req.prompt)]
        prompt = tuple(Message(role=t.role, content=t.content) for t in turns)
        if req.scorer == "reward_model":
            reward = self._reward_model(req.reward_model)
            scores = reward.score([prompt] * len(req.candidates), list(req.candidates))
            source = str(reward.folder)
        else:
            scores, source = self._implicit_dpo(req, prompt)
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise GenerationError("error", f"candidate {bad[0] + 1} scored {scores[bad[0]]}: the scorer is broken")
        return gp.Scores(
            id=req.id,
            scores=tuple(scores),
            scorer=req.scorer,
            source=source,
            elapsed_s=round(time.perf_counter() - start, 4),
        )

    def _reward_model(self, source: str) -> Any:
        """The reward model in ``source`` (its folder, or a reward run), loaded once and kept until another is
        asked for; on the loaded model's device (the CPU when none is loaded)."""
        from finetune_studio.engine.models import ModelError, pick_device
        from finetune_studio.engine.reward_model import RewardModel, RewardModelError, is_reward_model

        folder = Path(source).expanduser()
        if not is_reward_model(folder):
            folder, _run, _step = resolve_adapter(source)
            if not is_reward_model(folder):
                raise GenerationError(
                    "adapter",
                    f"{folder} is not a reward model (no reward_head.safetensors): give the adapter folder of a "
                    "run trained with objective 'reward'",
                )
        folder = folder.resolve()
        if self.reward is not None and self.reward.folder == folder:
            return self.reward
        self.reward = None  # one reward model at a time: the old one's memory goes before the new one loads
        device = self.device if self.base is not None else pick_device()
        try:
            self.reward = RewardModel.load(folder, device="cpu" if device == "mps" else device)
        except (RewardModelError, ModelError) as exc:
            raise GenerationError("adapter", f"cannot load the reward model {folder}: {exc}") from None
        return self.reward

    def _implicit_dpo(self, req: gp.Score, prompt: tuple) -> tuple[list[float], str]:
        """``beta * sum over each answer's tokens of (log pi - log pi_ref)`` with pi the policy adapter and pi_ref the
        reference (the base with adapters off, or another attached adapter)."""
        from finetune_studio.engine.datasets.render import IGNORE, RenderError, tokenize_example
        from finetune_studio.engine.datasets.schema import Message, UnpairedExample

        self._need_model()
        policy = self.active if req.adapter is None else req.adapter
        self._check_adapter(policy)
        self._check_adapter(req.reference)
        if policy == req.reference:
            what = "the base model" if policy == gp.BASE else f"adapter {policy!r}"
            raise GenerationError(
                "adapter",
                f"implicit_dpo compares an adapter with its reference, and both are {what}: attach the DPO adapter "
                "(or name it in 'adapter')",
            )
        most = self.context_length or 2**20
        rows = []
        for text in req.candidates:
            example = UnpairedExample(prompt=prompt, completion=(Message(role="assistant", content=text),), label=True)
            try:
                rows.append(tokenize_example(self.tokenizer, example, most))
            except RenderError as exc:
                raise GenerationError("bad_request", f"cannot render the prompt and answer: {exc}") from None
        with self._adapter_mode(policy):
            pol = self._answer_logps(rows, IGNORE)
        with self._adapter_mode(req.reference):
            ref = self._answer_logps(rows, IGNORE)
        names = {gp.BASE: "the base"}
        source = f"{names.get(policy, policy)} against {names.get(req.reference, req.reference)}"
        return [req.beta * (p - r) for p, r in zip(pol, ref, strict=True)], source

    @torch.no_grad()
    def _answer_logps(self, rows: Sequence[Any], ignore: int, chunk: int = 8) -> list[float]:
        """Each row's summed log-prob of its trained (answer) tokens under the model as it is now."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            width = max(len(r.input_ids) for r in part)
            ids = torch.full((len(part), width), pad, dtype=torch.long)
            labels = torch.full((len(part), width), ignore, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, r in enumerate(part):
                n = len(r.input_ids)
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
            ids, labels, mask = ids.to(self.device), labels.to(self.device), mask.to(self.device)
            logits = self.base(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            targets = labels[:, 1:]
            trained = targets != ignore
            logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out += (logps * trained).sum(-1).tolist()
        return out

    def _adapter_mode(self, adapter: str):
        import contextlib

        if self.peft is None:
            return contextlib.nullcontext()
        if adapter == gp.BASE:
            return self.peft.disable_adapter()
        self.peft.set_adapter(adapter)
        return contextlib.nullcontext()


def _strip_adapter_layers(model) -> None:
    """Put back the base layers wherever PEFT injected adapter layers (what ``unload`` does, without a PeftModel)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


def _longest_token_chars(tokenizer) -> int:
    """The most characters of text one token of ``tokenizer`` stands for: its longest vocabulary entry (a byte-level
    entry writes each byte as one character, so the text it decodes to is no longer); 0 when the vocabulary cannot
    be read (no bound then)."""
    try:
        return max((len(t) for t in tokenizer.get_vocab()), default=0)
    except Exception:
        return 0


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


class CandidateStreamer:
    """Receives each step's ``n`` new token ids from the decode loop; emits deltas and each candidate's Done.

    A candidate ends at an end-of-turn token (not part of its text) or a stop string (cut off, not part of its
    text). Deltas hold back an unfinished UTF-8 character and, when stop strings are set, the last few characters
    that could begin one, so that a candidate's deltas always concatenate to its final text.
    """

    def __init__(
        self,
        tokenizer,
        req: gp.Generate | gp.GenerateBatch,
        adapter: str,
        eos_ids: list[int],
        emit: Emit,
        start: float,
        n: int,
        seed: int,
        prompt: int = 0,
    ):
        self.tok = tokenizer
        self.req = req
        self.adapter = adapter
        self.eos = set(eos_ids)
        self.emit = emit
        self.start = start
        self.n, self.seed, self.prompt = n, seed, prompt
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.counts = [0] * n
        self.sent = [""] * n  # text already sent as deltas
        self.finished = [False] * n
        self.cancelled = False
        self.every = req.stream_every
        self.hold = max((len(s) for s in req.stop), default=1) - 1

    def step(self, new: list[int]) -> list[bool]:
        """One decoding step's token for each candidate (ignored for ended ones); return which have ended."""
        for i, tid in enumerate(new):
            if self.finished[i]:
                continue
            self.counts[i] += 1
            if tid in self.eos:
                self._finish(i, "stop")
                continue
            self.tokens[i].append(tid)
            if self.req.stop:
                text = self._text(i)
                cut = _first_stop(text, self.req.stop)
                if cut is not None:
                    self._finish(i, "stop", text[:cut])
                    continue
                if self.every and self.counts[i] % self.every == 0:
                    self._delta(i, text)
            elif self.every and self.counts[i] % self.every == 0:
                self._delta(i, self._text(i))
        return self.finished

    def finish_all(self) -> None:
        reason: gp.FinishReason = "cancelled" if self.cancelled else "length"
        for i in range(self.n):
            if not self.finished[i]:
                self._finish(i, reason)

    # internals
    def _text(self, i: int) -> str:
        return self.tok.decode(self.tokens[i], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _delta(self, i: int, text: str) -> None:
        safe = text.rstrip("\ufffd")
        if self.req.stop and self.hold:
            safe = safe[: max(len(self.sent[i]), len(safe) - self.hold)]
        if len(safe) > len(self.sent[i]) and safe.startswith(self.sent[i]):
            delta = safe[len(self.sent[i]) :]
            self.emit(gp.Delta(id=self.req.id, candidate=i, text=delta, tokens=self.counts[i], prompt=self.prompt))
            self.sent[i] = safe

    def _finish(self, i: int, reason: gp.FinishReason, text: str | None = None) -> None:
        self.finished[i] = True
        text = self._text(i) if text is None else text
        if self.every and text.startswith(self.sent[i]) and len(text) > len(self.sent[i]):
            delta = text[len(self.sent[i]) :]
            self.emit(gp.Delta(id=self.req.id, candidate=i, text=delta, tokens=self.counts[i], prompt=self.prompt))
            self.sent[i] = text
        self.emit(
            gp.Done(
                id=self.req.id,
                candidate=i,
                text=text,
                tokens=self.counts[i],
                finish_reason=reason,
                elapsed_s=round(time.perf_counter() - self.start, 4),
                adapter=self.adapter,
                seed=self.seed,
                prompt=self.prompt,
            )
        )


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [p for p in (text.find(s) for s in stops) if p >= 0]
    return min(hits) if hits else None
