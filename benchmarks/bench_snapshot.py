"""What a step snapshot costs: the seconds to write runs/<name>/step.pth.tar (weights, Adam's
moments, scheduler, scaler, RNGs, the epoch's meters) and the share of an epoch it adds at a
--checkpoint-every interval (default: asen.py's default).

It measures, through the project's code, a training step (engine.training_step on synthetic
triplets, after --warmup steps so that Adam's moments exist) and the snapshot
(checkpoints.step_snapshot + checkpoints.save_step_snapshot, fsync and rename included) into
--dir, then prints the snapshot's size and time, the epoch's time (--num-triplets / --batch-size
steps), the snapshots an epoch gets at the interval and the share they add.

    python benchmarks/bench_snapshot.py                                  # ResNet-50, 224 px, the paper's epoch
    python benchmarks/bench_snapshot.py --backbone resnet18 --img-size 64 --dim-embed 16 --batch-size 8 \\
        --num-triplets 2000 --interval 20                                # small, on a CPU
"""
import argparse
import os
import statistics
import tempfile

import _common
from _common import markdown_table, print_json, timed

import torch  # noqa: E402

import model as models  # noqa: E402
import utils  # noqa: E402
from lib import checkpoints, config, engine, flags, runtime  # noqa: E402
from losses import LossWeights  # noqa: E402

N_ATTRIBUTES = 8                                           # FashionAI's


def parse():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backbone', default='resnet50', choices=models.BACKBONES)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--dim-embed', type=int, default=1024)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--num-triplets', type=int, default=100000, help="an epoch's triplets")
    parser.add_argument('--interval', default=asen_default_interval(),
                        help="--checkpoint-every's value: N steps or Nm minutes (default: asen.py's)")
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--steps', type=int, default=5, help='timed training steps')
    parser.add_argument('--repeats', type=int, default=3, help='timed snapshots (the median is reported)')
    parser.add_argument('--dir', default=None, help='where to write the snapshots (default: a temporary folder '
                                                     'under runs/, on the disk the runs use)')
    parser.add_argument('--device', default=None, choices=('cpu', 'cuda'))
    return parser.parse_args()


def asen_default_interval():
    return flags.get_args_parser().get_default('checkpoint_every')


def synthetic_batch(args, device):
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(shape, generator=generator).to(device) for _ in range(3)]
    attr = torch.randint(0, N_ATTRIBUTES, (args.batch_size,), generator=generator).to(device)
    return (*images, attr, None)


def main():
    args = parse()
    device = _common.resolve_device(args.device)
    info = _common.machine_info(device)
    _common.print_machine(info)
    settings = config.from_flags(['--backbone', args.backbone, '--img-size', str(args.img_size), '--dim_embed',
                                  str(args.dim_embed), '--batch-size', str(args.batch_size), '--no-pretrained'])
    torch.manual_seed(0)
    tnet = models.TripletWrapper(models.build_model('ASENet', N_ATTRIBUTES, args.backbone, False,
                                                    args.dim_embed)).to(device)
    optimizer = runtime.adam(models.param_groups(tnet, settings.lr_global), settings.lr, device)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.985)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    batch, weights = synthetic_batch(args, device), LossWeights(settings.margin)

    def steps(n):
        for _ in range(n):
            engine.training_step(tnet, batch, optimizer, scaler, 'off', weights)
    timed(lambda: steps(args.warmup), device)
    _, seconds = timed(lambda: steps(args.steps), device)
    step_seconds = seconds / args.steps
    meters = engine.TrainMeters(device)
    os.makedirs('runs', exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir or 'runs', prefix='bench_snapshot-') as folder:
        costs = []
        for _ in range(args.repeats):
            def write():
                rows = runtime.gather_from_ranks(engine.meter_row(meters, device)).cpu()
                state = checkpoints.step_snapshot(1, 1, rows, utils.rng_state(), 1, tnet, optimizer, scheduler,
                                                  scaler, 0.0, settings)
                return checkpoints.save_step_snapshot(state, folder)
            path, cost = timed(write, device)
            costs.append(cost)
        size = os.path.getsize(path)
    cost = statistics.median(costs)
    epoch_steps = -(-args.num_triplets // args.batch_size)
    epoch_seconds = epoch_steps * step_seconds
    every_steps, every_seconds = flags.parse_interval(args.interval)
    if every_steps:
        per_epoch = epoch_steps / every_steps
    elif every_seconds:
        per_epoch = epoch_seconds / every_seconds
    else:
        per_epoch = 0.0
    share = 100 * per_epoch * cost / epoch_seconds
    print(markdown_table(
        ['model', 'snapshot size', 'snapshot time', 'step time', 'epoch (steps)', 'epoch time',
         f'snapshots per epoch at {args.interval}', 'share of the epoch'],
        [[f'ASENet {args.backbone} {args.img_size}px d{args.dim_embed} b{args.batch_size}',
          f'{size / 2**20:.1f} MiB', f'{cost:.3f} s', f'{1000 * step_seconds:.1f} ms',
          f'{epoch_steps}', f'{epoch_seconds:.0f} s', f'{per_epoch:.2f}', f'{share:.2f}%']]))
    print_json(dict(machine=info, bytes=size, snapshot_seconds=cost, snapshot_seconds_all=costs,
                    step_seconds=step_seconds, epoch_steps=epoch_steps, epoch_seconds=epoch_seconds,
                    interval=args.interval, snapshots_per_epoch=per_epoch, share_percent=share))


if __name__ == '__main__':
    main()
