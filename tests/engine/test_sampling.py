"""The worker's sampler (engine.decoding.token_sampling): the kept set is transformers' warpers' own, draws follow it,
and one
seed gives one stream."""

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from finetune_studio.engine.decoding.token_sampling import Sampler

CASES = [  # (vocab, logit spread, top_p, temperature, top_k)
    (50, 0.1, 0.5, 0.7, 0),
    (320, 1.0, 0.9, 0.8, 0),
    (3000, 4.0, 0.95, 1.3, 40),
    (4099, 8.0, 0.3, 0.5, 0),
    (777, 2.0, 0.999, 1.0, 500),
    (600, 3.0, 1.0, 0.9, 7),
    (5000, 6.0, 0.9, 0.7, 0),
    (49152, 5.0, 0.9, 0.7, 0),  # the default model's vocabulary
]


def _warped(scores, t, k, p):
    warpers = [TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k else [])
    warpers += [TopPLogitsWarper(p)] if p < 1 else []
    return LogitsProcessorList(warpers)(None, scores.clone())


def test_the_kept_tokens_and_their_probabilities_are_transformers_warpers():
    gen = torch.Generator().manual_seed(0)
    for vocab, spread, p, t, k in CASES:
        scores = torch.randn(4, vocab, generator=gen) * spread
        theirs = _warped(scores, t, k, p)
        sampler = Sampler(t, k, p, first_k=16)  # a small first guess: the growing partial sort is exercised
        assert torch.equal(sampler.mask(scores), ~torch.isinf(theirs)), (vocab, p, t, k)
        assert torch.allclose(sampler.probabilities(scores), theirs.softmax(dim=-1), atol=1e-6), (vocab, p, t, k)


def test_draws_follow_the_kept_distribution():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(1, 40, generator=gen) * 2.0
    sampler = Sampler(temperature=0.8, top_k=0, top_p=0.8)
    expected = sampler.probabilities(scores)[0]  # (40,)
    draws = 20000
    picks = sampler.sample(scores.expand(draws, -1), torch.Generator().manual_seed(2))
    counts = torch.bincount(picks, minlength=40).double()
    assert counts[expected == 0].sum() == 0  # never a filtered token
    kept = expected > 0
    assert kept.sum() >= 3
    observed = counts[kept] / draws
    sigma = (expected[kept] * (1 - expected[kept]) / draws).sqrt()
    assert ((observed - expected[kept]).abs() <= 5 * sigma + 1e-9).all()  # every frequency within 5 sigma


def test_greedy_is_argmax_and_one_seed_gives_one_stream():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 1000, generator=gen) * 3
    assert torch.equal(Sampler(temperature=0).sample(scores), scores.argmax(-1))
    sampler = Sampler(0.9, 50, 0.95)
    first = [sampler.sample(scores, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    runs = {tuple(sampler.sample(scores, torch.Generator().manual_seed(s)).tolist()) for s in range(8)}
    assert len(runs) > 1  # other seeds, other draws


def test_groups_draw_each_from_their_own_generator_as_if_alone():
    sampler = Sampler(temperature=0.8, top_p=0.9)
    logits = torch.randn(7, 500, generator=torch.Generator().manual_seed(3)) * 4
    together = sampler.sample_groups(
        logits, [(torch.Generator().manual_seed(1), 3), (torch.Generator().manual_seed(2), 4)]
    )
    first = sampler.sample(logits[:3], torch.Generator().manual_seed(1))
    second = sampler.sample(logits[3:], torch.Generator().manual_seed(2))
    assert together.tolist() == first.tolist() + second.tolist()
    swapped = sampler.sample_groups(
        logits, [(torch.Generator().manual_seed(2), 3), (torch.Generator().manual_seed(1), 4)]
    )
    assert swapped.tolist() != together.tolist()  # the seeds, not the rows' order, decide the draws
    with pytest.raises(ValueError, match="rows"):
        sampler.sample_groups(logits, [(None, 3)])
