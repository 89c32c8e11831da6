"""Where an epoch's time goes: data, copies, forward, backward, optimizer, host syncs, logging,
validation and snapshot writing, through asen's own code.

Everything after `--` is an asen command line (dataset, data path, model and speed flags); the
benchmark builds what commands.train builds from it (commands.build_network, runtime.adam,
engine.compiled, inputs.training_set, inputs.make_loader, the image cache with --cache-images) and
times:

1. the real training pass: engine.train_one_epoch over --steps batches, as asen runs it;
2. the same number of steps again, with the device synchronised after each part of the step, so
   that each part's time is its own: waiting for the loader, the host-to-device copy
   (engine.batch_to_device), forward and objective, backward, optimizer step, and engine.log_training at
   the log interval. The sum exceeds the real pass by whatever the real pass overlaps;
3. the steps alone on one batch already on the device (engine.training_step), with no host sync
   and with the per-step reads of loss and accuracy that asen made before (`.item()`): the
   difference is the cost of those host syncs;
4. validation as engine.evaluate runs it: embedding the valid queries and candidates
   (engine.embed_split, --eval-batch-size) and ranking them (evaluation.retrieval_map);
5. writing a snapshot (checkpoints.snapshot, checkpoints.save_snapshot) to a temporary folder.

--profile N adds torch.profiler's table of the top operators over N steps of engine.train_one_epoch
(by device time on CUDA, by CPU time on the CPU). --warmup steps run first, untimed (cuDNN
autotuning, torch.compile). Works on the CPU at small sizes and on CUDA.

    python benchmarks/bench_breakdown.py --steps 100 -- --dataset FashionAI --data_path DATA --no-pretrained
    python benchmarks/bench_breakdown.py --steps 4 --warmup 1 -- --dataset SynthFashion --data_path /tmp/sf
"""
import argparse
import logging
import os
import shlex
import tempfile
import time

import _common
from _common import markdown_table, print_json

import torch  # noqa: E402

from lib import runtime  # noqa: E402
import losses  # noqa: E402
import utils  # noqa: E402
from lib import checkpoints, commands, config, engine, evaluation, inputs  # noqa: E402


class Setup:
    """What commands.train builds for training, from an asen command line."""

    def __init__(self, asen_argv):
        self.asen_argv = list(asen_argv)
        self.args = args = config.from_flags(asen_argv)
        self.device = runtime.resolve_device(args.no_cuda)
        runtime.configure_backends(self.device, args.tf32)
        utils.seed_everything(args.seed)
        self.logger = logging.getLogger('bench_breakdown')
        self.split_files = inputs.prepare_dataset(args)
        self.tnet = commands.build_network(args, len(self.split_files.attributes), self.device)
        self.optimizer = runtime.adam([p for p in self.tnet.parameters() if p.requires_grad], args.lr, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == 'fp16')
        self.train_model = engine.compiled(self.tnet, commands.compile_mode(args))

    def loader(self, steps, epoch):
        """A loader of `steps` full batches of epoch `epoch`'s triplets."""
        args = config.from_flags(self.asen_argv + ['--num_triplets', str(steps * self.args.batch_size)])
        train_set = inputs.training_set(self.split_files, args)
        if args.cache_images:
            inputs.attach_image_cache([train_set], self.split_files, 'train', args, self.logger)
        train_set.set_epoch(epoch)
        return inputs.make_loader(train_set, args.batch_size, self.device, args.workers, args.channels_last)

    def sync(self):
        _common.sync(self.device)


def real_pass(setup, loader, epoch):
    """Seconds of engine.train_one_epoch over `loader`."""
    setup.sync()
    start = time.perf_counter()
    engine.train_one_epoch(setup.train_model, loader, setup.optimizer, setup.scaler, setup.device, epoch,
                           logger=setup.logger, **commands.train_settings(setup.args, setup.tnet.embeddingnet))
    setup.sync()
    return time.perf_counter() - start


