"""The training and evaluation loops: `train_one_epoch` with its `training_step` (the loss is
losses.objective), and `evaluate`. Everything they use comes in as an argument.

The step keeps the host ahead of the device: no host sync per step. The loss and accuracy
accumulate on the device (utils.DeviceMeter) and the non-finite-loss flag is a device tensor; all
are read at each log interval and at the end of the epoch.
"""

import sys

import torch
from tqdm import tqdm

import datasets
import losses
import utils
from lib import checkpoints, evaluation, inputs, runtime
from lib.config import CUDA_GRAPH_MODES
from lib.runtime import autocast, distributed, to_device
from utils import UserError


def training_step(tnet, batch, optimizer, scaler, amp, weights):
    """Forward, objective (losses.objective under `weights`), backward and optimizer step of one
    batch already on the device (see batch_to_device); returns (the terms {name: loss}, the total,
    sim_an, sim_ap) as detached device tensors, unread."""
    anchor, negative, positive, attr, originals = batch
    with autocast(anchor.device, amp):
        out = tnet(anchor, negative, positive, attr, originals=originals)
        total, terms = losses.objective(out, weights)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    return {name: t.detach() for name, t in terms.items()}, total.detach(), out.sim_an.detach(), out.sim_ap.detach()


class TrainMeters:
    """The running meters of an epoch, on the device (utils.DeviceMeter): the triplet loss (the log's
    "Loss" and metrics.jsonl's train_loss), the triplet accuracy, the total that is minimised and
    each term of losses.TERMS (those the objective does not compute stay empty)."""

    def __init__(self, device):
        self.loss, self.acc, self.total = (utils.DeviceMeter(device) for _ in range(3))
        self.terms = {name: utils.DeviceMeter(device) for name in losses.TERMS}

    def update(self, terms, total, acc, n):
        self.loss.update(terms['triplet'], n)
        self.acc.update(acc, n)
        self.total.update(total, n)
        for name, value in terms.items():
            if name != 'triplet':
                self.terms[name].update(value, n)

    def extra(self, names):
        """[(label, meter)] of the total and the computed terms `names` (LossWeights.computed())."""
        return [('total', self.total)] + [(name, self.terms[name]) for name in names]


# A step snapshot's meter row: the triplet loss (last, sum), the accuracy (last, sum), their count, then
# (last, sum, count) of the total and of each term of losses.TERMS. The first LEGACY_METER_ROW_WIDTH
# values are the row of the snapshots written before the total and the terms were kept.
# The names of its columns, in order: a snapshot's rows are checked against them
# (checkpoints.check_step_entry, preemption.Preemption.check_epoch_sizes), so a column added here is checked too.
METER_FIELDS = ('loss_last', 'loss_sum', 'acc_last', 'acc_sum', 'count') + tuple(
    f'{name}_{part}' for name in ('total', *losses.TERMS) for part in ('last', 'sum', 'count'))
LEGACY_METER_ROW_WIDTH = 5
METER_ROW_WIDTH = len(METER_FIELDS)


def meter_width():
    """The width of a meter row this version writes: len(METER_FIELDS)."""
    return METER_ROW_WIDTH


def meter_row(meters, device):
    """(METER_ROW_WIDTH,) float64 on `device`: a rank's TrainMeters, as a step snapshot keeps them
    (counts are whole numbers far below 2**53: exact in float64)."""
    count = lambda meter: torch.tensor(float(meter.count), dtype=torch.float64, device=device)
    values = [meters.loss.last, meters.loss.sum, meters.acc.last, meters.acc.sum, count(meters.loss)]
    for meter in (meters.total, *meters.terms.values()):
        values += [meter.last, meter.sum, count(meter)]
    return torch.stack(values)


def set_meter(meter, last, total, count):
    """Put a saved (last, sum, count) into a DeviceMeter."""
    meter.last, meter.sum, meter.count = last.clone(), total.clone(), int(count.item())


def meters_from_row(row, device):
    """The TrainMeters `meter_row` saved. A row of a snapshot written before the total and the terms
    were kept (LEGACY_METER_ROW_WIDTH) restores the loss and accuracy exactly, the total as the loss
    (they are equal unless a term weighs) and the terms empty: they count from the resumed step."""
    row = row.to(device=device, dtype=torch.float64)
    meters = TrainMeters(device)
    set_meter(meters.loss, row[0], row[1], row[4])
    set_meter(meters.acc, row[2], row[3], row[4])
    if row.shape[0] == LEGACY_METER_ROW_WIDTH:
        set_meter(meters.total, row[0], row[1], row[4])
        return meters
    for i, meter in enumerate((meters.total, *meters.terms.values())):
        at = LEGACY_METER_ROW_WIDTH + 3 * i
        set_meter(meter, row[at], row[at + 1], row[at + 2])
    return meters


