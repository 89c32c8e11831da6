"""Train and test ASEN (Ma et al., AAAI 2020): the entry point.

    python asen.py --dataset FashionAI                                   # train
    python asen.py --test --resume runs/ASEN/model_best.pth.tar          # test
    python asen.py --dataset SynthFashion                                # offline CPU demo
"""
import argparse
import copy
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image
from tensorboardX import SummaryWriter
from tqdm import tqdm

import analysis
import asenpp
import datasets
import imagecache
import model as models
import runtime
import synthfashion
import visualize
import utils
import tables
import zappos
from runtime import autocast, distributed, is_main_process, local_first, to_device
from utils import UserError

DATASETS = ('FashionAI', 'DARN', 'DeepFashion', 'SynthFashion', 'Zappos50k')
# Datasets of (anchor, far, close) triplet lists, scored by triplet accuracy rather than mAP.
TRIPLET_DATASETS = ('Zappos50k',)

# SynthFashion runs out of the box on a CPU in about 5 minutes: these replace the defaults of
# flags not given. The fast paths (bf16 where the CPU has bf16 kernels, channels_last, one
# concatenated forward) buy the triplets a from-scratch ResNet-18 needs in that time.
SYNTH_PRESET = dict(backbone='resnet18', pretrained=False, img_size=64, epochs=6, num_triplets=5000,
                    batch_size=32, log_interval=40, channels_last=True, concat_forward=True)


def synth_preset():
    bf16_ok = torch.cuda.is_available() or torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dict(SYNTH_PRESET, amp='bf16' if bf16_ok else 'off')


# Flags a checkpoint does not override when resuming (they describe this invocation).
INVOCATION_FLAGS = {'resume', 'test', 'start_epoch', 'no_cuda', 'workers', 'skip_bad_images', 'visualize',
                    'retrieve', 'attribute', 'topk', 'gallery', 'cache_images', 'sync_bn'}


class Interrupted(UserError):
    """Ctrl-C during training, after a resumable snapshot was saved."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) rather than the usage block."""

    def error(self, message):
        self.exit(2, f'error: {message} (see python asen.py --help)\n')


