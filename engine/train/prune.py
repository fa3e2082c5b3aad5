"""A smaller student made from a model: some decoder layers dropped, optionally a narrower MLP; saved as a plain folder.

Which layers go:

* a chosen set (``keep``), or
* ``drop`` of them, chosen greedily on the person's data: at each round every remaining layer is left out in turn, and
  the one whose absence changes the full model's outputs least goes (``search='once'``: each layer is left out alone,
  once, and the ``drop`` least missed go; n forward passes instead of about n * drop). The change is measured at the
  trained positions of up to ``examples`` rows of the data, as the mean KL(full model || pruned model) of the
  next-token distributions
  (``measure='kl'``, through the chunked head of ``kernels.distill_logits``), or as the mean relative change of the
  last hidden state ``|h' - h| / |h|`` (``measure='hidden'``).

``mlp_width`` narrows every kept layer's gated MLP (``gate_proj``, ``up_proj``, ``down_proj``: the Llama family) to
that many intermediate channels, keeping those with the largest mean activation ``|act(gate x) * up x|`` on the data
times the norm of their ``down_proj`` column (without data: the product of the three weights' norms).

The result is an ordinary model folder (config with ``num_hidden_layers``, ``layer_types`` and
``intermediate_size`` updated, safetensors weights, the tokenizer, ``pruning.json`` saying what was kept), written to a
temporary folder beside ``out`` and renamed into place; transformers loads it like any other.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_studio.core.config import ConfigError
from finetune_studio.engine.datasets import load_dataset
from finetune_studio.engine.datasets.render import Tokenized, tokenize_example
from finetune_studio.engine.models import LoadOptions, load_causal_lm, load_tokenizer, pick_device, resolve_model
from finetune_studio.engine.train.batches import Batch, make_batch
from finetune_studio.engine.train.forward import LogprobModel
from finetune_studio.kernels.distill_logits import distill_losses

MEASURES = ("kl", "hidden")
SEARCHES = ("greedy", "once")
RECORD = "pruning.json"
Progress = Callable[[str, int, int, str], None]


@dataclass
class PruneResult:
    out: Path
    kept_layers: list[int]  # indices in the source model, in order
    num_layers_before: int
    intermediate_before: int
    intermediate_after: int
    params_before: int
    params_after: int
    measure: str = ""  # "kl" / "hidden" when the layers were chosen on data
    rounds: list[dict[str, Any]] = field(default_factory=list)  # greedy rounds: {"dropped": i, "change": x}
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "kept_layers": self.kept_layers,
            "num_layers_before": self.num_layers_before,
            "intermediate_before": self.intermediate_before,
            "intermediate_after": self.intermediate_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "measure": self.measure,
            "rounds": self.rounds,
            "seconds": round(self.seconds, 2),
        }


def decoder_of(model: Any) -> Any:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        raise ConfigError("model", f"{type(model).__name__}: no decoder layers (model.layers) to prune")
    return decoder


# --- measuring on data ----------------------------------------------------------------------------------------------


def measurement_batches(data: Path, tokenizer: Any, examples: int, max_length: int, batch_size: int = 8) -> list[Batch]:
    """Up to ``examples`` rows of ``data`` with something to train on, tokenised, as padded batches."""
    try:
        loaded = load_dataset(data, max_length=max_length)
    except ValueError as exc:
        raise ConfigError("measure_on", str(exc)) from None
    items: list[Tokenized] = []
    for example in loaded.examples:
        item = tokenize_example(tokenizer, example, max_length)
        if isinstance(item, Tokenized) and item.trained_tokens:
            items.append(item)
        if len(items) == examples:
            break
    if not items:
        raise ConfigError("measure_on", f"{Path(data).name} has no rows with answers or text to measure on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [
        make_batch(items, list(range(s, min(s + batch_size, len(items)))), pad)
        for s in range(0, len(items), batch_size)
    ]


class _Layers:
    """Runs the model with a subset of its decoder layers (the module list swapped, nothing copied)."""

    def __init__(self, model: Any):
        self.model = model
        self.decoder = decoder_of(model)
        self.all = list(self.decoder.layers)
        self.forward = LogprobModel(model, kernels="torch")
        if not self.forward.fused:
            raise ConfigError("model", f"{type(model).__name__}: its output head is not a plain linear layer")

    @torch.no_grad()
    def hidden(self, keep: Sequence[int], batch: Batch) -> torch.Tensor:
        """[N, H] the last hidden states at the trained positions with only the layers ``keep``."""
        config = self.model.config
        saved = config.num_hidden_layers
        self.decoder.layers = torch.nn.ModuleList([self.all[i] for i in keep])
        config.num_hidden_layers = len(keep)
        try:
            return self.forward.trained_hidden(batch)[0].float()
        finally:
            self.decoder.layers = torch.nn.ModuleList(self.all)
            config.num_hidden_layers = saved


@torch.no_grad()
def _change(
    layers: _Layers, reference: list[torch.Tensor], keep: Sequence[int], batches: list[Batch], measure: str
) -> float:
    """The mean change of the outputs with only ``keep`` against the full model's (``reference`` hidden states)."""
    head = layers.forward.head.weight.float()
    total, count = 0.0, 0
    for full, batch in zip(reference, batches, strict=True):
        h = layers.hidden(keep, batch)
        if measure == "kl":
            targets = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
            kl = distill_losses(h, head, full, head, targets, alpha=1.0, student_softcap=layers.forward.softcap).kl
            total += kl.sum().item()
        else:
            total += ((h - full).norm(dim=-1) / full.norm(dim=-1).clamp(min=1e-6)).sum().item()
        count += h.shape[0]
    return total / max(count, 1)


