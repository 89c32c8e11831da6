"""Benchmark evaluation.mean_average_precision against the original per-query loop.

Both compute the mAP of `queries` ranked against `cand_set` by dot-product similarity on the same
random data; the reference is a plain Python loop (np.argsort(-sim) per query, then a walk over
the sorted labels accumulating precision at every relevant rank, AP = sum / R, 0 when R = 0),
written as the authors wrote it (a Python loop over the candidates of each query).

    python benchmarks/bench_map.py                      # 2000 x 8000 x 1024, 10 classes
    python benchmarks/bench_map.py --device cpu --queries 50 --candidates 200 --dim 16
"""
import argparse

import numpy as np

import _common
from _common import markdown_table, print_json, timed

import utils  # noqa: E402  (the project's modules; _common put the repo on sys.path)
from lib import evaluation  # noqa: E402


def reference_map(cand_set, queries, c_gdtruth, q_gdtruth):
    """The original algorithm, as the authors wrote it: per query an argsort, a Python loop over
    every candidate building the sorted 0/1 labels, then a walk accumulating precision@k at each
    relevant rank (AP = sum / R, 0 when R = 0)."""
    sims = np.matmul(queries, cand_set.T)                        # (Q, C)
    ap_sum = 0.0
    for q in range(sims.shape[0]):
        index = np.argsort(-sims[q])
        sorted_labels = []
        for i in range(index.shape[0]):
            sorted_labels.append(1 if c_gdtruth[index[i]] == q_gdtruth[q] else 0)
        n_relevant = sum(sorted_labels)
        if n_relevant == 0:
            continue
        hits, precision_sum = 0, 0.0
        for rank, label in enumerate(sorted_labels, start=1):
            if label >= 1:
                hits += 1
                precision_sum += hits / rank
        ap_sum += precision_sum / n_relevant
    return ap_sum / sims.shape[0] if sims.shape[0] else 0.0


def make_data(n_queries, n_candidates, dim, n_classes, dtype, seed):
    """L2-normalised Gaussian embeddings and integer class labels."""
    rng = np.random.default_rng(seed)
    cand = rng.standard_normal((n_candidates, dim)).astype(dtype)
    query = rng.standard_normal((n_queries, dim)).astype(dtype)
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    c_lab = rng.integers(0, n_classes, n_candidates)
    q_lab = rng.integers(0, n_classes, n_queries)
    return cand, query, c_lab, q_lab


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument('--queries', type=int, default=2000)
    parser.add_argument('--candidates', type=int, default=8000)
    parser.add_argument('--dim', type=int, default=1024)
    parser.add_argument('--classes', type=int, default=10, help='labels drawn from this many classes')
    parser.add_argument('--dtype', default='float32', choices=('float32', 'float64'),
                        help='embedding dtype (both implementations get the same arrays)')
    parser.add_argument('--device', default=None, choices=('cpu', 'cuda'),
                        help='device for evaluation.mean_average_precision (default: cuda if available)')
    parser.add_argument('--repeats', type=int, default=3, help='timed calls of the vectorised version (best)')
    parser.add_argument('--loop-repeats', type=int, default=1, help='timed calls of the slow loop (best)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    device = _common.resolve_device(args.device)
    info = _common.machine_info(device)
    _common.print_machine(info)

    cand, query, c_lab, q_lab = make_data(args.queries, args.candidates, args.dim, args.classes,
                                          np.dtype(args.dtype), args.seed)

    # Reference: numpy on the CPU.
    ref_value, ref_time = None, float('inf')
    for _ in range(max(args.loop_repeats, 1)):
        ref_value, t = timed(lambda: reference_map(cand, query, c_lab, q_lab), torch.device('cpu'))
        ref_time = min(ref_time, t)

    # Vectorised: inputs already on the device (as the embeddings are in engine.evaluate).
    cand_t, query_t = torch.from_numpy(cand).to(device), torch.from_numpy(query).to(device)
    c_lab_t, q_lab_t = torch.from_numpy(c_lab).to(device), torch.from_numpy(q_lab).to(device)
    call = lambda: evaluation.mean_average_precision(cand_t, query_t, c_lab_t, q_lab_t)  # noqa: E731
    if device.type == 'cuda':
        call()  # warm-up: CUDA context, kernels, allocator
    new_value, new_time = None, float('inf')
    for _ in range(max(args.repeats, 1)):
        new_value, t = timed(call, device)
        new_time = min(new_time, t)

    diff = abs(new_value - ref_value)
    ok = diff < 1e-6
    print(f"mAP of {args.queries} queries x {args.candidates} candidates x {args.dim} dims "
          f"({args.dtype}, {args.classes} classes)")
    print()
    print(markdown_table(
        ['implementation', 'device', 'mAP', 'time (s)', 'speed-up'],
        [['per-query loop (original)', 'cpu', f'{ref_value:.10f}', f'{ref_time:.4f}', '1.0x'],
         ['evaluation.mean_average_precision', device.type, f'{new_value:.10f}', f'{new_time:.4f}',
          f'{ref_time / new_time:.1f}x']]))
    print()
    print(f"|difference| = {diff:.3e} ({'OK, < 1e-6' if ok else 'FAIL, >= 1e-6'}); "
          f"times: best of {args.loop_repeats} (loop) / {args.repeats} (vectorised)")
    print_json({'benchmark': 'bench_map', 'machine': info,
                'sizes': {'queries': args.queries, 'candidates': args.candidates, 'dim': args.dim,
                          'classes': args.classes, 'dtype': args.dtype},
                'reference_map': ref_value, 'vectorised_map': new_value, 'abs_diff': diff,
                'match': ok, 'reference_s': ref_time, 'vectorised_s': new_time,
                'speedup': ref_time / new_time, 'repeats': args.repeats,
                'loop_repeats': args.loop_repeats})
    return 0 if ok else 1


if __name__ == '__main__':
    raise SystemExit(main())