def train_one_epoch(tnet, loader, optimizer, scaler, device, epoch, *, amp, weights, batch_size,
                    log_interval, logger, writer=None, run_dir=None, first_batch=0, meters=None, after_step=None):
    """One pass over the epoch's triplets; returns the epoch's means {'train_loss': the triplet loss,
    'train_acc': the triplet accuracy (a fraction), 'train_total': the total minimised, 'train_<term>'
    for each other term the objective computes}. `loader` yields (anchor, negative, positive,
    attribute[, originals x 3]) on `device`, the images normalised, flipped and channels_last when
    asked (inputs.make_loader).

    A non-finite loss stops the run at the next log interval, not at its own step: the steps in
    between have updated the weights in memory, but none of it is saved, as the epoch's snapshot
    is written only after this returns and a step snapshot checks the loss first (`check`). Under
    torch.compile a last partial batch runs eagerly (`tnet`'s uncompiled module, same weights):
    the compiled step keeps one static shape, so it neither recompiles nor records a second CUDA
    graph.

    A resumed epoch starts at `first_batch` (the loader yields the batches from there on) with the
    running TrainMeters `meters` of the steps before it. `after_step(steps done, meters, check)` runs
    after each step (`check()` raises the non-finite-loss error if one is pending): the step
    snapshots and the stop signals (preemption.Preemption.after_step).
    """
    eager = getattr(tnet, '_orig_mod', tnet)                # the module torch.compile wraps, if any
    meters = meters or TrainMeters(device)
    computed = weights.computed()
    non_finite = runtime.NonFiniteTracker(device)
    tnet.train()
    progress = tqdm(loader, desc=f'epoch {epoch}', disable=not sys.stderr.isatty(), leave=False)
    for batch_idx, batch in enumerate(progress, start=first_batch):
        batch = batch_to_device(batch, device)
        n = batch[0].size(0)
        net = tnet if n == batch_size else eager
        if net is not eager:
            torch.compiler.cudagraph_mark_step_begin()     # a new training step for CUDA graphs
        terms, total, sim_an, sim_ap = training_step(net, batch, optimizer, scaler, amp, weights)
        non_finite.update(total, batch_idx)
        meters.update(terms, total, evaluation.triplet_accuracy(sim_an, sim_ap), n)
        if batch_idx % log_interval == 0:
            stop_if_non_finite(non_finite, epoch, amp, run_dir, weights)
            log_training(logger, writer, epoch, batch_idx, n, len(loader), len(loader.dataset), meters, computed)
        if after_step is not None:
            after_step(batch_idx + 1, meters, lambda: stop_if_non_finite(non_finite, epoch, amp, run_dir, weights))
    stop_if_non_finite(non_finite, epoch, amp, run_dir, weights)
    means = {'train_loss': meters.loss.read()[1], 'train_acc': meters.acc.read()[1]}
    means.update((f'train_{label}', meter.read()[1]) for label, meter in meters.extra(computed))
    return means


def batch_to_device(batch, device, channels_last=False):
    """A loader batch (anchor, negative, positive, attr[, originals x 3]) on `device` as
    (anchor, negative, positive, attr, originals or None); a no-op for the DeviceLoader's batches,
    already there and in their memory format."""
    anchor, negative, positive, attr, *originals = batch
    anchor, negative, positive = (to_device(t, device, channels_last) for t in (anchor, negative, positive))
    originals = [o.to(device) for o in originals] or None
    return anchor, negative, positive, attr.to(device, non_blocking=True), originals


def stop_if_non_finite(non_finite, epoch, amp, run_dir, weights=None):
    """The one-line error for the first non-finite loss seen so far (one host sync), naming the
    flags that can cause it: the learning rates, ASEN++ stage 2's term weights, --amp. (Weights
    already non-finite in a --resume file are refused when it is loaded: checkpoints.validate.)"""
    bad = non_finite.first_bad_batch()
    if bad is not None:
        stage2 = weights is not None and (weights.local_triplet or weights.align)
        flags = '--lr, --lr-global, --local-weight or --align-weight' if stage2 else '--lr'
        hint = f'lower {flags}' + (f' or use --amp off (not --amp {amp})' if amp != 'off' else '')
        kept = checkpoints.last_snapshot_note(run_dir) if run_dir else 'nothing was saved'
        raise UserError(f"non-finite loss at epoch {epoch}, batch {bad}; {kept}; {hint}")


