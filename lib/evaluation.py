"""Evaluation: one interface per kind of score, each owning its metric, its Random row and its names.

- RetrievalEvaluation (FashionAI, DARN, DeepFashion, SynthFashion): for each attribute its queries
  are ranked against its candidates; mAP per attribute, and MeanAP weighting the attributes by
  their numbers of queries (Ma et al., AAAI 2020, Sec. 4.1; average_precisions).
- TripletEvaluation (Zappos50k): the share of CSN's (anchor, far, close) triplets ranked right,
  per condition and over all triplets (Veit et al., CVPR 2017).

Scores are fractions in [0, 1]; `percent` turns them into the percent records that the logs,
metrics.jsonl and test_results.json hold.
"""

from typing import NamedTuple

import numpy as np
import torch

import model
from lib import zappos


class Scores(NamedTuple):
    per: dict          # attribute (condition) name -> fraction
    total: float       # MeanAP (Accuracy), a fraction


class RetrievalEvaluation:
    """mAP per attribute and the query-weighted MeanAP of (queries, candidates) RetrievalDatasets."""
    per_key, total_key = 'mAP', 'MeanAP'

    def __init__(self, queries, candidates, attributes):
        self.queries, self.candidates, self.attributes = queries, candidates, attributes

    @property
    def datasets(self):
        """What is embedded, in order; `score` takes their embeddings in the same order."""
        return self.queries, self.candidates

    @property
    def images(self):
        """The images whose attention is drawn during training."""
        return self.candidates

    def score(self, embeddings):
        query_emb, cand_emb = embeddings
        per, total = retrieval_map(query_emb, self.queries.entries, cand_emb, self.candidates.entries,
                                   len(self.attributes))
        return Scores(dict(zip(self.attributes, per)), total)

    def random_score(self, embeddings, seed):
        """The paper's Random row: MeanAP of random Gaussian embeddings of the same sizes."""
        gen = torch.Generator().manual_seed(seed)
        query_emb, cand_emb = embeddings
        rand_q = model.l2norm(torch.randn(query_emb.shape, generator=gen))
        rand_c = model.l2norm(torch.randn(cand_emb.shape, generator=gen))
        return retrieval_map(rand_q, self.queries.entries, rand_c, self.candidates.entries,
                             len(self.attributes))[1]


class TripletEvaluation:
    """Triplet accuracy per condition and overall of a zappos.TripletEvalSet."""
    per_key, total_key = 'accuracy', 'Accuracy'

    def __init__(self, eval_set, conditions):
        self.eval_set, self.attributes = eval_set, conditions

    @property
    def datasets(self):
        return (self.eval_set,)

    @property
    def images(self):
        return self.eval_set

    def score(self, embeddings):
        (emb,) = embeddings
        per, total = zappos.condition_accuracy(emb, self.eval_set.rows, self.eval_set.conditions,
                                               len(self.attributes))
        return Scores(dict(zip(self.attributes, per)), total)

    def random_score(self, embeddings, seed):
        """The Random row: triplet accuracy of random Gaussian embeddings (about 50%)."""
        (emb,) = embeddings
        rand = model.l2norm(torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)))
        return zappos.condition_accuracy(rand, self.eval_set.rows, self.eval_set.conditions,
                                         len(self.attributes))[1]


def retrieval_map(query_emb, query_entries, cand_emb, cand_entries, n_attributes):
    """Per-attribute mAP and the query-weighted MeanAP (fractions in [0, 1])."""
    per_attribute, n_queries = [], []
    for attr in range(n_attributes):
        q = np.flatnonzero(query_entries[:, 1] == attr)
        c = np.flatnonzero(cand_entries[:, 1] == attr)
        q_idx, c_idx = torch.from_numpy(q).to(query_emb.device), torch.from_numpy(c).to(cand_emb.device)
        per_attribute.append(mean_average_precision(
            cand_emb[c_idx], query_emb[q_idx], torch.from_numpy(cand_entries[c, 2]),
            torch.from_numpy(query_entries[q, 2])))
        n_queries.append(len(q))
    mean = float(np.average(per_attribute, weights=n_queries)) if sum(n_queries) else 0.0
    return per_attribute, mean


# ----------------------------------------------------------------------------- the metrics

def _as_tensor(x):
    return x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))


