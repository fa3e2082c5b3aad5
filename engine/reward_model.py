"""A reward model: a base model, a LoRA adapter and a scalar head that scores an answer to a prompt.

A run with objective ``reward`` (``engine.train.objectives.reward``) trains the adapter and the head on preference
pairs (the loss ``-log sigmoid(r_chosen - r_rejected - margin)``) and saves one folder:

* ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA adapter, in PEFT's format;
* ``reward_head.safetensors``: the head, ``weight`` [1, hidden] and ``bias`` [1], float32;
* ``reward_head.json``: what the head reads (:class:`HeadInfo`: hidden size, base model, max length, meaning);
* ``README.md``: a card saying what the folder is and how to score with it.

The score of an answer is the head applied to the decoder's last hidden state (after the final norm) at the last
token of the chat-rendered prompt + answer, rendered exactly as training renders a preference pair
(``engine.datasets.render``). Only differences between scores mean something: the loss sees ``r_chosen -
r_rejected`` alone, so a constant added to every score changes nothing.

:meth:`RewardModel.load` reads such a folder with its base (named by the adapter's config, or given), and
:meth:`RewardModel.score` scores answers. Training (the objective) and the generation worker share the head's
layout and file format from here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_studio.core import paths
from finetune_studio.engine.bottleneck import is_bottleneck_folder, load_bottlenecks
from finetune_studio.engine.datasets.render import tokenize_example
from finetune_studio.engine.datasets.schema import Message, UnpairedExample
from finetune_studio.engine.models import LoadOptions, ModelError, compute_dtype, load_causal_lm, resolve_model

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_INFO = "reward_head.json"
FORMAT = "finetune-studio reward head"
FORMAT_VERSION = 1
MEANING = (
    "the head's scalar at the last token of the chat-rendered prompt + answer; higher means the answer is more "
    "likely the preferred one: sigmoid(r_a - r_b) is the model's probability that a is preferred over b. Only "
    "differences between scores of answers mean something."
)


class RewardModelError(ValueError):
    """A folder that is not a reward model, or whose base cannot be found; the message says what to do."""


@dataclass(frozen=True)
class HeadInfo:
    """``reward_head.json``: what a reward model's head reads and where its base is."""

    hidden_size: int
    base_model: str  # the run's model spec ("default", a folder, a hub id)
    base_model_path: str = ""  # the base's resolved folder when the run was trained
    max_length: int = 512  # the run's max_length: longer prompt + answer are cut as training cut them
    margin: float = 0.0  # the run's reward_margin
    method: str = ""  # the run's adapter method (lora, dora, houlsby...)
    meaning: str = MEANING
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @classmethod
    def read(cls, folder: Path) -> HeadInfo:
        path = Path(folder) / HEAD_INFO
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RewardModelError(
                f"{folder} is not a reward model: it has no {HEAD_INFO} (train one with objective 'reward')"
            ) from None
        except (OSError, ValueError) as exc:
            raise RewardModelError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RewardModelError(f"{path} is not a reward head's description (its 'format' is not {FORMAT!r})")
        if not isinstance(data.get("hidden_size"), int) or data["hidden_size"] < 1:
            raise RewardModelError(f"{path}: 'hidden_size' must be a positive whole number")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def is_reward_model(folder: Path) -> bool:
    """Whether ``folder`` holds a reward model's files (a PEFT or bottleneck adapter, the head and its
    description)."""
    folder = Path(folder)
    adapter = (folder / "adapter_config.json").is_file() or is_bottleneck_folder(folder)
    return adapter and all((folder / name).is_file() for name in (HEAD_WEIGHTS, HEAD_INFO))


# --- the head ----------------------------------------------------------------------------------------------------


def new_head(hidden_size: int, seed: int, device: str | torch.device = "cpu") -> torch.nn.Linear:
    """A fresh head, Linear(hidden, 1) in float32: weights drawn from N(0, 1/hidden) with ``seed`` (the run's seed
    alone decides them), bias 0. Rewards then start within a few units of 0."""
    head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, hidden_size, generator=generator) / math.sqrt(hidden_size))
        head.bias.zero_()
    return head.to(device)


