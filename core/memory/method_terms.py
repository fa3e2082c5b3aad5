"""The memory estimate's terms for the methods that are not LoRA (``core.methods``): trainable parameters, what their
layers keep for backward, a soft prompt's extra positions, a prefix's key/value cache and the unchunked output head
the prompt-learning methods go through; a full fine-tune's weights (every parameter trained: float32 weights,
gradients and AdamW states, the linears' inputs kept, and the start weights where DPO or GRPO compare with them).

:func:`core.memory.estimate.estimate_training_memory` reads these where ``lora_like(config)`` is false; the LoRA
family (LoRA, QLoRA, DoRA, QDoRA, VeRA) keeps the estimate's own formulas. Pure Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune_studio.core import methods

if TYPE_CHECKING:
    from finetune_studio.core.config import TrainConfig
    from finetune_studio.core.memory.estimate import LinearShape, ModelShape

P_TUNING_ENCODER = 128  # the P-tuning encoder's hidden width (engine.train.methods.peft_methods)
IA3_DEFAULT = ("k_proj", "v_proj", "down_proj")  # PEFT's IA3 targets for the Llama family
IA3_FEEDFORWARD = ("down_proj", "fc2", "c_proj", "w2")  # scaled at their input, not their output


def lora_like(config: TrainConfig) -> bool:
    """A low-rank update beside the targeted linears (LoRA, QLoRA, DoRA, QDoRA, VeRA): the estimate's own terms."""
    return methods.method(config.method).family == "lora"


def lora_pair(config: TrainConfig) -> bool:
    """A trained A and B beside each targeted linear (LoRA, DoRA and their 4-bit forms): what the estimate's
    activation formula counts (VeRA's A and B are frozen: its terms are :func:`layer_token_bytes`')."""
    return methods.method(config.method).peft_lora


def family(config: TrainConfig) -> str:
    return methods.method(config.method).family


def extra_positions(config: TrainConfig) -> int:
    """Positions a method adds to every sequence: prompt tuning's and P-tuning's virtual tokens (n)."""
    return config.num_virtual_tokens if config.method in ("prompt_tuning", "p_tuning") else 0


def ia3_layers(shape: ModelShape, config: TrainConfig) -> tuple[LinearShape, ...]:
    names = IA3_DEFAULT if config.target_modules == ["all-linear"] else tuple(config.target_modules)
    return shape.targeted_layers(list(names))