def average_precisions(cand_set, queries, c_gdtruth, q_gdtruth, chunk_size=1024):
    """AP of every query over the full ranking of the candidates, as a float64 tensor (Q,).

    AP = (1/R) * sum over relevant ranks k of precision@k; 0 when a query has R = 0 relevant
    candidates. Queries are processed in chunks so memory grows with the number of candidates,
    not queries x candidates. Only the relevant positions of each ranking are visited after the
    sort: the j-th relevant candidate at rank r adds j / r.
    """
    cand_set, queries = _as_tensor(cand_set), _as_tensor(queries)
    device = cand_set.device
    c_gdtruth, q_gdtruth = _as_tensor(c_gdtruth).to(device), _as_tensor(q_gdtruth).to(device)
    queries = queries.to(device, cand_set.dtype)
    aps = [torch.zeros(0, dtype=torch.float64, device=device)]
    for start in range(0, queries.shape[0], chunk_size):
        sims = queries[start:start + chunk_size] @ cand_set.T                       # (q, C)
        relevant = ranked_relevance(sims, c_gdtruth[None, :] == q_gdtruth[start:start + chunk_size, None])
        rows, cols = relevant.nonzero(as_tuple=True)                                # row-major order
        n_relevant = relevant.sum(dim=1)                                            # (q,)
        first = torch.cumsum(n_relevant, 0) - n_relevant                            # (q,) offsets
        nth = torch.arange(len(rows), device=device) - first[rows] + 1             # j of each hit
        contrib = nth.double() / (cols + 1).double()                                # j / rank
        precision_sum = torch.zeros(len(n_relevant), dtype=torch.float64, device=device)
        precision_sum.index_add_(0, rows, contrib)
        aps.append(torch.where(n_relevant > 0, precision_sum / n_relevant.clamp(min=1), 0.0))
    return torch.cat(aps).cpu()


_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def ranked_relevance(sims, relevant):
    """(q, C) relevance flags reordered by descending similarity in each row.

    Rather than an argsort and a gather, the flag is packed into the lowest mantissa bit of each
    similarity and the packed values alone are sorted (NumPy's SIMD sort on the CPU, several
    times faster than an argsort). Packing moves a score by at most one ulp, so only candidates
    whose scores are within one ulp of each other may change places; the original's argsort
    orders exact ties arbitrarily too.
    """
    if sims.dtype not in _SAME_SIZE_INT:
        sims = sims.float()
    int_type = _SAME_SIZE_INT[sims.dtype]
    bits = sims.contiguous().view(int_type)
    keys = ((bits & ~1) | relevant.to(int_type)).view(sims.dtype)                  # (q, C)
    if keys.device.type == 'cpu':
        keys = torch.from_numpy(np.sort(keys.numpy(), axis=1))                      # ascending
    else:
        keys = torch.sort(keys, dim=1).values
    return (keys.flip(1).view(int_type) & 1).bool()                                 # descending


def mean_average_precision(cand_set, queries, c_gdtruth, q_gdtruth):
    """mAP of one attribute: mean AP of `queries` (Q, D) against `cand_set` (C, D).

    Same argument order and meaning as the authors' function; numpy arrays or torch tensors in,
    a Python float in [0, 1] out (0 when there are no queries).
    """
    aps = average_precisions(cand_set, queries, c_gdtruth, q_gdtruth)
    return float(aps.mean()) if aps.numel() else 0.0


def triplet_accuracy(sim_an, sim_ap):
    """Share of triplets whose anchor is more similar to the positive than to the negative, as a
    0-dim float tensor on the inputs' device (reading it is the caller's host sync)."""
    return (sim_ap > sim_an).float().mean()


def percent(evaluation, scores):
    """{'mAP': {attribute: %}, 'MeanAP': %} (Zappos50k: 'accuracy', 'Accuracy'), and 'scored' when
    --skip-bad-images left entries of the split out (see `scored_share`)."""
    result = {evaluation.per_key: {name: 100 * value for name, value in scores.per.items()},
              evaluation.total_key: 100 * scores.total}
    share = scored_share(evaluation)
    if share is not None:
        result['scored'] = share
    return result


def scored_share(evaluation):
    """{'queries': [scored, listed], 'candidates': [kept, listed], 'share': scored / listed queries}
    when --skip-bad-images left queries or candidates of the split out (their images missing or
    unreadable), else None: a score computed on part of a split says so."""
    sets = {'queries': getattr(evaluation, 'queries', None), 'candidates': getattr(evaluation, 'candidates', None)}
    counts = {role: [len(d), int(getattr(d, 'listed', len(d)))] for role, d in sets.items() if d is not None}
    if len(counts) < 2 or all(kept == listed for kept, listed in counts.values()):
        return None
    scored, listed = counts['queries']
    return dict(counts, share=scored / max(listed, 1))


def log_scores(logger, evaluation, scores, epoch=None):
    """The log lines of an evaluation, as the original prints them."""
    if epoch is not None:
        logger.info(f'Train Epoch: {epoch}')
    for name, value in scores.per.items():
        logger.info(f'{name} {evaluation.per_key}: {100 * value:.4f}')
    logger.info(f'{evaluation.total_key}: {100 * scores.total:.4f}')