def head_rewards(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[N] float32 rewards from [N, H] hidden states (any dtype): the head in float32, outside any autocast."""
    with torch.autocast(hidden.device.type, enabled=False):
        out: torch.Tensor = head(hidden.float()).squeeze(-1)
    return out


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each right-padded row's last real token."""
    return attention_mask.sum(-1).long() - 1


def save_head(head: torch.nn.Module, folder: Path, info: HeadInfo) -> None:
    """Write ``reward_head.safetensors`` and ``reward_head.json`` into ``folder`` (a folder being written, renamed
    into place by its caller)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(folder / HEAD_WEIGHTS), metadata={"format": FORMAT})
    paths.atomic_write_text(folder / HEAD_INFO, json.dumps(asdict(info), indent=2) + "\n")


def load_head_weights(folder: Path, head: torch.nn.Module) -> None:
    """Load ``folder``'s head weights into ``head`` (same hidden size), in place."""
    from safetensors.torch import load_file

    path = Path(folder) / HEAD_WEIGHTS
    if not path.is_file():
        raise RewardModelError(f"{folder} has no {HEAD_WEIGHTS}: it was not saved by a reward run")
    weights = load_file(str(path))
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found != expected:
        raise RewardModelError(f"{path} holds {found}, but this model's head needs {expected}")
    device = next(head.parameters()).device
    with torch.no_grad():
        for name, param in head.named_parameters():
            param.copy_(weights[name].to(device))


def card_section(info: HeadInfo) -> str:
    """The card's text about the reward model: what a score is and how to score (Markdown, from a level-2 title)."""
    adapter = f"a {info.method} adapter" if info.method else "an adapter"
    return f"""## Reward model

{adapter[0].upper()}{adapter[1:]} for `{info.base_model}` trained with Finetune Studio's `reward` objective on
preference pairs, plus a scalar head (`{HEAD_WEIGHTS}`, a Linear({info.hidden_size}, 1) in float32, described in
`{HEAD_INFO}`).

**What a score is:** {info.meaning}

The loss was `-log sigmoid(r_chosen - r_rejected - {info.margin:g})`; prompt + answer are rendered with the base
model's chat template (the prompt a user turn, the answer an assistant turn) and cut at {info.max_length} tokens.
Loaded as a plain adapter (without the head) it is a language model adapter that was never trained to generate.

### Scoring

```
finetune-engine reward score --model THIS_FOLDER --prompt "Your prompt" \\
    --candidate "Answer A" --candidate "Answer B"
finetune-engine reward score --model THIS_FOLDER --input candidates.jsonl --json
```

From Python:

```python
from finetune_studio.engine.reward_model import RewardModel

rm = RewardModel.load("THIS_FOLDER")
rm.score(["Your prompt", "Your prompt"], ["Answer A", "Answer B"])
```

The generation worker scores too: a `score` request with `scorer: "reward_model"` and this folder.
"""


def write_card(folder: Path, info: HeadInfo) -> None:
    """``README.md`` of a reward run's adapter folder: what the folder is and how to score with it."""
    paths.atomic_write_text(Path(folder) / "README.md", "# Reward model\n\n" + card_section(info))


def add_to_card(folder: Path) -> None:
    """Append the reward model's section to the ``README.md`` of ``folder`` (an export of a reward run)."""
    card = Path(folder) / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    paths.atomic_write_text(card, text.rstrip("\n") + "\n\n" + card_section(HeadInfo.read(folder)))


# --- loading and scoring -------------------------------------------------------------------------------------------


def decoder_of(model: Any) -> Any:
    """The decoder body (embeddings, layers, final norm: no output head) of a PEFT model or a causal LM."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    if decoder is None:
        raise RewardModelError(f"{type(causal_lm).__name__} has no decoder body to read hidden states from")
    return decoder


def _base_folder(folder: Path, info: HeadInfo, base_model: str | None, options: LoadOptions) -> Path:
    """The base to load: the one given, the adapter config's (a folder on this machine), or the run's spec."""
    if base_model:
        return resolve_model(base_model, options)
    named = ""
    if (folder / "adapter_config.json").is_file():
        try:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RewardModelError(f"cannot read {folder / 'adapter_config.json'}: {exc}") from None
        named = str(config.get("base_model_name_or_path") or "")
    for candidate in (named, info.base_model_path):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    try:
        return resolve_model(info.base_model or named, options)
    except ModelError as exc:
        raise RewardModelError(
            f"the reward model's base ({info.base_model or named!r}) is not on this machine: {exc}; "
            "give the base model's folder (--base-model)"
        ) from None


class RewardModel:
    """A loaded reward model: ``score(prompts, completions)`` gives one float per answer."""

    def __init__(self, model: Any, head: torch.nn.Linear, tokenizer: Any, info: HeadInfo, folder: Path, device: str):
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.info, self.folder, self.device = info, Path(folder), device
        self.decoder = decoder_of(model)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        base_model: str | None = None,
        device: str = "cpu",
        options: LoadOptions = LoadOptions(),
    ) -> RewardModel:
        """The reward model saved in ``folder`` (a reward run's ``adapter/``, a checkpoint of one, or a copy), on
        its base: ``base_model`` when given, else the base the adapter's config names, else the run's model spec.
        The base loads in full precision (float32 on the CPU) even for a QLoRA-trained model."""
        from peft import PeftModel

        from finetune_studio.engine.models import load_tokenizer

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise RewardModelError(f"no folder {folder}: give a reward run's adapter folder")
        info = HeadInfo.read(folder)
        if not is_reward_model(folder) or not (folder / "adapter_model.safetensors").is_file():
            raise RewardModelError(
                f"{folder} has {HEAD_INFO} but no adapter (its config and adapter_model.safetensors)"
            )
        base_folder = _base_folder(folder, info, base_model, options)
        tokenizer = load_tokenizer(str(base_folder), options)
        base = load_causal_lm(
            base_folder, dtype=compute_dtype("auto", device), device=device, quantize_4bit=False, options=options
        )
        hidden = int(getattr(base.config, "hidden_size", 0) or 0)
        if hidden and hidden != info.hidden_size:
            raise RewardModelError(
                f"{folder}'s head reads {info.hidden_size} hidden units, but {base_folder} has {hidden}: "
                "give the base model it was trained on"
            )
        model: Any
        try:
            if is_bottleneck_folder(folder):
                model = load_bottlenecks(base, folder)
            else:
                model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
        except Exception as exc:  # peft raises many types for a mismatched adapter
            raise RewardModelError(f"the adapter in {folder} does not fit {base_folder}: {exc}") from None
        model.eval()
        head = torch.nn.Linear(info.hidden_size, 1, dtype=torch.float32).to(device)
        load_head_weights(folder, head)
        head.eval()
        return cls(model, head, tokenizer, info, folder, device)

    def tokenize(self, prompt: str | Sequence[Message], completion: str) -> list[int]:
        """Token ids of ``prompt`` (a user message, or the turns of a conversation) + ``completion`` as the
        assistant's answer, rendered and cut as training renders a preference pair."""
        turns = (Message(role="user", content=prompt),) if isinstance(prompt, str) else tuple(prompt)
        example = UnpairedExample(prompt=turns, completion=(Message(role="assistant", content=completion),), label=True)
        return list(tokenize_example(self.tokenizer, example, self.info.max_length).input_ids)

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str | Sequence[Message]], completions: Sequence[str], batch_size: int = 8
    ) -> list[float]:
        """One score per (prompt, completion) pair, in order (higher is better)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: give one prompt per answer")
        ids = [self.tokenize(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.score_ids(ids, batch_size)

    @torch.no_grad()
    def score_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
        """Scores of already tokenised sequences (longest first in batches, answered in the given order)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = [0.0] * len(ids)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.tensor(list(ids[i]), dtype=torch.long)
                mask[r, : len(ids[i])] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            hidden = self.decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
            ends = hidden[torch.arange(len(rows), device=hidden.device), last_positions(mask)]
            for i, value in zip(rows, head_rewards(self.head, ends).tolist(), strict=True):
                out[i] = float(value)
        return out