def get_args_parser():
    parser = ArgumentParser(
        description='Attribute-Specific Embedding Network (ASEN): train, or test with --test --resume.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('--dataset', default='FashionAI', choices=DATASETS,
                      help='dataset under --data_path; SynthFashion is generated on first use and '
                           f'brings a CPU preset for flags not given: {synth_preset()}')
    data.add_argument('--data_path', '--data-path', default='data', help='folder holding the datasets')
    data.add_argument('--img_size', '--img-size', type=int, default=224,
                      help='Resize and CenterCrop size; the attention map size follows from it')
    data.add_argument('--num_triplets', '--num-triplets', type=int, default=100000,
                      help='training triplets drawn anew each epoch')
    data.add_argument('--synth-images', '--synth_images', dest='synth_images', type=int, default=2000,
                      help='SynthFashion: training images to generate (valid and test get a quarter each)')
    data.add_argument('--skip-bad-images', dest='skip_bad_images', action='store_true',
                      help='skip listed images that are missing or unreadable, and say how many '
                           '(default: stop and name the first one)')
    data.add_argument('--workers', type=int, default=None,
                      help='DataLoader worker processes (default: 4 on CUDA, 0 on CPU, as the original)')
    data.add_argument('--cache-images', '--cache_images', dest='cache_images', action='store_true',
                      help='decode and resize each split\'s images once into a uint8 memory-mapped file '
                           'data/<Dataset>/cache/<split>_<img-size>.u8 (N x S x S x 3 bytes), rebuilt '
                           'when the images, their list or --img-size change')

    net = parser.add_argument_group('model')
    net.add_argument('--model', default='ASENet', choices=list(models.MODELS),
                     help='network: ASENet and its ablations (_noASA, _noACA); ASENet_V2, the authors\' later '
                          'variant (embedding size = trunk channels, e.g. 1024 for resnet50: --dim_embed is '
                          'ignored); ASENet_V2_fc, V2 with a final Linear to --dim_embed (their earlier V2 code); '
                          'ConditionalSimNet (CSN, Veit et al. 2017); TripletNet, one embedding for all attributes; '
                          'ASENpp, ASEN++ (TIP 2021): global and local branches, trained in two --stage runs')
    net.add_argument('--backbone', default='resnet50', choices=models.BACKBONES,
                     help='ResNet trunk, cut after layer3')
    net.add_argument('--no-pretrained', dest='pretrained', action='store_false', default=True,
                     help='random init instead of ImageNet weights (default: pretrained)')
    net.add_argument('--backbone-weights', dest='backbone_weights', default=None, metavar='FILE',
                     help='trunk weights from a local file instead of the ImageNet download: a torchvision '
                          'ResNet state dict (e.g. resnet50-0676ba61.pth) or one written by pretrain.py '
                          '(default: none)')
    net.add_argument('--dim_embed', '--dim-embed', type=int, default=1024, help='embedding size')
    net.add_argument('--csn-fixed-masks', dest='csn_fixed_masks', action='store_true',
                     help='ConditionalSimNet: fixed disjoint 0/1 masks, not trained (default: learned masks '
                          'initialised N(0.9, 0.7))')
    net.add_argument('--csn-reg', dest='csn_reg', action='store_true',
                     help='ConditionalSimNet: add the CSN regularisers to the loss, 5e-3 x embedding L2 norm '
                          '+ 5e-4 x mask L1 norm (default: off, as the ASEN authors\' CSN baseline)')
    net.add_argument('--stage', type=int, choices=(1, 2), default=None,
                     help='ASENpp: 1 trains the global branch alone (defaults --epochs 50 --step_size 3 '
                          '--decay_rate 0.9); 2 starts from a stage-1 --resume and trains both branches '
                          '(defaults --epochs 20 --step_size 1 --decay_rate 0.9) (default: 1, or the '
                          'checkpoint\'s stage)')
    net.add_argument('--local-backbone', '--local_backbone', dest='local_backbone', default='resnet34',
                     choices=models.BACKBONES, help='ASENpp: the local branch\'s ResNet trunk, cut after layer3')
    net.add_argument('--local-size', '--local_size', dest='local_size', type=int, default=None,
                     help='ASENpp: side of the local branch\'s input crop (default: half of --img-size, '
                          '112 at 224)')
    net.add_argument('--threshold', type=float, default=0.1,
                     help='ASENpp: the local crop keeps the box of the attention above this fraction of '
                          'its min-max range, in (0, 1)')
    net.add_argument('--beta', type=float, default=0.6,
                     help='ASENpp stage 2: weight of the global branch in the test embedding '
                          '[sqrt(beta) global; sqrt(1 - beta) local]')
    net.add_argument('--local-crop', '--local_crop', dest='local_crop', choices=('original', 'view'),
                     default='original',
                     help='ASENpp stage 2: crop the local input from the original image (the authors\') '
                          'or from the --img-size view (a shortcut that loses detail; works with '
                          '--cache-images)')

    train = parser.add_argument_group('training')
    train.add_argument('--epochs', type=int, default=200, help='last epoch to train')
    train.add_argument('--start_epoch', '--start-epoch', type=int, default=1,
                       help='first epoch (set from the checkpoint with --resume)')
    train.add_argument('--batch-size', '--batch_size', dest='batch_size', type=int, default=16,
                       help='triplets per batch, per process: under torchrun with N processes a '
                            'step sees N x this many triplets')
    train.add_argument('--lr', type=float, default=1e-4, help='Adam learning rate')
    train.add_argument('--step_size', '--step-size', type=int, default=1, help='StepLR step, in epochs')
    train.add_argument('--decay_rate', '--decay-rate', type=float, default=0.985, help='StepLR gamma')
    train.add_argument('--margin', type=float, default=0.2, help='triplet ranking margin')
    train.add_argument('--lr-global', '--lr_global', dest='lr_global', type=float, default=1e-5,
                       help='ASENpp stage 2: learning rate of the global branch and the attribute '
                            'embedding (--lr is the local branch\'s)')
    train.add_argument('--local-weight', '--local_weight', dest='local_weight', type=float, default=0.1,
                       help='ASENpp stage 2: weight of the local branch\'s triplet loss')
    train.add_argument('--align-weight', '--align_weight', dest='align_weight', type=float, default=0.1,
                       help='ASENpp stage 2: weight of the global-local alignment loss')
    train.add_argument('--seed', type=int, default=1, help='seeds Python random, numpy and torch')

    perf = parser.add_argument_group('performance (off by default: the original semantics)')
    perf.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'),
                      help='autocast precision; fp16 uses a GradScaler')
    perf.add_argument('--channels-last', dest='channels_last', action=argparse.BooleanOptionalAction,
                      default=False, help='channels_last memory format for the network and its inputs')
    perf.add_argument('--compile', action='store_true', help='torch.compile the network')
    perf.add_argument('--concat-forward', dest='concat_forward', action=argparse.BooleanOptionalAction,
                      default=False,
                      help='one forward pass over anchor+negative+positive (changes BatchNorm batch '
                           'statistics; the original does three passes)')
    perf.add_argument('--sync-bn', dest='sync_bn', action='store_true',
                      help='under torchrun on GPUs: SyncBatchNorm (batch statistics over all processes); '
                           'not available on CPUs (torch has no CPU kernel); no effect in one process')

    run = parser.add_argument_group('run')
    run.add_argument('--name', default='ASEN', help='run folder runs/<name>/ for snapshots and logs')
    run.add_argument('--resume', default=None, help='checkpoint to resume training from or to test')
    run.add_argument('--test', action='store_true', help='evaluate --resume on the test split and exit')
    run.add_argument('--no-cuda', '--no_cuda', dest='no_cuda', action='store_true',
                     help='use the CPU even when CUDA is available')
    run.add_argument('--log-interval', '--log_interval', dest='log_interval', type=int, default=400,
                     help='batches between training log lines')

    use = parser.add_argument_group('seeing and using a trained model (with --resume)')
    use.add_argument('--visualize', action='store_true',
                     help='write attention overlays of a few test images per attribute to runs/<name>/heatmaps/')
    use.add_argument('--retrieve', metavar='IMAGE', default=None,
                     help='rank the test candidates (or --gallery) by similarity to IMAGE under --attribute')
    use.add_argument('--attribute', default=None, help='attribute name for --retrieve')
    use.add_argument('--topk', type=int, default=10, help='results --retrieve prints and draws')
    use.add_argument('--gallery', metavar='DIR', default=None,
                     help='rank the images of DIR instead of the test candidates')

    table = parser.add_argument_group('result tables')
    table.add_argument('--collect', nargs='+', metavar='RUN', default=None,
                       help='print one markdown table of the test results of these runs (runs/<name> '
                            'folders or their test_results.json) and exit')
    table.add_argument('--collect-out', '--collect_out', dest='collect_out', metavar='FILE', default=None,
                       help='also write the collected table as JSON to FILE')
    table.add_argument('--collect-by', '--collect_by', dest='collect_by', choices=('model', 'run'),
                       default='model', help='one row per model (mean ± std over its runs) or per run')
    return parser