def bottleneck_width(shape: ModelShape, config: TrainConfig) -> int:
    return max(1, shape.hidden_size // config.adapter_reduction_factor)


def bottleneck_sites(config: TrainConfig) -> int:
    """Adapters a layer: after the attention and the MLP (Houlsby) or after the MLP (Pfeiffer)."""
    return 2 if config.method == "houlsby" else 1


def trainable_params(shape: ModelShape, config: TrainConfig) -> int:
    """The trainable parameters of a method outside the LoRA family, as PEFT (or ``engine.bottleneck``) makes them:

    - IA3: one vector per targeted linear, its output width (its input width for the MLP's down-projection);
    - BitFit (BEFT): one bias vector per targeted linear, its output width;
    - prompt tuning: n x h; P-tuning: n x h + the encoder's MLP h -> e -> e -> h with biases (e = 128);
    - prefix tuning: n x L x 2 x the key/value width (a key and a value per virtual token and layer);
    - bottleneck: per adapter 2 h b + b + h (b = h // reduction factor), one or two a layer;
    - full: every parameter of the model (a tied head once).
    """
    h, layers, n = shape.hidden_size, shape.num_hidden_layers, config.num_virtual_tokens
    kind = config.method
    if family(config) == "full":
        return shape.parameter_count
    if kind == "ia3":
        return layers * sum(
            lin.in_features if lin.name in IA3_FEEDFORWARD else lin.out_features for lin in ia3_layers(shape, config)
        )
    if kind == "bitfit":
        return layers * sum(lin.out_features for lin in shape.targeted_layers(config.target_modules))
    if kind == "prompt_tuning":
        return n * h
    if kind == "p_tuning":
        e = P_TUNING_ENCODER
        return n * h + (h * e + e) + (e * e + e) + (e * h + h)
    if kind == "prefix_tuning":
        return n * layers * 2 * shape.kv_width
    if family(config) == "bottleneck":
        b = bottleneck_width(shape, config)
        return layers * bottleneck_sites(config) * (2 * h * b + b + h)
    raise ValueError(f"no trainable-parameter formula for method {kind!r} here (the LoRA family's is the estimate's)")


def layer_token_bytes(shape: ModelShape, config: TrainConfig, b: int) -> int:
    """What a method's own layers keep for backward per token and layer (beside the frozen block's own):

    - VeRA, per targeted linear: the frozen A's output (r) scaled by d, and the frozen B's output (out) scaled by
      b, both kept in float32 for the vectors' gradients: 4 (r + out); the input is not kept (A and B are frozen);
    - IA3: the keys and values it scales (b per element); the MLP's activation that the down-projection's vector
      scales is kept by the MLP already;
    - BitFit: nothing (a bias's gradient is the sum of the output's);
    - bottleneck, per adapter: its input, the down-projection's output and the non-linearity's output, in the
      adapter's dtype (float32, or the compute dtype for a 16-bit base): (h + 2 b') x that;
    - prompt and prefix tuning: nothing in the layers (their extra positions and cache are counted apart).
    """
    if config.method == "vera":
        return sum(4 * (config.lora_rank + lin.out_features) for lin in shape.targeted_layers(config.target_modules))
    if config.method == "ia3":
        return b * sum(lin.out_features for lin in ia3_layers(shape, config) if lin.name not in IA3_FEEDFORWARD)
    if family(config) == "bottleneck":
        width = bottleneck_width(shape, config)
        return bottleneck_sites(config) * (shape.hidden_size + 2 * width) * b
    if family(config) == "full":
        return full_layer_token_bytes(shape, b)
    return 0


def full_layer_token_bytes(shape: ModelShape, b: int) -> int:
    """A full fine-tune's linears need their inputs for their weights' gradients: beside what the frozen block keeps
    already (the norms' inputs, the attention's output, which o_proj reads, the MLP's gate and up outputs), the
    attention's input (the first norm's output, read by q, k and v), the MLP's input (the second norm's output, read
    by gate and up) and the down-projection's input (the SwiGLU product): b (2 h + i) per token and layer."""
    return b * (2 * shape.hidden_size + shape.intermediate_size)


def full_weight_bytes(shape: ModelShape, config: TrainConfig) -> int:
    """A full fine-tune's weights beside the trained ones (counted as the trainable parameters, float32): a frozen
    float32 copy of the start weights for the objectives that compare with them (DPO, GRPO with a KL term), else 0."""
    keeps = config.objective == "dpo" or (config.objective == "grpo" and config.grpo_beta > 0)
    return 4 * shape.parameter_count if keeps else 0


def frozen_start_bytes(shape: ModelShape, config: TrainConfig, rows: int, seq: int, b: int) -> int:
    """What the first layer does not keep when its first trained parameter comes after its attention (Houlsby) or
    after its MLP (Pfeiffer): nothing before them needs a gradient. Houlsby: the attention's share of the layer
    (its norm, q/k/v and scores); Pfeiffer: that and the MLP's gate and up outputs (and SiLU's without the fused
    ops); the MLP's norm stays (measured: ``tests/engine/test_methods.py``)."""
    from finetune_studio.core.memory.estimate import layer_activation_bytes

    plain = config.replace(method="bitfit", target_modules=["all-linear"])  # nothing of its own per token
    layer = layer_activation_bytes(shape, plain, rows, seq, b)
    attention = shape.norms_per_layer // 2 * (4 * shape.hidden_size + 4) + b * (2 * shape.q_width + 2 * shape.kv_width)
    if config.method == "pfeiffer":
        attention += (2 if config.fused_ops else 3) * shape.intermediate_size * b
    return min(layer, rows * seq * attention)


def prefix_cache_bytes(shape: ModelShape, config: TrainConfig, rows: int, b: int) -> int:
    """Prefix tuning's key/value cache: each row's copy of the prefix's keys and values in every layer, kept by the
    attention for backward: rows x L x n x 2 x the key/value width x b."""
    if config.method != "prefix_tuning":
        return 0
    return rows * shape.num_hidden_layers * config.num_virtual_tokens * 2 * shape.kv_width * b


def full_head_bytes(shape: ModelShape, rows: int, seq: int, trained: int, b: int) -> int:
    """The output head of the prompt-learning methods, which run PEFT's own forward (not the chunked head): the
    [rows, seq, V] logits (b), the trained positions' float32 logits and log-softmax (2 x 4 x V each)."""
    v = shape.vocab_size
    return rows * seq * v * b + trained * v * 8
