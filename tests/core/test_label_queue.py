"""The labelling queue's orders on fixed margins, and the model's agreement over the person's last decisions."""

from __future__ import annotations

import math

import pytest

from finetune_studio.core import label_queue as lq

MARGINS = [0.9, -0.1, None, 2.5, 0.0, -1.2, float("nan")]


def test_as_added_keeps_the_order():
    assert lq.order("added", MARGINS) == list(range(7))


def test_least_sure_first_is_the_smallest_gap_then_the_unscored_as_added():
    # |margins|: 0.9, 0.1, -, 2.5, 0.0, 1.2, - (NaN is no score)
    assert lq.order("least_sure", MARGINS) == [4, 1, 0, 5, 3, 2, 6]


def test_largest_gap_first_is_the_largest_gap_either_way_then_the_unscored():
    assert lq.order("largest_gap", MARGINS) == [3, 5, 0, 1, 4, 2, 6]


def test_equal_gaps_keep_the_order_they_were_added_in():
    assert lq.order("least_sure", [0.5, -0.5, 0.5]) == [0, 1, 2]
    assert lq.order("largest_gap", [-0.5, 0.5, 0.1]) == [0, 1, 2]


def test_random_is_a_seeded_shuffle_stable_as_pairs_are_added():
    keys = [f"pair-{i}" for i in range(40)]
    first = lq.order("random", [None] * 40, keys, seed=3)
    assert sorted(first) == list(range(40)) and first != list(range(40))
    assert lq.order("random", [None] * 40, keys, seed=3) == first  # the same each time
    assert lq.order("random", [None] * 40, keys, seed=4) != first
    more = lq.order("random", [None] * 50, keys + [f"pair-{i}" for i in range(40, 50)], seed=3)
    assert [i for i in more if i < 40] == first  # the first 40 keep their relative order
    assert lq.order("random", [1.0, 2.0], ["a", "b"]) == lq.order("random", [None, None], ["a", "b"])  # no scores


def test_bad_order_or_keys_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="least_sure"):
        lq.order("smallest", [0.1])
    with pytest.raises(ValueError, match="one key per pair"):
        lq.order("random", [0.1, 0.2], ["a"])


def test_margin_of_two_answers():
    rewards = {"x": 1.5, "y": -0.5, "z": math.inf}
    assert lq.margin(rewards, "x", "y") == 2.0 and lq.margin(rewards, "y", "x") == -2.0
    assert lq.margin(rewards, "x", "missing") is None and lq.margin(rewards, "x", "z") is None


def test_agreement_counts_the_last_picks_with_a_prediction():
    picks = [(True, 1.0), (False, 1.0), (True, None), (False, -0.2), (True, 0.0)]
    # agreed: yes, no, (not counted), yes, no (0 is no preference)
    assert lq.agreement(picks) == lq.Agreement(2, 4)
    assert lq.agreement(picks, last=2) == lq.Agreement(1, 2)
    assert lq.agreement([]) == lq.Agreement(0, 0)
    assert lq.Agreement(2, 4).text() == "The model agreed with you on 2 of your last 4 decisions."
    assert lq.Agreement(0, 1).text() == "The model did not agree with you on your last decision."
    assert lq.Agreement(1, 1).text() == "The model agreed with you on your last decision."
    assert lq.Agreement(0, 0).rate is None and "after your first pick" in lq.Agreement(0, 0).text()


def test_agreement_looks_back_twenty_decisions_at_most():
    picks = [(True, -1.0)] * 5 + [(True, 1.0)] * 20  # the 5 disagreements are older than the last 20
    assert lq.agreement(picks) == lq.Agreement(20, 20)
    assert lq.agreement(picks + [(False, 1.0)]) == lq.Agreement(19, 20)
    with pytest.raises(ValueError):
        lq.agreement(picks, last=0)
