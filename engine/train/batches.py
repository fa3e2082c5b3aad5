"""From examples to padded (or packed) tensors, in a seeded order that a checkpoint can resume exactly.

Padded: one row per sequence, right-padded to the batch's longest. Packed (``packing``): the batch's sequences
concatenated into one row with no padding, ``position_ids`` restarting at 0 where each sequence starts (the model
confines attention to each sequence from them, see ``engine.train.forward``), and each sequence's first label
``IGNORE`` (the last position of one sequence does not predict the next one's first token). The same
examples in the same order either way: packing changes only the layout.

The order is a stream of example positions: position p belongs to epoch ``p // n`` and is example
``perm(epoch)[p % n]``, with ``perm(epoch)`` a permutation seeded by ``seed + epoch``. A checkpoint stores only
how many examples were consumed. With ``first`` (the longest batch, ``engine.train.memory_budget.longest_batch``)
epoch 0 starts with those examples, then the rest in the seeded order; a checkpoint stores ``first`` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune_studio.engine.datasets.render import IGNORE, Tokenized, TokenizedPair


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE where not trained
    pairs: int = 0  # DPO: the first `pairs` sequences are chosen, the next `pairs` rejected
    indices: tuple = ()  # example indices (for precomputed reference log-probs)
    position_ids: torch.Tensor | None = None  # [1, T] packed: each sequence's positions from 0; None: padded

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def sequences(self) -> int:
        """How many sequences (examples, or chosen and rejected answers) the batch holds."""
        if self.position_ids is None:
            return int(self.input_ids.shape[0])
        return int((self.position_ids == 0).sum())

    @property
    def sequence_index(self) -> torch.Tensor:
        """[B, T] the sequence each position belongs to (padded: its row)."""
        if self.position_ids is None:
            rows = torch.arange(self.input_ids.shape[0], device=self.input_ids.device)
            return rows[:, None].expand_as(self.input_ids)
        return (self.position_ids == 0).cumsum(-1) - 1

    @property
    def sequence_lengths(self) -> list[int]:
        """Tokens of each sequence, in order (padded: the unpadded length of each row)."""
        if self.position_ids is None:
            return self.attention_mask.sum(-1).tolist()
        starts = (self.position_ids[0] == 0).nonzero()[:, 0].tolist() + [self.position_ids.shape[1]]
        return [b - a for a, b in zip(starts, starts[1:])]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def trained_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device: str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.pairs,
            self.indices,
            None if self.position_ids is None else self.position_ids.to(device),
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


def pack(items: list[Tokenized]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``items`` as one row [1, sum of lengths]: (input_ids, attention_mask of ones, labels with each sequence's
    first label IGNORE, position_ids restarting at 0 per sequence)."""
    ids = torch.cat([torch.as_tensor(t.input_ids, dtype=torch.long) for t in items])[None]
    labels = torch.cat([torch.as_tensor(t.labels, dtype=torch.long) for t in items])[None]
    lengths = torch.tensor([len(t.input_ids) for t in items])
    starts = torch.cumsum(lengths, 0) - lengths
    labels[0, starts] = IGNORE
    positions = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
    return ids, torch.ones_like(ids), labels, positions[None]


def make_batch(examples: list, indices: list[int], pad_id: int, packed: bool = False) -> Batch:
    """SFT rows, or DPO pairs stacked as [chosen...; rejected...] so one forward pass serves both; ``packed``:
    the same sequences, in the same order, concatenated into one row (``pack``)."""
    if isinstance(examples[0], TokenizedPair):
        items = [examples[i].chosen for i in indices] + [examples[i].rejected for i in indices]
        pairs = len(indices)
    else:
        items, pairs = [examples[i] for i in indices], 0
    if packed:
        ids, mask, labels, positions = pack(items)
        return Batch(ids, mask, labels, pairs=pairs, indices=tuple(indices), position_ids=positions)
    return Batch(*collate(items, pad_id), pairs=pairs, indices=tuple(indices))


def layout(items: list, pad_id: int, packed: bool = False) -> Batch:
    """``items`` (tokenized sequences made during training: sampled answers) as one batch, in their order."""
    return make_batch(items, list(range(len(items))), pad_id, packed)


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
