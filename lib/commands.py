"""The commands asen.py dispatches to, each on a resolved configuration: train, test, retrieve and
visualise. Each assembles the network, the data and the optimiser and hands the loops to engine.py."""

import contextlib
import json
import os
import time

import numpy as np
import torch
from PIL import Image

import losses
import model
import utils
from lib import analysis, asenpp, engine, evaluation, inputs, report, runfolder, runtime, tables, visualize
from lib.eventlog import RunWriter
from lib.preemption import Preemption
from lib.runtime import is_main_process
from utils import UserError


def build_network(args, n_attributes, device, imagenet=True, local_imagenet=False):
    """The triplet-wrapped --model; `imagenet=False` skips the ImageNet and --backbone-weights
    weights (a checkpoint replaces them, so nothing is downloaded or read); `local_imagenet`: ASENpp's
    local trunk gets them all the same (stage 2 starting from a stage-1 checkpoint)."""
    weights_file = args.backbone_weights if imagenet else None
    options = {}
    if args.model == 'ConditionalSimNet':
        options = {'fixed_masks': args.csn_fixed_masks}
    elif args.model == 'ASENpp':
        options = asenpp.model_options(args, imagenet or local_imagenet)
    net = model.build_model(args.model, n_attributes, args.backbone,
                            args.pretrained and imagenet and weights_file is None, args.dim_embed,
                            backbone_weights=weights_file, **options)
    tnet = model.TripletWrapper(net, concat_forward=args.concat_forward).to(device)
    if args.channels_last:
        tnet = tnet.to(memory_format=torch.channels_last)
    return tnet


def compile_mode(args):
    """--compile-mode when --compile is given, else None (not compiled)."""
    return args.compile_mode if args.compile else None


def train_settings(args, net):
    """engine.train_one_epoch's settings from the configuration, for the embedding network `net`."""
    return dict(amp=args.amp, weights=losses.LossWeights.of(args, net.loss_terms), batch_size=args.batch_size,
                log_interval=args.log_interval)


def eval_settings(args):
    """engine.evaluate's (and embed_split's) settings from the configuration."""
    return dict(amp=args.amp, batch_size=args.eval_batch_size, workers=args.workers,
                channels_last=args.channels_last)


def evaluate(net, evaluation_set, device, args):
    """engine.evaluate with the configuration's settings."""
    return engine.evaluate(net, evaluation_set, device, **eval_settings(args))


# ----------------------------------------------------------------------------- train

def train(tnet, split_files, device, args, logger, run_dir, checkpoint):
    """The epoch loop: train, validate, step the schedule, save the epoch snapshot and record the
    epoch; returns the best validation score. Preemption (lib/preemption.py) restores a --resume
    snapshot, continues a step snapshot's epoch at its next step, writes the step snapshots and
    stops the run on a signal."""
    optimizer = runtime.adam(model.param_groups(tnet, args.lr_global), args.lr, device)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.decay_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    snapshots = Preemption(tnet, optimizer, scheduler, scaler, args, run_dir, device, checkpoint)
    train_set, train_loader, valid = training_data(split_files, args, device, logger, snapshots)
    train_net = engine.compiled(runtime.distributed_model(tnet, device, args.sync_bn, logger, args.batch_size),
                                compile_mode(args))
    eval_net = engine.compiled(tnet.embeddingnet, compile_mode(args), evaluation_only=True)
    writer = open_run_files(run_dir, args, logger)
    logger.info(f'Begin training on {args.dataset} dataset.')
    start = time.time()
    with snapshots.stops_deferred(), contextlib.closing(writer):
        for epoch in range(args.start_epoch, args.epochs + 1):
            train_set.set_epoch(epoch)
            first_batch, meters = snapshots.start_epoch(epoch)
            means = engine.train_one_epoch(train_net, batches_from(train_loader, first_batch), optimizer, scaler,
                                           device, epoch, logger=logger, writer=writer, run_dir=run_dir,
                                           first_batch=first_batch, meters=meters, after_step=snapshots.after_step,
                                           **train_settings(args, tnet.embeddingnet))
            means = dict(zip(means, runtime.global_mean(list(means.values()), device)))
            runtime.broadcast_buffers(tnet)
            scores, _ = evaluate(eval_net, valid, device, args)
            evaluation.log_scores(logger, valid, scores, epoch)
            scheduler.step()
            snapshots.save_epoch(epoch, scores.total)
            record_epoch(tnet, split_files, valid, device, args, run_dir, logger, writer, epoch, means, scores,
                         optimizer.param_groups[0]['lr'])
            snapshots.stop_if_asked(epoch)
    minutes = int(time.time() - start) // 60
    logger.info(f'training time {minutes // 60}h {minutes % 60}min')
    return snapshots.best_prec


