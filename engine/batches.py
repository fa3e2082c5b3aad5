"""From examples to padded tensors, in a seeded order that a checkpoint can resume exactly.

The order is a stream of example positions: position p belongs to epoch ``p // n`` and is example
``perm(epoch)[p % n]``, with ``perm(epoch)`` a permutation seeded by ``seed + epoch``. A checkpoint stores only
how many examples were consumed. With ``first`` (the longest batch, ``engine.memory_budget.longest_batch``)
epoch 0 starts with those examples, then the rest in the seeded order; a checkpoint stores ``first`` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune_studio.engine.render import IGNORE, Tokenized, TokenizedPair


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE where not trained
    pairs: int = 0  # DPO: the first `pairs` rows are chosen, the next `pairs` rejected
    indices: tuple = ()  # example indices (for precomputed reference log-probs)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def trained_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device: str) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.pairs, self.indices
        )


def collate(items: list[Tokenized], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(t.labels)
    return ids, mask, labels


def make_batch(examples: list, indices: list[int], pad_id: int) -> Batch:
    """SFT rows, or DPO pairs stacked as [chosen...; rejected...] so one forward pass serves both."""
    if isinstance(examples[0], TokenizedPair):
        items = [examples[i].chosen for i in indices] + [examples[i].rejected for i in indices]
        return Batch(*collate(items, pad_id), pairs=len(indices), indices=tuple(indices))
    return Batch(*collate([examples[i] for i in indices], pad_id), indices=tuple(indices))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class Sampler:
    """Yields lists of example indices; ``consumed`` is the resumable data position."""

    def __init__(self, n: int, batch_size: int, seed: int, consumed: int = 0, first: list[int] | None = None):
        self.n, self.batch_size, self.seed, self.consumed = n, batch_size, seed, consumed
        self.first = list(first or [])
        self._epoch = -1
        self._order: list[int] = []

    @property
    def epoch(self) -> float:
        return self.consumed / self.n

    def next_indices(self) -> list[int]:
        out = []
        for _ in range(self.batch_size):
            epoch, pos = divmod(self.consumed, self.n)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, epoch_order(self.n, self.seed, epoch)
                if epoch == 0 and self.first:
                    head = set(self.first)
                    self._order = self.first + [i for i in self._order if i not in head]
            out.append(self._order[pos])
            self.consumed += 1
        return out