def choose_layers(
    model: Any,
    batches: list[Batch],
    drop: int,
    measure: str = "kl",
    progress: Progress | None = None,
    search: str = "greedy",
) -> tuple[list[int], list[dict[str, Any]]]:
    """Drop ``drop`` layers: ``greedy``, each round the one whose absence (with those already gone) changes the
    outputs least (about n * drop forward passes); ``once``, the ``drop`` layers whose absence alone changes them
    least (n passes). Returns the kept layers and each round's (dropped layer, change measured)."""
    layers = _Layers(model)
    n = len(layers.all)
    if not 0 < drop < n:
        raise ConfigError("drop", f"must be from 1 to {n - 1} (the model has {n} layers)")
    if search not in SEARCHES:
        raise ConfigError("search", f"must be one of {', '.join(SEARCHES)}")
    reference = [layers.hidden(range(n), b) for b in batches]
    keep, rounds = list(range(n)), []
    if search == "once":
        alone = {}
        for i in range(n):
            if progress is not None:
                progress("prune", i, n, f"Measuring layer {i + 1} of {n}")
            alone[i] = _change(layers, reference, [k for k in range(n) if k != i], batches, measure)
        for i in sorted(alone, key=lambda i: (alone[i], i))[:drop]:
            keep.remove(i)
            rounds.append({"dropped": i, "change": alone[i]})
        return keep, rounds
    for r in range(drop):
        if progress is not None:
            progress("prune", r, drop, f"Choosing layer {r + 1} of {drop} to drop")
        changes = {i: _change(layers, reference, [k for k in keep if k != i], batches, measure) for i in keep}
        best = min(changes, key=lambda i: (changes[i], i))
        keep.remove(best)
        rounds.append({"dropped": best, "change": changes[best]})
    return keep, rounds


# --- narrowing the MLP ----------------------------------------------------------------------------------------------


def _mlp(layer: Any) -> Any:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(
        isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
    ):
        raise ConfigError("mlp_width", "narrowing needs gated MLPs (gate_proj, up_proj, down_proj: the Llama family)")
    return mlp


