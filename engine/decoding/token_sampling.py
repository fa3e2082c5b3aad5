"""Next-token sampling for the generation worker: temperature, top-k, top-p, without sorting the vocabulary.

The kept set is exactly the one transformers' warpers keep, in their order (``TemperatureLogitsWarper``, then
``TopKLogitsWarper``, then ``TopPLogitsWarper`` on what top-k left): top-p keeps token j (in descending
probability) iff the mass of the tokens ranked above it is < ``top_p``. Instead of sorting all 49k scores per
candidate per step, it takes ``topk`` over a growing k until those k tokens hold ``top_p`` of the mass in every
row (at temperature <= 1 a few hundred tokens almost always do), so the result is exact, not a cap. Then one
token per row is drawn from the kept tokens, renormalised, with the request's own ``torch.Generator``.

Ties exactly at the nucleus boundary may be broken differently from a full sort (a measure-zero event with real
logits). The random stream is not transformers' (which draws over the whole vocabulary), so sampled texts differ
from plain ``generate``'s for the same seed; greedy decoding is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampler:
    """``temperature`` 0: greedy. ``top_k`` 0 / ``top_p`` 1: that filter off. ``first_k``: the first partial sort."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    first_k: int = 256

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def kept(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities, token ids, keep), each (rows, k): each row's k most likely tokens in descending order,
        their probabilities after temperature (and top-k), and whether the filters keep them."""
        scores = logits.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        vocab = scores.shape[-1]
        if 0 < self.top_k < vocab:
            top, idx = scores.topk(self.top_k, dim=-1)  # (rows, top_k), descending
            probs = top.softmax(dim=-1)  # top-p sees the top-k survivors renormalised, as in transformers
        else:
            full = scores.softmax(dim=-1)  # (rows, vocab)
            if self.top_p >= 1.0:
                idx = torch.arange(vocab, device=scores.device).expand_as(full)
                return full, idx, torch.ones_like(full, dtype=torch.bool)
            k = min(self.first_k, vocab)
            while True:
                probs, idx = full.topk(k, dim=-1)  # (rows, k), descending
                if k == vocab or bool((probs.sum(dim=-1) >= self.top_p).all()):
                    break  # the nucleus of every row lies within these k
                k = min(vocab, k * 4)
        if self.top_p >= 1.0:
            return probs, idx, torch.ones_like(probs, dtype=torch.bool)
        above = probs.cumsum(dim=-1) - probs  # (rows, k): mass ranked strictly above each token
        return probs, idx, above < self.top_p

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token id per row of ``logits`` (rows, vocab): (rows,) int64.

        Inverse-CDF draw over the kept tokens: one uniform number per row (``torch.multinomial`` would draw an
        exponential variate for every token of the vocabulary).
        """
        return self.sample_groups(logits, [(generator, logits.shape[0])])

    def sample_groups(self, logits: torch.Tensor, groups: Sequence[tuple[torch.Generator | None, int]]) -> torch.Tensor:
        """:meth:`sample` for rows that come in consecutive groups, each drawing from its own generator: group
        ``(generator, rows)`` draws the same numbers as :meth:`sample` of those rows alone with that generator
        (a batch of several prompts, each with its own seed). The group sizes must add up to the rows."""
        if self.greedy:
            return logits.argmax(dim=-1)
        if sum(size for _, size in groups) != logits.shape[0]:
            raise ValueError(f"sample_groups: groups of {[size for _, size in groups]} rows for {logits.shape[0]}")
        probs, idx, keep = self.kept(logits)
        cdf = probs.masked_fill(~keep, 0.0).cumsum(dim=-1)  # (rows, k), unnormalised
        u = torch.cat([torch.rand(size, 1, generator=g, device=cdf.device) for g, size in groups]) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # first index with cdf > u
        return idx.gather(1, pick).squeeze(1)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) bool: the tokens a row may draw (what the warpers leave finite)."""
        if self.greedy:
            return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.argmax(-1, keepdim=True), True)
        _, idx, keep = self.kept(logits)
        return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, keep)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, vocab): the distribution :meth:`sample` draws from (for tests)."""
        probs, idx, keep = self.kept(logits)
        kept = probs.masked_fill(~keep, 0.0)
        out = torch.zeros_like(logits, dtype=kept.dtype).scatter_(1, idx, kept)
        return out / out.sum(dim=-1, keepdim=True)
