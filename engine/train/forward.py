"""The forward pass that training needs: log-probs of the trained tokens only.

Instead of ``model(...).logits`` (a [B, T, V] float32 tensor, usually the peak of a step), run the decoder
body, pick the hidden states of trained positions, and send only those through the output head in chunks
(``kernels.linear_logprobs``). Models whose head is not a plain linear map (LoRA on the head, logit scaling)
take the ordinary path.

A packed batch (``Batch.position_ids``: one row, positions restarting per sequence) goes in with no attention mask
and its position ids: transformers then confines attention to each sequence (a block-diagonal causal mask for
SDPA and eager attention, ``masking_utils.find_packed_sequence_indices``; flash-attention's varlen kernel on GPUs,
from the sequence boundaries passed as ``cu_seq_lens_q`` / ``cu_seq_lens_k``). The CPU's patched attention
(``engine.train.model_patches.fused_ops``) reads those boundaries too and runs each sequence on its own
(``kernels.attention``); the forward runs inside ``fused_ops.split_packed_rows``, so that the decoder (set up by
``apply_packed_attention``) does not build the block-diagonal mask that attention would ignore.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import sys
from dataclasses import dataclass
from typing import Any

import torch

from finetune_studio.engine.datasets.render import IGNORE
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.model_patches.fused_ops import split_packed_rows
from finetune_studio.engine.train.model_patches.kernel_wiring import logprobs_impl
from finetune_studio.kernels.linear_logprobs import token_logprobs


@dataclass
class TokenLogps:
    logps: torch.Tensor  # [N] float32, log p of each trained target token
    rows: torch.Tensor  # [N] the sequence each token belongs to (a padded batch's row, or a packed one's sequence)
    batch: int  # sequences in the batch


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
        # prompt / prefix / P-tuning put their virtual tokens in through the PEFT model's own forward
        prompt_learning = bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))
        self.fused = (
            self.decoder is not None and plain_head and not scaled and head.bias is None and not prompt_learning
        )

    def __call__(self, batch: Batch) -> TokenLogps:
        targets = batch.labels[:, 1:]  # [B, T-1]
        mask = targets != IGNORE
        rows, inputs, split = _model_inputs(batch, mask)
        if self.fused:
            with split:
                hidden = self.decoder(**inputs).last_hidden_state  # [B, T, H]
            logps = self.head_logps(hidden[:, :-1][mask], targets[mask])
        else:
            with split:
                # the last T positions: prompt tuning's output starts with its virtual tokens' positions
                logits = self.model(**inputs).logits[:, -batch.input_ids.shape[1] : -1]
            logps = torch.log_softmax(logits[mask].float(), dim=-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
        return TokenLogps(logps=logps, rows=rows, batch=batch.sequences)

    def head_logps(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The log-probs of ``targets`` [N] through the output head from the decoder's hidden states [N, H] (the
        fused head: no [N, V] logits kept). Under bf16 autocast on the CPU the head runs in float32 (bf16 logits of
        ~20 are off by ~0.1; the head is a small share of a step once only trained positions reach it)."""
        if hidden.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return token_logprobs(
                    hidden.float(), self.head.weight.float(), targets, softcap=self.softcap, impl=self.impl
                )
        return token_logprobs(hidden, self.head.weight, targets, softcap=self.softcap, impl=self.impl)

    def trained_hidden(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last hidden states at the trained positions [N, H] and their target tokens [N], for a loss
        that goes through the output head itself (distillation); needs a plain head (``fused``)."""
        if not self.fused:
            raise ValueError(f"{type(self.causal_lm).__name__}: the output head is not a plain linear layer")
        targets = batch.labels[:, 1:]  # [B, T-1]
        mask = targets != IGNORE
        _rows, inputs, split = _model_inputs(batch, mask)
        with split:
            hidden = self.decoder(**inputs).last_hidden_state  # [B, T, H]
        return hidden[:, :-1][mask], targets[mask]


def _model_inputs(
    batch: Batch, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any], contextlib.AbstractContextManager[None]]:
    """(the sequence of each trained position [N], the model's keyword arguments, the context to run it in)."""
    split: contextlib.AbstractContextManager[None]
    if batch.packed:
        rows = batch.sequence_index[:, :-1][mask]
        inputs = dict(input_ids=batch.input_ids, use_cache=False, **packed_inputs(batch))
        split = split_packed_rows(batch.sequence_lengths)  # no [T, T] mask where the attention runs split
    else:
        rows = mask.nonzero()[:, 0]
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        split = contextlib.nullcontext()
    return rows, inputs, split


def takes_packed_rows(model) -> bool:
    """Whether ``model`` (a PEFT model or a causal LM) confines attention to each sequence of a packed row: its
    decoder builds its masks with transformers' ``create_causal_mask`` (which finds the sequences from position ids
    that restart) and its forward takes position ids and passes other keyword arguments on to the attention."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    if decoder is None or getattr(sys.modules.get(type(decoder).__module__), "create_causal_mask", None) is None:
        return False
    params = inspect.signature(decoder.forward).parameters
    return "position_ids" in params and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def packed_inputs(batch: Batch) -> dict:
    """The decoder's keyword arguments for a packed batch: its position ids, no attention mask, and the sequence
    boundaries in flash-attention's varlen form (cumulative lengths, int32, and the longest)."""
    lengths = batch.sequence_lengths
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=batch.input_ids.device)
    longest = max(lengths)
    return dict(
        position_ids=batch.position_ids,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=longest,
        max_length_k=longest,
    )