@torch.no_grad()
def channel_scores(model: Any, batches: list[Batch]) -> list[torch.Tensor]:
    """Per decoder layer, [intermediate] the importance of each MLP channel (see the module's docstring)."""
    layers = list(decoder_of(model).layers)
    mlps = [_mlp(layer) for layer in layers]
    weights = [m.down_proj.weight.float().norm(dim=0) for m in mlps]  # [I] per layer
    if not batches:
        return [
            m.gate_proj.weight.float().norm(dim=1) * m.up_proj.weight.float().norm(dim=1) * w
            for m, w in zip(mlps, weights, strict=True)
        ]
    sums = [torch.zeros_like(w) for w in weights]
    counts = [0]
    hooks = []
    for i, m in enumerate(mlps):

        def record(module: Any, args: tuple[Any, ...], i: int = i) -> None:
            x = args[0]  # [B, T, I] the down projection's input: act(gate x) * up x
            sums[i] += x.detach().float().abs().reshape(-1, x.shape[-1]).sum(0)

        hooks.append(m.down_proj.register_forward_pre_hook(record))
    try:
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            counts[0] += int(batch.attention_mask.numel())
    finally:
        for h in hooks:
            h.remove()
    return [s / max(counts[0], 1) * w for s, w in zip(sums, weights, strict=True)]


def narrow_mlps(model: Any, width: int, scores: list[torch.Tensor]) -> None:
    """Keep ``width`` channels of every layer's MLP (the highest ``scores``, in their order); in place."""
    for layer, score in zip(decoder_of(model).layers, scores, strict=True):
        mlp = _mlp(layer)
        keep = score.topk(width).indices.sort().values.to(mlp.gate_proj.weight.device)
        for name in ("gate_proj", "up_proj"):
            _slice_linear(getattr(mlp, name), keep, dim=0)
        _slice_linear(mlp.down_proj, keep, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    model.config.intermediate_size = width


def _slice_linear(linear: torch.nn.Linear, keep: torch.Tensor, dim: int) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data.index_select(dim, keep).clone(), requires_grad=False)
    if dim == 0:
        linear.out_features = len(keep)
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.data[keep].clone(), requires_grad=False)
    else:
        linear.in_features = len(keep)


# --- the whole ------------------------------------------------------------------------------------------------------


def keep_only(model: Any, keep: Sequence[int]) -> None:
    """Keep the decoder layers ``keep`` (in that order), renumbered for the cache, and say so in the config."""
    decoder = decoder_of(model)
    layers = list(decoder.layers)
    decoder.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(decoder.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    config = model.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]


def _check_keep(keep: Sequence[int], n: int) -> list[int]:
    out = list(keep)
    if not out:
        raise ConfigError("keep_layers", "keep at least one layer")
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ConfigError("keep_layers", f"the model has layers 0 to {n - 1}; {bad} are not among them")
    if len(set(out)) != len(out) or out != sorted(out):
        raise ConfigError("keep_layers", "name each layer once, in increasing order")
    return out


