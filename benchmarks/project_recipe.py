"""Projected wall time of the paper's recipe from measured rates: 200 epochs of 100000 triplets,
each followed by validation at FashionAI's size and a snapshot.

For each variant of a bench_epoch.py run (e.g. asen's defaults against the fast flags, on
authors'-format data from authors_data.py):

    epoch = triplets / train_rate + valid_images / embed_rate + rank_s + snapshot_s
    total = epochs x epoch

train_rate: the variant's training pass in triplets/s (engine.train_one_epoch, data loading
included); embed_rate: its validation's images/s (valid images / commands.evaluate's seconds, the
small split's ranking included); rank_s: bench_eval.py's seconds to rank FashionAI's valid split
(3600 queries x 14400 candidates, 8 attributes) on the device the epoch ran on; snapshot_s: the
variant's checkpoints.save_snapshot seconds. Left out: the per-epoch attention heatmaps and log lines
(well under a second an epoch) and one-time start-up costs.

    python benchmarks/project_recipe.py --epoch OUT/bench_epoch_fashionai.json --eval OUT/bench_eval.json
"""
import argparse
import json
import sys

from _common import markdown_table, print_json

PAPER = dict(epochs=200, triplets=100000, valid_images=3600 + 14400)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def ranking_seconds(eval_result, device):
    """bench_eval's seconds on `device` ('cuda' or 'cpu'; a 'cuda:0' device counts as cuda)."""
    kind = device.split(':')[0]
    for result in eval_result['results']:
        if result['device'] == kind:
            return result['seconds']
    raise SystemExit(f'error: the bench_eval JSON has no {kind} result; run it with --devices {kind}')


def project(epoch_result, rank_s, epochs, triplets, valid_images):
    """One row per variant that ran: its rates and the projected seconds of an epoch and of all."""
    rows = []
    for r in epoch_result['results']:
        if r.get('rc') != 0 or not r.get('train_s') or not r.get('valid_s'):
            continue
        train_rate = r['train_triplets_per_s']
        embed_rate = r['valid_images'] / r['valid_s']
        epoch_s = triplets / train_rate + valid_images / embed_rate + rank_s + (r.get('snapshot_s') or 0.0)
        rows.append(dict(name=r['name'], train_rate=train_rate, embed_rate=embed_rate, rank_s=rank_s,
                         snapshot_s=r.get('snapshot_s') or 0.0, epoch_s=epoch_s, total_s=epochs * epoch_s))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--epoch', required=True, help='bench_epoch.py JSON (its last line, or a file of it)')
    parser.add_argument('--eval', required=True, help='bench_eval.py JSON')
    parser.add_argument('--epochs', type=int, default=PAPER['epochs'])
    parser.add_argument('--triplets', type=int, default=PAPER['triplets'], help='training triplets per epoch')
    parser.add_argument('--valid-images', type=int, default=PAPER['valid_images'],
                        help='images embedded per validation (FashionAI: 3600 queries + 14400 candidates)')
    args = parser.parse_args(argv)
    epoch_result, eval_result = read_json(args.epoch), read_json(args.eval)
    device = epoch_result['settings']['device']
    rank_s = ranking_seconds(eval_result, device)
    rows = project(epoch_result, rank_s, args.epochs, args.triplets, args.valid_images)
    if not rows:
        print('error: no variant of the bench_epoch JSON ran to the end', file=sys.stderr)
        return 1
    base = rows[0]['total_s']
    print(f"Projected wall time of {args.epochs} epochs of {args.triplets} triplets, each validated on "
          f"{args.valid_images} images, device {device}:")
    print(f"  total = {args.epochs} x ({args.triplets} / train_rate + {args.valid_images} / embed_rate + "
          f"rank_s + snapshot_s), rank_s = {rank_s:.3f} s (bench_eval)")
    print()
    table = [[r['name'], f"{r['train_rate']:.1f}", f"{r['embed_rate']:.1f}", f"{r['snapshot_s']:.2f}",
              f"{r['epoch_s']:.1f}", f"{r['total_s'] / 3600:.1f}", f"{base / r['total_s']:.2f}x"] for r in rows]
    print(markdown_table(['variant', 'train_rate (triplets/s)', 'embed_rate (img/s)', 'snapshot_s',
                          'epoch (s)', 'total (h)', 'speed-up'], table))
    print_json({'benchmark': 'project_recipe', 'device': device, 'epochs': args.epochs, 'triplets': args.triplets,
                'valid_images': args.valid_images, 'rank_s': rank_s, 'results': rows})
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
