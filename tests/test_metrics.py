"""The retrieval metric: per-query AP (evaluation.average_precisions) against plain loops and the
authors' (benchmarks/bench_map.reference_map), ties and empty cases, and MeanAP over attributes
(evaluation.retrieval_map: weighted by each attribute's number of queries)."""
import os
import types
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from lib import evaluation

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))


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
    assert evaluation.mean_average_precision(cand, queries, c_gt, q_gt) == pytest.approx(expected, abs=1e-6)
    as_torch = evaluation.mean_average_precision(torch.from_numpy(cand), torch.from_numpy(queries),
                                            torch.from_numpy(c_gt), torch.from_numpy(q_gt))
    assert as_torch == pytest.approx(expected, abs=1e-6)


def test_chunking_does_not_change_aps():
    rng = np.random.default_rng(0)
    cand, queries = torch.randn(30, 5), torch.randn(17, 5)
    c_gt, q_gt = torch.from_numpy(rng.integers(0, 3, 30)), torch.from_numpy(rng.integers(0, 3, 17))
    whole = evaluation.average_precisions(cand, queries, c_gt, q_gt, chunk_size=1024)
    chunked = evaluation.average_precisions(cand, queries, c_gt, q_gt, chunk_size=4)
    assert torch.allclose(whole, chunked)


def test_perfect_and_empty_rankings():
    cand = np.eye(3, dtype=np.float32)
    assert evaluation.mean_average_precision(cand, cand, np.arange(3), np.arange(3)) == pytest.approx(1.0)
    # no candidate shares the query's value: AP is 0, not NaN
    assert evaluation.mean_average_precision(cand, cand[:1], np.array([1, 1, 1]), np.array([0])) == 0.0
    assert evaluation.mean_average_precision(cand, cand[:0], np.arange(3), np.arange(0)) == 0.0


def test_ap_by_hand():
    """Relevant at ranks 1 and 3 of 4: AP = (1/1 + 2/3) / 2; at ranks 2 and 4: (1/2 + 2/4) / 2."""
    cand = np.array([[4.0], [3.0], [2.0], [1.0]], dtype=np.float32)       # ranked in this order
    aps = evaluation.average_precisions(cand, np.array([[1.0], [1.0]], dtype=np.float32),
                                   np.array([0, 1, 0, 1]), np.array([0, 1]))
    assert aps.dtype == torch.float64
    assert aps.tolist() == pytest.approx([(1 + 2 / 3) / 2, (1 / 2 + 2 / 4) / 2])
    value = evaluation.mean_average_precision(cand, np.array([[1.0], [1.0]], dtype=np.float32),
                                         np.array([0, 1, 0, 1]), np.array([0, 1]))
    assert isinstance(value, float) and value == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


def loop_aps(cand_set, queries, c_gdtruth, q_gdtruth):
    """Per-query AP, plainly: sort by similarity (no ties in the inputs), walk the ranking."""
    out = []
    for q in range(len(queries)):
        sims = [float(np.dot(queries[q], c)) for c in cand_set]
        order = sorted(range(len(cand_set)), key=lambda i: -sims[i])
        hits, total = 0, 0.0
        for rank, i in enumerate(order, start=1):
            if c_gdtruth[i] == q_gdtruth[q]:
                hits += 1
                total += hits / rank
        out.append(total / hits if hits else 0.0)
    return out


@pytest.mark.parametrize('seed', range(4))
def test_per_query_aps_match_a_plain_loop(seed):
    rng = np.random.default_rng(10 + seed)
    n_cand, n_query = int(rng.integers(1, 30)), int(rng.integers(1, 9))
    cand = rng.normal(size=(n_cand, 4)).astype(np.float32)
    queries = rng.normal(size=(n_query, 4)).astype(np.float32)
    c_gt, q_gt = rng.integers(0, 3, n_cand), rng.integers(0, 4, n_query)
    got = evaluation.average_precisions(cand, queries, c_gt, q_gt, chunk_size=3)
    assert got.tolist() == pytest.approx(loop_aps(cand, queries, c_gt, q_gt), abs=1e-12)


def test_edge_rankings():
    one = np.ones((1, 2), dtype=np.float32)
    assert evaluation.average_precisions(one, one, [0], [0]).tolist() == [1.0]        # one candidate, relevant
    assert evaluation.average_precisions(one, one, [1], [0]).tolist() == [0.0]        # one candidate, not
    cand = np.array([[3.0], [2.0], [1.0]], dtype=np.float32)
    assert evaluation.average_precisions(cand, one[:, :1], [0, 0, 0], [0]).tolist() == [1.0]  # all relevant
    assert evaluation.average_precisions(cand, -one[:, :1], [0, 1, 1], [0]).tolist() == [pytest.approx(1 / 3)]  # last


