"""The whole training objective (losses.py: objective, LossWeights): the triplet loss (Eq. 6)
plus ASEN++ stage 2's local triplet and alignment terms and CSN's regularisers, each written out by
hand on random embeddings, each with its own weight; a term of weight 0 is not computed. The weights
come from the configuration and the terms the network feeds (EmbeddingNetwork.loss_terms), never
from its name."""
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import losses
import model as models
from helpers import tiny_asenpp, tiny_net

N, D = 5, 6


def hinge(an, ap, margin):
    return torch.clamp(an - ap + margin, min=0).mean()


def triplet_output(anchor, negative, positive, extras):
    return models.TripletOutput(anchor, negative, positive, (anchor * negative).sum(1), (anchor * positive).sum(1),
                                extras)


def outputs(seed=0):
    """A TripletOutput whose passes (anchor, negative, positive) carry both ASEN++'s and CSN's extras."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)
    passes = tuple({'global': r(N, D), 'local': r(N, D), 'unmasked': r(N, D), 'mask': r(N, D).abs()}
                   for _ in range(3))
    return triplet_output(r(N, D), r(N, D), r(N, D), passes)


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
    w = losses.LossWeights(margin, *weights)
    total, terms = losses.objective(out, w)
    want_terms = by_hand(out, margin)
    assert torch.allclose(terms['triplet'], want_terms[0], atol=1e-6)
    want = want_terms[0] + sum(wi * t for wi, t in zip(weights, want_terms[1:]))
    assert torch.allclose(torch.as_tensor(total), want, atol=1e-6)
    # the terms returned are the unweighted ones, those of a computed pair both
    assert list(terms) == ['triplet', *w.computed()]
    by_name = dict(zip(('triplet',) + losses.TERMS, want_terms))
    for name, value in terms.items():
        assert torch.allclose(value, by_name[name], atol=1e-6)


def test_the_computed_terms_come_in_pairs_that_share_inputs():
    assert losses.LossWeights(0.2).computed() == ()
    assert losses.LossWeights(0.2, align=0.1).computed() == ('local_triplet', 'align')
    assert losses.LossWeights(0.2, csn_mask=0.1).computed() == ('csn_embed', 'csn_mask')
    assert losses.LossWeights(0.2, 1, 1, 1, 1).computed() == losses.TERMS


def test_each_weight_moves_the_total_by_its_own_term():
    """objective's total on these outputs: each extra term is large enough that a weight left out
    lowers the total by weight * term, and distinct enough that any two weights swapped change it
    (a term given another's weight would show in test_each_term_enters_with_its_weight)."""
    out, weights = outputs(), (0.3, 0.7, 0.2, 0.9)
    total = lambda w: float(losses.objective(out, losses.LossWeights(0.4, *w))[0])
    _, terms = losses.objective(out, losses.LossWeights(0.4, *weights))
    for i, name in enumerate(losses.TERMS):
        dropped = weights[:i] + (0.0,) + weights[i + 1:]
        assert float(terms[name]) > 0.1
        assert total(weights) - total(dropped) == pytest.approx(weights[i] * float(terms[name]), abs=1e-5)
    for i, j in itertools.combinations(range(4), 2):
        swapped = list(weights)
        swapped[i], swapped[j] = weights[j], weights[i]
        assert abs(total(weights) - total(swapped)) > 0.1, (i, j)


def test_a_term_of_weight_zero_is_not_computed():
    """Networks without extras (ASENet: {} per pass) train with the triplet loss alone."""
    emb = torch.eye(2)
    out = models.TripletOutput(emb, emb, emb, torch.tensor([0.5, 0.1]), torch.tensor([0.2, 0.3]), ({}, {}, {}))
    total, terms = losses.objective(out, losses.LossWeights(0.2))
    assert float(terms['triplet']) == float(total) == pytest.approx((0.5 + 0.0) / 2)
    assert list(terms) == ['triplet']


def test_the_margin_alone_is_the_papers_objective():
    """LossWeights(margin), as the benchmarks build it: on outputs that carry every network's extras,
    objective computes the triplet loss (Eq. 6) alone and nothing else."""
    out = outputs(seed=4)
    total, terms = losses.objective(out, losses.LossWeights(0.3))
    assert list(terms) == ['triplet']
    assert torch.allclose(torch.as_tensor(total), hinge(out.sim_an, out.sim_ap, 0.3), atol=1e-6)


def test_a_new_loss_reads_the_embeddings():
    """TripletOutput carries the float32 embeddings the similarities come from, so a loss over them
    (in-batch negatives, say) needs nothing else."""
    out = outputs(seed=3)
    assert torch.allclose(out.sim_an, (out.anchor * out.negative).sum(1))
    assert torch.allclose(out.sim_ap, (out.anchor * out.positive).sum(1))
    tnet = models.TripletWrapper(tiny_net('ASENet', dim_embed=8)).eval()
    images, attr = [torch.randn(2, 3, 32, 32) for _ in range(3)], torch.tensor([0, 3])
    with torch.no_grad():
        got = tnet(*images, attr)
        for emb, x in zip((got.anchor, got.negative, got.positive), images):
            assert emb.dtype == torch.float32 and torch.allclose(emb, tnet.embeddingnet(x, attr), atol=1e-6)
    assert torch.allclose(got.sim_an, (got.anchor * got.negative).sum(1))


CONFIGURED = dict(margin=0.2, local_weight=0.25, align_weight=0.5, csn_embed_weight=losses.CSN_EMBED_WEIGHT,
                  csn_mask_weight=losses.CSN_MASK_WEIGHT)


@pytest.mark.parametrize('model, stage, csn_reg, want', [
    ('ASENpp', 2, False, (0.2, 0.25, 0.5, 0.0, 0.0)),
    ('ASENpp', 2, True, (0.2, 0.25, 0.5, 0.0, 0.0)),
    ('ASENpp', 1, False, (0.2, 0.0, 0.0, 0.0, 0.0)),
    ('ConditionalSimNet', 2, True, (0.2, 0.0, 0.0, 5e-3, 5e-4)),       # the CSN authors' weights
    ('ConditionalSimNet', 1, False, (0.2, 0.0, 0.0, 0.0, 0.0)),
    ('ASENet', 2, True, (0.2, 0.0, 0.0, 0.0, 0.0)),
])
def test_weights_of_a_configuration(model, stage, csn_reg, want):
    """The weights of the terms the network feeds; the others 0 whatever the flags say."""
    net = tiny_asenpp(stage=stage) if model == 'ASENpp' else tiny_net(model)
    args = SimpleNamespace(csn_reg=csn_reg, **CONFIGURED)
    assert tuple(losses.LossWeights.of(args, net.loss_terms)) == pytest.approx(want, rel=0, abs=0)


def test_csn_weights_come_from_the_configuration():
    """--csn-embed-weight and --csn-mask-weight, with --csn-reg; their defaults are the CSN authors'."""
    assert (losses.CSN_EMBED_WEIGHT, losses.CSN_MASK_WEIGHT) == (5e-3, 5e-4)
    args = SimpleNamespace(**{**CONFIGURED, 'csn_embed_weight': 0.125, 'csn_mask_weight': 0.5}, csn_reg=True)
    assert losses.LossWeights.of(args, ('csn_embed', 'csn_mask')) == (0.2, 0.0, 0.0, 0.125, 0.5)
    args.csn_reg = False
    assert losses.LossWeights.of(args, ('csn_embed', 'csn_mask')) == (0.2, 0.0, 0.0, 0.0, 0.0)


def test_the_extra_terms_are_computed_in_float32():
    """Under autocast the branches' embeddings are bf16; their cosines and norms are taken in float32."""
    out = outputs(seed=2)
    half = out._replace(extras=tuple({k: v.bfloat16() for k, v in p.items()} for p in out.extras))
    upcast = out._replace(extras=tuple({k: v.float() for k, v in p.items()} for p in half.extras))
    got = losses.asenpp_local_terms(half.extras, 0.4) + losses.csn_regularisers(half.extras)
    want = by_hand(upcast, 0.4)[1:]
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.allclose(g, w, rtol=1e-6, atol=1e-6)