def explicit_flags(parser, argv):
    """Names of the options given on the command line (defaults suppressed)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(parser, argv)
    asenpp.apply_stage_defaults(args, dataset_preset(args))
    apply_defaults(args, dataset_preset(args))
    return args


def dataset_preset(args):
    """The defaults --dataset brings for flags not given (SynthFashion's CPU preset), else none."""
    return synth_preset() if args.dataset == 'SynthFashion' else {}


def apply_defaults(args, values):
    """Set each of `values` on `args` unless the user gave that flag."""
    for key, value in values.items():
        if key not in args.explicit and key in vars(args):
            setattr(args, key, value)


def check_args(args):
    utils.check_positive(args, ['synth_images', 'img_size', 'num_triplets', 'dim_embed', 'epochs', 'batch_size',
                          'step_size', 'log_interval', 'lr'])


# ----------------------------------------------------------------------------- data

def prepare_dataset(args):
    if args.dataset == 'Zappos50k':
        return zappos.ZapposFiles(args.data_path)
    if args.dataset == 'SynthFashion':
        n_eval = max(args.synth_images // 4, 8)
        synthfashion.ensure(os.path.join(args.data_path, 'SynthFashion'), n_train=args.synth_images,
                            n_valid=n_eval, n_test=n_eval)
    return datasets.SplitFiles(args.data_path, args.dataset)


def training_set(split_files, args):
    """The training triplets of the dataset: attribute labels or, on Zappos50k, the CSN lists."""
    if args.model == 'ASENpp':
        return asenpp.training_set(split_files, args)
    transform = datasets.build_transform(args.img_size, train=True)
    if args.dataset in TRIPLET_DATASETS:
        return zappos.ZapposTripletDataset(split_files, args.num_triplets, transform, args.seed, args.skip_bad_images)
    return datasets.TripletDataset(split_files, args.num_triplets, transform, args.seed, args.skip_bad_images)


def evaluation_sets(split_files, split, args, logger):
    """What `evaluate` scores: (queries, candidates), or on Zappos50k a TripletEvalSet."""
    if args.dataset not in TRIPLET_DATASETS:
        return retrieval_sets(split_files, split, args, logger)
    split = {'valid': 'val'}.get(split, split)          # CSN names its lists train, val, test
    eval_set = zappos.TripletEvalSet(split_files, split, datasets.build_transform(args.img_size, train=False),
                                     args.skip_bad_images)
    report_skipped(logger, f'{split} triplets', eval_set.skipped)
    return eval_set


def retrieval_sets(split_files, split, args, logger):
    """(queries, candidates) RetrievalDatasets of `split`, validated once."""
    transform = datasets.build_transform(args.img_size, train=False)
    dataset_class = asenpp.RetrievalDataset if asenpp.uses_originals(args) else datasets.RetrievalDataset
    queries = dataset_class(split_files, split, 'query', transform, args.skip_bad_images)
    candidates = dataset_class(split_files, split, 'candidate', transform, args.skip_bad_images)
    report_skipped(logger, f'{split} split', queries.skipped + candidates.skipped)
    if args.cache_images:
        attach_image_cache([queries, candidates], split_files, split, args, logger)
    return queries, candidates


def check_triplet_flags(args):
    """--visualize and --retrieve need query/candidate files, which triplet datasets lack; the image
    cache reads the authors' filenames files."""
    for flag in ('visualize', 'retrieve', 'cache_images'):
        if getattr(args, flag) and args.dataset in TRIPLET_DATASETS:
            raise UserError(f"--{flag.replace('_', '-')} is not available for {args.dataset} (it has triplet "
                            f"lists, not the authors' split files)")


def report_skipped(logger, what, count):
    if count:
        logger.info(f'--skip-bad-images: left out {count} missing or unreadable image(s) of the {what}')


def make_loader(dataset, args, device):
    """Batches in dataset order. Workers are not persistent: each epoch's iterator must see the
    triplets that `set_epoch` drew."""
    workers = args.workers if args.workers is not None else (4 if device.type == 'cuda' else 0)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=workers,
                                       pin_memory=device.type == 'cuda',
                                       collate_fn=getattr(dataset, 'collate_fn', None))


def cache_workers(args):
    """Decoding processes for building the image cache: --workers, else up to 4."""
    return args.workers if args.workers is not None else min(4, os.cpu_count() or 1)


def attach_image_cache(dataset_list, split_files, split, args, logger):
    """Serve `dataset_list` (all of one split) from the split's image cache, built if stale."""
    ids = np.concatenate([d.image_ids for d in dataset_list])
    cache = local_first(lambda: imagecache.ensure(split_files, split, ids, args.img_size, cache_workers(args),
                                                  args.skip_bad_images, may_build=runtime.first_on_node(),
                                                  log=logger.info))
    for dataset in dataset_list:
        dataset.attach_cache(cache)


def synth_regions(split_files, split):
    """SynthFashion's attribute regions of `split` (n_images, n_attributes, boxes, 4), else None."""
    path = split_files.path(f'regions_{split}.txt')
    return synthfashion.read_regions(path, len(split_files.attributes)) if os.path.isfile(path) else None


def heatmap_images(sets):
    """The images whose attention is drawn each epoch: the candidates, or the triplets' images."""
    return sets if isinstance(sets, zappos.TripletEvalSet) else sets[1]


# ----------------------------------------------------------------------------- model

def model_options(args, local_imagenet=True):
    """Constructor options of --model from its own flags; a flag of another model is an error.
    `local_imagenet`: ASENpp's stage-2 local trunk starts from ImageNet weights (if --pretrained)."""
    csn = {'csn_fixed_masks': 'fixed_masks', 'csn_reg': 'regularise'}
    given = [flag for flag in csn if getattr(args, flag, False)]
    if args.model != 'ConditionalSimNet':
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} applies only to --model ConditionalSimNet")
        return asenpp.model_options(args, local_imagenet) if args.model == 'ASENpp' else {}
    return {option: bool(getattr(args, flag, False)) for flag, option in csn.items()}


