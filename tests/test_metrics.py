"""The vectorised mAP against a plain per-query loop (the authors' algorithm) on tiny inputs."""
import numpy as np
import pytest
import torch

import utils


def loop_average_precision(cand_set, queries, c_gdtruth, q_gdtruth):
    """The original evaluation: rank each query's candidates, then walk the ranking."""
    simmat = queries @ cand_set.T
    ap_sum = 0.0
    for q in range(simmat.shape[0]):
        order = np.argsort(-simmat[q], kind='stable')
        labels = [1 if c_gdtruth[i] == q_gdtruth[q] else 0 for i in order]
        n_relevant, hits, ap = sum(labels), 0, 0.0
        for rank, label in enumerate(labels, start=1):
            if label:
                hits += 1
                ap += hits / rank
        ap_sum += ap / n_relevant if n_relevant else 0.0
    return ap_sum / simmat.shape[0]


@pytest.mark.parametrize('seed', range(5))
def test_map_matches_loop(seed):
    rng = np.random.default_rng(seed)
    n_cand, n_query, dim, n_values = 40, 12, 8, 4
    cand = rng.normal(size=(n_cand, dim)).astype(np.float32)
    queries = rng.normal(size=(n_query, dim)).astype(np.float32)
    c_gt = rng.integers(0, n_values, n_cand)
    q_gt = rng.integers(0, n_values + 2, n_query)   # values n_values.. have no relevant candidate
    expected = loop_average_precision(cand, queries, c_gt, q_gt)
    assert (q_gt >= n_values).any()
    assert utils.mean_average_precision(cand, queries, c_gt, q_gt) == pytest.approx(expected, abs=1e-6)
    as_torch = utils.mean_average_precision(torch.from_numpy(cand), torch.from_numpy(queries),
                                            torch.from_numpy(c_gt), torch.from_numpy(q_gt))
    assert as_torch == pytest.approx(expected, abs=1e-6)


def test_chunking_does_not_change_aps():
    rng = np.random.default_rng(0)
    cand, queries = torch.randn(30, 5), torch.randn(17, 5)
    c_gt, q_gt = torch.from_numpy(rng.integers(0, 3, 30)), torch.from_numpy(rng.integers(0, 3, 17))
    whole = utils.average_precisions(cand, queries, c_gt, q_gt, chunk_size=1024)
    chunked = utils.average_precisions(cand, queries, c_gt, q_gt, chunk_size=4)
    assert torch.allclose(whole, chunked)


def test_perfect_and_empty_rankings():
    cand = np.eye(3, dtype=np.float32)
    assert utils.mean_average_precision(cand, cand, np.arange(3), np.arange(3)) == pytest.approx(1.0)
    # no candidate shares the query's value: AP is 0, not NaN
    assert utils.mean_average_precision(cand, cand[:1], np.array([1, 1, 1]), np.array([0])) == 0.0
    assert utils.mean_average_precision(cand, cand[:0], np.arange(3), np.arange(0)) == 0.0


def test_map_is_in_unit_interval_and_float():
    rng = np.random.default_rng(1)
    value = utils.mean_average_precision(rng.normal(size=(20, 4)), rng.normal(size=(6, 4)),
                                         rng.integers(0, 2, 20), rng.integers(0, 2, 6))
    assert isinstance(value, float) and 0.0 <= value <= 1.0


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_ranked_relevance_equals_argsort_then_gather(dtype):
    gen = torch.Generator().manual_seed(0)
    sims = torch.randn(9, 50, generator=gen).to(dtype)
    relevant = torch.rand(9, 50, generator=gen) < 0.3
    order = torch.argsort(sims, dim=1, descending=True)
    assert torch.equal(utils.ranked_relevance(sims, relevant), torch.gather(relevant, 1, order))