def training_data(split_files, args, device, logger, snapshots):
    """(the training set, sharded under torchrun; its loader, which keeps its workers across
    epochs; the valid split's evaluation), with a resumed step snapshot's position checked
    against them (`snapshots`, a Preemption)."""
    train_set = inputs.training_set(split_files, args)
    inputs.report_skipped(logger, 'training set', train_set.skipped)
    if args.cache_images:
        inputs.attach_image_cache([train_set], split_files, 'train', args, logger)
    rank, world = runtime.rank_and_world()
    if runtime.distributed():
        if args.num_triplets < world:
            raise UserError(f"--num_triplets {args.num_triplets} is below the {world} processes")
        train_set.shard(rank, world)
    snapshots.check_processes(max(inputs.default_workers(args.workers, device), 1), world)
    valid = inputs.evaluation_of(split_files, 'valid', args, logger)
    train_loader = inputs.make_loader(train_set, args.batch_size, device, args.workers, args.channels_last,
                                      persistent=True)
    snapshots.check_epoch_sizes(len(train_loader), len(train_set), rank)
    return train_set, train_loader, valid


def open_run_files(run_dir, args, logger):
    """Rank 0 readies the run folder's files for this run (an --overwrite run sets the earlier
    one aside, a torn last line of metrics.jsonl is cut, args.json is written) and returns the
    event writer (TensorBoard); the other ranks write nothing."""
    if not is_main_process():
        return runtime.NullWriter()
    if args.overwrite and not runfolder.resumes_in(run_dir, args.resume):
        aside = runfolder.set_aside_previous_run(run_dir)      # moved, never deleted
        if aside:
            logger.info(f'--overwrite: the earlier run of {run_dir} is kept in {aside}')
    torn = runfolder.cut_torn_metrics_line(run_dir)
    if torn:
        logger.info(f'metrics.jsonl ended in a torn line ({torn} bytes of a record cut short); cut off '
                    f'before this run appends')
    utils.write_json(args.as_dict(), os.path.join(run_dir, 'args.json'))
    return RunWriter(run_dir)


def batches_from(loader, first_batch):
    """`loader` for a pass starting at batch `first_batch` (a resumed epoch)."""
    if first_batch == 0:
        return loader
    if hasattr(loader, 'start_at'):                   # gpuinput.DeviceLoader
        loader.start_at(first_batch)
        return loader
    return inputs.LoaderFrom(loader, first_batch)


def record_epoch(tnet, split_files, valid, device, args, run_dir, logger, writer, epoch, means, scores, lr):
    """Rank 0 appends the epoch's row to metrics.jsonl (the training means, the learning rate for
    the next epoch, the valid scores), writes its TensorBoard scalars and, when due, its heatmaps;
    every rank logs the learning rate."""
    if is_main_process():
        loss, acc = means.pop('train_loss'), means.pop('train_acc')
        result = evaluation.percent(valid, scores)
        append_metrics(run_dir, dict(epoch=epoch, train_loss=loss, train_acc=100 * acc, **means, lr=lr, **result))
        log_epoch(writer, epoch, lr, valid, result)
        if heatmap_due(epoch, args.heatmap_every, args.epochs):
            valid_heatmaps(tnet.embeddingnet, valid.images, split_files.attributes, run_dir, epoch, writer, device)
    logger.info(f'lr:{lr}')


def append_metrics(run_dir, record):
    """One JSON line; a failed write is taken back, so the file never ends in half a line."""
    utils.append_line(os.path.join(run_dir, 'metrics.jsonl'), json.dumps(record))


