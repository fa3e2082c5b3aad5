"""The parameter-efficient methods a run can train, and what each one allows: one table, pure Python.

The config's checks (:mod:`core.config`), the memory estimate, the export's refusals and the studio's Set up page
all read this table; the engine builds each method in :mod:`engine.train.methods`. A method that cannot do
something says why here, in a sentence a person can act on, and the config refuses it before anything loads.

Families:

- ``lora``: a low-rank update ``W0 + s B A`` of the linear layers (LoRA, QLoRA on a 4-bit base, DoRA / QDoRA with a
  trained magnitude, VeRA with frozen shared random matrices and trained scaling vectors); folds into the weights.
- ``scaling``: IA3, learned vectors that rescale the keys, values and the MLP's inner activations; folds in.
- ``bias``: BitFit-style bias tuning, a trained bias vector added to each linear layer's output (PEFT's BEFT
  tuner); folds in only where the layers have a bias of their own.
- ``prompt``: prompt tuning (trained soft-prompt embeddings before the input), P-tuning (the same, produced by a
  small encoder) and prefix tuning (trained keys and values every attention layer sees first); extra inputs, not
  weights, so nothing folds in.
- ``bottleneck``: sequential bottleneck adapters (down-projection, non-linearity, up-projection, residual) after
  the attention and the MLP (Houlsby) or after the MLP only (Pfeiffer); the non-linearity keeps them out of the
  weights.
- ``full``: no adapter, every weight of the model trained (the student of a distillation is the usual case); the run
  saves a whole model folder, which is also its merged export.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a method may be refused for, the name a refusal gives.
PACKING = "packing"
PAIRS = "dpo"  # DPO and the other objectives that compare the model with the one training started from
MERGE = "merge"  # the merged and GGUF exports
DISTRIBUTED = "distributed"  # several processes (train --nproc N)
SAMPLING = "sampling"  # objectives that sample answers with the engine's decode loop (GRPO, on-policy distillation)
BASE_4BIT = "4bit"  # the weights stored in 4-bit NF4 (a method whose base_4bit is true)
REWARD_HEAD = "reward"  # the reward objective: an adapter and a scalar head saved on the base

LORA_INITS = ("default", "pissa", "olora", "loftq")
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")

_PROMPT_PACKING = (
    "its virtual tokens (or prefix) belong in front of each sequence, and a packed row holds several sequences "
    "whose attention is kept apart: set packing to false"
)
_ONE_PROCESS = "it is trained in one process here: run it without --nproc"
_NO_SAMPLING = (
    "the engine's decode loop, which samples the answers, does not feed its virtual tokens (or prefix), so they "
    "would not be the trained model's: choose SFT or DPO"
)
_FULL_4BIT = (
    "a full fine-tune updates the weights themselves, and 4-bit NF4 weights cannot take small updates (the "
    "rounding eats them), so there is no QLoRA-style full fine-tune: train in 16 or 32 bits, or choose qlora"
)
_NO_FOLD_PROMPT = (
    "it trains extra inputs (virtual tokens or a key/value prefix), not weights, so nothing folds into the model: "
    "export the adapter (the model card shows how to load it)"
)


@dataclass(frozen=True)
class Method:
    """One trainable method: what it is, what it trains and costs (one sentence for Set up), what it allows."""

    name: str
    label: str
    family: str  # lora | scaling | bias | prompt | bottleneck | full
    summary: str  # what it trains and what it costs, one sentence
    base_4bit: bool = False  # the frozen base is stored in 4-bit NF4
    refusals: tuple[tuple[str, str], ...] = ()  # (capability, why not) for each thing it cannot do

    def refusal(self, capability: str) -> str:
        """Why this method cannot do ``capability`` ("" when it can)."""
        return dict(self.refusals).get(capability, "")

    def allows(self, capability: str) -> bool:
        return not self.refusal(capability)

    @property
    def peft_lora(self) -> bool:
        """Built with PEFT's LoRA tuner (LoRA, QLoRA, DoRA, QDoRA): the init choices and LoRA+ apply."""
        return self.name in ("lora", "qlora", "dora", "qdora")


