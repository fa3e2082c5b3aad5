"""How much memory a training run will need, worked out before it starts (pure Python, well under 1 ms).

``ModelShape`` reads a Hugging Face ``config.json``; ``estimate_training_memory(shape, config, device)``
adds up what is alive at the peak of one training step (the start of the backward pass); ``fits`` turns
that into a verdict with a sentence for the GUI. Notation in the docstrings: T = tokens per forward pass
(batch x the padded length, doubled for DPO), N = trained tokens that reach the output head. With a dataset
(``DataLengths``) the batch is the longest the data can form (``batch_lengths``); without one it is the worst
case: rows of max_length, N = rows x (max_length - 1), every token trained. c = the output head's chunk
(1024 rows), h = hidden size, q / kv = width of the query / key-value projections, i = MLP width,
V = vocabulary, L = layers, r = LoRA rank, b = bytes per compute-dtype element, P = parameter count.
``ParamCounts`` (the engine's count on the meta device) replace the formula's parameter counts for
architectures it does not know.

It describes the step the engine runs (``engine.train.recipe.Recipe``): the decoder body, then only the trained
positions' hidden states through the output head in chunks (``engine.train.forward.LogprobModel``,
``kernels.linear_logprobs``), so no [T, V] logits ever exist; for DPO the reference log-probs are computed
first, without a graph. The terms were checked against that path (``benchmarks/memory_estimate.py``: the
tensors autograd saves and the peak of whole steps) for transformers' Llama with SDPA attention and PEFT.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_studio.core import kernel_choice
from finetune_studio.core.config import SAMPLING_OBJECTIVES, TrainConfig
from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory import method_terms
from finetune_studio.core.model_spec import SpecKind, cached_snapshot, parse_spec
from finetune_studio.core.paths import resources_dir

GIB = 1024**3
# bf16-mixed: float32 activations; its frozen linears are loaded in float32 and only then stored in bf16, so the
# float32 weights are its peak (the freed pages stay in the process's heap for the activations).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "bf16-mixed": 4}
ADAPTER_BYTES = 4  # PEFT keeps adapter weights in float32 (autocast_adapter_dtype)
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # bitsandbytes 4-bit blocks; double quantisation groups 256 absmaxes
BNB_8BIT_MIN_SIZE, BNB_8BIT_BLOCK = 4096, 256  # 8-bit optimizers keep 32-bit state for small tensors
CUDA_CONTEXT_BYTES = 3 * GIB // 4  # CUDA context, cuBLAS workspaces, kernels (0.5-1 GiB in practice)
PYTHON_BASELINE_BYTES = GIB // 2  # the engine process with torch, transformers and peft imported
ALLOCATOR_SLACK = {"cuda": 0.10, "mps": 0.10, "cpu": 0.0}
DEFAULT_MODEL_FILE = "smollm2-135m-instruct.json"
LOGITS_CHUNK = 1024  # rows of the output head per chunk: kernels.linear_logprobs.DEFAULT_CHUNK (a test pins it)
DORA_NORM_CHUNK = 256  # rows of W + s B A per chunk: kernels.dora_norm.DEFAULT_CHUNK (a test pins it)
# oneDNN's and ideep's caches of bf16 products (bf16-mixed on the CPU): engine.train.memory_budget bounds each to
# ONEDNN_CACHE_ENTRIES (it reads it from here), about 0.29 MiB of generated code an entry whatever the shapes
ONEDNN_CACHE_ENTRIES = 64
ONEDNN_CACHE_BYTES = 2 * ONEDNN_CACHE_ENTRIES * 300 * 1024

# architecture -> (norms per block, q/k norms, default tie_word_embeddings, fused projections, bias on q/k/v)
_KNOWN = {
    "LlamaForCausalLM": (2, False, False, False, False),
    "MistralForCausalLM": (2, False, False, False, False),
    "Qwen2ForCausalLM": (2, False, False, False, True),
    "Qwen3ForCausalLM": (2, True, False, False, False),
    "GemmaForCausalLM": (2, False, True, False, False),
    "Gemma2ForCausalLM": (4, False, True, False, False),
    "Gemma3ForCausalLM": (4, True, True, False, False),
    "Phi3ForCausalLM": (2, False, False, True, False),
}
_EXACT = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
# Architectures whose MLP and RMSNorm the engine swaps for kernels' fused ops when ``fused_ops`` is on
# (engine.train.model_patches.fused_ops): layer_activation_bytes counts what those ops save.
FUSED_OPS_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_ALIASES = (
    ("hidden_size", "n_embd"),
    ("num_hidden_layers", "n_layer"),
    ("num_attention_heads", "n_head"),
    ("intermediate_size", "n_inner"),
    ("max_position_embeddings", "n_positions"),
)
_BY_MODEL_TYPE = {**{a.removesuffix("ForCausalLM").lower(): a for a in _KNOWN}, "gemma3_text": "Gemma3ForCausalLM"}


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a block. ``reads`` names its input, so layers sharing an input share it."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    reads: str  # 'attn_in' | 'attn_out' | 'mlp_in' | 'mlp_act'

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer, read from its ``config.json``."""

    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str = "bfloat16"
    norms_per_layer: int = 2
    qk_norm: bool = False
    fused_projections: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    approximate: bool = False
    note: str = ""

    @classmethod
    def from_config_dict(cls, d: dict[str, Any]) -> ModelShape:
        """Llama-style configs (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3); others are read as Llama, flagged.
        GPT-2-style names (n_embd, n_layer, n_head, n_inner, n_positions) are read as their Llama names."""
        d = {**d, **d.get("text_config", {})}  # multimodal wrappers keep the LM under text_config
        for name, alias in _ALIASES:
            if d.get(name) is None and d.get(alias) is not None:
                d[name] = d[alias]
        if d.get("intermediate_size") is None and "hidden_size" in d:
            d["intermediate_size"] = 4 * int(d["hidden_size"])  # GPT-2: n_inner None means 4 * n_embd
        model_type = str(d.get("model_type", "unknown"))
        arch = (d.get("architectures") or [_BY_MODEL_TYPE.get(model_type, model_type)])[0]
        norms, qk_norm, tie_default, fused, qkv_bias = _KNOWN.get(arch, (2, False, False, False, False))
        h, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        note = ""
        if arch not in _EXACT:
            note = (
                f"{arch}: estimated as a Llama-like model"
                if arch not in _KNOWN
                else f"{arch}: parameter count exact, activations approximated with the Llama formula"
            )
        if d.get("num_local_experts") or d.get("num_experts"):
            note = f"{arch}: mixture-of-experts read as a dense model; the estimate is rough"
        return cls(
            architecture=arch,
            hidden_size=h,
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or h // heads),
            intermediate_size=int(d["intermediate_size"]),
            vocab_size=int(d["vocab_size"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
            max_position_embeddings=int(d.get("max_position_embeddings") or 0),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            norms_per_layer=norms,
            qk_norm=qk_norm,
            fused_projections=fused,
            attention_bias=bool(d.get("attention_bias", qkv_bias)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            approximate=arch not in _EXACT,
            note=note,
        )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelShape:
        return _read_shape(str(Path(path) / "config.json"), _mtime(Path(path) / "config.json"))

    @classmethod
    def for_model_spec(cls, spec: str) -> ModelShape | None:
        """'default' -> the bundled SmolLM2 shape; a model folder or cached hub id -> its config.json;
        a .gguf file or anything unreadable -> None (the GUI then shows no estimate)."""
        path = _resolve_config(spec)
        if path is None:
            return None
        try:
            return _read_shape(str(path), _mtime(path))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def formula_counts_exactly(self) -> bool:
        """The formula counts this architecture's parameters exactly (else the engine counts them)."""
        return self.architecture in _KNOWN and "mixture" not in self.note

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def linear_layers(self) -> tuple[LinearShape, ...]:
        """The linear layers of one block with (in, out): q/k/v/o and gate/up/down (fused on Phi-3)."""
        h, q, kv, i, ab, mb = (
            self.hidden_size,
            self.q_width,
            self.kv_width,
            self.intermediate_size,
            self.attention_bias,
            self.mlp_bias,
        )
        if self.fused_projections:
            attn = [LinearShape("qkv_proj", h, q + 2 * kv, ab, "attn_in")]
            mlp = [LinearShape("gate_up_proj", h, 2 * i, mb, "mlp_in")]
        else:
            attn = [
                LinearShape("q_proj", h, q, ab, "attn_in"),
                LinearShape("k_proj", h, kv, ab, "attn_in"),
                LinearShape("v_proj", h, kv, ab, "attn_in"),
            ]
            mlp = [LinearShape("gate_proj", h, i, mb, "mlp_in"), LinearShape("up_proj", h, i, mb, "mlp_in")]
        o_bias = ab and self.architecture != "Qwen2ForCausalLM"  # Qwen2: biases on q/k/v only
        return (
            *attn,
            LinearShape("o_proj", q, h, o_bias, "attn_out"),
            *mlp,
            LinearShape("down_proj", i, h, mb, "mlp_act"),
        )

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def linear_params(self) -> int:
        """Weights (and biases) of every block linear: what NF4 quantises."""
        return self.num_hidden_layers * sum(lin.params for lin in self.linear_layers)

    @property
    def parameter_count(self) -> int:
        """P = V*h (embeddings) + [V*h untied head] + h (final norm)
        + L * (sum of in*out (+out bias) over the block linears + norms*h + [2*head_dim q/k norms])."""
        per_block_norms = self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return (
            self.embedding_params
            + self.lm_head_params
            + self.hidden_size
            + self.linear_params
            + self.num_hidden_layers * per_block_norms
        )

    def targeted_layers(self, target_modules: list[str] | tuple[str, ...]) -> tuple[LinearShape, ...]:
        """Block linears that get an adapter: 'all-linear' = all of them (never the output head)."""
        if "all-linear" in target_modules:
            return self.linear_layers
        names = {t.rsplit(".", 1)[-1] for t in target_modules}
        return tuple(lin for lin in self.linear_layers if lin.name in names)


LONGEST_KEPT = 64  # the data report keeps this many longest rows: enough for batch_size <= 32 DPO pairs


@dataclass(frozen=True)
class DataLengths:
    """The longest rows of a dataset, as a batch sees them (a DPO pair is two rows: chosen and rejected).

    ``longest_rows``: the longest row lengths in tokens, before truncation, longest first;
    ``most_trained``: the largest counts of trained tokens per row, largest first (not necessarily the
    same rows); both at most ``LONGEST_KEPT`` long. ``measured`` rows (examples) were tokenised of ``total``.
    """

    longest_rows: tuple[int, ...]
    most_trained: tuple[int, ...]
    measured: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "longest_rows", tuple(sorted((int(n) for n in self.longest_rows), reverse=True)))
        object.__setattr__(self, "most_trained", tuple(sorted((int(n) for n in self.most_trained), reverse=True)))

    @classmethod
    def of_rows(cls, lengths: list[int], trained: list[int], total: int = 0) -> DataLengths:
        """From every row's length and trained tokens (keeps the longest ``LONGEST_KEPT``)."""
        return cls(
            tuple(sorted(lengths, reverse=True)[:LONGEST_KEPT]),
            tuple(sorted(trained, reverse=True)[:LONGEST_KEPT]),
            len(lengths),
            total or len(lengths),
        )

    @classmethod
    def from_token_stats(cls, tokens: Any, total_rows: int = 0) -> DataLengths | None:
        """From the data report's token statistics (``core.protocol.dataset_report.TokenStats``, what ``engine data
        inspect
        --json`` measured: its ``longest_rows`` and ``most_trained_rows``), if it has them; ``total_rows``: the
        dataset's usable rows."""
        rows, trained = getattr(tokens, "longest_rows", ()), getattr(tokens, "most_trained_rows", ())
        if not rows or not trained:
            return None
        measured = int(tokens.measured or 0)
        return cls(tuple(rows), tuple(trained), measured, max(measured, int(total_rows or 0)))


@dataclass(frozen=True)
class BatchLengths:
    """The batch an estimate assumes: ``rows`` rows padded to ``seq`` tokens, ``trained_tokens`` of them
    reaching the output head. ``fitted``: from the data (the longest batch the run can form), else the worst
    case (every row ``max_length`` long, every token trained)."""

    rows: int
    seq: int
    trained_tokens: int
    fitted: bool
    description: str
    packed: bool = False  # ``packing``: one row of ``seq`` tokens, several sequences in it


def batch_lengths(config: TrainConfig, lengths: DataLengths | None = None) -> BatchLengths:
    """The longest batch: rows = batch_size (x2 for DPO); seq = the longest row truncated at max_length (the
    engine pads a batch to its longest row); trained = the ``rows`` largest trained counts, each at most
    seq - 1 (an upper bound over every batch the data can form). No data: the worst case.
    With ``packing`` the batch is one row of the tokens present (``engine.train.batches.pack``): rows = 1, seq = the
    ``rows`` longest rows' lengths (each truncated at max_length), summed. GRPO and PPO: ``grpo_batch_lengths``."""
    if config.objective in SAMPLING_OBJECTIVES:
        return grpo_batch_lengths(config, lengths)
    rows = config.batch_size * (2 if config.trains_on_pairs else 1)
    what = "pairs" if config.trains_on_pairs else "rows"
    if lengths is None or not lengths.longest_rows:
        present = rows * config.max_length
        layout = f", packed into one row of {present} tokens" if config.packing else ""
        return BatchLengths(
            1 if config.packing else rows,
            present if config.packing else config.max_length,
            rows * (config.max_length - 1),
            False,
            f"worst case (no dataset yet): {config.batch_size} {what} of max_length {config.max_length} tokens"
            f"{layout}, every token trained",
            packed=config.packing,
        )
    seq = max(2, min(config.max_length, lengths.longest_rows[0]))
    top = list(lengths.most_trained[:rows]) + [lengths.most_trained[-1] if lengths.most_trained else seq] * max(
        0, rows - len(lengths.most_trained)
    )
    trained = sum(min(n, seq - 1) for n in top)
    longest = [min(config.max_length, n) for n in lengths.longest_rows[:rows]]
    present = max(2, sum(longest) + longest[-1] * (rows - len(longest)))  # rows past those kept: the shortest kept
    cut = " (truncated at max_length)" if lengths.longest_rows[0] > config.max_length else ""
    part = f" of the first {lengths.measured} of {lengths.total} rows" if lengths.total > lengths.measured else ""
    layout = f"packed into one row of {present} tokens" if config.packing else f"padded to {seq} tokens"
    return BatchLengths(
        1 if config.packing else rows,
        present if config.packing else seq,
        trained,
        True,
        f"fitted to the data{part}: the longest batch is {config.batch_size} {what} {layout}{cut}, "
        f"at most {trained} trained tokens",
        packed=config.packing,
    )


def grpo_batch_lengths(config: TrainConfig, lengths: DataLengths | None = None) -> BatchLengths:
    """GRPO's longest step batch: each of batch_size prompts with grpo_group_size (G) sampled answers, so rows =
    batch_size x G sequences of a prompt and up to grpo_max_new_tokens answer tokens; seq = the data's longest row
    (its prompt and reference answer: more than its prompt) + grpo_max_new_tokens, at most max_length (the engine
    cuts prompts to leave the answers room); no data: max_length. Trained: every answer token, rows x
    grpo_max_new_tokens. Packed: one row of rows x seq tokens. PPO: the same with its ``ppo_samples_per_prompt`` and
    ``ppo_max_new_tokens`` (``sampling_settings``)."""
    g, new = sampling_settings(config)
    rows = config.batch_size * g
    fitted = lengths is not None and bool(lengths.longest_rows)
    longest = lengths.longest_rows[0] if lengths is not None and fitted else config.max_length
    seq = max(2, min(config.max_length, longest + new))
    present = rows * seq
    layout = f"packed into one row of {present} tokens" if config.packing else f"padded to {seq} tokens"
    source = "fitted to the data" if fitted else "worst case (no dataset yet)"
    return BatchLengths(
        1 if config.packing else rows,
        present if config.packing else seq,
        rows * min(new, seq - 1),
        fitted,
        f"{source}: {config.batch_size} prompts x {g} sampled answers of up to {new} tokens, {layout}",
        packed=config.packing,
    )


@dataclass(frozen=True)
class ParamCounts:
    """Parameters counted by building the model for the chosen method (the engine does it on the meta device).

    ``total_params``: every parameter of the adapted model (base + adapters, as PEFT counts them);
    ``trainable_params``: the adapters; ``quantizable_params``: the weights of the linear layers NF4 would
    quantise (every linear but the output head); ``optimizer_8bit_bytes``: 8-bit AdamW's states for these
    trainable tensors (``states_8bit`` summed per tensor)."""

    total_params: int
    trainable_params: int
    quantizable_params: int = 0
    optimizer_8bit_bytes: int = 0
    source: str = "meta"


def counts_key(config: TrainConfig) -> str:
    """What a parameter count depends on: method, rank and targets ("lora r=16 all-linear")."""
    return f"{config.method} r={config.lora_rank} {','.join(config.target_modules)}"


def states_8bit(n: int) -> int:
    """8-bit AdamW state bytes for one tensor of n elements (see ``optimizer_bytes``)."""
    return 8 * n if n < BNB_8BIT_MIN_SIZE else 2 * n + 8 * math.ceil(n / BNB_8BIT_BLOCK)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes alive at the peak of one training step, by cause. ``total_bytes`` is their sum."""

    base_weights: int
    adapter_weights: int
    gradients: int
    optimizer_states: int
    activations: int  # what autograd keeps for backward, and the last block's backward beyond the head (long rows)
    logits: int
    reference_forward: int
    runtime_overhead: int
    allocator_slack: int
    trainable_params: int
    compute_dtype: str
    device_kind: str
    approximate: bool = False
    notes: tuple[str, ...] = ()
    total_params: int = 0  # base + adapters
    batch: BatchLengths | None = None  # the lengths assumed
    params_source: str = "formula"  # 'formula' (from config.json) or 'meta' (counted by the engine)
    rollouts: int = 0  # GRPO: what its sampling phase needs beyond the step's activations (``rollout_bytes``)

    TERMS = (
        "base_weights",
        "adapter_weights",
        "gradients",
        "optimizer_states",
        "activations",
        "logits",
        "reference_forward",
        "rollouts",
        "runtime_overhead",
        "allocator_slack",
    )

    @property
    def terms(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.TERMS}

    @property
    def total_bytes(self) -> int:
        return sum(self.terms.values())


@dataclass(frozen=True)
class FitVerdict:
    """Whether a run fits a device, with the sentence the GUI shows."""

    fits: bool
    tight: bool
    needed_bytes: int
    available_bytes: int
    message: str


def resolve_compute_dtype(config: TrainConfig, device: DeviceInfo) -> str:
    """auto -> bfloat16 on a GPU that has it, float16 on an older GPU, float32 on the CPU.

    On a CPU with fast bf16 the engine's ``auto`` trains LoRA/DoRA and QLoRA in bf16-mixed
    (``engine.train.model_patches.mixed_precision``): loaded in float32 (a 4-bit base's other parameters too), so
    counted as float32
    (``DTYPE_BYTES``)."""
    if device.kind == "cpu" and method_terms.family(config) == "full":
        return "float32"  # a full fine-tune's weights are float32, and 16 bits are CUDA autocast over them
    if config.compute_dtype != "auto":
        return config.compute_dtype
    if device.kind == "cpu":
        return "float32"
    return "bfloat16" if device.bf16_supported else "float16"


def trainable_params(shape: ModelShape, config: TrainConfig) -> int:
    """LoRA: L * sum r*(in+out) over targeted linears; DoRA adds a magnitude vector of size out to each; VeRA trains
    r + out per targeted linear; the other methods' in ``core.memory.method_terms``."""
    if not method_terms.lora_like(config):
        return method_terms.trainable_params(shape, config)
    if config.method == "vera":  # d (r) and b (out); the shared random matrices are frozen
        return shape.num_hidden_layers * sum(
            config.lora_rank + lin.out_features for lin in shape.targeted_layers(config.target_modules)
        )
    per_block = sum(
        config.lora_rank * (lin.in_features + lin.out_features) + (lin.out_features if config.uses_dora else 0)
        for lin in shape.targeted_layers(config.target_modules)
    )
    return shape.num_hidden_layers * per_block


def base_weight_bytes(shape: ModelShape, quantized: bool, dtype_bytes: int) -> int:
    """16-bit base (32-bit when computing in float32): P*b.
    NF4 (QLoRA/QDoRA) for the block linears' weights: n/2 + n/64 (8-bit absmax per 64-block, double quantised)
    + 4*n/(64*256) (float32 second-level absmax) per layer; embeddings, norms, biases, head stay at b bytes."""
    if not quantized:
        return shape.parameter_count * dtype_bytes
    per_layer = 0
    for lin in shape.linear_layers:
        n = lin.in_features * lin.out_features
        blocks = math.ceil(n / NF4_BLOCK)
        per_layer += n // 2 + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + 4 * 256 + 4  # + code table, offset
    weights_only = shape.num_hidden_layers * sum(lin.in_features * lin.out_features for lin in shape.linear_layers)
    return shape.num_hidden_layers * per_layer + (shape.parameter_count - weights_only) * dtype_bytes


def optimizer_bytes(shape: ModelShape, config: TrainConfig) -> int:
    """AdamW (and paged AdamW): two float32 moments = 8 bytes per trainable parameter.
    8-bit AdamW: 2 bytes per parameter + two float32 absmaxes per 256-block, except tensors under 4096
    elements (DoRA magnitudes, small LoRA matrices), which bitsandbytes keeps in 32 bits (8 bytes)."""
    if not config.optimizer.endswith("8bit"):
        return 8 * trainable_params(shape, config)
    if not method_terms.lora_like(config) or config.method == "vera":  # vectors and small matrices: approximate
        return states_8bit(trainable_params(shape, config))

    states = states_8bit
    per_block = 0
    for lin in shape.targeted_layers(config.target_modules):
        per_block += states(config.lora_rank * lin.in_features) + states(config.lora_rank * lin.out_features)
        per_block += states(lin.out_features) if config.uses_dora else 0
    return shape.num_hidden_layers * per_block


def fuses_dora_output(config: TrainConfig) -> bool:
    """The engine computes DoRA's output with ``kernels.dora_output`` (``engine.train.model_patches.kernel_wiring
    .install_dora_output``): fused ops on, a 16/32-bit base (peft's 4-bit layers keep their own forward) and no
    adapter dropout (with dropout peft's forward runs)."""
    return config.uses_dora and config.fused_ops and not config.quantized and config.lora_dropout == 0


def chunked_dora_norm(config: TrainConfig, device_kind: str) -> bool:
    """DoRA's weight norm without the dense ``B @ A``: where the kernel wiring routes it through ``dora_weight_norm``
    (``core.kernel_choice.dora_norm_impl``: ``kernels: auto`` where the chunked norm was measured faster, the CPU,
    or ``kernels: triton``); elsewhere peft's norm builds it."""
    return config.uses_dora and kernel_choice.dora_norm_impl(config.kernels, device_kind) is not None


def uses_fused_ops(shape: ModelShape, config: TrainConfig) -> bool:
    """The engine swaps this model's MLP, norms and attention for kernels' fused ops
    (engine.train.model_patches.fused_ops)."""
    return config.fused_ops and shape.architecture in FUSED_OPS_ARCHITECTURES


@dataclass(frozen=True)
class StepLayout:
    """How one training step lays out its work, as far as its memory goes: which of the engine's optimisations
    apply to this model, batch and device (:func:`step_layout`). One description instead of a flag per
    optimisation; each field's effect is in ``layer_activation_bytes`` and ``activation_bytes``."""

    fused: bool = False  # kernels' fused norms and SwiGLU (``uses_fused_ops``)
    recompute: bool = False  # the fused ops rebuild their outputs in backward (float32, no checkpointing)
    gqa: bool = False  # attention keeps grouped keys and values at their own width (``kernels.attention``, CPU)
    masked: bool = False  # a padding or block-diagonal mask reaches SDPA
    # transformers builds a mask: padded rows, or a packed row of several sequences except on the CPU, where the
    # attention runs it sequence by sequence and the decoder skips the mask (``fused_ops.split_packed_rows``)
    mask_built: bool = False
    packed: bool = False  # ``packing``: one row of several sequences
    split_attention: bool = False  # a packed row's attention sequence by sequence (the CPU)
    checkpointing: bool = False  # ``gradient_checkpointing``: blocks recomputed in backward
    fused_dora_output: bool = False  # ``fuses_dora_output``
    chunked_dora_norm: bool = False  # ``chunked_dora_norm``


def step_layout(shape: ModelShape, config: TrainConfig, rows: int, b: int, device_kind: str = "cuda") -> StepLayout:
    """The layout of a step of ``rows`` rows computing in ``b`` bytes on ``device_kind``."""
    fused = uses_fused_ops(shape, config)
    packed = config.packing
    cpu = device_kind == "cpu"
    sequences = config.batch_size * (2 if config.trains_on_pairs else 1)
    return StepLayout(
        fused=fused,
        recompute=fused and b == ADAPTER_BYTES and not config.gradient_checkpointing,
        gqa=(fused or packed) and cpu,
        # a packed row of one sequence has no mask (transformers finds no restart in its position ids)
        masked=(not cpu and sequences > 1) if packed else rows > 1,
        mask_built=rows > 1 or (packed and sequences > 1 and not cpu),
        packed=packed,
        split_attention=packed and cpu,
        checkpointing=config.gradient_checkpointing,
        fused_dora_output=fuses_dora_output(config),
        chunked_dora_norm=chunked_dora_norm(config, device_kind),
    )


def layer_activation_bytes(
    shape: ModelShape,
    config: TrainConfig,
    rows: int,
    seq: int,
    b: int,
    layout: StepLayout | None = None,
) -> int:
    """What autograd keeps for one block with frozen base weights, laid out as ``layout`` says (default: padded
    rows, none of the optimisations); per token (x T = rows * seq):

    - each RMSNorm: its input upcast to float32 (4h) + the rsqrt (4);      [norms * (4h + 4)]
      fused (``kernels.rms_norm``): its input in its own dtype (b*h) + rstd [norms * (b*h + 4)]
    - SDPA (flash / memory-efficient): q, k, v, output at b bytes + log-sum-exp (4 per head);
      k and v are saved at q width when a padding mask makes transformers repeat them (``masked``),
      at their own width with ``gqa`` (``kernels.attention`` on the CPU)
                                                                            [b*(2q + 2kv') + 4*heads]
    - MLP: gate output (for SiLU), SiLU output and up output                [3*i*b]
      fused (``kernels.swiglu``): gate and up                               [2*i*b]
    - each adapted linear: its input cast to float32 for the float32 adapter (4*in; in float32 the
      q/k/v and gate/up inputs are one tensor, and o_proj's is the saved SDPA output)
      + lora_A's output (4r)                                                [sum 4*in + 4r]
      ``recompute`` (fused, float32, no checkpointing): the norms' and SwiGLU's outputs are rebuilt in backward,
      not kept (``kernels.recompute``): no input term for the layers that read them
    - DoRA also keeps the base output (b) and the adapter output (4) per out feature [sum out*(b+4)]
      with ``fuses_dora_output`` (``kernels.dora_output``): only the layer's output, in float32 [sum 4*out],
      nothing for a bias-free layer whose output its consumer keeps anyway (b = 4: gate and up for the MLP,
      v for unrepeated attention)
    plus, once per block, the padding mask SDPA turns into an additive bias: rows * seq^2 * b (rows > 1),
    and for DoRA the weight norm and two scale vectors per adapted linear: 12 * out (``fuses_dora_output``: the
    scale m / n, 4 * out).
    ``masked``: whether a mask reaches SDPA (padded rows > 1; a packed row's block-diagonal mask does, except on
    the CPU, where each sequence is its own causal call). ``split_attention`` (that CPU path): each call keeps its
    sequence's output and o_proj's adapter (float32) keeps their concatenation, a second copy  [b*q]
    Frozen linears keep nothing: the gradient of x needs only the weight.
    """
    layout = layout or StepLayout(masked=rows > 1)
    fused = layout.fused
    h, i = shape.hidden_size, shape.intermediate_size
    padded = layout.masked
    repeated = padded and shape.num_key_value_heads < shape.num_attention_heads and not layout.gqa
    kv = shape.q_width if repeated else shape.kv_width
    per_token = shape.norms_per_layer * ((b * h if fused else 4 * h) + 4)
    per_token += b * (2 * shape.q_width + 2 * kv) + 4 * shape.num_attention_heads
    per_token += (2 if fused else 3) * i * b + (4 * (shape.q_width + shape.kv_width) if shape.qk_norm else 0)
    targeted = shape.targeted_layers(config.target_modules)
    if not method_terms.lora_pair(config):  # no trained low-rank pair: the method's own layers' terms instead
        targeted = ()
        per_token += method_terms.layer_token_bytes(shape, config, b)
    if b == ADAPTER_BYTES:
        kept = ("attn_out",) + (("attn_in", "mlp_in", "mlp_act") if layout.recompute else ())
        per_token += sum(
            4 * lin.in_features for reads, lin in {lin.reads: lin for lin in targeted}.items() if reads not in kept
        )
    else:
        per_token += sum(4 * lin.in_features for lin in targeted)
    per_token += sum(4 * config.lora_rank for _ in targeted)
    if layout.split_attention and b == ADAPTER_BYTES and any(lin.reads == "attn_out" for lin in targeted):
        per_token += b * shape.q_width
    if config.uses_dora and layout.fused_dora_output:
        # the output, float32 (the wider of the base's and the float32 adapter's dtypes); the MLP's gate and up
        # outputs (and v, when attention keeps it unrepeated) are kept by their consumer already when b = 4
        shared = {"gate_proj", "up_proj", "gate_up_proj"} | (set() if repeated else {"v_proj"})
        per_token += sum(
            4 * lin.out_features for lin in targeted if b != ADAPTER_BYTES or lin.bias or lin.name not in shared
        )
    elif config.uses_dora:
        per_token += sum(lin.out_features * (b + 4) for lin in targeted)
    constant = sum((4 if layout.fused_dora_output else 12) * lin.out_features for lin in targeted)
    constant = constant if config.uses_dora else 0
    return rows * seq * per_token + (rows * seq * seq * b if padded else 0) + constant


def activation_bytes(
    shape: ModelShape,
    config: TrainConfig,
    rows: int,
    seq: int,
    b: int,
    trained: int | None = None,
    device_kind: str = "cuda",
) -> int:
    """Without checkpointing: L blocks, less the first block's first norm input (the embeddings are
    frozen, so nothing before it needs a gradient) + final norm (4h + 4 per token) + RoPE cos/sin
    (2*seq*head_dim*b). With the fused ops' recompute, that first norm's output is kept instead (nothing
    before it needs a gradient, so there is nothing to rebuild it from): 4h per token when q/k/v are adapted.
    With checkpointing: each block's input (h*b per token) + final norm, the boolean padding mask the
    checkpoints hold to recompute the blocks (rows * seq^2 bytes, rows > 1), and one block recomputed
    in backward (fused ops, no recompute hooks inside a checkpoint); that comes after the output head's
    backward, so it counts only by what it exceeds the head's memory freed by then:
    max(0, block - logits_bytes(N)), N = ``trained`` (default rows x (seq - 1)).
    DoRA's recomputed block also holds 4 * in * out per adapted linear: peft's forward builds a dense B @ A for
    its weight norm; with ``chunked_dora_norm`` there it is one chunk of rows of the sum at a time
    (4 * min(out, 256) * in, the largest linear's). With ``fuses_dora_output`` the measured peak is the same with
    either norm (``benchmarks/memory_grid.py --method dora``: 15.14 MiB both, the estimate 15.17), so the dense
    term stays; which temporaries of the recomputed block make it up there is not pinned down.
    ``device_kind``: the fused attention keeps grouped keys and values at their width on the CPU only.
    ``packing`` (``rows`` = 1 packed row of ``seq`` tokens): transformers builds a boolean block-diagonal mask
    (seq^2 bytes) that the checkpoints hold and SDPA reads; not on the CPU, where the attention runs sequence by
    sequence (``engine.train.model_patches.fused_ops.apply_packed_attention``, keys and values at their own width)
    and the decoder builds no mask (``fused_ops.split_packed_rows``).
    With checkpointing the last block's backward (``backward_bytes``) adds to the recomputed block; without, it is
    not counted here (what autograd keeps) but by ``backward_peak_bytes``."""
    tokens = rows * seq
    layout = step_layout(shape, config, rows, b, device_kind)
    fused = layout.fused
    final = tokens * ((b * shape.hidden_size if fused else 4 * shape.hidden_size) + 4)
    if layout.checkpointing:
        one = layer_activation_bytes(shape, config, rows, seq, b, layout)
        head = logits_bytes(shape, rows * (seq - 1) if trained is None else trained, b)
        targeted = shape.targeted_layers(config.target_modules)
        if config.uses_dora and layout.chunked_dora_norm and not layout.fused_dora_output:
            # peft's DoRA forward with the chunked norm: one chunk of rows of W + s B A at a time
            one += max(4 * min(lin.out_features, DORA_NORM_CHUNK) * lin.in_features for lin in targeted)
        elif config.uses_dora:  # measured: a dense float32 [out, in] per adapted linear (see the docstring)
            one += sum(4 * lin.in_features * lin.out_features for lin in targeted)
        recompute = max(0, one + backward_bytes(shape, config, tokens, b, layout) - head)
        mask = rows * seq * seq if layout.mask_built else 0
        return shape.num_hidden_layers * tokens * shape.hidden_size * b + final + mask + recompute
    one = layer_activation_bytes(shape, config, rows, seq, b, layout)
    rope = 2 * seq * shape.head_dim * b
    first_norm = tokens * ((b * shape.hidden_size if fused else 4 * shape.hidden_size) + 4)
    adapted = shape.targeted_layers(config.target_modules) if method_terms.lora_pair(config) else ()
    if layout.recompute and any(lin.reads == "attn_in" for lin in adapted):
        first_norm -= tokens * 4 * shape.hidden_size
    if method_terms.family(config) == "full":  # the embeddings train: the first norm's input is kept too
        first_norm = 0
    return shape.num_hidden_layers * one - first_norm + final + rope


def backward_peak_bytes(
    shape: ModelShape,
    config: TrainConfig,
    rows: int,
    seq: int,
    b: int,
    trained: int | None = None,
    device_kind: str = "cuda",
) -> int:
    """What the step's peak holds beyond the kept activations and the output head, without checkpointing: the last
    block's backward temporaries (``backward_bytes``) by what they exceed the head's memory, freed by then:
    max(0, backward - logits_bytes(N)). 0 with checkpointing (``activation_bytes`` counts them with the recomputed
    block), and wherever the head is the larger (short rows, or many trained tokens)."""
    layout = step_layout(shape, config, rows, b, device_kind)
    if layout.checkpointing:
        return 0
    head = logits_bytes(shape, rows * (seq - 1) if trained is None else trained, b)
    return max(0, backward_bytes(shape, config, rows * seq, b, layout) - head)


def backward_bytes(shape: ModelShape, config: TrainConfig, tokens: int, b: int, layout: StepLayout) -> int:
    """The temporaries of the last block's backward, the first one to run, while every other block's activations
    are still kept: T * (3i + 2h) * b, less 4 * i per token where down_proj's adapter kept its input (float32; not
    with ``recompute``, which rebuilds it): that is freed once down_proj's backward is done, before the peak. With
    16-bit compute (b = 2) it is not subtracted: the peak was measured with that float32 copy still alive (a reward
    model's step, ``tests/core/test_memory.py``, where no output head outgrows this term).
    Its MLP's backward holds three [T, i] tensors at once (the gradient of the SwiGLU output, summed over the frozen
    and the adapter path, and two of the SwiGLU backward's products) and the incoming gradient of the hidden state
    and the residual's copy of it ([T, h] each). It matters where the tokens are many and the trained ones few (long
    packed rows: the output head's chunk stops growing at c rows); measured on the fused ops' path
    (``tests/engine/test_packed_mask.py``: a packed row of 3.6k tokens)."""
    transient = tokens * (3 * shape.intermediate_size + 2 * shape.hidden_size) * b
    adapted = shape.targeted_layers(config.target_modules) if method_terms.lora_pair(config) else ()
    down = [lin for lin in adapted if lin.reads == "mlp_act"]
    if down and not layout.recompute and b == ADAPTER_BYTES:
        transient -= tokens * 4 * down[0].in_features
    return max(0, transient)


def logits_bytes(shape: ModelShape, trained_tokens: int, b: int) -> int:
    """The output head at the peak (its forward, for N trained tokens):

        V * (4 + (b if b < 4 else 0)) * min(N, c) + N * (2*h*b + 48)

    The head runs chunk by chunk (``kernels.linear_logprobs._ChunkedLogprobs``) and keeps no logits for
    backward: with the head frozen, each chunk's gradient with respect to the hidden states is made in the
    forward pass. A chunk's float32 logits (4 per element; from a 16-bit product, that product too: b) become
    their softmax and then its gradient in their own memory, and the chunk is dropped before the next one is
    made, so the term stops growing past c = 1024 trained tokens. The backward only scales that gradient.
    Per trained token: the selected hidden state (h*b) and the gradient the forward made (h*b), the int64
    target (8), the [N, 2] int64 positions of the boolean-mask gather, saved for its backward (16) and kept
    as the token -> row map (16), the float32 log-prob and its gradient (4 + 4).
    The full [B, T, h] hidden state is not kept: only the selected rows are."""
    n, c, v = trained_tokens, LOGITS_CHUNK, shape.vocab_size
    return v * (4 + (b if b < 4 else 0)) * min(n, c) + n * (2 * shape.hidden_size * b + 48)


def scalar_head_params(shape: ModelShape) -> int:
    """A reward model's head, Linear(h, 1): h + 1 trainable float32 parameters beside the adapter's."""
    return shape.hidden_size + 1


def scalar_head_bytes(shape: ModelShape, sequences: int, b: int) -> int:
    """A reward model's head at the peak, in place of the output head (``engine.train.objectives.reward``): per
    sequence its last position's hidden state (h*b), that state in float32 for the head (4h), the reward and its
    gradient (4 + 4) and the gathered position (8):  sequences * (h*b + 4h + 16). No logits and no [T, V] tensor:
    the output head never runs."""
    return sequences * (shape.hidden_size * b + 4 * shape.hidden_size + 16)


def reference_bytes(shape: ModelShape, trained_tokens: int, b: int) -> int:
    """DPO's reference log-probs add nothing to the peak: 0. The engine computes them first, under no_grad with
    the adapters disabled, before the policy forward, so no policy graph is alive then; that forward keeps
    one block's temporaries and one head chunk (4*c*V) at a time, below the training step's own peak
    (all activations + ``logits_bytes``). With ``precompute_reference`` they come from a table (0 too).
    The term is kept so that the breakdown names it."""
    return 0


def sampling_settings(config: TrainConfig) -> tuple[int, int]:
    """An online RL objective's answers per prompt and longest answer: GRPO's ``grpo_group_size`` and
    ``grpo_max_new_tokens``, PPO's ``ppo_samples_per_prompt`` and ``ppo_max_new_tokens``."""
    if config.objective == "ppo":
        return config.ppo_samples_per_prompt, config.ppo_max_new_tokens
    return config.grpo_group_size, config.grpo_max_new_tokens


def value_head_bytes(shape: ModelShape, trained_tokens: int, b: int) -> int:
    """PPO's value head beside the output head (``engine.train.objectives.ppo``), for N answer tokens:

        N * (4h [b < 4] + 32)

    The head reads the same selected hidden states as the output head (counted in ``logits_bytes``), in float32:
    a copy of them (4h per token) kept for the head's weight gradient unless they are float32 already; per token
    the value and its gradient, the sampling-time value, the return, the advantage, the sampling policy's and the
    reference's log-probs and the token -> answer map (8 x 4). Its weights, h + 1 float32 parameters, join the
    trainable ones (``scalar_head_params``)."""
    return trained_tokens * ((4 * shape.hidden_size if b < 4 else 0) + 32)


def rollout_bytes(shape: ModelShape, config: TrainConfig, capacity: int, b: int) -> int:
    """GRPO's sampling phase, when no graph is alive (the previous step's is freed, its gradients too), for one
    micro-batch's rows R = batch_size x grpo_group_size (``engine.decoding.decode``): the preallocated KV cache,
    2 x L x R x capacity x kv x b (keys and values of the prompt and every answer token; capacity = the longest
    prompt + grpo_max_new_tokens), and one step's next-token scores, R x V x (b + 16) (the head's output, then the
    sampler's float32 scores, probabilities, kept mass and cumulative sums). Its log-prob passes for the sampling
    policy (grpo_updates_per_batch above 1) and the reference run without a graph, one layer's work at a time: less
    than the step's own forward keeps, so nothing beyond it."""
    rows = config.batch_size * sampling_settings(config)[0]  # PPO: x ppo_samples_per_prompt
    kv_cache = 2 * shape.num_hidden_layers * rows * capacity * shape.kv_width * b
    return kv_cache + rows * shape.vocab_size * (b + 16)


DISTILL_CHUNK = 256  # trained positions per chunk of the distillation loss: kernels.distill_logits.DEFAULT_CHUNK
DISTILL_CHUNK_TENSORS = 8  # [chunk, V] float32 tensors alive at once in a chunk of the distillation loss


def teacher_shape(config: TrainConfig) -> ModelShape | None:
    """The distillation teacher's shape (``distill_teacher``): a model spec's, or the base model of the adapter or
    run it names (its folder's ``adapter_config.json``, the run's ``config.json``); None when unknown."""
    spec = config.distill_teacher.strip()
    if not spec:
        return None
    shape = ModelShape.for_model_spec(spec)
    if shape is not None:
        return shape
    from finetune_studio.core import paths

    folder = Path(spec).expanduser()
    if not folder.is_dir():  # a run id, or RUN:best / RUN:step-N
        folder = paths.data_dir() / "runs" / spec.partition(":")[0]
    for place in (folder, *list(folder.parents)[:3]):
        try:
            if (place / "adapter_config.json").is_file():
                base = json.loads((place / "adapter_config.json").read_text(encoding="utf-8"))
                shape = ModelShape.for_model_spec(str(base.get("base_model_name_or_path") or ""))
            elif (place / "config.json").is_file() and not (place / "model.safetensors").exists():  # a run folder
                run = json.loads((place / "config.json").read_text(encoding="utf-8"))
                shape = ModelShape.for_model_spec(str(run.get("model") or ""))
        except (OSError, ValueError, AttributeError):
            shape = None
        if shape is not None:
            return shape
    return None


def teacher_weight_bytes(teacher: ModelShape, config: TrainConfig, b: int) -> int:
    """The frozen teacher's weights: in the run's dtype (b bytes), 16 bits (2), or NF4 as a QLoRA base is."""
    precision = config.distill_teacher_precision
    if precision == "4-bit":
        return base_weight_bytes(teacher, True, 2)
    return teacher.parameter_count * (2 if precision == "16-bit" else b)


def distill_logits_bytes(student: ModelShape, teacher: ModelShape, trained_tokens: int, b: int, tb: int) -> int:
    """Both output heads at the peak, in place of ``logits_bytes`` (``kernels.distill_logits``):

        8 * 4 * V * min(N, c) + N * (2*hs*b + ht*tb + 48)

    The distillation loss applies the student's and the teacher's heads chunk by chunk (c = 256 trained positions)
    and keeps no logits for backward; a chunk holds about eight [c, V] float32 tensors at once (both heads' logits,
    their log-softmaxes at T, probabilities, the gradient). Per trained token: the student's selected hidden state
    and the gradient the forward made (2*hs*b), the teacher's hidden state, kept from its no-grad pass until the
    loss (ht*tb), targets, positions and the three per-token figures (48). The teacher's own forward runs before the
    student's, under no_grad, one block at a time: below the step's peak, as DPO's reference pass is."""
    n, c, v = trained_tokens, DISTILL_CHUNK, student.vocab_size
    return DISTILL_CHUNK_TENSORS * 4 * v * min(n, c) + n * (2 * student.hidden_size * b + teacher.hidden_size * tb + 48)


def estimate_training_memory(
    shape: ModelShape,
    config: TrainConfig,
    device: DeviceInfo,
    lengths: DataLengths | None = None,
    counts: ParamCounts | None = None,
) -> MemoryEstimate:
    """Peak bytes of one training step on ``device``; every term's formula is in its function's docstring.

    The batch is the longest the data can form (``batch_lengths``), or the worst case without ``lengths``.
    Pair objectives (``TrainConfig.trains_on_pairs``: DPO, reward) run chosen and rejected answers as one batch
    (2x the rows); DPO's reference forward runs before the policy forward and adds nothing at the peak (see
    ``reference_bytes``). A reward model (``TrainConfig.scalar_head``) has no reference and no output head: the
    ``logits`` term is its scalar head's (``scalar_head_bytes``), whose h + 1 parameters join the trainable ones.
    GRPO's step trains batch_size x grpo_group_size sampled answers (``grpo_batch_lengths``; PPO's x
    ppo_samples_per_prompt, its value head in ``logits``, ``value_head_bytes``, and its weights with the trainable
    parameters; its reference pass, as GRPO's, runs without a graph before the step); its sampling phase
    (the KV cache, the next-token scores) comes between steps, so ``rollouts`` holds only what it needs beyond the
    step's activations, output head and gradients (``rollout_bytes``); its reference runs without a graph.
    Gradients are counted in full although they appear only as backward frees activations (conservative by at most
    that term). Runtime overhead: the CUDA context (0.75 GiB) on a GPU; elsewhere the training process's baseline,
    ``device.process_bytes`` (what the engine measured and kept, ``core.memory.runtime_baseline``), else 0.5 GiB;
    allocator slack: 10% of the tensors on CUDA and MPS for fragmentation, on the CPU the bf16 products' primitive
    caches at their bound (``ONEDNN_CACHE_BYTES``, 38 MiB; a float32 run keeps none). ``counts`` (the engine's
    parameter count for this method) replace the formula's weights, adapters and optimizer states: exact for any
    architecture.
    """
    dtype = resolve_compute_dtype(config, device)
    b = DTYPE_BYTES[dtype]
    student_note = ""
    if config.objective == "distill" and 0 < config.distill_student_layers < shape.num_hidden_layers:
        # the run prunes its model to this many layers first: the student's shape (counts were of the whole model)
        shape = dataclasses.replace(shape, num_hidden_layers=config.distill_student_layers)
        counts = None
        student_note = f"the student: the model pruned to {config.distill_student_layers} layers"
    batch = batch_lengths(config, lengths)
    rows, seq, trained = batch.rows, batch.seq, batch.trained_tokens
    extra = method_terms.extra_positions(config)  # a soft prompt's virtual tokens before every sequence
    seq += extra
    notes = [shape.note] if shape.note else []
    notes += [student_note] if student_note else []
    if counts is not None:
        trainable = counts.trainable_params
        total_params = counts.total_params
        base = meta_base_weight_bytes(counts, config.quantized, b)
        optimizer = counts.optimizer_8bit_bytes if config.optimizer.endswith("8bit") else 8 * trainable
        if shape.approximate:
            notes = [f"{shape.architecture}: parameters counted exactly, activations approximated (Llama formula)"]
    else:
        trainable = trainable_params(shape, config)
        total_params = shape.parameter_count + trainable
        base = base_weight_bytes(shape, config.quantized, b)
        optimizer = optimizer_bytes(shape, config)
    if shape.max_position_embeddings and config.max_length > shape.max_position_embeddings:
        notes.append(
            f"max_length {config.max_length} exceeds the model's context ({shape.max_position_embeddings} tokens)"
        )
    if config.optimizer.startswith("paged"):
        notes.append("paged optimizer states can spill to CPU memory when the GPU runs short")
    if config.quantized and device.kind != "cuda":
        notes.append("4-bit (NF4) bases need bitsandbytes on a CUDA GPU for good speed")
    if method_terms.family(config) == "full":  # the weights are the trained parameters (adapter_weights, float32)
        total_params = trainable
        base = method_terms.full_weight_bytes(shape, config)
        if base:
            notes.append(f"base weights: the frozen start weights DPO / GRPO compare with ({_gib(base)})")
    reference = 0
    if config.objective == "dpo" and not config.precompute_reference:
        reference = reference_bytes(shape, trained, b)
    if config.scalar_head:  # a reward model: its head's weights and their optimizer states, no output head at all
        head = scalar_head_params(shape)
        trainable += head
        total_params += head
        optimizer += 8 * head
        trained = 0  # no token reaches the output head (activation_bytes and backward_peak_bytes read it so)
    if config.objective == "ppo":  # the value head's weights and their optimizer states (its tokens: below)
        head = scalar_head_params(shape)
        trainable += head
        total_params += head
        optimizer += 8 * head
    tensors = dict(
        base_weights=base,
        adapter_weights=ADAPTER_BYTES * trainable,
        gradients=ADAPTER_BYTES * trainable,
        optimizer_states=optimizer,
        activations=activation_bytes(shape, config, rows, seq, b, trained, device.kind)
        + backward_peak_bytes(shape, config, rows, seq, b, trained, device.kind),
        logits=scalar_head_bytes(shape, 2 * config.batch_size, b)
        if config.scalar_head
        else logits_bytes(shape, trained, b),
        reference_forward=reference,
    )
    if method_terms.family(config) == "bottleneck":  # nothing before the first adapter needs a gradient
        tensors["activations"] -= method_terms.frozen_start_bytes(shape, config, rows, seq, b)
    if method_terms.family(config) == "prompt":  # the method's own terms (core.memory.method_terms)
        cache = method_terms.prefix_cache_bytes(shape, config, rows, b)
        tensors["activations"] += cache
        if not config.scalar_head:
            tensors["logits"] = method_terms.full_head_bytes(shape, rows, seq, trained, b)
        if extra:
            notes.append(f"{config.num_virtual_tokens} virtual tokens lengthen every sequence to {seq} positions")
        if cache:
            notes.append(f"the prefix's key/value cache: {_gib(cache)} in the activations")
    if config.objective == "ppo":
        tensors["logits"] += value_head_bytes(shape, trained, b)
    if config.objective in SAMPLING_OBJECTIVES:  # the sampling phase's peak beside the step's: what it needs beyond
        capacity = batch.seq // rows if batch.packed else batch.seq
        step = tensors["activations"] + tensors["logits"] + tensors["gradients"]
        tensors["rollouts"] = max(0, rollout_bytes(shape, config, capacity, b) - step)
    if config.objective == "distill":  # the teacher's frozen weights, and both heads in the loss's chunks
        teacher = teacher_shape(config)
        if teacher is None:
            notes.append("the distillation teacher's size is unknown (not counted): name a model or a run's adapter")
        else:
            weights = teacher_weight_bytes(teacher, config, b)
            tb = 2 if config.distill_teacher_precision != "auto" else b
            tensors["base_weights"] += weights
            tensors["logits"] = distill_logits_bytes(shape, teacher, trained, b, tb)
            notes.append(f"base weights include the distillation teacher's ({_gib(weights)})")
    if device.kind == "cuda":
        overhead = CUDA_CONTEXT_BYTES
    else:  # the training process's resident memory before loading, as the engine measured and kept it
        overhead = device.process_bytes or PYTHON_BASELINE_BYTES
    slack = int(ALLOCATOR_SLACK[device.kind] * sum(tensors.values()))
    if device.kind == "cpu":  # the bf16 products' kept primitives in the heap, full after a few batch lengths
        slack += ONEDNN_CACHE_BYTES
    return MemoryEstimate(
        **tensors,
        runtime_overhead=overhead,
        allocator_slack=slack,
        trainable_params=trainable,
        compute_dtype=dtype,
        device_kind=device.kind,
        approximate=shape.approximate and counts is None,
        notes=tuple(notes),
        total_params=total_params,
        batch=batch,
        params_source="formula" if counts is None else counts.source,
    )


def meta_base_weight_bytes(counts: ParamCounts, quantized: bool, dtype_bytes: int) -> int:
    """The frozen base from counted parameters: (total - trainable) * b; with NF4 the quantisable weights
    take n/2 + n/64 + 4*n/(64*256) bytes (the per-tensor code tables are left out: 1 KiB each)."""
    frozen = counts.total_params - counts.trainable_params
    if not quantized:
        return frozen * dtype_bytes
    n = counts.quantizable_params
    blocks = math.ceil(n / NF4_BLOCK)
    return n // 2 + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + (frozen - n) * dtype_bytes


def fits(
    estimate: MemoryEstimate, device: DeviceInfo, headroom: float = 0.10, config: TrainConfig | None = None
) -> FitVerdict:
    """Fits when total*(1 + headroom) <= available; tight when only total <= available.
    The advice names the largest term the user can shrink (``config`` makes it precise)."""
    need, have = estimate.total_bytes, device.available_bytes
    where = "the GPU" if device.kind in ("cuda", "mps") else "this computer"
    approx = "~" if not estimate.approximate else "roughly "
    if have <= 0:
        return FitVerdict(True, False, need, have, f"Needs {approx}{_gib(need)}; free memory unknown")
    if need * (1 + headroom) <= have:
        return FitVerdict(True, False, need, have, f"Needs {approx}{_gib(need)} of {_gib(have)} — fits")
    if need <= have:
        return FitVerdict(
            True,
            True,
            need,
            have,
            f"Needs {approx}{_gib(need)} of {_gib(have)} — tight; {_advice(estimate, config)} for a safer margin",
        )
    return FitVerdict(
        False,
        False,
        need,
        have,
        f"Needs {approx}{_gib(need)} but {where} has {_gib(have)} free: {_advice(estimate, config)}",
    )


def rank_limit(shape: ModelShape, config: TrainConfig) -> int:
    """The largest LoRA rank that makes sense: the widest targeted layer's narrow side, min(in, out) (0 when no
    layer is targeted). Above it, no layer's update can gain rank: the rank only adds parameters and memory."""
    layers = shape.targeted_layers(config.target_modules)
    return max((min(lin.in_features, lin.out_features) for lin in layers), default=0)


def _advice(estimate: MemoryEstimate, config: TrainConfig | None) -> str:
    """Advice for the largest shrinkable term."""
    shrinkable = ("base_weights", "optimizer_states", "activations", "logits", "reference_forward", "rollouts")
    biggest = max(shrinkable, key=lambda name: getattr(estimate, name))
    checkpointing = config is not None and config.gradient_checkpointing
    quantized = config is not None and config.quantized
    if biggest == "activations" and not checkpointing:
        return "enable gradient checkpointing, or lower batch_size or max_length"
    if biggest in ("activations", "logits"):
        return "lower batch_size or max_length" + ("" if checkpointing else ", or enable gradient checkpointing")
    if biggest == "rollouts":
        return "lower grpo_group_size, batch_size or grpo_max_new_tokens"
    if biggest == "reference_forward":
        return "turn on precompute_reference, or lower batch_size or max_length"
    if biggest == "optimizer_states" and config is not None and method_terms.family(config) == "full":
        return "use 8-bit AdamW, or train an adapter (method lora) instead of every weight"
    if biggest == "optimizer_states":
        return "use 8-bit AdamW, or lower lora_rank"
    return "choose a smaller model" if quantized else "use QLoRA (4-bit base), or choose a smaller model"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 1024**2:.0f} MiB"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@functools.lru_cache(maxsize=32)
def _read_shape(path: str, mtime: float) -> ModelShape:  # mtime keys the cache: an edited file is re-read
    return ModelShape.from_config_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _resolve_config(spec: str) -> Path | None:
    parsed = parse_spec(spec)
    if parsed.kind == SpecKind.DEFAULT:
        return resources_dir() / "models" / DEFAULT_MODEL_FILE
    if parsed.kind == SpecKind.FOLDER:
        assert parsed.path is not None  # parse_spec gives FOLDER and FILE a path
        return parsed.path / "config.json" if (parsed.path / "config.json").is_file() else None
    if parsed.kind == SpecKind.FILE and parsed.path is not None and parsed.path.suffix.lower() == ".json":
        return parsed.path
    if parsed.kind == SpecKind.HUB:
        snapshot = cached_snapshot(parsed.repo_id, needs="config.json")
        return snapshot / "config.json" if snapshot else None
    return None  # .gguf files: no config.json to read