def build_network(args, n_attributes, device, imagenet=True, local_imagenet=False):
    """The triplet-wrapped --model; `imagenet=False` skips the ImageNet and --backbone-weights
    weights (a checkpoint replaces them, so nothing is downloaded or read); `local_imagenet`: ASENpp's
    local trunk gets them all the same (stage 2 starting from a stage-1 checkpoint)."""
    weights_file = getattr(args, 'backbone_weights', None) if imagenet else None
    net = models.build_model(args.model, n_attributes, args.backbone,
                             args.pretrained and imagenet and weights_file is None, args.dim_embed,
                             backbone_weights=weights_file, **model_options(args, imagenet or local_imagenet))
    tnet = models.TripletNet(net, concat_forward=args.concat_forward).to(device)
    if args.channels_last:
        tnet = tnet.to(memory_format=torch.channels_last)
    return tnet


# ----------------------------------------------------------------------------- training

def run_training(tnet, split_files, device, args, logger, run_dir, checkpoint):
    optimizer = torch.optim.Adam(models.param_groups(tnet, getattr(args, 'lr_global', None)), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.decay_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    best_prec = 0.0
    if checkpoint is not None and 'optimizer' in checkpoint:
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        scaler.load_state_dict(checkpoint['scaler'])
        best_prec = checkpoint.get('best_prec', 0.0)
        utils.set_rng_state(checkpoint['rng'])
    train_set = training_set(split_files, args)
    report_skipped(logger, 'training set', train_set.skipped)
    if args.cache_images:
        attach_image_cache([train_set], split_files, 'train', args, logger)
    if distributed():
        rank, world = runtime.rank_and_world()
        if args.num_triplets < world:
            raise UserError(f"--num_triplets {args.num_triplets} is below the {world} processes")
        train_set.shard(rank, world)
    valid_sets = evaluation_sets(split_files, 'valid', args, logger)
    train_loader = make_loader(train_set, args, device)
    train_model = runtime.distributed_model(tnet, device, args.sync_bn, logger, args.batch_size)
    train_model = torch.compile(train_model) if args.compile else train_model
    eval_model = torch.compile(tnet.embeddingnet) if args.compile else tnet.embeddingnet
    if is_main_process():
        utils.write_json(saved_args(args), os.path.join(run_dir, 'args.json'))
    writer = SummaryWriter(run_dir) if is_main_process() else runtime.NullWriter()
    logger.info(f'Begin training on {args.dataset} dataset.')
    start, epoch = time.time(), args.start_epoch
    try:
        for epoch in range(args.start_epoch, args.epochs + 1):
            train_set.set_epoch(epoch)
            loss, acc = train_one_epoch(train_model, train_loader, optimizer, scaler, device, epoch, args,
                                        logger, writer)
            loss, acc = runtime.global_mean([loss, acc], device)
            runtime.broadcast_buffers(tnet)
            result, _ = evaluate(eval_model, valid_sets, split_files.attributes, device, args, logger, epoch)
            prec = result[tables.score_keys(result)[1]] / 100
            is_best = prec > best_prec
            best_prec = max(prec, best_prec)
            scheduler.step()
            lr = optimizer.param_groups[0]['lr']
            if is_main_process():
                save_snapshot(snapshot(epoch, tnet, optimizer, scheduler, scaler, prec, best_prec, args),
                              run_dir, is_best)
                append_metrics(run_dir, dict(epoch=epoch, train_loss=loss, train_acc=100 * acc, lr=lr, **result))
                log_epoch(writer, epoch, lr, result)
                valid_heatmaps(tnet.embeddingnet, heatmap_images(valid_sets), split_files.attributes, run_dir,
                               epoch, writer, device)
            logger.info(f'lr:{lr}')
    except KeyboardInterrupt:
        # the weights are mid-epoch: resuming this file repeats the interrupted epoch from them
        path = os.path.join(run_dir, 'interrupted.pth.tar')
        if is_main_process():
            utils.save_atomic(snapshot(epoch - 1, tnet, optimizer, scheduler, scaler, None, best_prec, args),
                              path)
        raise Interrupted(f'interrupted in epoch {epoch}; saved {path}; continue with --resume {path}')
    finally:
        writer.close()
    minutes = int(time.time() - start) // 60
    logger.info(f'training time {minutes // 60}h {minutes % 60}min')
    return best_prec


def train_one_epoch(tnet, loader, optimizer, scaler, device, epoch, args, logger, writer=None):
    """One pass over the epoch's triplets; returns (mean loss, mean triplet accuracy)."""
    losses, accs = utils.AverageMeter(), utils.AverageMeter()
    tnet.train()
    progress = tqdm(loader, desc=f'epoch {epoch}', disable=not sys.stderr.isatty(), leave=False)
    for batch_idx, (anchor, negative, positive, attr, *originals) in enumerate(progress):
        anchor, negative, positive = (to_device(t, device, args.channels_last) for t in (anchor, negative, positive))
        attr = attr.to(device)
        originals = [o.to(device) for o in originals] or None                 # ASENpp stage 2 only
        with autocast(device, args.amp):
            sim_an, sim_ap = tnet(anchor, negative, positive, attr, originals=originals)
            loss = models.triplet_loss(sim_an.float(), sim_ap.float(), args.margin)
            objective = loss + models.regularisation(tnet)
        if not runtime.loss_is_finite(objective):
            raise UserError(f"non-finite loss at epoch {epoch}, batch {batch_idx}; the last good snapshot "
                            f"in runs/{args.name}/ is kept; lower --lr or use --amp off")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.update(loss.item(), anchor.size(0))
        accs.update(utils.triplet_accuracy(sim_an.detach(), sim_ap.detach()), anchor.size(0))
        if batch_idx % args.log_interval == 0:
            logger.info(f'Train Epoch: {epoch} [{batch_idx * anchor.size(0)}/{len(loader.dataset)}]\t'
                        f'Loss: {losses.val:.4f} ({losses.avg:.4f}) \t'
                        f'Acc: {100 * accs.val:.2f}% ({100 * accs.avg:.2f}%)')
            if writer is not None:
                step = (epoch - 1) * len(loader) + batch_idx
                writer.add_scalar('train/loss', losses.val, step)
                writer.add_scalar('train/triplet_accuracy', 100 * accs.val, step)
    return losses.avg, accs.avg


def log_epoch(writer, epoch, lr, result):
    writer.add_scalar('train/lr', lr, epoch)
    per, total = tables.score_keys(result)
    writer.add_scalar(f'valid/{total}', result[total], epoch)
    for name, value in result[per].items():
        writer.add_scalar(f'valid/{per}/{name}', value, epoch)


def valid_heatmaps(net, candidates, attributes, run_dir, epoch, writer, device):
    """Attention overlays of a fixed set of valid images, as a PNG and in TensorBoard."""
    samples = analysis.samples_per_attribute(candidates, len(attributes), 2)
    path = os.path.join(run_dir, 'heatmaps', f'valid_epoch{epoch:03d}.png')
    visualize.save_attention_grid(net, [(p, a) for p, a, _ in samples], attributes, candidates.transform,
                                  device, path, columns=4)
    with Image.open(path) as img:
        writer.add_image('attention/valid', np.asarray(img.convert('RGB')), epoch, dataformats='HWC')


def saved_args(args):
    return {k: v for k, v in vars(args).items() if k != 'explicit'}


def append_metrics(run_dir, record):
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


# ----------------------------------------------------------------------------- evaluation

def evaluate(net, sets, attributes, device, args, logger, epoch=None):
    """Score (queries, candidates); logs, returns ({'mAP': {attr: %}, 'MeanAP': %}, embeddings)."""
    if isinstance(sets, zappos.TripletEvalSet):
        return evaluate_triplets(net, sets, attributes, device, args, logger, epoch)
    queries, candidates = sets
    query_emb = embed_split(net, queries, device, args)
    cand_emb = embed_split(net, candidates, device, args)
    per_attr, mean = retrieval_map(query_emb, queries.entries, cand_emb, candidates.entries, len(attributes))
    if epoch is not None:
        logger.info(f'Train Epoch: {epoch}')
    for name, value in zip(attributes, per_attr):
        logger.info(f'{name} mAP: {100 * value:.4f}')
    logger.info(f'MeanAP: {100 * mean:.4f}')
    return {'mAP': {n: 100 * v for n, v in zip(attributes, per_attr)}, 'MeanAP': 100 * mean}, (query_emb, cand_emb)


def embed_split(net, dataset, device, args):
    """Embeddings of a RetrievalDataset in its order; under torchrun each rank embeds a contiguous
    shard and the shards are gathered, so every rank gets what one process would."""
    if not distributed():
        return extract_embeddings(net, make_loader(dataset, args, device), device, args)
    rank, world = runtime.rank_and_world()
    sizes = runtime.shard_sizes(len(dataset), world)
    start = sum(sizes[:rank])
    shard = datasets.IndexShard(dataset, start, start + sizes[rank])
    local = extract_embeddings(net, make_loader(shard, args, device), device, args)
    # a rank with an empty shard learns the embedding width (C for ASENet_V2) from the others
    width = runtime.max_over_ranks(0 if local is None else local.shape[1], device)
    if local is None:
        local = torch.zeros(0, width, device=device)
    return runtime.gather_rows(local, sizes)


@torch.inference_mode()
def extract_embeddings(net, loader, device, args):
    """Embeddings (N, D) float32 of a RetrievalDataset in its order, each under its attribute."""
    net.eval()
    out = None
    progress = tqdm(loader, desc='features', disable=not sys.stderr.isatty(), leave=False)
    for images, attr, _, index, *originals in progress:
        extra = {'originals': originals[0].to(device)} if originals else {}   # ASENpp stage 2 only
        with autocast(device, args.amp):
            emb = net(to_device(images, device, args.channels_last), attr.to(device), **extra)
        if out is None:
            out = torch.empty(len(loader.dataset), emb.shape[1], device=device)
        out[index.to(device)] = emb.float()
    return out


def retrieval_map(query_emb, query_entries, cand_emb, cand_entries, n_attributes):
    """Per-attribute mAP and the query-weighted MeanAP (fractions in [0, 1])."""
    per_attribute, n_queries = [], []
    for attr in range(n_attributes):
        q = np.flatnonzero(query_entries[:, 1] == attr)
        c = np.flatnonzero(cand_entries[:, 1] == attr)
        q_idx, c_idx = torch.from_numpy(q).to(query_emb.device), torch.from_numpy(c).to(cand_emb.device)
        per_attribute.append(utils.mean_average_precision(
            cand_emb[c_idx], query_emb[q_idx], torch.from_numpy(cand_entries[c, 2]),
            torch.from_numpy(query_entries[q, 2])))
        n_queries.append(len(q))
    mean = float(np.average(per_attribute, weights=n_queries)) if sum(n_queries) else 0.0
    return per_attribute, mean


def evaluate_triplets(net, eval_set, conditions, device, args, logger, epoch=None):
    """Triplet accuracy per condition and overall; logs, returns ({'accuracy': {cond: %}, 'Accuracy': %},
    embeddings). Each distinct (image, condition) is embedded once, then all triplets are scored at once."""
    emb = embed_split(net, eval_set, device, args)
    per_condition, overall = zappos.condition_accuracy(emb, eval_set.rows, eval_set.conditions, len(conditions))
    if epoch is not None:
        logger.info(f'Train Epoch: {epoch}')
    for name, value in zip(conditions, per_condition):
        logger.info(f'{name} accuracy: {100 * value:.4f}')
    logger.info(f'Accuracy: {100 * overall:.4f}')
    return {'accuracy': {n: 100 * v for n, v in zip(conditions, per_condition)}, 'Accuracy': 100 * overall}, emb


def run_test(tnet, split_files, device, args, logger, run_dir):
    """--test: the test split's figures (mAP, or triplet accuracy on Zappos50k) beside the Random
    baseline, test_results.json and a markdown table."""
    net = torch.compile(tnet.embeddingnet) if args.compile else tnet.embeddingnet
    sets = evaluation_sets(split_files, 'test', args, logger)
    result, embeddings = evaluate(net, sets, split_files.attributes, device, args, logger)
    random_key = f'Random {tables.score_keys(result)[1]}'
    result[random_key] = random_baseline(embeddings, sets, len(split_files.attributes), args.seed)
    logger.info(f"{random_key}: {result[random_key]:.4f}")
    result.update(split='test', model=asenpp.result_label(args), dataset=args.dataset, checkpoint=args.resume,
                  attributes=split_files.attributes)
    regions = synth_regions(split_files, 'test')
    if regions is not None and tnet.embeddingnet.has_spatial_attention and is_main_process():
        result['attention_localisation'] = log_localisation(tnet.embeddingnet, sets, split_files, regions,
                                                            device, args, logger)
    if is_main_process():
        utils.write_json(result, os.path.join(run_dir, 'test_results.json'))
        print(markdown_table(result, split_files.attributes))
    return result


def random_baseline(embeddings, sets, n_attributes, seed):
    """The Random row: MeanAP, or triplet accuracy on a triplet dataset, of random embeddings."""
    if isinstance(sets, zappos.TripletEvalSet):
        return random_accuracy(embeddings.cpu(), sets, n_attributes, seed)
    query_emb, cand_emb = embeddings
    return random_map(query_emb, sets[0], cand_emb, sets[1], n_attributes, seed)


def random_map(query_emb, queries, cand_emb, candidates, n_attributes, seed):
    """MeanAP (%) of random Gaussian embeddings on the same split: the paper's Random row."""
    gen = torch.Generator().manual_seed(seed)
    rand_q = models.l2norm(torch.randn(query_emb.shape, generator=gen))
    rand_c = models.l2norm(torch.randn(cand_emb.shape, generator=gen))
    _, mean = retrieval_map(rand_q, queries.entries, rand_c, candidates.entries, n_attributes)
    return 100 * mean


def random_accuracy(emb, eval_set, n_conditions, seed):
    """Triplet accuracy (%) of random Gaussian embeddings: the Random row (about 50)."""
    rand = models.l2norm(torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)))
    return 100 * zappos.condition_accuracy(rand, eval_set.rows, eval_set.conditions, n_conditions)[1]