TABLE: tuple[Method, ...] = (
    Method(
        "lora",
        "LoRA",
        "lora",
        "Trains a rank-r update B A beside each linear layer of a 16-bit base: 2 r (in + out) parameters a layer, "
        "the base's memory plus little.",
    ),
    Method(
        "qlora",
        "QLoRA",
        "lora",
        "LoRA on a base stored in 4-bit NF4: the same trained parameters, about a quarter of the base's memory, "
        "slower steps (the weights are dequantised as they are used).",
        base_4bit=True,
    ),
    Method(
        "dora",
        "DoRA",
        "lora",
        "LoRA's update split into a trained magnitude per output and a direction: LoRA's parameters plus one "
        "vector a layer, and a weight norm computed every step.",
    ),
    Method(
        "qdora",
        "QDoRA",
        "lora",
        "DoRA on a 4-bit NF4 base: DoRA's parameters at about a quarter of the base's memory.",
        base_4bit=True,
    ),
    Method(
        "vera",
        "VeRA",
        "lora",
        "A low-rank update through frozen random matrices shared by all layers, only two scaling vectors a layer "
        "trained: far fewer parameters than LoRA at the same rank (ranks of 256 are usual).",
        refusals=((DISTRIBUTED, _ONE_PROCESS),),
    ),
    Method(
        "ia3",
        "IA3",
        "scaling",
        "Trains vectors that rescale the attention's keys and values and the MLP's inner activations: a few "
        "thousand parameters, almost no memory above the model.",
        refusals=((DISTRIBUTED, _ONE_PROCESS),),
    ),
    Method(
        "bitfit",
        "BitFit",
        "bias",
        "Trains a bias vector added to each linear layer's output (on a model without biases, such as Llama, new "
        "zero-initialised ones): one vector a layer, almost no memory above the model.",
        refusals=((DISTRIBUTED, _ONE_PROCESS),),
    ),
    Method(
        "prompt_tuning",
        "Prompt tuning",
        "prompt",
        "Trains n soft-prompt embeddings put before every input: n x hidden parameters, and n extra positions in "
        "every sequence's activations.",
        refusals=(
            (PACKING, _PROMPT_PACKING),
            (MERGE, _NO_FOLD_PROMPT),
            (DISTRIBUTED, _ONE_PROCESS),
            (SAMPLING, _NO_SAMPLING),
        ),
    ),
    Method(
        "p_tuning",
        "P-tuning",
        "prompt",
        "Soft-prompt embeddings produced by a small trained MLP encoder: the encoder's parameters, and n extra "
        "positions in every sequence's activations.",
        refusals=(
            (PACKING, _PROMPT_PACKING),
            (MERGE, _NO_FOLD_PROMPT),
            (DISTRIBUTED, _ONE_PROCESS),
            (SAMPLING, _NO_SAMPLING),
        ),
    ),
    Method(
        "prefix_tuning",
        "Prefix tuning",
        "prompt",
        "Trains n key and value vectors that every attention layer sees before the input: 2 x layers x n x the "
        "key/value width parameters, and that prefix in every sequence's key/value cache.",
        refusals=(
            (PACKING, _PROMPT_PACKING),
            (MERGE, _NO_FOLD_PROMPT),
            (DISTRIBUTED, _ONE_PROCESS),
            (SAMPLING, _NO_SAMPLING),
        ),
    ),
    Method(
        "houlsby",
        "Houlsby adapter",
        "bottleneck",
        "Trains a small bottleneck (hidden / reduction factor wide) after each layer's attention and after its MLP: "
        "about 2 x 2 x hidden^2 / factor parameters a layer, and the bottleneck's activations.",
        refusals=(
            (
                MERGE,
                "its non-linearity between the two projections does not fold into a linear weight: export the adapter "
                "(with its loader)",
            ),
            (DISTRIBUTED, _ONE_PROCESS),
        ),
    ),
    Method(
        "pfeiffer",
        "Pfeiffer adapter",
        "bottleneck",
        "Trains one small bottleneck (hidden / reduction factor wide) after each layer's MLP: half Houlsby's "
        "parameters, about 2 x hidden^2 / factor a layer.",
        refusals=(
            (
                MERGE,
                "its non-linearity between the two projections does not fold into a linear weight: export the adapter "
                "(with its loader)",
            ),
            (DISTRIBUTED, _ONE_PROCESS),
        ),
    ),
    Method(
        "full",
        "Full fine-tune",
        "full",
        "Trains every weight of the model, no adapter: all its parameters, their gradients and two AdamW states "
        "each (about 16 bytes a parameter), and the run saves a whole model folder. For small models, such as a "
        "distilled student.",
        refusals=(
            (BASE_4BIT, _FULL_4BIT),
            (
                REWARD_HEAD,
                "a reward model is saved as an adapter and a scalar head on its base: train it with an adapter "
                "method (lora)",
            ),
            (
                DISTRIBUTED,
                "it is trained in one process here (its whole-model checkpoints are not sharded): run it without "
                "--nproc",
            ),
        ),
    ),
)

BY_NAME: dict[str, Method] = {m.name: m for m in TABLE}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def method(name: str) -> Method:
    """The table's entry for ``name`` (KeyError for a name not in it)."""
    return BY_NAME[name]


def lora_init_refusal(lora_init: str, method_name: str, pairs: bool) -> str:
    """Why ``lora_init`` cannot be used with this method and objective ("" when it can)."""
    entry = BY_NAME.get(method_name)
    if lora_init == "default" or entry is None:
        return ""
    if not entry.peft_lora or method_name in ("dora", "qdora"):
        return f"{lora_init} initialises LoRA's matrices: choose method lora{' or qlora' * (lora_init == 'loftq')}"
    if lora_init == "loftq":
        return "" if entry.base_4bit else "LoftQ initialises LoRA for a 4-bit base: choose method qlora"
    if entry.base_4bit:
        return (
            f"{lora_init} moves the weights' principal part into the adapter and rewrites the base, which a 4-bit "
            "base cannot hold exactly: use loftq with qlora, or {lora_init} with lora"
        ).replace("{lora_init}", lora_init)
    if pairs:
        return (
            f"{lora_init} takes the weights' principal part out of the base into the adapter, so the model without "
            "the adapter (DPO's reference) is not the one training started from: use the default init, or start "
            "DPO from a finished run (init_adapter)"
        )
    return ""
