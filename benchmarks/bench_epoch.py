"""Wall time of one epoch end to end through asen.main: default, fast and cached flags.

Each run is `asen.main(['--dataset', DATASET, '--data_path', DATA, '--epochs', '1',
'--name', NAME, *passthrough, *flags])` in a temporary working directory, so runs/<NAME>/ lands
there; the timed call includes data loading, training, validation and checkpointing. DATASET is
SynthFashion (with asen's CPU preset) or, with --dataset FashionAI, data in the authors' format
such as benchmarks/authors_data.py writes (asen's own defaults then, with --no-pretrained). The dataset is
generated (by asen's own code) before the timed runs if it is not there yet, and so is the image
cache of the `cached` variant (`--cache-images`). Each run also reports the time of its training
pass alone (engine.train_one_epoch, without validation and checkpointing), its validation
(commands.evaluate: embedding the valid split and ranking) and its snapshot writing
(checkpoints.save_snapshot); `--step-alone` adds the
time of as many training steps on tensors already in memory (bench_train_step's loop, the fast
flags), the speed an epoch reaches when loading images costs nothing.

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
import bench_train_step  # noqa: E402
import datasets  # noqa: E402
from lib import runtime  # noqa: E402
import utils  # noqa: E402
from lib import checkpoints, commands, config, engine, inputs  # noqa: E402

# 'default' is the original semantics: the SynthFashion preset would otherwise turn the fast paths on.
VARIANTS = {
    'default': ['--amp', 'off', '--no-channels-last', '--no-concat-forward'],
    'fast': ['--amp', 'bf16', '--channels-last', '--concat-forward'],
    'cached': ['--amp', 'bf16', '--channels-last', '--concat-forward', '--cache-images'],
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


def prepare_cache(settings):
    """Build the train and valid image caches (untimed) as asen would; returns seconds."""
    start = time.perf_counter()
    cached = config.from_flags(settings.argv_base + ['--cache-images'])
    split_files = inputs.prepare_dataset(cached)
    logger = logging.getLogger('bench_epoch')
    train_set = datasets.TripletDataset(split_files, cached.num_triplets,
                                        datasets.build_transform(cached.img_size, train=True), cached.seed)
    inputs.attach_image_cache([train_set], split_files, 'train', cached, logger)
    inputs.evaluation_of(split_files, 'valid', cached, logger).datasets
    return time.perf_counter() - start


class Timer:
    """Wraps module.<name> (engine.train_one_epoch, commands.evaluate, checkpoints.save_snapshot) to
    record the seconds of each call, synchronising CUDA at its end so that queued device work is
    counted where it was queued."""

    def __init__(self, module, name, device):
        self.module, self.name, self.device, self.seconds = module, name, device, []
        self.original = getattr(module, name)

    def __enter__(self):
        setattr(self.module, self.name, self)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            _common.sync(self.device)
            self.seconds.append(time.perf_counter() - start)

    def first(self):
        return self.seconds[0] if self.seconds else None


def step_alone(settings, device):
    """(seconds, steps) of the epoch's number of training steps on in-memory tensors, fast flags."""
    steps = -(-settings.num_triplets // settings.batch_size)
    bench_args = argparse.Namespace(n_attributes=5, backbone=settings.backbone, pretrained=False,
                                    dim_embed=settings.dim_embed, lr=settings.lr, margin=settings.margin,
                                    batch_size=settings.batch_size, img_size=settings.img_size,
                                    warmup=1, steps=steps)
    cfg = bench_train_step.config_of('bf16 channels_last concat')
    if bench_train_step.skip_reason(cfg, device):
        cfg = bench_train_step.config_of('fp32 concat')
    seconds, _ = bench_train_step.run_config(cfg, bench_args, device)
    return seconds, steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument('--data_path', '--data-path', default=os.path.join(_common.REPO, 'data'),
                        help='folder holding SynthFashion/ (generated there on first use) or FashionAI/')
    parser.add_argument('--dataset', default='SynthFashion', choices=('SynthFashion', 'FashionAI'),
                        help='FashionAI: authors\'-format data already in --data_path (benchmarks/authors_data.py), '
                             'asen\'s defaults with --no-pretrained')
    parser.add_argument('--fast-workers', dest='fast_workers', type=int, default=None,
                        help='--workers of the fast and cached variants (default: as --workers)')
    parser.add_argument('--extra', default='',
                        help='more asen flags for every variant, one string (e.g. "--backbone resnet18")')
    parser.add_argument('--fast-extra', dest='fast_extra', default='',
                        help='more asen flags for the fast and cached variants, one string (e.g. "--compile")')
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
    parser.add_argument('--workers', type=int, default=None, help='passed through to asen')
    parser.add_argument('--step-alone', dest='step_alone', action=argparse.BooleanOptionalAction, default=True,
                        help='also time the training steps alone on in-memory tensors')
    args = parser.parse_args(argv)

    data_path = os.path.abspath(args.data_path)
    passthrough = []
    for flag, value in (('--num_triplets', args.num_triplets), ('--img-size', args.img_size),
                        ('--synth-images', args.synth_images)):
        if value is not None:
            passthrough += [flag, str(value)]
    if args.workers is not None:
        passthrough += ['--workers', str(args.workers)]
    if args.no_cuda:
        passthrough.append('--no-cuda')
    base = ['--dataset', args.dataset, '--data_path', data_path, '--epochs', '1', *passthrough]
    if args.dataset == 'FashionAI':
        base.append('--no-pretrained')                # nothing to download; speed does not depend on it
    base += shlex.split(args.extra)
    fast_flags = shlex.split(args.fast_extra)
    if args.fast_workers is not None:
        fast_flags += ['--workers', str(args.fast_workers)]

    settings = config.from_flags(base)              # what asen will use (preset + passthrough)
    settings.argv_base = base
    device = runtime.resolve_device(settings.no_cuda)
    info = _common.machine_info(device)
    _common.print_machine(info)

    # Generate the data (if needed) outside the timed runs, with asen's own code.
    start = time.perf_counter()
    split_files = inputs.prepare_dataset(settings)
    prepare_s = time.perf_counter() - start
    settings.valid_images = len(split_files.filenames('valid'))
    cache_s = prepare_cache(settings) if 'cached' in args.variants else None
    close_asen_logger()
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
            argv_run = base + ['--name', f'bench-{name}', '--overwrite'] + VARIANTS[name] + (fast_flags if name != 'default' else [])
            with Timer(engine, 'train_one_epoch', device) as train, Timer(commands, 'evaluate', device) as valid, \
                    Timer(checkpoints, 'save_snapshot', device) as save:
                start = time.perf_counter()
                rc = asen.main(argv_run)
                seconds = time.perf_counter() - start
            close_asen_logger()
            train_s = train.first()
            metrics = read_metrics(os.path.join(workdir, 'runs', f'bench-{name}', 'metrics.jsonl'))
            last = metrics[-1] if metrics else {}
            result = dict(name=name, argv=argv_run, rc=rc, seconds=seconds,
                          triplets_per_s=settings.num_triplets / seconds, train_s=train_s,
                          train_triplets_per_s=settings.num_triplets / train_s if train_s else None,
                          valid_MeanAP=last.get('MeanAP'), train_loss=last.get('train_loss'),
                          valid_s=valid.first(), snapshot_s=save.first(), valid_images=settings.valid_images,
                          train_vs_steps_alone=None)
            results.append(result)
    finally:
        os.chdir(cwd)
        close_asen_logger()
        if tmp is not None:
            tmp.cleanup()

    alone = None
    if args.step_alone:
        seconds, steps = step_alone(settings, device)
        alone = dict(seconds=seconds, steps=steps, triplets_per_s=steps * settings.batch_size / seconds)
    if alone:
        for r in results:
            if r['train_s']:
                r['train_vs_steps_alone'] = r['train_triplets_per_s'] / alone['triplets_per_s']
    first = next((r['seconds'] for r in results if r['rc'] == 0), None)
    for r in results:
        ok = r['rc'] == 0
        rows.append([r['name'], ' '.join(VARIANTS[r['name']]) or '(none)', 'ok' if ok else f"rc={r['rc']}",
                     f"{r['seconds']:.2f}", f"{r['triplets_per_s']:.1f}",
                     f"{first / r['seconds']:.2f}x" if ok and first else '',
                     f"{r['train_s']:.2f}" if r['train_s'] else 'n/a',
                     f"{r['train_triplets_per_s']:.1f}" if r['train_s'] else 'n/a',
                     f"{100 * r['train_vs_steps_alone']:.0f}%" if r['train_vs_steps_alone'] else 'n/a',
                     f"{r['valid_s']:.2f}" if r['valid_s'] else 'n/a',
                     f"{r['valid_MeanAP']:.2f}" if r['valid_MeanAP'] is not None else 'n/a'])
    if alone:
        rows.append(['training steps alone', 'in-memory tensors, fast flags', 'ok', '', '', '',
                     f"{alone['seconds']:.2f}", f"{alone['triplets_per_s']:.1f}", '100%', '', ''])
    print(f"One epoch of {args.dataset}: {settings.backbone}, {settings.img_size} px, "
          f"{settings.num_triplets} triplets, batch {settings.batch_size}, "
          f"{len(split_files.filenames('train'))} training images, device {device}; data in {data_path} "
          f"(prepared in {prepare_s:.1f} s, not timed)")
    print(f"common flags: {shlex.join(base)}")
    print()
    print(markdown_table(['variant', 'extra flags', 'status', 'wall (s)', 'triplets/s', 'speed-up',
                          'training pass (s)', 'training triplets/s', 'of steps alone', 'validation (s)',
                          'valid MeanAP (%)'], rows))
    print()
    print('wall time covers the whole asen.main call: training epoch, validation, checkpoint; the '
          'training pass is engine.train_one_epoch alone (data loading included); validation is commands.evaluate '
          f'({settings.valid_images} valid images embedded and ranked).')
    if cache_s is not None:
        print(f'image cache built (or found up to date) in {cache_s:.1f} s, not timed')
    print_json({'benchmark': 'bench_epoch', 'machine': info, 'data_path': data_path,
                'prepare_s': prepare_s, 'cache_s': cache_s, 'step_alone': alone,
                'settings': {'dataset': args.dataset, 'backbone': settings.backbone, 'img_size': settings.img_size,
                             'fast_flags': fast_flags, 'valid_images': settings.valid_images,
                             'num_triplets': settings.num_triplets, 'batch_size': settings.batch_size,
                             'synth_images': settings.synth_images, 'device': str(device)},
                'results': results})
    return 0 if all(r['rc'] == 0 for r in results) else 1


if __name__ == '__main__':
    raise SystemExit(main())