def markdown_table(result, attributes):
    """The paper's layout: attributes as columns, MeanAP (Zappos50k: Accuracy) last."""
    per, total = tables.score_keys(result)
    header = '| model | ' + ' | '.join(attributes) + f' | {total} |'
    rule = '|' + ' --- |' * (len(attributes) + 2)
    row = f"| {result['model']} | " + ' | '.join(f"{result[per][a]:.2f}" for a in attributes)
    return '\n'.join([header, rule, row + f" | {result[total]:.2f} |"])


def log_localisation(net, sets, split_files, regions, device, args, logger):
    """Attention mass inside each attribute's region, beside the region's share (uniform attention)."""
    scores = analysis.attention_localisation(net, sets, len(split_files.attributes), regions, args.img_size, device)
    for name, (inside, share) in zip(split_files.attributes, scores):
        logger.info(f'{name} attention in region: {100 * inside:.2f}% (uniform: {100 * share:.2f}%, '
                    f'ratio {inside / max(share, 1e-12):.2f})')
    return {name: {'inside': 100 * i, 'uniform': 100 * u} for name, (i, u) in zip(split_files.attributes, scores)}


# ----------------------------------------------------------------------------- checkpoints

def restore_args(args, checkpoint):
    """Take the checkpoint's settings for every flag the user did not give."""
    saved = checkpoint.get('args')
    if not isinstance(saved, dict):
        return
    keep = args.explicit | INVOCATION_FLAGS
    for key, value in saved.items():
        if key not in keep and key in vars(args):
            setattr(args, key, value)