def phases_pass(setup, loader, epoch):
    """Seconds per part of the step, the device synchronised after each part."""
    args, device, net = setup.args, setup.device, setup.train_model
    weights = losses.LossWeights.of(args, setup.tnet.embeddingnet.loss_terms)
    parts = dict.fromkeys(('data', 'copy', 'forward', 'backward', 'optimizer', 'logging'), 0.0)
    meters = engine.TrainMeters(device)
    net.train()
    clock = time.perf_counter
    batches = iter(loader)
    for batch_idx in range(len(loader)):
        t0 = clock()
        batch = next(batches)
        t1 = clock()
        anchor, negative, positive, attr, originals = engine.batch_to_device(batch, device, args.channels_last)
        setup.sync()
        t2 = clock()
        if net is not getattr(net, '_orig_mod', net):
            torch.compiler.cudagraph_mark_step_begin()
        with runtime.autocast(device, args.amp):
            out = net(anchor, negative, positive, attr, originals=originals)
            objective, terms = losses.objective(out, weights)
        setup.sync()
        t3 = clock()
        setup.optimizer.zero_grad(set_to_none=True)
        setup.scaler.scale(objective).backward()
        setup.sync()
        t4 = clock()
        setup.scaler.step(setup.optimizer)
        setup.scaler.update()
        meters.update({k: v.detach() for k, v in terms.items()}, objective.detach(),
                      evaluation.triplet_accuracy(out.sim_an.detach(), out.sim_ap.detach()), anchor.size(0))
        setup.sync()
        t5 = clock()
        if batch_idx % args.log_interval == 0:
            engine.log_training(setup.logger, None, epoch, batch_idx, anchor.size(0), len(loader),
                              len(loader.dataset), meters, weights.computed())
        t6 = clock()
        for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            parts[name] += seconds
    return parts


def steps_alone(setup, steps, per_step_reads):
    """Seconds of `steps` engine.training_step calls on one batch already on the device; with
    `per_step_reads`, each step also reads its loss and accuracy (`.item()`), as asen did before."""
    args, device = setup.args, setup.device
    batch = engine.batch_to_device(next(iter(setup.loader(1, 0))), device, args.channels_last)
    weights = losses.LossWeights.of(args, setup.tnet.embeddingnet.loss_terms)
    compiled = setup.train_model is not getattr(setup.train_model, '_orig_mod', setup.train_model)
    setup.train_model.train()
    setup.sync()
    start = time.perf_counter()
    for _ in range(steps):
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        terms, _, sim_an, sim_ap = engine.training_step(setup.train_model, batch, setup.optimizer, setup.scaler,
                                                        args.amp, weights)
        if per_step_reads:
            terms['triplet'].item()
            evaluation.triplet_accuracy(sim_an, sim_ap).item()
    setup.sync()
    return time.perf_counter() - start


def validation(setup):
    """(embedding seconds, ranking seconds, images embedded) of the valid split, as engine.evaluate."""
    args, device = setup.args, setup.device
    queries, candidates = inputs.evaluation_of(setup.split_files, 'valid', args, setup.logger).datasets
    net = engine.compiled(setup.tnet.embeddingnet, commands.compile_mode(args), evaluation_only=True)
    setup.sync()
    start = time.perf_counter()
    query_emb = engine.embed_split(net, queries, device, **commands.eval_settings(args))
    cand_emb = engine.embed_split(net, candidates, device, **commands.eval_settings(args))
    setup.sync()
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluation.retrieval_map(query_emb, queries.entries, cand_emb, candidates.entries, len(setup.split_files.attributes))
    setup.sync()
    return embed_s, time.perf_counter() - start, len(queries) + len(candidates)


def snapshot_seconds(setup):
    """Seconds to write one snapshot (and its model_best copy) as asen does after each epoch."""
    scheduler = torch.optim.lr_scheduler.StepLR(setup.optimizer, step_size=1)
    with tempfile.TemporaryDirectory(prefix='bench_breakdown-') as folder:
        start = time.perf_counter()
        checkpoints.save_snapshot(checkpoints.snapshot(1, setup.tnet, setup.optimizer, scheduler, setup.scaler, 0.5, 0.5,
                                         setup.args), folder, True)
        return time.perf_counter() - start


