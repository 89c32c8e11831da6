"""The whole training objective (lib/engine.py: objective, LossWeights): the triplet loss (Eq. 6)
plus ASEN++ stage 2's local triplet and alignment terms and CSN's regularisers, each written out by
hand on random embeddings, each with its own weight; a term of weight 0 is not computed."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import model as models
from lib import engine

N, D = 5, 6


def hinge(an, ap, margin):
    return torch.clamp(an - ap + margin, min=0).mean()


def outputs(seed=0):
    """A TripletOutput whose passes (anchor, negative, positive) carry both ASEN++'s and CSN's extras."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)
    passes = tuple({'global': r(N, D), 'local': r(N, D), 'unmasked': r(N, D), 'mask': r(N, D).abs()}
                   for _ in range(3))
    return models.TripletOutput(r(N), r(N), passes)


def by_hand(out, margin):
    """(triplet, local triplet, alignment, CSN embedding norm, CSN mask norm)."""
    (a, n, p) = out.extras
    cos = lambda x, y: F.cosine_similarity(x, y, dim=1)
    local = hinge(cos(a['local'], n['local']), cos(a['local'], p['local']), margin)
    align = sum(torch.clamp(1 - cos(q['global'], q['local']), min=0).mean() for q in (a, n, p))
    embed = sum(torch.sqrt((q['unmasked'] ** 2).sum()) / N ** 0.5 for q in (a, n, p)) / 3
    mask = sum(q['mask'].abs().sum() / N for q in (a, n, p)) / 3
    return hinge(out.sim_an, out.sim_ap, margin), local, align, embed, mask


@pytest.mark.parametrize('weights', [(0, 0, 0, 0), (0.3, 0, 0, 0), (0, 0.7, 0, 0), (0, 0, 0.2, 0),
                                     (0, 0, 0, 0.9), (0.3, 0.7, 0.2, 0.9)])
def test_each_term_enters_with_its_weight(weights):
    out, margin = outputs(), 0.4
    w = engine.LossWeights(margin, *weights)
    triplet, total = engine.objective(out, w)
    terms = by_hand(out, margin)
    assert torch.allclose(triplet, terms[0], atol=1e-6)
    want = terms[0] + sum(wi * t for wi, t in zip(weights, terms[1:]))
    assert torch.allclose(torch.as_tensor(total), want, atol=1e-6)


def test_the_terms_by_hand_are_not_trivial():
    """Each extra term is large enough that leaving it out, or a weight swapped, shows."""
    local, align, embed, mask = by_hand(outputs(), 0.4)[1:]
    assert min(local, align, embed, mask) > 0.1
    assert len({round(float(t), 3) for t in (local, align, embed, mask)}) == 4


def test_a_term_of_weight_zero_is_not_computed():
    """Networks without extras (ASENet: {} per pass) train with the triplet loss alone."""
    out = models.TripletOutput(torch.tensor([0.5, 0.1]), torch.tensor([0.2, 0.3]), ({}, {}, {}))
    triplet, total = engine.objective(out, engine.LossWeights(0.2))
    assert float(triplet) == float(total) == pytest.approx((0.5 + 0.0) / 2)


def test_the_defaults_weigh_only_the_triplet_loss():
    w = engine.LossWeights(0.3)
    assert w == (0.3, 0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize('model, stage, csn_reg, want', [
    ('ASENpp', 2, False, (0.2, 0.25, 0.5, 0.0, 0.0)),
    ('ASENpp', 2, True, (0.2, 0.25, 0.5, 0.0, 0.0)),
    ('ASENpp', 1, False, (0.2, 0.0, 0.0, 0.0, 0.0)),
    ('ConditionalSimNet', 2, True, (0.2, 0.0, 0.0, 5e-3, 5e-4)),       # the CSN authors' weights
    ('ConditionalSimNet', 1, False, (0.2, 0.0, 0.0, 0.0, 0.0)),
    ('ASENet', 2, True, (0.2, 0.0, 0.0, 0.0, 0.0)),
])
def test_weights_of_a_configuration(model, stage, csn_reg, want):
    args = SimpleNamespace(model=model, stage=stage, csn_reg=csn_reg, margin=0.2, local_weight=0.25,
                           align_weight=0.5)
    assert tuple(engine.LossWeights.of(args)) == pytest.approx(want, rel=0, abs=0)


def test_the_extra_terms_are_computed_in_float32():
    """Under autocast the branches' embeddings are bf16; their cosines and norms are taken in float32."""
    out = outputs(seed=2)
    half = models.TripletOutput(out.sim_an, out.sim_ap,
                                tuple({k: v.bfloat16() for k, v in p.items()} for p in out.extras))
    upcast = models.TripletOutput(out.sim_an, out.sim_ap,
                                  tuple({k: v.float() for k, v in p.items()} for p in half.extras))
    got = models.asenpp_local_terms(half.extras, 0.4) + models.csn_regularisers(half.extras)
    want = by_hand(upcast, 0.4)[1:]
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.allclose(g, w, rtol=1e-6, atol=1e-6)