def adopt_original_checkpoint(args, checkpoint):
    """A file saved by the authors' code ({'epoch', 'state_dict', 'prec'}, their module names; ASEN++'s
    main.py writes {'epoch', 'model', 'mAP'}): rename its weights to ours in place, and take --model,
    --backbone and --dim_embed (ASEN++: also --local-backbone, --stage) from them unless given.
    Returns what was inferred (None for other files). It has no 'args', so --dataset is this
    command line's."""
    if isinstance(checkpoint, dict) and 'state_dict' not in checkpoint and 'args' not in checkpoint \
            and isinstance(checkpoint.get('model'), dict):
        checkpoint['state_dict'] = checkpoint.pop('model')
        checkpoint.setdefault('prec', checkpoint.get('mAP'))
    state = checkpoint.get('state_dict') if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or 'args' in checkpoint:
        return None
    try:
        converted = models.convert_original_state_dict(state)
    except UserError as err:
        raise UserError(f"--resume {args.resume}: {err}") from err
    if converted is None:
        return None
    info, checkpoint['state_dict'] = converted
    for key in ('model', 'backbone', 'dim_embed', 'local_backbone', 'stage'):
        if key not in args.explicit and info.get(key) is not None:
            setattr(args, key, info[key])
    return info


def load_weights(tnet, checkpoint, path, dataset=None):
    state = checkpoint.get('state_dict') if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"--resume {path}: no 'state_dict' in the file; it is not an ASEN checkpoint")
    try:
        tnet.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(weights_mismatch(tnet, state, path, dataset) or
                        f"--resume {path}: weights do not fit --model {model_name(tnet)}: "
                        f"{' '.join(str(err).split())[:300]}") from err


