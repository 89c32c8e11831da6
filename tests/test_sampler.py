"""The training-triplet samplers: ASEN's (datasets.TripletSampler, with attribute_draws and
distinct_pairs), ASEN++'s (asenpp.ValuePairSampler) and the Zappos50k one (zappos.ConditionSampler).

Rows are (anchor, negative, positive, attribute). The statistical checks use fixed seeds and
bounds of about four standard deviations; the defects they guard against move the share they
look at by much more than that.
"""
import numpy as np
import pytest

import datasets
from lib import asenpp, zappos
from utils import UserError

# ----------------------------------------------------------------------------- the pieces

def test_distinct_pairs_never_pair_an_entry_with_itself_and_are_uniform():
    ids = np.array([10, 20, 30, 40])
    anchor, positive = datasets.distinct_pairs(ids, 12000, np.random.default_rng(0))
    assert (anchor != positive).all()
    assert set(anchor) | set(positive) == set(ids.tolist())
    pairs, counts = np.unique(np.stack([anchor, positive]), axis=1, return_counts=True)
    assert pairs.shape[1] == 12                                   # every ordered pair of distinct ids
    assert np.allclose(counts / 12000, 1 / 12, atol=0.01)         # sd of a share: 0.0025


def test_distinct_pairs_of_two():
    anchor, positive = datasets.distinct_pairs(np.array([5, 6]), 400, np.random.default_rng(1))
    assert sorted(set(zip(anchor.tolist(), positive.tolist()))) == [(5, 6), (6, 5)]
    assert 0.4 < np.mean(anchor == 5) < 0.6


def test_attribute_draws_are_uniform_over_the_usable_attributes():
    usable = np.array([0, 2, 5])
    out, attrs = datasets.attribute_draws(usable, 9000, np.random.default_rng(2))
    assert out.shape == (9000, 4) and out.dtype == np.int64
    assert np.array_equal(out[:, 3], attrs)
    shares = np.bincount(attrs, minlength=6) / 9000
    assert shares[[1, 3, 4]].sum() == 0
    assert np.allclose(shares[usable], 1 / 3, atol=0.02)          # sd: 0.005


# ----------------------------------------------------------------------------- ASEN's sampler

LABELS = np.array([[i, a, v] for i, (a, v) in enumerate(
    [(0, 0), (0, 0), (0, 0), (0, 1), (0, 1), (0, 2), (1, 0), (1, 0), (1, 1), (1, 1)])])


def test_triplet_sampler_invariants():
    sampler = datasets.TripletSampler(LABELS, n_attributes=2)
    triplets = sampler.sample(5000, np.random.default_rng(0))
    value = {(i, a): v for i, a, v in LABELS}
    for anchor, negative, positive, attr in triplets:
        assert anchor != positive
        # the negative is a labelled entry of the same attribute (a KeyError otherwise)
        assert value[anchor, attr] == value[positive, attr] != value[negative, attr]
    # attribute uniform; value 2 of attribute 0 has one image, so is never an anchor value
    share = np.mean(triplets[:, 3] == 0)
    assert 0.47 < share < 0.53
    anchor_values = [value[a, 0] for a, *_, attr in triplets if attr == 0]
    assert set(anchor_values) == {0, 1}
    assert abs(np.mean(anchor_values) - 0.5) < 0.03


def test_triplet_sampler_negative_is_any_other_entry_of_the_attribute():
    """As the authors: the negative is uniform over the attribute's entries of other values (so a
    value with more images is the negative more often), including a value with one image."""
    triplets = datasets.TripletSampler(LABELS, n_attributes=2).sample(8000, np.random.default_rng(3))
    attr0 = triplets[triplets[:, 3] == 0]
    value0 = attr0[np.isin(attr0[:, 0], [0, 1, 2])]               # anchors of value 0
    negatives = np.bincount(value0[:, 1], minlength=6)[3:6] / len(value0)
    assert np.allclose(negatives, 1 / 3, atol=0.04)               # images 3, 4 (value 1) and 5 (value 2)
    value1 = attr0[np.isin(attr0[:, 0], [3, 4])]
    negatives = np.bincount(value1[:, 1], minlength=6)[[0, 1, 2, 5]] / len(value1)
    assert np.allclose(negatives, 1 / 4, atol=0.04)
    # anchor and positive uniform within the value: each of images 0, 1, 2 anchors a third
    assert np.allclose(np.bincount(value0[:, 0], minlength=3)[:3] / len(value0), 1 / 3, atol=0.04)


def test_triplet_sampler_value_uniform_over_three_values():
    """Whatever their image counts (5, 2, 3), the anchor's value is uniform over the usable ones."""
    values = [0] * 5 + [1] * 2 + [2] * 3
    labels = np.array([[i, 0, v] for i, v in enumerate(values)])
    triplets = datasets.TripletSampler(labels, n_attributes=1).sample(6000, np.random.default_rng(6))
    shares = np.bincount(np.asarray(values)[triplets[:, 0]], minlength=3) / 6000
    assert np.allclose(shares, 1 / 3, atol=0.025)                  # sd: 0.006
    assert (np.asarray(values)[triplets[:, 0]] == np.asarray(values)[triplets[:, 2]]).all()