def prune(
    model: str | Path,
    out: Path,
    *,
    keep: Sequence[int] | None = None,
    drop: int = 0,
    measure_on: Path | None = None,
    measure: str = "kl",
    search: str = "greedy",
    mlp_width: int = 0,
    examples: int = 32,
    max_length: int = 256,
    options: LoadOptions = LoadOptions(),
    progress: Progress | None = None,
) -> PruneResult:
    """Prune ``model`` (a model spec) into the new folder ``out``; see the module's docstring."""
    started = time.perf_counter()
    out = Path(out)
    if out.exists():
        raise ConfigError("out", f"{out} exists already: name a new folder")
    if (keep is None) == (drop <= 0):
        raise ConfigError("keep_layers", "give either the layers to keep or how many to drop (with data to measure on)")
    if measure not in MEASURES:
        raise ConfigError("measure", f"must be one of {', '.join(MEASURES)}")
    if drop and measure_on is None:
        raise ConfigError("measure_on", "dropping layers by measurement needs data: a dataset file")
    folder = resolve_model(str(model), options)
    tokenizer = load_tokenizer(str(folder), options)
    device = pick_device()
    source_dtype = _source_dtype(folder)
    base = load_causal_lm(folder, dtype=torch.float32, device=device, quantize_4bit=False, options=options)
    n = len(decoder_of(base).layers)
    intermediate = int(getattr(base.config, "intermediate_size", 0) or 0)
    if mlp_width and not 0 < mlp_width <= intermediate:
        raise ConfigError("mlp_width", f"must be from 1 to the model's intermediate size {intermediate}")
    params_before = sum(p.numel() for p in base.parameters())
    batches = []
    if measure_on is not None and (drop or mlp_width):
        batches = [b.to(device) for b in measurement_batches(Path(measure_on), tokenizer, examples, max_length)]
    rounds: list[dict[str, Any]] = []
    if keep is None:
        keep, rounds = choose_layers(base, batches, drop, measure, progress, search)
    keep = _check_keep(keep, n)
    if mlp_width and mlp_width < intermediate:
        scores = channel_scores(base, batches)
        keep_only(base, keep)
        narrow_mlps(base, mlp_width, [scores[i] for i in keep])
    else:
        keep_only(base, keep)
    base.to(source_dtype)
    result = PruneResult(
        out=out,
        kept_layers=list(keep),
        num_layers_before=n,
        intermediate_before=intermediate,
        intermediate_after=int(getattr(base.config, "intermediate_size", 0) or 0),
        params_before=params_before,
        params_after=sum(p.numel() for p in base.parameters()),
        measure=measure if rounds else "",
        rounds=rounds,
    )
    _save(base, tokenizer, out, {**result.to_dict(), "source": str(model)})
    result.seconds = time.perf_counter() - started
    return result


def _source_dtype(folder: Path) -> torch.dtype:
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _save(model: Any, tokenizer: Any, out: Path, record: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-tmp-", dir=out.parent))
    try:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_layers(text: str) -> list[int]:
    """``"0,1,4-7"`` -> [0, 1, 4, 5, 6, 7]; a ConfigError naming keep_layers otherwise."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ConfigError("keep_layers", f"{text!r}: give layer numbers like 0,1,4-7") from None
    return out


# --- a distillation run's student (distill_student_layers) -----------------------------------------------------------

STUDENT_DIR = "student"  # in the run's folder
STUDENT_EXAMPLES = 16  # training rows the layers are chosen on


def run_student(
    model_folder: Path,
    config: Any,
    run_dir: Path,
    options: LoadOptions = LoadOptions(),
    progress: Progress | None = None,
) -> tuple[Path, PruneResult | None]:
    """The student of a distillation run with ``distill_student_layers`` N > 0: ``model_folder`` pruned to N
    layers, those whose removal changes the model's outputs least on the run's training data (each layer measured
    left out alone, ``search='once'``: n passes over the first rows), written into ``<run_dir>/student``. A folder
    already there (a resumed run) is reused as it is: (its path, None); else (its path, what was pruned).
    N at or above the model's layers is a ConfigError naming ``distill_student_layers``."""
    out = Path(run_dir) / STUDENT_DIR
    if (out / RECORD).is_file():
        return out, None
    wanted = int(config.distill_student_layers)
    layers = _num_layers(model_folder)
    if not 0 < wanted < layers:
        raise ConfigError(
            "distill_student_layers",
            f"must be below the model's {layers} layers (0 trains the model as it is), not {wanted}",
        )
    try:
        result = prune(
            model_folder,
            out,
            drop=layers - wanted,
            measure_on=Path(config.dataset),
            search="once",
            examples=STUDENT_EXAMPLES,
            max_length=int(config.max_length),
            options=options,
            progress=progress,
        )
    except ConfigError as exc:
        if exc.field != "measure_on":
            raise
        raise ConfigError("dataset", str(exc).removeprefix("measure_on: ")) from None
    return out, result


def _num_layers(folder: Path) -> int:
    cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    cfg = {**cfg, **cfg.get("text_config", {})}
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0
    if not layers:
        raise ConfigError("distill_student_layers", f"{folder}: its config does not say how many layers it has")
    return int(layers)
