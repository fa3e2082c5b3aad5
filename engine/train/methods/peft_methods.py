"""PEFT's other methods: VeRA, IA3, bias tuning and the prompt-learning methods, each one config.

- VeRA (Kopiczko et al., 2024): ``W0 x + Lambda_b B Lambda_d A x`` with A and B frozen random matrices shared by
  every layer (from a seed) and only the vectors d (rank r) and b (out) trained per layer.
- IA3 (Liu et al., 2022): the keys, the values and the MLP's down-projection input rescaled by trained vectors
  (initialised to 1); the targets are PEFT's for the architecture.
- Bias tuning (BitFit, Ben Zaken et al., 2022) through PEFT's BEFT tuner: a trained bias vector (initialised to 0)
  added to each targeted linear's output. On a layer with a bias that is training its bias (b + delta); on a
  model without biases (Llama, SmolLM2) it trains new ones, one vector of the layer's output width per linear.
- Prompt tuning (Lester et al., 2021): ``num_virtual_tokens`` trained embeddings put before every input.
  P-tuning (Liu et al., 2021): the same embeddings produced by a small MLP encoder (the encoder trains).
  Prefix tuning (Li and Liang, 2021): trained keys and values that every attention layer sees before the input
  (``num_virtual_tokens`` positions of each layer's key/value cache).
"""

from __future__ import annotations

from typing import Any

from finetune_studio.core.config import TrainConfig


def _targets(config: TrainConfig) -> Any:
    return "all-linear" if config.target_modules == ["all-linear"] else list(config.target_modules)


def config_for(config: TrainConfig) -> Any:
    """The PEFT config of ``config.method`` (not the LoRA family's, :mod:`.lora`)."""
    import peft

    name, n = config.method, config.num_virtual_tokens
    if name == "vera":
        return peft.VeraConfig(
            r=config.lora_rank,
            target_modules=_targets(config),
            vera_dropout=config.lora_dropout,
            projection_prng_key=config.seed,
            save_projection=True,  # the adapter folder carries its frozen matrices: loadable without the seed
            task_type="CAUSAL_LM",
        )
    if name == "ia3":
        # PEFT's targets for the architecture (keys, values, the MLP's down-projection) unless the config names some
        if config.target_modules == ["all-linear"]:
            return peft.IA3Config(task_type="CAUSAL_LM")
        targets = list(config.target_modules)
        return peft.IA3Config(
            target_modules=targets,
            feedforward_modules=[t for t in targets if t in ("down_proj", "fc2", "c_proj", "w2")],
            task_type="CAUSAL_LM",
        )
    if name == "bitfit":
        return peft.BeftConfig(target_modules=_targets(config), task_type="CAUSAL_LM")
    if name == "prompt_tuning":
        # started as the embeddings of tokens sampled from the vocabulary: N(0, 1) vectors would be far larger
        return peft.PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init="SAMPLE_VOCAB", task_type="CAUSAL_LM")
    if name == "p_tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=n, encoder_hidden_size=128, task_type="CAUSAL_LM")
    if name == "prefix_tuning":
        # zero keys and values at the start: random ones (PEFT's default) derail every attention layer at step 0
        return peft.PrefixTuningConfig(num_virtual_tokens=n, init_weights="zero", task_type="CAUSAL_LM")
    raise ValueError(f"no PEFT config for method {name!r}")


def is_prompt_learning(model: Any) -> bool:
    """A PEFT model whose adapter is extra inputs (prompt / prefix / P-tuning), not layers."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))
