"""The forward pass that training needs: log-probs of the trained tokens only.

Instead of ``model(...).logits`` (a [B, T, V] float32 tensor, usually the peak of a step), run the decoder
body, pick the hidden states of trained positions, and send only those through the output head in chunks
(``kernels.linear_logprobs``). Models whose head is not a plain linear map (LoRA on the head, logit scaling)
take the ordinary path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune_studio.engine.batches import Batch
from finetune_studio.engine.kernel_wiring import logprobs_impl
from finetune_studio.engine.render import IGNORE
from finetune_studio.kernels.linear_logprobs import token_logprobs


@dataclass
class TokenLogps:
    logps: torch.Tensor  # [N] float32, log p of each trained target token
    rows: torch.Tensor  # [N] the sequence each token belongs to
    batch: int


class LogprobModel:
    """Wraps a PEFT model (or a plain causal LM) to compute trained-token log-probs."""

    def __init__(self, model, kernels: str = "auto"):
        self.model = model
        self.impl = logprobs_impl(kernels)
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.causal_lm = causal_lm
        self.decoder: Any = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
        head = causal_lm.get_output_embeddings()
        cfg = causal_lm.config
        plain_head = type(head) is torch.nn.Linear  # not a LoRA-wrapped or quantised head
        scaled = any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in ("logit_scale", "logits_scaling"))
        self.head = head
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.fused = self.decoder is not None and plain_head and not scaled and head.bias is None

    def __call__(self, batch: Batch) -> TokenLogps:
        targets = batch.labels[:, 1:]  # [B, T-1]
        mask = targets != IGNORE
        rows = mask.nonzero()[:, 0]
        if self.fused:
            hidden = self.decoder(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state  # [B, T, H]
            selected = hidden[:, :-1][mask]  # [N, H]
            if selected.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
                # bf16 autocast on the CPU: the head in float32 (bf16 logits of ~20 are off by ~0.1; the head is
                # a small share of a step once only trained positions reach it).
                with torch.autocast("cpu", enabled=False):
                    logps = token_logprobs(
                        selected.float(), self.head.weight.float(), targets[mask], softcap=self.softcap, impl=self.impl
                    )
            else:
                logps = token_logprobs(selected, self.head.weight, targets[mask], softcap=self.softcap, impl=self.impl)
        else:
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[
                :, :-1
            ]
            logps = torch.log_softmax(logits[mask].float(), dim=-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
        return TokenLogps(logps=logps, rows=rows, batch=batch.input_ids.shape[0])
