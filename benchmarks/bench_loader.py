"""The training input pipeline alone (no network): today's transform path against gpuinput.DeviceLoader.

`transform`: a DataLoader over the TripletDataset's items (decode or memmap, Resize + CenterCrop,
flip, ToTensor, Normalize per image in the workers), then runtime.to_device per tensor: the
pipeline before gpuinput.py. `device`: gpuinput.DeviceLoader as inputs.make_loader builds it (uint8
batches, flip and normalisation on the device; on CUDA pinned memory and a side stream; persistent
workers). Both give the same tensors (tests/test_gpuinput.py). Each pass loads --num_triplets
triplets (3 images each) of a SynthFashion folder, with and without --cache-images; the figure is
the best of --repeats passes (the device variant's first pass also starts its persistent workers).

    python benchmarks/bench_loader.py --data_path /tmp/sf --synth-images 200 --num_triplets 256
"""
import argparse
import logging
import os

import _common
from _common import markdown_table, print_json

import torch  # noqa: E402

from lib import runtime  # noqa: E402
from lib import config, inputs  # noqa: E402


def transform_pass(dataset, args, device):
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=device.type == 'cuda')
    for anchor, negative, positive, attr in loader:
        batch = [runtime.to_device(t, device, args.channels_last) for t in (anchor, negative, positive)]
        attr.to(device)
    return batch


def device_pass(loader):
    for batch in loader:
        pass
    return batch


def timed_best(fn, repeats, device):
    best = float('inf')
    for _ in range(repeats):
        torch.manual_seed(0)
        _, seconds = _common.timed(fn, device)
        best = min(best, seconds)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data_path', '--data-path', default=os.path.join(_common.REPO, 'data'),
                        help='folder holding SynthFashion/, generated there on first use (default: data/)')
    parser.add_argument('--synth-images', dest='synth_images', type=int, default=2000,
                        help='SynthFashion training images (default: 2000)')
    parser.add_argument('--num_triplets', '--num-triplets', type=int, default=512, help='triplets a pass (default: 512)')
    parser.add_argument('--img-size', '--img_size', dest='img_sizes', type=int, nargs='+', default=[64, 224],
                        help='image sizes to time (default: 64 224)')
    parser.add_argument('--batch-size', dest='batch_size', type=int, default=32, help='triplets a batch (default: 32)')
    parser.add_argument('--workers', type=int, default=0, help='DataLoader workers (default: 0)')
    parser.add_argument('--channels-last', dest='channels_last', action=argparse.BooleanOptionalAction,
                        default=True, help='channels_last images (default: on)')
    parser.add_argument('--repeats', type=int, default=3, help='passes per variant; the best counts (default: 3)')
    parser.add_argument('--device', default=None, choices=('cpu', 'cuda'), help='default: cuda if available')
    args = parser.parse_args(argv)
    device = _common.resolve_device(args.device)
    info = _common.machine_info(device)
    _common.print_machine(info)
    logger = logging.getLogger('bench_loader')
    rows, results = [], []
    for size in args.img_sizes:
        for cached in (False, True):
            flags = ['--dataset', 'SynthFashion', '--data_path', args.data_path, '--synth-images',
                     str(args.synth_images), '--img-size', str(size), '--num_triplets', str(args.num_triplets),
                     '--batch-size', str(args.batch_size), '--workers', str(args.workers)]
            settings = config.from_flags(flags + (['--cache-images'] if cached else []) +
                                       (['--channels-last'] if args.channels_last else ['--no-channels-last']))
            split_files = inputs.prepare_dataset(settings)
            dataset = inputs.training_set(split_files, settings)
            if cached:
                inputs.attach_image_cache([dataset], split_files, 'train', settings, logger)
            loader = inputs.make_loader(dataset, settings.batch_size, device, settings.workers, settings.channels_last,
                                        persistent=True)
            old = timed_best(lambda: transform_pass(dataset, settings, device), args.repeats, device)
            new = timed_best(lambda: device_pass(loader), args.repeats, device)
            images = 3 * len(dataset)
            rows.append([size, 'yes' if cached else 'no', f'{images / old:.0f}', f'{images / new:.0f}',
                         f'{old / new:.2f}x'])
            results.append(dict(img_size=size, cached=cached, transform_img_s=images / old,
                                device_img_s=images / new, speedup=old / new))
    print(markdown_table(['img px', 'cache', 'transform path img/s', 'DeviceLoader img/s', 'speed-up'], rows))
    print()
    print_json(dict(machine=info, workers=args.workers, batch_size=args.batch_size,
                    channels_last=args.channels_last, num_triplets=args.num_triplets, results=results))


if __name__ == '__main__':
    main()