def profile_table(setup, steps, rows=12):
    """torch.profiler's top operators over `steps` steps of engine.train_one_epoch."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if setup.device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    loader = setup.loader(steps, 3)
    with torch.profiler.profile(activities=activities) as prof:
        real_pass(setup, loader, 3)
    sort = 'self_cuda_time_total' if setup.device.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--steps', type=int, default=100, help='training steps per timed pass')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps first')
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='also print torch.profiler\'s top operators over N steps (0: no profile)')
    parser.add_argument('asen_argv', nargs=argparse.REMAINDER, help='-- then an asen command line')
    args = parser.parse_args(argv)
    asen_argv = args.asen_argv[1:] if args.asen_argv[:1] == ['--'] else args.asen_argv
    if args.steps <= 0 or args.warmup < 0 or args.profile < 0:
        parser.error('--steps must be positive, --warmup and --profile at least 0')

    setup = Setup(asen_argv)
    device, batch = setup.device, setup.args.batch_size
    info = _common.machine_info(device)
    _common.print_machine(info)

    if args.warmup:
        real_pass(setup, setup.loader(args.warmup, 0), 0)
    real_s = real_pass(setup, setup.loader(args.steps, 1), 1)
    parts = phases_pass(setup, setup.loader(args.steps, 2), 2)
    alone_s = steps_alone(setup, args.steps, per_step_reads=False)
    alone_reads_s = steps_alone(setup, args.steps, per_step_reads=True)
    embed_s, map_s, n_valid = validation(setup)
    save_s = snapshot_seconds(setup)
    table = profile_table(setup, args.profile) if args.profile else None

    images = 3 * batch * args.steps
    sync_s = max(alone_reads_s - alone_s, 0.0)
    phase_sum = sum(parts.values())

    def row(name, seconds, per_step=True, share=True):
        return [name, f'{seconds:.3f}', f'{1000 * seconds / args.steps:.2f}' if per_step else '',
                f'{100 * seconds / real_s:.0f}%' if share else '']
    rows = [row('waiting for data (loader)', parts['data']),
            row('host-to-device copy', parts['copy']),
            row('forward + loss', parts['forward']),
            row('backward', parts['backward']),
            row('optimizer step (+ device-side meters)', parts['optimizer']),
            row('logging (log interval)', parts['logging']),
            row('sum of the parts, synchronised after each', phase_sum),
            row('**real training pass** (engine.train_one_epoch)', real_s),
            row('steps alone, no host sync (asen.training_step)', alone_s),
            row('host syncs of per-step .item() reads (difference)', sync_s),
            row(f'validation: embedding {n_valid} images', embed_s, per_step=False, share=False),
            row('validation: ranking (mAP)', map_s, per_step=False, share=False),
            row('snapshot writing', save_s, per_step=False, share=False)]
    print(f"Breakdown of {args.steps} training steps of {batch} triplets ({images} images), device {device}; "
          f"asen {shlex.join(asen_argv)}")
    print()
    print(markdown_table(['part', 'seconds', 'ms per step', 'share of the real pass'], rows))
    print()
    print(f'real training pass: {images / real_s:.1f} img/s; steps alone: {images / alone_s:.1f} img/s '
          f'({100 * alone_s / real_s:.0f}% of the real pass\'s time); validation embeds '
          f'{n_valid / embed_s:.1f} img/s')
    if table:
        print()
        print(f'torch.profiler, {args.profile} steps of asen.train_one_epoch:')
        print(table)
    print_json({'benchmark': 'bench_breakdown', 'machine': info, 'asen_argv': asen_argv,
                'settings': {'steps': args.steps, 'warmup': args.warmup, 'batch_size': batch,
                             'device': str(device)},
                'parts': parts, 'phase_sum_s': phase_sum, 'real_pass_s': real_s, 'steps_alone_s': alone_s,
                'steps_alone_with_reads_s': alone_reads_s, 'host_sync_s': sync_s,
                'real_images_per_s': images / real_s, 'steps_alone_images_per_s': images / alone_s,
                'valid_images': n_valid, 'valid_embed_s': embed_s, 'valid_map_s': map_s,
                'valid_images_per_s': n_valid / embed_s, 'snapshot_s': save_s})
    return 0


if __name__ == '__main__':
    os.environ.setdefault('TQDM_DISABLE', '1')
    raise SystemExit(main())
