"""What --report adds to --test at the paper's size: per attribute the AP of every query, the
retrieval examples, the AP per value and the t-SNE map of at most report.TSNE_POINTS embeddings,
timed on random 1024-d embeddings with FashionAI's test split (18000 images: 3600 queries, 14400
candidates, 8 attributes) read from ../shared/reference-splits/FashionAI (--splits) when it is there, else
an even split of the same sizes. The embedding of the test split is --test's own and is not counted
here; the attention grids and the figures cost the same at any size (see docs/report.md).

    python benchmarks/bench_report.py                     # FashionAI's test split
    python benchmarks/bench_report.py --queries 200 --candidates 800 --attributes 5
"""
import argparse
import os
import time

import numpy as np
import torch

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import markdown_table, print_json

import model
from lib import report

from lib import costs
SPLITS = os.path.join(costs.REFERENCE_SPLITS, 'FashionAI')


class Part:
    def __init__(self, entries):
        self.entries = entries


class Evaluation:
    def __init__(self, queries, candidates):
        self.queries, self.candidates = Part(queries), Part(candidates)
        self.datasets = (self.queries, self.candidates)


def entries(splits, role, n, n_attributes, n_values, rng):
    """(id, attr, value) rows of the reference split's {role}_test.txt, else an even random split."""
    path = os.path.join(splits, f'{role}_test.txt')
    if os.path.isfile(path) and n is None:
        return np.loadtxt(path, dtype=np.int64).reshape(-1, 3), path
    n = n or {'query': 3600, 'candidate': 14400}[role]
    attrs = np.arange(n) % n_attributes
    return np.stack([np.arange(n), attrs, rng.integers(0, n_values, n)], axis=1), 'random'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--splits', default=SPLITS, help='folder of query_test.txt and candidate_test.txt')
    parser.add_argument('--queries', type=int, default=None)
    parser.add_argument('--candidates', type=int, default=None)
    parser.add_argument('--attributes', type=int, default=8)
    parser.add_argument('--dim', type=int, default=1024)
    opts = parser.parse_args()
    rng = np.random.default_rng(0)
    queries, source = entries(opts.splits, 'query', opts.queries, opts.attributes, 6, rng)
    candidates, _ = entries(opts.splits, 'candidate', opts.candidates, opts.attributes, 6, rng)
    evaluation_set = Evaluation(queries, candidates)
    gen = torch.Generator().manual_seed(0)
    embeddings = (model.l2norm(torch.randn(len(queries), opts.dim, generator=gen)),
                  model.l2norm(torch.randn(len(candidates), opts.dim, generator=gen)))
    # wall seconds, and CPU seconds of this process (all its threads): on a machine shared with
    # other work the CPU time is what the steps cost, the wall time what they took there
    rows, totals = [], dict(rank=0.0, tsne=0.0, rank_cpu=0.0, tsne_cpu=0.0)
    for attr in np.unique(queries[:, 1]):
        start, start_cpu = time.perf_counter(), time.process_time()
        q, aps = report.query_aps(evaluation_set, embeddings, attr)
        report.retrieval_examples(evaluation_set, embeddings, attr, q, aps)
        report.value_aps(evaluation_set, q, aps)
        ranked, ranked_cpu = time.perf_counter(), time.process_time()
        points, _, _ = report.tsne_input(evaluation_set, embeddings, attr)
        report.tsne_map(points, 1)
        done, done_cpu = time.perf_counter(), time.process_time()
        for key, wall, cpu in (('rank', ranked - start, ranked_cpu - start_cpu),
                               ('tsne', done - ranked, done_cpu - ranked_cpu)):
            totals[key] += wall
            totals[key + '_cpu'] += cpu
        rows.append([int(attr), len(q), int((candidates[:, 1] == attr).sum()), len(points),
                     f'{ranked - start:.2f} / {ranked_cpu - start_cpu:.2f}', f'{done - ranked:.2f} / {done_cpu - ranked_cpu:.2f}'])
    print(f'split: {source}; {len(queries)} queries, {len(candidates)} candidates, {opts.dim}-d')
    print(markdown_table(['attribute', 'queries', 'candidates', 't-SNE points', 'APs + examples (s wall / CPU)',
                          't-SNE (s wall / CPU)'], rows))
    print(f"total: APs + examples {totals['rank']:.1f} s wall, {totals['rank_cpu']:.1f} s CPU; "
          f"t-SNE {totals['tsne']:.1f} s wall, {totals['tsne_cpu']:.1f} s CPU")
    print_json(dict(source=source, queries=len(queries), candidates=len(candidates), dim=opts.dim,
                    **{f'{k}_s': v for k, v in totals.items()}))


if __name__ == '__main__':
    main()
