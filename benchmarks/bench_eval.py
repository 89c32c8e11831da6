"""Seconds of the validation metric at FashionAI's size, from synthetic embeddings, on the CPU and the GPU.

evaluation.retrieval_map (what engine.evaluate runs after embedding the split: per attribute, its queries
ranked against its candidates, AP over the full ranking, MeanAP weighted by query count) on
random unit-length embeddings with the sizes of FashionAI's valid split: by default 3600 queries
and 14400 candidates over 8 attributes with FashionAI's value counts (the authors' meta.json),
1024 dims, spread evenly over the attributes. Each embedding is its value's centre plus noise,
so the MeanAP is about 30%, neither 0 nor 100%. The embeddings are already on the device, as
engine.evaluate leaves them; best of --repeats runs, after one untimed run on CUDA (kernels, allocator).

    python benchmarks/bench_eval.py                      # cpu, then cuda when available
    python benchmarks/bench_eval.py --queries 400 --candidates 1600 --devices cpu
"""
import argparse
import time

import _common
from _common import markdown_table, print_json

import numpy as np  # noqa: E402
import torch  # noqa: E402

import datasets  # noqa: E402
import model as models  # noqa: E402
from lib import evaluation  # noqa: E402


def fashionai_like(n_queries, n_candidates, dim, seed=0):
    """(query_emb, query_entries, cand_emb, cand_entries): entries rows are (id, attribute, value)
    as asen's RetrievalDataset.entries; values drawn per attribute from FashionAI's counts."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    counts = [n for _, n in datasets.FASHIONAI_ATTRIBUTES]
    centres = [torch.randn(n, dim, generator=gen) for n in counts]
    noise = 1.25 * dim ** 0.25              # keeps the MeanAP near 30% at any dim (not 0, not 100%)

    def split(n):
        attrs = np.arange(n) % len(counts)
        values = np.array([rng.integers(counts[a]) for a in attrs])
        entries = np.stack([np.arange(n), attrs, values], axis=1)
        emb = torch.stack([centres[a][v] for a, v in zip(attrs, values)]) + noise * torch.randn(n, dim, generator=gen)
        return models.l2norm(emb), entries

    q_emb, q_entries = split(n_queries)
    c_emb, c_entries = split(n_candidates)
    return q_emb, q_entries, c_emb, c_entries


def time_map(data, device, repeats):
    """(best seconds, MeanAP) of evaluation.retrieval_map with the embeddings on `device`."""
    q_emb, q_entries, c_emb, c_entries = data
    q_emb, c_emb = q_emb.to(device), c_emb.to(device)
    n_attributes = len(datasets.FASHIONAI_ATTRIBUTES)
    if device.type == 'cuda':
        evaluation.retrieval_map(q_emb, q_entries, c_emb, c_entries, n_attributes)
    best, mean = float('inf'), None
    for _ in range(repeats):
        _common.sync(device)
        start = time.perf_counter()
        _, mean = evaluation.retrieval_map(q_emb, q_entries, c_emb, c_entries, n_attributes)
        _common.sync(device)
        best = min(best, time.perf_counter() - start)
    return best, mean


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--queries', type=int, default=3600)
    parser.add_argument('--candidates', type=int, default=14400)
    parser.add_argument('--dim', type=int, default=1024)
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per device (best reported)')
    parser.add_argument('--devices', nargs='+', default=None, choices=('cpu', 'cuda'),
                        help='default: cpu, and cuda when available')
    args = parser.parse_args(argv)
    if min(args.queries, args.candidates, args.dim, args.repeats) <= 0:
        parser.error('--queries, --candidates, --dim and --repeats must be positive')
    devices = args.devices or (['cpu', 'cuda'] if torch.cuda.is_available() else ['cpu'])
    info = _common.machine_info()
    _common.print_machine(info)

    data = fashionai_like(args.queries, args.candidates, args.dim)
    results, rows = [], []
    for name in devices:
        device = _common.resolve_device(name)
        seconds, mean = time_map(data, device, args.repeats)
        results.append(dict(device=name, seconds=seconds, MeanAP=100 * mean))
        rows.append([name, f'{seconds:.3f}', f'{100 * mean:.4f}'])
    print(f"Validation metric at FashionAI's size: {args.queries} queries x {args.candidates} candidates over "
          f"{len(datasets.FASHIONAI_ATTRIBUTES)} attributes, {args.dim} dims (evaluation.retrieval_map, "
          f"best of {args.repeats})")
    print()
    print(markdown_table(['device', 'seconds', 'MeanAP (%)'], rows))
    spread = max(r['MeanAP'] for r in results) - min(r['MeanAP'] for r in results)
    print()
    print(f'MeanAP difference between devices: {spread:.2e} points')
    print_json({'benchmark': 'bench_eval', 'machine': info, 'settings': vars(args), 'results': results,
                'MeanAP_spread': spread})
    return 0 if spread < 1e-4 else 1


if __name__ == '__main__':
    raise SystemExit(main())