def model_name(tnet):
    return getattr(tnet.embeddingnet, 'model_name', type(tnet.embeddingnet).__name__)


def weights_mismatch(tnet, state, path, dataset=None):
    """One line on why `state` does not fit `tnet`: the attribute count, else the key names."""
    here = tnet.embeddingnet.n_attributes
    in_file = models.attribute_count(state)
    if in_file is not None and in_file != here:
        where = f"--dataset {dataset.dataset} has {here} ({dataset.path('meta.json')})" if dataset else \
            f"this dataset has {here}"
        return (f"--resume {path}: attribute count {in_file} in the file but {where}; "
                f"pass the --dataset it was trained on")
    detail = models.state_dict_mismatch(tnet.state_dict(), state)
    return detail and (f"--resume {path}: weights do not fit --model {model_name(tnet)} "
                       f"(--backbone, --dim_embed or --model differ from the file's?): {detail}")


def snapshot(epoch, tnet, optimizer, scheduler, scaler, prec, best_prec, args):
    return {'epoch': epoch, 'state_dict': tnet.state_dict(), 'prec': prec, 'best_prec': best_prec,
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'scaler': scaler.state_dict(), 'args': saved_args(args), 'rng': utils.rng_state()}


def save_snapshot(state, run_dir, is_best):
    path = os.path.join(run_dir, 'checkpoint.pth.tar')
    utils.save_atomic(state, path)
    if is_best:
        best = os.path.join(run_dir, 'model_best.pth.tar')
        tmp = best + '.tmp'
        shutil.copyfile(path, tmp)
        os.replace(tmp, best)