def test_triplet_sampler_skips_attributes_without_two_values():
    labels = np.vstack([LABELS, [[20, 2, 0], [21, 2, 0]]])        # attribute 2: one value only
    sampler = datasets.TripletSampler(labels, n_attributes=3)
    assert sampler.usable_attributes.tolist() == [0, 1]
    assert set(sampler.sample(300, np.random.default_rng(4))[:, 3]) == {0, 1}


def test_triplet_sampler_is_seeded():
    sampler = datasets.TripletSampler(LABELS, n_attributes=2)
    first = sampler.sample(50, np.random.default_rng([1, 3]))
    again = sampler.sample(50, np.random.default_rng([1, 3]))
    other = sampler.sample(50, np.random.default_rng([1, 4]))
    assert (first == again).all() and not (first == other).all()


def test_triplet_sampler_needs_two_values():
    with pytest.raises(UserError, match='triplets'):
        datasets.TripletSampler(np.array([[0, 0, 0], [1, 0, 0]]), n_attributes=1)
    with pytest.raises(UserError, match='triplets'):            # two values, but neither has two images
        datasets.TripletSampler(np.array([[0, 0, 0], [1, 0, 1]]), n_attributes=1)
    datasets.TripletSampler(np.array([[0, 0, 0], [1, 0, 0], [2, 0, 1]]), n_attributes=1)


# ----------------------------------------------------------------------------- ASEN++'s sampler

def test_value_pair_sampler():
    # attribute 0: value 0 has 40 images, values 1 and 2 two each, value 3 one (never a positive)
    ids = np.arange(45)
    values = np.array([0] * 40 + [1, 1, 2, 2, 3])
    sampler = asenpp.ValuePairSampler([(ids, values), (ids[:4], np.array([0, 0, 1, 1]))])
    out = sampler.sample(6000, np.random.default_rng(0))
    value_of = dict(zip(ids.tolist(), values.tolist()))
    attr0 = out[out[:, 3] == 0]
    assert 0.45 < len(attr0) / len(out) < 0.55                                # attribute uniform
    assert (attr0[:, 0] != attr0[:, 2]).all()                                 # distinct anchor, positive
    first = np.array([value_of[i] for i in attr0[:, 0]])
    assert (first == np.array([value_of[i] for i in attr0[:, 2]])).all()
    second = np.array([value_of[i] for i in attr0[:, 1]])
    assert (first != second).all() and 3 not in first
    # the first value uniform over 0, 1, 2; the second uniform over the three others, whatever
    # their image counts (ASEN's sampler would pick value 0's 40 images about 40/45 of the time)
    assert np.allclose(np.bincount(first, minlength=4)[:3] / len(first), 1 / 3, atol=0.03)
    for v in range(3):
        counts = np.bincount(second[first == v], minlength=4)
        others = [u for u in range(4) if u != v]
        assert np.allclose(counts[others] / counts.sum(), 1 / 3, atol=0.05), (v, counts)

def test_value_pair_sampler_negative_is_an_entry_of_the_attribute():
    ids0, ids1 = np.arange(6), np.arange(100, 104)
    sampler = asenpp.ValuePairSampler([(ids0, np.array([0, 0, 1, 1, 2, 2])), (ids1, np.array([0, 0, 1, 1]))])
    out = sampler.sample(2000, np.random.default_rng(5))
    for attr, ids in ((0, ids0), (1, ids1)):
        rows = out[out[:, 3] == attr]
        assert np.isin(rows[:, :3], ids).all()
    with pytest.raises(UserError, match='triplets'):             # one value with two images, no other value
        asenpp.ValuePairSampler([(np.arange(2), np.array([0, 0]))])
    with pytest.raises(UserError, match='triplets'):             # two values, one image each
        asenpp.ValuePairSampler([(np.arange(2), np.array([0, 1]))])


# ----------------------------------------------------------------------------- Zappos50k (CSN triplet lists)

def test_condition_sampler_is_even_over_conditions_and_seeded():
    triplets = np.array([[i, i + 1, i + 2, c] for c in range(4) for i in range(10 * (c + 1))])
    sampler = zappos.ConditionSampler(triplets, 4)
    drawn = sampler.sample(1002, np.random.default_rng([1, 3]))
    assert np.bincount(drawn[:, 3]).tolist() == [251, 251, 250, 250]
    as_rows = {tuple(t) for t in triplets}
    assert all(tuple(t) in as_rows for t in drawn)              # (anchor, far, close, condition) kept
    assert np.array_equal(drawn, sampler.sample(1002, np.random.default_rng([1, 3])))
    assert not np.array_equal(drawn, sampler.sample(1002, np.random.default_rng([1, 4])))
    assert len(set(drawn[:8, 3])) > 1                           # batches mix the conditions
    few = sampler.sample(40, np.random.default_rng(0))          # 10 of 10..40: no repeats within a condition
    for c in range(4):
        assert len({tuple(t) for t in few[few[:, 3] == c]}) == 10


def test_condition_sampler_names_the_conditions_without_triplets():
    triplets = np.array([[0, 1, 2, 0], [1, 2, 3, 2]])
    with pytest.raises(UserError, match=f'condition[(]s[)] {zappos.CONDITIONS[1]}, {zappos.CONDITIONS[3]}$'):
        zappos.ConditionSampler(triplets, 4)