def test_query_without_relevant_candidate_counts_as_zero_as_in_the_authors_code():
    """AP 0 for that query, and the query stays in the mean's denominator: the authors' loop
    (bench_map.reference_map) skips it in the sum but divides by all queries."""
    import bench_map
    cand = np.eye(3, dtype=np.float32)
    queries = cand[:2].copy()
    c_gt, q_gt = np.array([0, 1, 2]), np.array([0, 7])                # query 2's value 7: no candidate
    assert evaluation.average_precisions(cand, queries, c_gt, q_gt).tolist() == [1.0, 0.0]
    assert evaluation.mean_average_precision(cand, queries, c_gt, q_gt) == 0.5
    assert bench_map.reference_map(cand, queries, c_gt, q_gt) == 0.5


@pytest.mark.parametrize('seed', range(3))
def test_map_equals_the_authors_loop(seed):
    import bench_map
    rng = np.random.default_rng(20 + seed)
    cand, queries = rng.normal(size=(50, 6)), rng.normal(size=(9, 6))
    c_gt, q_gt = rng.integers(0, 4, 50), rng.integers(0, 5, 9)
    assert evaluation.mean_average_precision(cand, queries, c_gt, q_gt) == pytest.approx(
        bench_map.reference_map(cand, queries, c_gt, q_gt), abs=1e-12)


def test_exact_ties_rank_the_relevant_candidates_first():
    """Candidates with equal similarity: ranked_relevance puts the relevant ones first (the flag
    sits in the lowest mantissa bit), so AP is the optimistic one whatever the candidates' order.
    The authors' np.argsort(-sims) orders ties by its sort algorithm (by index for these small
    inputs), so their AP depends on where the relevant tie sits: a known, documented difference
    that only exact ties can show."""
    import bench_map
    cand = np.ones((4, 2), dtype=np.float32)                            # four equal scores
    query = np.ones((1, 2), dtype=np.float32)
    for c_gt in ([1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]):
        assert evaluation.average_precisions(cand, query, c_gt, [0]).tolist() == [1.0]
    assert bench_map.reference_map(cand, query, [1, 1, 1, 0], [0]) == 0.25     # theirs: last of four


# ----------------------------------------------------------------------------- MeanAP over attributes

def entries(attrs, values):
    """(N, 3) rows (image id, attribute, value), as the retrieval sets hold them."""
    return np.array([[i, a, v] for i, (a, v) in enumerate(zip(attrs, values))], dtype=np.int64).reshape(-1, 3)


def test_meanap_weights_each_attribute_by_its_number_of_queries():
    """Attribute 0: one query, AP 1; attribute 1: three queries, AP 1/2 each (the relevant
    candidate second of two). Per attribute [1, 0.5]; MeanAP = (1 * 1 + 3 * 0.5) / 4 = 0.625,
    where the plain mean of the attributes would be 0.75."""
    from lib.evaluation import retrieval_map
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    query_emb = torch.stack([e0, e1, e1, e1])
    queries = entries([0, 1, 1, 1], [0, 0, 0, 0])
    cand_emb = torch.stack([e0, e1, e1 * 0.5 + e0 * 0.1, e1 * 0.1])
    candidates = entries([0, 1, 1, 1], [0, 1, 0, 2])                   # attr 1: value 0 ranks second
    per_attribute, mean = retrieval_map(query_emb, queries, cand_emb, candidates, 2)
    assert per_attribute == pytest.approx([1.0, 0.5])
    assert mean == pytest.approx(0.625)


def test_meanap_with_an_attribute_without_queries():
    """An attribute with no query has mAP 0 and weight 0: it does not pull MeanAP down."""
    from lib.evaluation import retrieval_map
    emb = torch.eye(2)
    per_attribute, mean = retrieval_map(emb, entries([0, 0], [0, 1]), emb, entries([0, 0], [0, 1]), 3)
    assert per_attribute == [1.0, 0.0, 0.0]
    assert mean == 1.0
    assert retrieval_map(emb[:0], entries([], []), emb, entries([0, 0], [0, 1]), 2) == ([0.0, 0.0], 0.0)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_ranked_relevance_equals_argsort_then_gather(dtype):
    gen = torch.Generator().manual_seed(0)
    sims = torch.randn(9, 50, generator=gen).to(dtype)
    relevant = torch.rand(9, 50, generator=gen) < 0.3
    order = torch.argsort(sims, dim=1, descending=True)
    assert torch.equal(evaluation.ranked_relevance(sims, relevant), torch.gather(relevant, 1, order))


def test_ranked_relevance_keeps_float64_precision():
    """float64 similarities are ranked in float64: scores 1e-12 apart (equal once rounded to
    float32) keep their order."""
    sims = (1 + torch.tensor([[3.0, 0.0, 2.0, 1.0]], dtype=torch.float64) * 1e-12)
    relevant = torch.tensor([[False, True, False, True]])
    assert evaluation.ranked_relevance(sims, relevant).tolist() == [[False, False, True, True]]


def test_ranked_relevance_of_half_precision_scores():
    """float16 / bfloat16 similarities (embeddings under autocast) are ranked as float32."""
    sims = torch.tensor([[0.5, -0.25, 0.75, 0.0]])
    relevant = torch.tensor([[True, False, False, True]])
    for dtype in (torch.float16, torch.bfloat16):
        assert evaluation.ranked_relevance(sims.to(dtype), relevant).tolist() == [[False, True, True, False]]