def log_training(logger, writer, epoch, batch_idx, batch_size, n_batches, n_triplets, meters, computed=()):
    """The log line and TensorBoard scalars of a log interval (reads the device meters: a sync each):
    the triplet loss ("Loss", TensorBoard train/loss) and the accuracy, then the total minimised and
    each other term the objective computes (`computed`: LossWeights.computed()), last (mean)."""
    (loss, loss_avg), (acc, acc_avg) = meters.loss.read(), meters.acc.read()
    extra = [(label, *meter.read()) for label, meter in meters.extra(computed)]
    logger.info(f'Train Epoch: {epoch} [{batch_idx * batch_size}/{n_triplets}]\t'
                f'Loss: {loss:.4f} ({loss_avg:.4f}) \t'
                f'Acc: {100 * acc:.2f}% ({100 * acc_avg:.2f}%) \t'
                + ' '.join(f'{label}: {last:.4f} ({avg:.4f})' for label, last, avg in extra))
    if writer is not None:
        step = (epoch - 1) * n_batches + batch_idx
        writer.add_scalar('train/loss', loss, step)
        writer.add_scalar('train/triplet_accuracy', 100 * acc, step)
        for label, last, _ in extra:
            writer.add_scalar(f'train/{label}', last, step)


def compiled(module, compile_mode, evaluation_only=False):
    """`module` under torch.compile in `compile_mode` (None: not compiled). Evaluation runs batches
    of several sizes (the last of each split is partial): it is compiled without CUDA graphs,
    which would record one graph per size."""
    if compile_mode is None:
        return module
    if evaluation_only and compile_mode in CUDA_GRAPH_MODES:
        compile_mode = 'default' if compile_mode == 'reduce-overhead' else 'max-autotune-no-cudagraphs'
    return torch.compile(module, mode=compile_mode)


# ----------------------------------------------------------------------------- evaluation

def evaluate(net, evaluation_set, device, *, amp, batch_size, workers, channels_last):
    """Embed what `evaluation_set` (lib.evaluation) scores and score it; returns (Scores,
    embeddings)."""
    embeddings = tuple(embed_split(net, dataset, device, amp=amp, batch_size=batch_size, workers=workers,
                                   channels_last=channels_last) for dataset in evaluation_set.datasets)
    return evaluation_set.score(embeddings), embeddings


def embed_split(net, dataset, device, *, amp, batch_size, workers, channels_last):
    """Embeddings of a RetrievalDataset in its order; under torchrun each rank embeds a contiguous
    shard and the shards are gathered, so every rank gets what one process would."""
    def embed(part):
        loader = inputs.make_loader(part, batch_size, device, workers, channels_last)
        return extract_embeddings(net, loader, device, amp, channels_last)
    if not distributed():
        return embed(dataset)
    rank, world = runtime.rank_and_world()
    sizes = runtime.shard_sizes(len(dataset), world)
    start = sum(sizes[:rank])
    local = embed(datasets.IndexShard(dataset, start, start + sizes[rank]))
    # a rank with an empty shard learns the embedding width (C for ASENet_V2) from the others
    (width,) = runtime.max_of_ranks([0 if local is None else local.shape[1]], device)
    if local is None:
        local = torch.zeros(0, width, device=device)
    return runtime.gather_rows(local, sizes)


@torch.inference_mode()
def extract_embeddings(net, loader, device, amp, channels_last):
    """Embeddings (N, D) float32 of a RetrievalDataset in its order, each under its attribute.
    `loader` (inputs.make_loader) yields (images, attribute, value, index) already on `device`."""
    net.eval()
    out = None
    progress = tqdm(loader, desc='features', disable=not sys.stderr.isatty(), leave=False)
    for images, attr, _, index, *originals in progress:
        extra = {'originals': originals[0].to(device)} if originals else {}   # ASENpp stage 2 only
        with autocast(device, amp):
            emb = net(to_device(images, device, channels_last), attr.to(device), **extra)
        if out is None:
            out = torch.empty(len(loader.dataset), emb.shape[1], device=device)
        out[index.to(device)] = emb.float()
    return out