def log_epoch(writer, epoch, lr, evaluation_set, result):
    writer.add_scalar('train/lr', lr, epoch)
    per, total = evaluation_set.per_key, evaluation_set.total_key
    writer.add_scalar(f'valid/{total}', result[total], epoch)
    for name, value in result[per].items():
        writer.add_scalar(f'valid/{per}/{name}', value, epoch)


def heatmap_due(epoch, every, last_epoch):
    """--heatmap-every: epochs every, 2 x every, ... and the last one; never for 0."""
    return every > 0 and (epoch % every == 0 or epoch == last_epoch)


def valid_heatmaps(net, candidates, attributes, run_dir, epoch, writer, device):
    """Attention overlays of a fixed set of valid images, as a PNG and in TensorBoard."""
    samples = analysis.samples_per_attribute(candidates, len(attributes), 2)
    path = os.path.join(run_dir, 'heatmaps', f'valid_epoch{epoch:03d}.png')
    visualize.save_attention_grid(net, [(p, a) for p, a, _ in samples], attributes, candidates.transform,
                                  device, path, columns=4)
    with Image.open(path) as img:
        writer.add_image('attention/valid', np.asarray(img.convert('RGB')), epoch, dataformats='HWC')


# ----------------------------------------------------------------------------- test and use

def test(tnet, split_files, device, args, logger, run_dir, source=None):
    """--test: the test split's figures (mAP, or triplet accuracy on Zappos50k) beside the Random
    baseline, test_results.json and a markdown table. --report (`source`: report.Source): the
    report, from the same embeddings (test_results.json only when --test is given too)."""
    writer = report.Writer(report.prepare(run_dir, args, source), source, args) if args.report else None
    net = engine.compiled(tnet.embeddingnet, compile_mode(args), evaluation_only=True)
    test_set = inputs.evaluation_of(split_files, 'test', args, logger)
    regions = inputs.synth_regions(split_files, 'test')   # read before the evaluation: a bad file stops here
    scores, embeddings = evaluate(net, test_set, device, args)
    evaluation.log_scores(logger, test_set, scores)
    result = evaluation.percent(test_set, scores)
    random_key = f'Random {test_set.total_key}'
    result[random_key] = 100 * test_set.random_score(embeddings, args.seed)
    logger.info(f"{random_key}: {result[random_key]:.4f}")
    result.update(split='test', model=asenpp.result_label(args), dataset=args.dataset, checkpoint=args.resume,
                  attributes=split_files.attributes)
    if args.test and regions is not None and tnet.embeddingnet.has_spatial_attention and is_main_process():
        result['attention_localisation'] = log_localisation(tnet.embeddingnet, test_set, split_files, regions,
                                                            device, args, logger)
    if is_main_process():
        if args.test:
            runfolder.write_test_results(result, run_dir, args.overwrite)
        print(tables.markdown_of_result(result))
        if writer is not None:
            writer.write(tnet.embeddingnet, split_files, test_set, embeddings, result, device, logger)
    return result


def log_localisation(net, test_set, split_files, regions, device, args, logger):
    """Attention mass inside each attribute's region, beside the region's share (uniform attention)."""
    scores = analysis.attention_localisation(net, test_set.datasets, len(split_files.attributes), regions,
                                             args.img_size, device)
    for name, (inside, share) in zip(split_files.attributes, scores):
        logger.info(f'{name} attention in region: {100 * inside:.2f}% (uniform: {100 * share:.2f}%, '
                    f'ratio {inside / max(share, 1e-12):.2f})')
    return {name: {'inside': 100 * i, 'uniform': 100 * u} for name, (i, u) in zip(split_files.attributes, scores)}


def retrieve(tnet, split_files, device, args, run_dir):
    results, grid = analysis.retrieve(tnet.embeddingnet, split_files, args, device, run_dir)
    for rank, score, path in results:
        print(f'{rank:3d}  {score:.4f}  {path}')
    print(f'grid: {grid}')
    return results


def visualize_attention(tnet, split_files, device, args, run_dir):
    path = analysis.write_heatmaps(tnet.embeddingnet, split_files, args.img_size, device,
                                   os.path.join(run_dir, 'heatmaps'),
                                   regions=inputs.synth_regions(split_files, 'test'))
    print(f'heatmaps: {path}')
    return path