# ----------------------------------------------------------------------------- lib/evaluation.py's interface

def retrieval_sets():
    """Queries and candidates of two attributes, as RetrievalDatasets hold them (only `entries` is read):
    attribute 0 has 3 queries and 5 candidates, attribute 1 has 2 queries and 4 candidates."""
    from types import SimpleNamespace
    class Split(SimpleNamespace):
        def __len__(self):                 # every listed entry kept (as without --skip-bad-images)
            return len(self.entries)
    queries = Split(entries=entries([0, 1, 0, 1, 0], [0, 1, 1, 0, 2]))
    candidates = Split(entries=entries([1, 0, 0, 1, 0, 1, 0, 1, 0], [0, 0, 1, 1, 2, 1, 0, 0, 1]))
    return queries, candidates


def test_retrieval_score_ranks_each_query_against_its_attributes_candidates_only():
    """Each query is ranked against the candidates of its own attribute (not all candidates, not the
    queries): per attribute, the mAP of that attribute's rows alone; MeanAP weights them by queries."""
    from lib.evaluation import RetrievalEvaluation
    queries, candidates = retrieval_sets()
    gen = torch.Generator().manual_seed(0)
    query_emb = torch.nn.functional.normalize(torch.randn(5, 4, generator=gen), dim=1)
    cand_emb = torch.nn.functional.normalize(torch.randn(9, 4, generator=gen), dim=1)
    scores = RetrievalEvaluation(queries, candidates, ['collar', 'sleeve']).score((query_emb, cand_emb))
    want = []
    for attr in (0, 1):
        q = queries.entries[:, 1] == attr
        c = candidates.entries[:, 1] == attr
        want.append(loop_average_precision(cand_emb[c].numpy(), query_emb[q].numpy(), candidates.entries[c, 2],
                                           queries.entries[q, 2]))
    assert list(scores.per) == ['collar', 'sleeve']
    assert list(scores.per.values()) == pytest.approx(want)
    assert scores.total == pytest.approx((3 * want[0] + 2 * want[1]) / 5)
    everything = loop_average_precision(cand_emb.numpy(), query_emb.numpy(), candidates.entries[:, 2], queries.entries[:, 2])
    assert scores.total != pytest.approx(everything)


def test_random_row_is_the_meanap_of_seeded_normalised_gaussian_embeddings():
    """The Random row: MeanAP of l2-normalised N(0, 1) embeddings of the embeddings' sizes, drawn
    queries first from a generator seeded with --seed; the trained embeddings' values do not matter."""
    from lib.evaluation import RetrievalEvaluation, retrieval_map
    queries, candidates = retrieval_sets()
    retrieval = RetrievalEvaluation(queries, candidates, ['collar', 'sleeve'])
    embeddings = (torch.zeros(5, 6), torch.ones(9, 6))
    got = retrieval.random_score(embeddings, seed=3)
    gen = torch.Generator().manual_seed(3)
    rand_q = torch.nn.functional.normalize(torch.randn(5, 6, generator=gen), dim=1)
    rand_c = torch.nn.functional.normalize(torch.randn(9, 6, generator=gen), dim=1)
    assert isinstance(got, float)
    assert got == retrieval_map(rand_q, queries.entries, rand_c, candidates.entries, 2)[1]
    assert got == retrieval.random_score((torch.randn(5, 6), torch.randn(9, 6)), seed=3)
    # unnormalised candidates rank otherwise (a query's own scale never changes its ranking)
    assert got != retrieval_map(rand_q, queries.entries, rand_c * torch.rand(9, 1, generator=gen),
                                candidates.entries, 2)[1]
    assert got != retrieval.random_score(embeddings, seed=4)


def test_percent_records_and_log_lines():
    """percent: the records of test_results.json and metrics.jsonl, per attribute and in all, in
    percent; log_scores: one line per attribute, then the total, as the original prints them."""
    from lib import evaluation
    queries, candidates = retrieval_sets()
    retrieval = evaluation.RetrievalEvaluation(queries, candidates, ['collar', 'sleeve'])
    scores = evaluation.Scores({'collar': 0.5, 'sleeve': 0.125}, 0.25)
    assert evaluation.percent(retrieval, scores) == {'mAP': {'collar': 50.0, 'sleeve': 12.5}, 'MeanAP': 25.0}
    lines = []
    logger = types.SimpleNamespace(info=lines.append)
    evaluation.log_scores(logger, retrieval, scores, epoch=3)
    assert lines == ['Train Epoch: 3', 'collar mAP: 50.0000', 'sleeve mAP: 12.5000', 'MeanAP: 25.0000']
    lines.clear()
    evaluation.log_scores(logger, retrieval, scores)
    assert lines == ['collar mAP: 50.0000', 'sleeve mAP: 12.5000', 'MeanAP: 25.0000']