# ----------------------------------------------------------------------------- using a trained model

def run_retrieval(tnet, split_files, device, args, run_dir):
    results, grid = analysis.retrieve(tnet.embeddingnet, split_files, args, device, run_dir)
    for rank, score, path in results:
        print(f'{rank:3d}  {score:.4f}  {path}')
    print(f'grid: {grid}')
    return results


def run_visualize(tnet, split_files, device, args, run_dir):
    path = analysis.write_heatmaps(tnet.embeddingnet, split_files, args.img_size, device,
                                   os.path.join(run_dir, 'heatmaps'), regions=synth_regions(split_files, 'test'))
    print(f'heatmaps: {path}')
    return path


# ----------------------------------------------------------------------------- main

def is_training(args):
    return not (args.test or args.visualize or args.retrieve)


def run(args):
    if args.collect:
        return tables.collect(args.collect, args.collect_out, args.collect_by)
    check_args(args)
    checkpoint = utils.load_checkpoint(args.resume) if args.resume else None
    original_info = None
    if checkpoint is not None:
        restore_args(args, checkpoint)
        original_info = adopt_original_checkpoint(args, checkpoint)
    # ASENpp: its flags checked; True when stage 2 starts from a stage-1 checkpoint's weights alone
    starts_stage2 = asenpp.prepare(args, checkpoint, original_info, dataset_preset(args), is_training(args))
    for flag in ('test', 'visualize', 'retrieve'):
        if getattr(args, flag) and checkpoint is None:
            raise UserError(f"--{flag} needs --resume CHECKPOINT (e.g. runs/<name>/model_best.pth.tar)")
    if args.retrieve and not args.attribute:
        raise UserError("--retrieve needs --attribute NAME (one of the dataset's ATTRIBUTES)")
    check_triplet_flags(args)
    device = runtime.resolve_device(args.no_cuda)
    utils.seed_everything(args.seed)
    run_dir = os.path.join('runs', args.name)
    os.makedirs(run_dir, exist_ok=True)
    if distributed() and (args.visualize or args.retrieve):
        raise UserError("--visualize and --retrieve run in one process; start them without torchrun")
    logger = utils.setup_logger(os.path.join(run_dir, 'train.log' if is_training(args) else 'test.log')) \
        if is_main_process() else runtime.silent_logger()
    split_files = local_first(lambda: prepare_dataset(args))
    tnet = build_network(args, len(split_files.attributes), device, imagenet=checkpoint is None,
                         local_imagenet=starts_stage2)
    logger.info(f'  + Number of params: {sum(p.numel() for p in tnet.parameters())}')
    if starts_stage2:
        asenpp.load_stage1_weights(tnet, checkpoint, args.resume)
        logger.info(f"=> stage 2 starts from the stage-1 weights of '{args.resume}'")
        checkpoint = None                     # its optimizer, epoch and RNG belong to stage 1
    if checkpoint is not None:
        load_weights(tnet, checkpoint, args.resume, split_files)
        score = 'accuracy' if args.dataset in TRIPLET_DATASETS else 'mAP'
        logger.info(f"=> loaded checkpoint '{args.resume}' (epoch {checkpoint.get('epoch')} "
                    f"{score} on validation set {checkpoint.get('prec')})")
        if is_training(args) and 'start_epoch' not in args.explicit:
            args.start_epoch = int(checkpoint.get('epoch', 0)) + 1
    if args.retrieve:
        return run_retrieval(tnet, split_files, device, args, run_dir)
    if args.visualize:
        run_visualize(tnet, split_files, device, args, run_dir)
    if args.test:
        return run_test(tnet, split_files, device, args, logger, run_dir)
    if is_training(args):
        return run_training(tnet, split_files, device, args, logger, run_dir, checkpoint)
    return None


def main(argv=None):
    args = parse_args(argv)
    try:
        with runtime.distributed_session(args.no_cuda, args.sync_bn):
            run(args)
    except UserError as err:
        # errors raised in DataLoader workers arrive wrapped in their traceback: keep the message
        message = str(err).strip().splitlines()[-1] if str(err).strip() else 'failed'
        print(f"error: {message.removeprefix('utils.UserError: ')}", file=sys.stderr)
        return 130 if isinstance(err, Interrupted) else 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
