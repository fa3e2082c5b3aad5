"""The training run's configuration: one typed, validated dataclass.

Pure Python (no torch, no Qt) so that the studio can build, validate and show a
config without importing the ML stack. Every field carries a one-sentence help
text in its metadata; the studio uses it for tooltips and the CLI for errors.

A config round-trips through JSON and YAML::

    cfg = TrainConfig.from_dict(yaml.safe_load(text))
    TrainConfig.from_dict(cfg.to_dict()) == cfg
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from finetune_studio.core import methods as _methods

METHODS = _methods.NAMES  # every trainable method, its capabilities in core.methods
OBJECTIVES = ("sft", "dpo", "reward", "grpo", "ppo", "distill")
# What a person reads for each objective (Set up's choice, the Runs table's column).
OBJECTIVE_LABELS = {
    "sft": "SFT",
    "dpo": "DPO",
    "reward": "Reward model",
    "grpo": "GRPO",
    "ppo": "PPO",
    "distill": "Distil",
}
SAMPLING_OBJECTIVES = ("grpo", "ppo")  # online RL: answers sampled from the policy, scored with ``rewards``
# How an objective's step is shaped, for the memory estimate (core.memory.estimate): the engine's objectives say the
# same (tests/engine/test_reward_model.py checks that they agree).
PAIR_OBJECTIVES = ("dpo", "reward")  # each example is a preference pair: chosen and rejected, two sequences
SCALAR_HEAD_OBJECTIVES = ("reward",)  # a scalar head at each sequence's last token instead of the output head
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
SCHEDULERS = ("linear", "cosine", "constant")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
DTYPES = ("auto", "float32", "bfloat16", "float16", "bf16-mixed")
LOSS_ON = ("assistant", "all")
PARALLELISMS = ("ddp", "fsdp")
LONGEST_FIRST = ("auto", "on", "off")
DISTILL_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TEACHER_PRECISIONS = ("auto", "16-bit", "4-bit")
KERNELS = ("auto", "triton", "torch")
GRPO_LOSSES = ("sequence", "token", "dr_grpo")

# The whole-number fields' allowed ranges (inclusive). The upper bounds keep a typo or an exponent (1e30, 2**70) from
# reaching the trainer, where it would overflow, run for ever, or read as running out of memory.
INT_RANGES: dict[str, tuple[int, int]] = {
    "max_steps": (1, 10**9),
    "batch_size": (1, 65_536),
    "gradient_accumulation_steps": (1, 4096),
    "max_length": (8, 2**20),
    "lora_rank": (1, 2**20),  # the model's layer width bounds it further once the model is known
    "seed": (0, 2**32 - 1),  # what every random generator the run seeds takes
    "num_threads": (0, 1024),
    "warmup_steps": (0, 10**9),
    "eval_every": (0, 10**9),
    "checkpoint_every": (0, 10**9),
    "max_eval_examples": (0, 10**9),
    "sample_prompts": (0, 10_000),
    "sample_max_new_tokens": (0, 2**20),
    "early_stopping_patience": (0, 10**6),
    "grpo_group_size": (2, 1024),  # one answer alone has no group to be better than
    "grpo_max_new_tokens": (1, 2**16),
    "grpo_updates_per_batch": (1, 64),
    "ppo_samples_per_prompt": (1, 1024),
    "ppo_max_new_tokens": (1, 2**16),
    "ppo_epochs": (1, 64),
    "num_virtual_tokens": (1, 4096),
    "adapter_reduction_factor": (1, 4096),
    "distill_student_layers": (0, 4096),  # below the model's layers, checked once the model is known
}
MAX_EPOCHS = 1_000_000


class ConfigError(ValueError):
    """A config value a person must change; the message names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _f(default: Any, help: str, *, advanced: bool = False, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    meta: dict[str, Any] = {"help": help, "advanced": advanced}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Field help is shown as tooltips."""

    # --- what to train -----------------------------------------------------
    model: str = _f(
        "default",
        "Model to fine-tune: 'default' (bundled SmolLM2-135M-Instruct), a local model "
        "folder, a .gguf file, or a Hugging Face hub id already in the local cache.",
    )
    dataset: str = _f(
        "",
        "Training data: a JSON, JSONL, CSV, TSV or Parquet file, or a folder saved by `datasets`; for DPO and "
        "reward also 'pairs:latest' (the preference store now) or 'pairs:<snapshot id>' (an earlier export).",
    )
    dataset_mapping: dict[str, Any] = _f(
        {},
        "Optional column/role mapping that overrides format detection, e.g. "
        "{'prompt': 'question', 'chosen': 'good', 'rejected': 'bad'}.",
        advanced=True,
    )
    method: str = _f(
        "lora",
        "Adapter method: LoRA (16-bit base), QLoRA (4-bit NF4 base), DoRA (magnitude + direction), QDoRA (DoRA on "
        "a 4-bit base), VeRA, IA3, BitFit (biases), prompt tuning, P-tuning, prefix tuning, a bottleneck adapter "
        "(Houlsby or Pfeiffer), or full (every weight trained, no adapter); core.methods says what each trains and "
        "allows.",
        choices=METHODS,
    )
    objective: str = _f(
        "sft",
        "SFT learns to imitate the answers; DPO learns to prefer the chosen answer over the rejected one; reward "
        "trains a reward model (the adapter and a scalar head) that scores answers as the preference pairs do; "
        "GRPO and PPO learn online from sampled answers scored by the rewards (PPO with a value head); "
        "distill teaches this (smaller) model the output distribution of a teacher (distill_teacher).",
        choices=OBJECTIVES,
    )
    run_name: str = _f("", "A name for the run shown in the runs list; empty picks one from model and method.")
    init_adapter: str = _f(
        "",
        "Start from an adapter instead of a fresh one: a run id (its final adapter), RUN:step-000050 (a checkpoint; "
        "RUN:best for the best one), or an exported adapter folder. Its rank and layers are kept. For DPO the "
        "reference model is this starting model.",
    )

    # --- the basics ---------------------------------------------------------
    max_steps: int = _f(100, "Number of optimizer steps to train for.")
    learning_rate: float = _f(2e-4, "Peak learning rate; 1e-4 to 3e-4 suits LoRA, about 10x lower for DPO.")
    batch_size: int = _f(4, "Examples per forward pass; lower it first when memory runs out.")
    gradient_accumulation_steps: int = _f(
        1, "Forward passes summed per optimizer step; effective batch = batch_size x this."
    )
    max_length: int = _f(512, "Longest sequence in tokens; longer examples are truncated. Memory grows with it.")
    lora_rank: int = _f(16, "Rank r of the adapter matrices; higher learns more and costs more memory.")
    lora_alpha: float = _f(
        32.0, "Adapter scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."
    )
    seed: int = _f(42, "Random seed; the same seed and data give the same run.")

    # --- adapter details ----------------------------------------------------
    lora_dropout: float = _f(0.0, "Dropout on the adapter input during training.", advanced=True)
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.", advanced=True)
    lora_init: str = _f(
        "default",
        "LoRA's initialisation: default (B = 0), PiSSA or OLoRA (the adapter starts as the weights' principal part, "
        "taken out of the base; 16-bit LoRA, SFT) or LoftQ (QLoRA: the adapter starts by correcting the 4-bit "
        "rounding of the base).",
        advanced=True,
        choices=_methods.LORA_INITS,
    )
    loraplus_lr_ratio: float = _f(
        1.0,
        "LoRA+: the B matrices learn at this many times the learning rate (the paper suggests 16); 1 is plain LoRA.",
        advanced=True,
    )
    num_virtual_tokens: int = _f(
        20, "Prompt tuning, P-tuning and prefix tuning: the number of virtual tokens (prefix length).", advanced=True
    )
    adapter_reduction_factor: int = _f(
        16, "Bottleneck adapters: the bottleneck is the hidden size divided by this.", advanced=True
    )
    adapter_non_linearity: str = _f(
        "relu",
        "Bottleneck adapters: the non-linearity between the down- and up-projection.",
        advanced=True,
        choices=_methods.NON_LINEARITIES,
    )
    target_modules: list[str] = _f(
        ["all-linear"],
        "Layers that get adapters: 'all-linear' (every linear layer but "
        "the output head) or module names such as q_proj, v_proj.",
        advanced=True,
    )
    compute_dtype: str = _f(
        "auto",
        "Precision of the computation: auto picks bfloat16 on GPUs that support it, float16 on older GPUs, "
        "bf16-mixed on CPUs with AVX-512 BF16 or AMX (one process), float32 on other CPUs. bf16-mixed multiplies "
        "by the frozen base weights in bfloat16 (stored in bfloat16, or a 4-bit base dequantised to bfloat16; about "
        "2x faster there) and keeps the adapters, the residual stream, norms, attention and the output head in "
        "float32, so it learns like float32.",
        advanced=True,
        choices=DTYPES,
    )
    num_threads: int = _f(
        0,
        "CPU threads for the computation; 0 picks one fewer than the physical cores (at least 1), so the app "
        "and other programs beside the run do not stall it.",
        advanced=True,
    )

    # --- optimisation -------------------------------------------------------
    optimizer: str = _f(
        "adamw",
        "AdamW keeps two float32 states per trainable parameter; 8-bit AdamW stores "
        "them in 8 bits; paged variants spill them to CPU memory under pressure (CUDA only).",
        advanced=True,
        choices=OPTIMIZERS,
    )
    weight_decay: float = _f(0.0, "Decoupled weight decay applied by AdamW.", advanced=True)
    lr_scheduler: str = _f("cosine", "How the learning rate falls after warm-up.", advanced=True, choices=SCHEDULERS)
    warmup_steps: int = _f(0, "Steps over which the learning rate rises linearly from 0 to its peak.", advanced=True)
    max_grad_norm: float = _f(
        1.0, "Clip the gradient's global norm to this value; 0 turns clipping off.", advanced=True
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute activations in the backward pass: much less memory, about 30% slower.", advanced=True
    )
    fused_ops: bool = _f(
        True,
        "Memory-saving fused ops for Llama-family models (SwiGLU MLP and RMSNorm that save less for backward): "
        "the same numbers, less activation memory; off runs transformers' own modules.",
        advanced=True,
    )
    packing: bool = _f(
        True,
        "Pack each batch's examples into one row with no padding, attention kept within each example: the same "
        "loss, less work and memory when examples differ in length.",
        advanced=True,
    )
    num_epochs: float = _f(0.0, "If above 0, train this many passes over the data instead of max_steps.", advanced=True)
    longest_batch_first: str = _f(
        "auto",
        "Train on the longest batch first, so a run that cannot fit fails at step 1: auto does it when the "
        "memory estimate is within 15% of the device.",
        advanced=True,
        choices=LONGEST_FIRST,
    )

    # --- data and evaluation ------------------------------------------------
    loss_on: str = _f(
        "assistant",
        "SFT: compute the loss on the assistant's tokens only, or on every token.",
        advanced=True,
        choices=LOSS_ON,
    )
    validation_fraction: float = _f(
        0.1, "Share of prompts held out for the eval loss (split by prompt).", advanced=True
    )
    eval_every: int = _f(25, "Compute the eval loss every this many steps; 0 turns it off.", advanced=True)
    max_eval_examples: int = _f(64, "At most this many held-out examples per evaluation.", advanced=True)
    checkpoint_every: int = _f(
        50, "Save a resumable checkpoint every this many steps; 0 saves only at the end.", advanced=True
    )
    sample_prompts: int = _f(
        3,
        "At each evaluation, answer this many fixed validation prompts (greedy) and show them; 0: none.",
        advanced=True,
    )
    sample_max_new_tokens: int = _f(48, "Longest sampled answer at an evaluation, in tokens.", advanced=True)
    early_stopping_patience: int = _f(
        0,
        "Stop when the eval loss has not improved for this many evaluations in a row, keeping the best "
        "checkpoint; 0 turns early stopping off.",
        advanced=True,
    )

    # --- DPO ----------------------------------------------------------------
    dpo_beta: float = _f(0.1, "DPO temperature beta: higher keeps the model closer to the reference.", advanced=True)
    dpo_loss: str = _f(
        "sigmoid",
        "DPO loss: sigmoid (the paper's), IPO (squared, regularised) or hinge.",
        advanced=True,
        choices=DPO_LOSSES,
    )
    dpo_label_smoothing: float = _f(
        0.0, "Assumed share of flipped preference labels (conservative DPO).", advanced=True
    )
    precompute_reference: bool = _f(
        False,
        "Compute the reference log-probs once before training: one forward pass per example saved per epoch.",
        advanced=True,
    )

    # --- reward model -------------------------------------------------------
    reward_margin: float = _f(
        0.0,
        "Reward model: the chosen answer must out-score the rejected one by this much before the loss lets go "
        "(-log sigmoid(r_chosen - r_rejected - margin)); 0 is the plain Bradley-Terry loss. Pairs carry no "
        "strength, so one margin serves every pair.",
        advanced=True,
    )

    kernels: str = _f(
        "auto",
        "Fast kernels for the output head's log-probs and DoRA's weight norm: auto uses a Triton kernel only where "
        "it was measured faster on this kind of GPU; triton forces them (CUDA GPU and the triton package); torch "
        "keeps the PyTorch paths.",
        advanced=True,
        choices=KERNELS,
    )

    # --- distillation (objective distill) ---------------------------------------
    distill_teacher: str = _f(
        "",
        "Distillation: the teacher, a model ('default', a local folder, a .gguf file, a hub id in the cache) or an "
        "adapter on its base (a run id for its final adapter, RUN:best, RUN:step-000050, or an adapter folder). "
        "It must use the student's tokenizer.",
    )
    distill_alpha: float = _f(
        0.5,
        "Distillation: the loss is alpha x T^2 x the divergence to the teacher + (1 - alpha) x the cross-entropy of "
        "the trained tokens; 1 learns from the teacher alone, 0 is plain SFT.",
        advanced=True,
    )
    distill_temperature: float = _f(
        1.0,
        "Distillation: both models' logits are divided by T before the divergence; above 1 softens them.",
        advanced=True,
    )
    distill_divergence: str = _f(
        "forward_kl",
        "Distillation: forward KL(teacher || student) covers all the teacher's choices; reverse KL(student || "
        "teacher) settles on its likeliest; JSD blends the two by distill_jsd_beta.",
        advanced=True,
        choices=DISTILL_DIVERGENCES,
    )
    distill_jsd_beta: float = _f(
        0.5, "Distillation with JSD: the teacher's weight in the mixture, between 0 and 1 (exclusive).", advanced=True
    )
    distill_on_policy: bool = _f(
        False,
        "Distillation on the student's own answers (sampled at each step, the teacher scoring them) instead of the "
        "dataset's.",
        advanced=True,
    )
    distill_teacher_precision: str = _f(
        "auto",
        "Distillation: the teacher's weights in the run's compute dtype (auto), in 16 bits, or in 4-bit NF4 (a CUDA "
        "GPU or the CPU); it never trains.",
        advanced=True,
        choices=TEACHER_PRECISIONS,
    )
    distill_student_layers: int = _f(
        0,
        "Distillation: 0 trains the model as it is; N above 0 makes the student the model pruned to N layers, "
        "chosen on the run's training data as the layers whose removal changes its outputs least (pruned once, at "
        "the start, into the run's folder).",
        advanced=True,
    )
    distill_measure_speed: bool = _f(
        True,
        "Distillation: at the end, time greedy generation (new tokens per second) of the teacher and the trained "
        "student on a few prompts, taking turns, and keep the figures with the run.",
        advanced=True,
    )

    # --- online RL (objective grpo) -------------------------------------------
    grpo_group_size: int = _f(
        8,
        "GRPO: answers sampled per prompt (G); each answer's advantage is its reward against its group's mean.",
        advanced=True,
    )
    grpo_max_new_tokens: int = _f(
        128,
        "GRPO: longest sampled answer in tokens; prompts are cut from the front to leave room for it in max_length.",
        advanced=True,
    )
    grpo_temperature: float = _f(
        1.0, "GRPO: sampling temperature of the answers (above 0: a group needs different answers).", advanced=True
    )
    grpo_beta: float = _f(
        0.04,
        "GRPO: weight of the KL penalty to the reference (the model training started from); 0 drops the "
        "reference pass.",
        advanced=True,
    )
    grpo_epsilon: float = _f(
        0.2,
        "GRPO: the probability ratio to the sampling policy is clipped to [1 - epsilon, 1 + epsilon].",
        advanced=True,
    )
    grpo_loss: str = _f(
        "sequence",
        "GRPO loss normalisation: sequence (each answer's mean over its tokens, then the mean over answers), token "
        "(the sum over all answer tokens / their count) or dr_grpo (the sum / (answers x grpo_max_new_tokens), and "
        "advantages not divided by the group's spread).",
        advanced=True,
        choices=GRPO_LOSSES,
    )
    grpo_updates_per_batch: int = _f(
        1,
        "GRPO: optimizer steps taken on each batch of sampled answers (mu), the ratio measured against the policy "
        "that sampled them; 1 is the plain policy gradient.",
        advanced=True,
    )
    # --- online RL with a value head (objective ppo; TRL's PPOConfig names in brackets) ---------------------
    ppo_samples_per_prompt: int = _f(
        1,
        "PPO: answers sampled per prompt (1 as in TRL; more share one prompt's prefill). Each is scored alone: "
        "its advantage comes from the value head, not from the other answers.",
        advanced=True,
    )
    ppo_max_new_tokens: int = _f(
        128,
        "PPO: longest sampled answer in tokens (TRL: response_length); prompts are cut from the front to leave room "
        "for it in max_length.",
        advanced=True,
    )
    ppo_temperature: float = _f(
        1.0, "PPO: sampling temperature of the answers (TRL: temperature); 1 samples the policy itself.", advanced=True
    )
    ppo_epochs: int = _f(
        4,
        "PPO: optimizer steps taken on each batch of sampled answers (TRL: num_ppo_epochs, with one mini-batch), "
        "the ratio measured against the policy that sampled them.",
        advanced=True,
    )
    ppo_cliprange: float = _f(
        0.2,
        "PPO: the probability ratio to the sampling policy is clipped to [1 - cliprange, 1 + cliprange] (TRL: "
        "cliprange).",
        advanced=True,
    )
    ppo_cliprange_value: float = _f(
        0.2,
        "PPO: the value head's prediction may move at most this far from its sampling-time value before the value "
        "loss stops pushing it (TRL: cliprange_value).",
        advanced=True,
    )
    ppo_vf_coef: float = _f(0.1, "PPO: weight of the value loss beside the policy loss (TRL: vf_coef).", advanced=True)
    ppo_kl_coef: float = _f(
        0.05,
        "PPO: each answer token's reward is -kl_coef x (log pi_old - log pi_ref), the KL penalty to the reference "
        "(the model training started from); 0 drops the reference pass (TRL: kl_coef).",
        advanced=True,
    )
    ppo_gamma: float = _f(
        1.0, "PPO: discount of later tokens' rewards in the advantages and returns (TRL: gamma).", advanced=True
    )
    ppo_lambda: float = _f(
        0.95,
        "PPO: GAE's lambda, between the one-step estimate (0) and the whole answer's return (1) (TRL: lam).",
        advanced=True,
    )
    rewards: list[dict[str, Any]] = _f(
        [],
        "GRPO and PPO: the reward functions and their weights, e.g. [{'kind': 'json_valid'}, {'kind': 'exact_match', "
        "'column': 'answer', 'weight': 2}]; kinds: json_valid, json_schema, exact_match, token_f1, regex, length, "
        "contains, not_contains, think_answer, python (your function, run in a sandbox), reward_model.",
        advanced=True,
    )

    # --- several processes (train --nproc N) ------------------------------------
    parallelism: str = _f(
        "ddp",
        "With several processes (GPUs): DDP replicates the model and all-reduces the adapter's gradients; "
        "FSDP shards parameters (a 4-bit base too), gradients and optimizer states across the processes.",
        advanced=True,
        choices=PARALLELISMS,
    )

    # --- safety -------------------------------------------------------------
    allow_pickle: bool = _f(
        False, "Allow loading .bin/.pt pickle checkpoints, which can run arbitrary code.", advanced=True
    )
    trust_remote_code: bool = _f(False, "Allow running Python code shipped inside a model folder.", advanced=True)
    ignore_memory_check: bool = _f(
        False,
        "Start even when the memory estimate says the run will not fit (the system may then end it).",
        advanced=True,
    )

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(name, msg)

        need(isinstance(self.model, str) and self.model.strip() != "", "model", "name a model")
        need(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, not {self.method!r}")
        need(
            self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}"
        )
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            need(
                _is_int(value) and low <= value <= high,
                name,
                f"must be a whole number from {low:,} to {high:,}, not {_show(value)}",
            )
        need(
            _num(self.learning_rate) and 0 < self.learning_rate < 1,
            "learning_rate",
            f"must be between 0 and 1 (typical: 2e-4), not {self.learning_rate!r}",
        )
        need(
            _num(self.lora_alpha) and 0 < self.lora_alpha <= 1e6,
            "lora_alpha",
            f"must be a number above 0 and at most 1,000,000 (typical: 2 x lora_rank), not {_show(self.lora_alpha)}",
        )
        need(_num(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(
            _num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be a finite number of at least 0"
        )
        need(
            _num(self.max_grad_norm) and self.max_grad_norm >= 0,
            "max_grad_norm",
            "must be a finite number of at least 0",
        )
        need(
            _num(self.num_epochs) and 0 <= self.num_epochs <= MAX_EPOCHS,
            "num_epochs",
            f"must be a number from 0 to {MAX_EPOCHS:,} (0: train for max_steps), not {_show(self.num_epochs)}",
        )
        need(
            _num(self.validation_fraction) and 0 <= self.validation_fraction < 0.9,
            "validation_fraction",
            "must be in [0, 0.9)",
        )
        need(_num(self.dpo_beta) and self.dpo_beta > 0, "dpo_beta", "must be a finite number above 0 (typical: 0.1)")
        need(
            _num(self.reward_margin) and 0 <= self.reward_margin <= 100,
            "reward_margin",
            f"must be a number from 0 to 100 (typical: 0), not {_show(self.reward_margin)}",
        )
        need(
            _num(self.dpo_label_smoothing) and 0 <= self.dpo_label_smoothing < 0.5,
            "dpo_label_smoothing",
            "must be in [0, 0.5)",
        )
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        need(self.lr_scheduler in SCHEDULERS, "lr_scheduler", f"must be one of {', '.join(SCHEDULERS)}")
        need(self.dpo_loss in DPO_LOSSES, "dpo_loss", f"must be one of {', '.join(DPO_LOSSES)}")
        need(self.compute_dtype in DTYPES, "compute_dtype", f"must be one of {', '.join(DTYPES)}")
        need(self.loss_on in LOSS_ON, "loss_on", f"must be one of {', '.join(LOSS_ON)}")
        need(self.kernels in KERNELS, "kernels", f"must be one of {', '.join(KERNELS)}, not {self.kernels!r}")
        need(self.parallelism in PARALLELISMS, "parallelism", f"must be one of {', '.join(PARALLELISMS)}")
        self._check_method()
        need(
            self.objective != "distill"
            or (isinstance(self.distill_teacher, str) and bool(self.distill_teacher.strip())),
            "distill_teacher",
            "name the teacher: a model folder, 'default', or a run id / adapter folder of a tuned model",
        )
        need(_num(self.distill_alpha) and 0 <= self.distill_alpha <= 1, "distill_alpha", "must be in [0, 1]")
        need(
            _num(self.distill_temperature) and 0 < self.distill_temperature <= 100,
            "distill_temperature",
            f"must be above 0 and at most 100 (typical: 1 or 2), not {_show(self.distill_temperature)}",
        )
        need(
            self.distill_divergence in DISTILL_DIVERGENCES,
            "distill_divergence",
            f"must be one of {', '.join(DISTILL_DIVERGENCES)}, not {self.distill_divergence!r}",
        )
        need(
            _num(self.distill_jsd_beta) and 0 < self.distill_jsd_beta < 1,
            "distill_jsd_beta",
            "must be between 0 and 1, exclusive (0 and 1 are the two KLs: choose forward_kl or reverse_kl)",
        )
        need(
            self.objective == "distill" or not self.distill_student_layers,
            "distill_student_layers",
            f"prunes the student of a distillation: set objective to distill, or set it to 0 (now "
            f"{_show(self.distill_student_layers)})",
        )
        need(
            not (self.distill_student_layers and self.init_adapter),
            "distill_student_layers",
            "prunes the model at the run's start, so an adapter made for another model cannot continue on it: to go "
            "on from an earlier run's student, set model to that run's student folder (<run folder>/student), "
            "init_adapter to the run, and this to 0",
        )
        need(
            self.distill_teacher_precision in TEACHER_PRECISIONS,
            "distill_teacher_precision",
            f"must be one of {', '.join(TEACHER_PRECISIONS)}",
        )
        need(
            _num(self.grpo_temperature) and 0 < self.grpo_temperature <= 10,
            "grpo_temperature",
            f"must be above 0 and at most 10 (typical: 1), not {_show(self.grpo_temperature)}",
        )
        need(
            _num(self.grpo_beta) and 0 <= self.grpo_beta <= 100,
            "grpo_beta",
            f"must be a number from 0 to 100 (typical: 0.04; 0: no KL term), not {_show(self.grpo_beta)}",
        )
        need(
            _num(self.grpo_epsilon) and 0 < self.grpo_epsilon < 1,
            "grpo_epsilon",
            f"must be above 0 and below 1 (typical: 0.2), not {_show(self.grpo_epsilon)}",
        )
        need(
            self.grpo_loss in GRPO_LOSSES,
            "grpo_loss",
            f"must be one of {', '.join(GRPO_LOSSES)}, not {self.grpo_loss!r}",
        )
        need(
            self.objective != "grpo" or self.grpo_max_new_tokens < self.max_length,
            "grpo_max_new_tokens",
            f"must be below max_length ({self.max_length}): the prompt and the answer share it",
        )
        self._check_ppo()
        need(
            self.longest_batch_first in LONGEST_FIRST,
            "longest_batch_first",
            f"must be one of {', '.join(LONGEST_FIRST)}",
        )
        need(
            isinstance(self.target_modules, list)
            and len(self.target_modules) > 0
            and all(isinstance(m, str) and m for m in self.target_modules),
            "target_modules",
            "must be a non-empty list of module names, or ['all-linear']",
        )
        need(isinstance(self.dataset_mapping, dict), "dataset_mapping", "must be a mapping of names")
        from finetune_studio.core.rewards.spec import parse_rewards  # it reads ConfigError from this module

        parse_rewards(self.rewards)  # ConfigError("rewards", ...) naming the entry
        need(
            self.objective not in SAMPLING_OBJECTIVES or bool(self.rewards),
            "rewards",
            f"{OBJECTIVE_LABELS.get(self.objective, '')} scores its sampled answers with rewards: list at least one, "
            "e.g. [{'kind': 'json_valid'}]",
        )
        need(
            not self.early_stopping_patience or (self.eval_every > 0 and self.validation_fraction > 0),
            "early_stopping_patience",
            "needs evaluations: set eval_every and validation_fraction above 0",
        )
        need(
            not self.dataset.startswith("pairs:") or self.objective in ("dpo", "reward"),
            "dataset",
            "the preference store (pairs:...) holds preference pairs: choose the DPO or reward objective",
        )
        for flag in (
            "use_rslora",
            "gradient_checkpointing",
            "fused_ops",
            "packing",
            "precompute_reference",
            "distill_on_policy",
            "distill_measure_speed",
            "allow_pickle",
            "trust_remote_code",
            "ignore_memory_check",
        ):
            need(isinstance(getattr(self, flag), bool), flag, "must be true or false")

    def _check_ppo(self) -> None:
        """PPO's settings (``ppo_*``), each refused naming its field."""

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(name, msg)

        need(
            _num(self.ppo_temperature) and 0 < self.ppo_temperature <= 10,
            "ppo_temperature",
            f"must be above 0 and at most 10 (typical: 1), not {_show(self.ppo_temperature)}",
        )
        need(
            _num(self.ppo_cliprange) and 0 < self.ppo_cliprange < 1,
            "ppo_cliprange",
            f"must be above 0 and below 1 (typical: 0.2), not {_show(self.ppo_cliprange)}",
        )
        need(
            _num(self.ppo_cliprange_value) and 0 < self.ppo_cliprange_value <= 100,
            "ppo_cliprange_value",
            f"must be above 0 and at most 100, in the rewards' units (typical: 0.2), not "
            f"{_show(self.ppo_cliprange_value)}",
        )
        need(
            _num(self.ppo_vf_coef) and 0 <= self.ppo_vf_coef <= 100,
            "ppo_vf_coef",
            f"must be a number from 0 to 100 (typical: 0.1), not {_show(self.ppo_vf_coef)}",
        )
        need(
            _num(self.ppo_kl_coef) and 0 <= self.ppo_kl_coef <= 100,
            "ppo_kl_coef",
            f"must be a number from 0 to 100 (typical: 0.05; 0: no KL penalty), not {_show(self.ppo_kl_coef)}",
        )
        for name, typical in (("ppo_gamma", 1), ("ppo_lambda", 0.95)):
            value = getattr(self, name)
            need(_num(value) and 0 <= value <= 1, name, f"must be from 0 to 1 (typical: {typical}), not {_show(value)}")
        need(
            self.objective != "ppo" or self.ppo_max_new_tokens < self.max_length,
            "ppo_max_new_tokens",
            f"must be below max_length ({self.max_length}): the prompt and the answer share it",
        )

    def _check_method(self) -> None:
        """What the method cannot do, refused here (before anything loads), naming the field to change."""
        entry = _methods.method(self.method)
        if self.packing and not entry.allows(_methods.PACKING):
            raise ConfigError("packing", f"{entry.label} cannot train on packed rows: {entry.refusal('packing')}")
        if (self.objective in SAMPLING_OBJECTIVES or self.distill_on_policy) and not entry.allows(_methods.SAMPLING):
            field_name = "objective" if self.objective in SAMPLING_OBJECTIVES else "distill_on_policy"
            raise ConfigError(
                field_name, f"{entry.label} cannot learn from sampled answers: {entry.refusal('sampling')}"
            )
        if self.trains_on_pairs and not entry.allows(_methods.PAIRS):
            raise ConfigError("objective", f"{entry.label} cannot train {self.objective}: {entry.refusal('dpo')}")
        if self.objective == "reward" and not entry.allows(_methods.REWARD_HEAD):
            raise ConfigError("objective", f"{entry.label} cannot train a reward model: {entry.refusal('reward')}")
        if entry.family == "full":
            if self.objective == "ppo" and self.ppo_kl_coef > 0:
                raise ConfigError(
                    "ppo_kl_coef",
                    "a full fine-tune keeps no copy of its start weights for PPO's KL penalty: set ppo_kl_coef to 0, "
                    "or train an adapter (lora)",
                )
            if self.init_adapter:
                raise ConfigError(
                    "init_adapter",
                    "a full fine-tune starts from the model's own weights, not an adapter: set model to the tuned "
                    "model's folder (a merged export, or a full run's model/ folder) and leave init_adapter empty",
                )
            if self.compute_dtype == "bf16-mixed":
                raise ConfigError(
                    "compute_dtype",
                    "bf16-mixed keeps frozen weights in bfloat16, and a full fine-tune freezes none (updates to "
                    "bfloat16 weights would be rounded away): choose auto, float32 or bfloat16",
                )
        if self.lora_init not in _methods.LORA_INITS:
            raise ConfigError("lora_init", f"must be one of {', '.join(_methods.LORA_INITS)}, not {self.lora_init!r}")
        why = _methods.lora_init_refusal(
            self.lora_init, self.method, self.trains_on_pairs or self.objective in SAMPLING_OBJECTIVES
        )
        if why and not self.init_adapter:
            raise ConfigError("lora_init", why)
        if not (_num(self.loraplus_lr_ratio) and 1 <= self.loraplus_lr_ratio <= 1000):
            raise ConfigError(
                "loraplus_lr_ratio",
                f"must be a number from 1 to 1,000 (1: plain LoRA), not {_show(self.loraplus_lr_ratio)}",
            )
        if self.loraplus_lr_ratio != 1 and not entry.peft_lora:
            raise ConfigError(
                "loraplus_lr_ratio", f"LoRA+ sets the learning rate of LoRA's B matrices; {entry.label} has none"
            )
        if self.adapter_non_linearity not in _methods.NON_LINEARITIES:
            raise ConfigError("adapter_non_linearity", f"must be one of {', '.join(_methods.NON_LINEARITIES)}")

    # --- helpers --------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """True when the frozen base is stored in 4-bit NF4."""
        return _methods.method(self.method).base_4bit

    @property
    def trains_on_pairs(self) -> bool:
        """Each example is a preference pair whose chosen and rejected answers run as two sequences of one batch."""
        return self.objective in PAIR_OBJECTIVES

    @property
    def scalar_head(self) -> bool:
        """The step reads one scalar per sequence at its last token (a reward model): no output head, no logits."""
        return self.objective in SCALAR_HEAD_OBJECTIVES

    @property
    def uses_dora(self) -> bool:
        return self.method in ("dora", "qdora")

    @property
    def display_name(self) -> str:
        if self.run_name:
            return self.run_name
        model = Path(self.model).name if self.model != "default" else "SmolLM2-135M"
        return f"{model} {self.method} {self.objective}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Any) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError("config", "must be a mapping of field names to values")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            hint = ", ".join(f"'{u}'{_did_you_mean(u, known)}" for u in unknown)
            raise ConfigError(unknown[0], f"unknown field(s): {hint}")
        values = {}
        for name, value in data.items():
            values[name] = _coerce(name, known[name], value)
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a YAML or JSON config file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", f"file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml  # pure Python; part of the shared dependencies

                data = yaml.safe_load(text)
        except Exception as exc:
            raise ConfigError("config", f"cannot parse {path.name}: {exc}") from None
        return cls.from_dict(data or {})

    def with_overrides(self, pairs: Iterable[str]) -> TrainConfig:
        """This config with ``--set KEY=VALUE`` overrides applied (see :func:`parse_overrides`), checked again."""
        return type(self).from_dict({**self.to_dict(), **parse_overrides(pairs)})

    @classmethod
    def field_help(cls) -> dict[str, dict[str, Any]]:
        """{name: {'help', 'advanced', 'choices'?, 'default'}} for forms and tooltips."""
        out = {}
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            meta["default"] = (
                f.default if f.default is not dataclasses.MISSING else cast(Callable[[], Any], f.default_factory)()
            )
            out[f.name] = meta
        return out


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as ``{key: value}``, each value read as YAML (``3``, ``true``, ``[q_proj, v_proj]``).

    Shared by every command that takes ``--set`` (train, the torchrun launcher, estimate); raises
    :class:`ConfigError` for a pair without ``=`` or a value YAML cannot read.
    """
    import yaml  # pure Python; part of the shared dependencies

    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(key, "--set takes KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(key.strip(), f"cannot read {value!r} as a value: {exc}") from None
    return out


def _num(v: Any) -> bool:
    """A finite real number (not a bool, not NaN or infinity, not an int too large for a float)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: Any) -> str:
    """``v`` for a message: a huge integer (which ``repr`` may refuse to write out) by its size instead."""
    if _is_int(v) and abs(v) >= 10**18:
        try:
            return f"{float(v):.6g}"
        except OverflowError:
            return f"a whole number of about {int(v.bit_length() * math.log10(2)) + 1} digits"
    return repr(v)


def _coerce(name: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """Accept the forms YAML and forms produce (1e-4 as a string, 3.0 for 3)."""
    default = f.default if f.default is not dataclasses.MISSING else cast(Callable[[], Any], f.default_factory)()
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(name, f"must be a whole number, not {value!r}") from None
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(name, f"must be a number, not {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(name, f"must be a finite number, not {_show(value)}") from None
        return value
    if name == "rewards" and isinstance(value, str):
        return _read_rewards(value)
    if isinstance(default, list) and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(default, str) and not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(name, f"must be text, not {value!r}")
    return value


def _did_you_mean(name: str, known: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _read_rewards(text: str) -> Any:
    """``rewards`` given as text (a form, ``--set rewards=...``): YAML or JSON, one mapping or a list of them."""
    import yaml  # pure Python; part of the shared dependencies

    text = text.strip()
    if not text:
        return []
    try:
        value = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
    except yaml.YAMLError as exc:
        example = "[{kind: json_valid}]"
        raise ConfigError(
            "rewards", f"cannot read {text[:80]!r} as a list of rewards such as {example}: {exc}"
        ) from None
    return value
