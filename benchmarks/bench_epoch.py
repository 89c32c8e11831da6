"""Wall time of one SynthFashion epoch end to end through asen.main, default flags vs fast flags.

Each run is `asen.main(['--dataset', 'SynthFashion', '--data_path', DATA, '--epochs', '1',
'--name', NAME, *passthrough, *flags])` in a temporary working directory, so runs/<NAME>/ lands
there; the timed call includes data loading, training, validation and checkpointing. The dataset is
generated (by asen's own code) before the timed runs if it is not there yet.

    python benchmarks/bench_epoch.py                          # SynthFashion preset of asen.py
    python benchmarks/bench_epoch.py --num_triplets 16 --synth-images 48 --img-size 64 --data_path /tmp/sf
"""
import argparse
import json
import logging
import os
import shlex
import tempfile
import time

import _common
from _common import markdown_table, print_json

import torch  # noqa: E402

import asen  # noqa: E402  (the project's module; _common put the repo on sys.path)

VARIANTS = {
    'default': [],
    'fast': ['--amp', 'bf16', '--channels-last', '--concat-forward'],
}


def read_metrics(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def close_asen_logger():
    """Close the file handler asen's logger holds, so the temporary folder can be removed."""
    logger = logging.getLogger('asen')
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--data_path', '--data-path', default=os.path.join(_common.REPO, 'data'),
                        help='folder holding SynthFashion/ (generated there on first use)')
    parser.add_argument('--num_triplets', '--num-triplets', type=int, default=None,
                        help='passed through to asen (default: not passed, i.e. the SynthFashion preset)')
    parser.add_argument('--img_size', '--img-size', type=int, default=None, help='passed through to asen')
    parser.add_argument('--synth-images', '--synth_images', dest='synth_images', type=int, default=None,
                        help='passed through to asen (changing it regenerates the dataset in --data_path)')
    parser.add_argument('--no-cuda', dest='no_cuda', action='store_true', help='passed through to asen')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS),
                        help='which flag sets to time, in this order')
    parser.add_argument('--workdir', default=None,
                        help='keep the runs here instead of in a removed temporary folder')
    args = parser.parse_args(argv)

    data_path = os.path.abspath(args.data_path)
    passthrough = []
    for flag, value in (('--num_triplets', args.num_triplets), ('--img-size', args.img_size),
                        ('--synth-images', args.synth_images)):
        if value is not None:
            passthrough += [flag, str(value)]
    if args.no_cuda:
        passthrough.append('--no-cuda')
    base = ['--dataset', 'SynthFashion', '--data_path', data_path, '--epochs', '1', *passthrough]

    settings = asen.parse_args(base)              # what asen will use (preset + passthrough)
    device = asen.resolve_device(settings)
    info = _common.machine_info(device)
    _common.print_machine(info)

    # Generate the data (if needed) outside the timed runs, with asen's own code.
    start = time.perf_counter()
    asen.prepare_dataset(settings)
    prepare_s = time.perf_counter() - start
    if device.type == 'cuda':
        torch.zeros(1, device=device)             # CUDA context outside the first timed run

    tmp = None
    if args.workdir:
        workdir = os.path.abspath(args.workdir)
        os.makedirs(workdir, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix='bench_epoch-', ignore_cleanup_errors=True)
        workdir = tmp.name
    results, rows = [], []
    cwd = os.getcwd()
    try:
        os.chdir(workdir)
        for name in args.variants:
            argv_run = base + ['--name', f'bench-{name}'] + VARIANTS[name]
            start = time.perf_counter()
            rc = asen.main(argv_run)
            seconds = time.perf_counter() - start
            close_asen_logger()
            metrics = read_metrics(os.path.join(workdir, 'runs', f'bench-{name}', 'metrics.jsonl'))
            last = metrics[-1] if metrics else {}
            result = dict(name=name, argv=argv_run, rc=rc, seconds=seconds,
                          triplets_per_s=settings.num_triplets / seconds,
                          valid_MeanAP=last.get('MeanAP'), train_loss=last.get('train_loss'))
            results.append(result)
    finally:
        os.chdir(cwd)
        close_asen_logger()
        if tmp is not None:
            tmp.cleanup()

    first = next((r['seconds'] for r in results if r['rc'] == 0), None)
    for r in results:
        ok = r['rc'] == 0
        rows.append([r['name'], ' '.join(VARIANTS[r['name']]) or '(none)', 'ok' if ok else f"rc={r['rc']}",
                     f"{r['seconds']:.2f}", f"{r['triplets_per_s']:.1f}",
                     f"{first / r['seconds']:.2f}x" if ok and first else '',
                     f"{r['valid_MeanAP']:.2f}" if r['valid_MeanAP'] is not None else 'n/a'])
    print(f"One epoch of SynthFashion: {settings.backbone}, {settings.img_size} px, "
          f"{settings.num_triplets} triplets, batch {settings.batch_size}, "
          f"{settings.synth_images} training images, device {device}; data in {data_path} "
          f"(prepared in {prepare_s:.1f} s, not timed)")
    print(f"common flags: {shlex.join(base)}")
    print()
    print(markdown_table(['variant', 'extra flags', 'status', 'wall (s)', 'triplets/s', 'speed-up',
                          'valid MeanAP (%)'], rows))
    print()
    print('wall time covers the whole asen.main call: training epoch, validation, checkpoint.')
    print_json({'benchmark': 'bench_epoch', 'machine': info, 'data_path': data_path,
                'prepare_s': prepare_s,
                'settings': {'backbone': settings.backbone, 'img_size': settings.img_size,
                             'num_triplets': settings.num_triplets, 'batch_size': settings.batch_size,
                             'synth_images': settings.synth_images, 'device': str(device)},
                'results': results})
    return 0 if all(r['rc'] == 0 for r in results) else 1


if __name__ == '__main__':
    raise SystemExit(main())
