"""Train and test ASEN (Ma et al., AAAI 2020): the entry point.

    python asen.py --dataset FashionAI                                   # train
    python asen.py --test --resume runs/ASEN/model_best.pth.tar          # test
    python asen.py --dataset SynthFashion                                # offline CPU demo
"""
import argparse
import contextlib
import copy
import errno
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from tensorboardX import SummaryWriter
from tqdm import tqdm

from lib import analysis
from lib import asenpp
import datasets
from lib import gpuinput
from lib import imagecache
import model as models
from lib import runtime
import synthfashion
from lib import visualize
import utils
from lib import tables
from lib import zappos
from lib.runtime import autocast, distributed, is_main_process, local_first, to_device
from utils import UserError

DATASETS = ('FashionAI', 'DARN', 'DeepFashion', 'SynthFashion', 'Zappos50k')
# Datasets of (anchor, far, close) triplet lists, scored by triplet accuracy rather than mAP.
TRIPLET_DATASETS = ('Zappos50k',)
# torch.compile modes of --compile-mode; those that replay CUDA graphs need static shapes.
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
CUDA_GRAPH_MODES = ('reduce-overhead', 'max-autotune')

# SynthFashion runs out of the box on a CPU in about 5 minutes: these replace the defaults of
# flags not given. The fast paths (bf16 where the device has bf16 kernels, channels_last, one
# concatenated forward) buy the triplets a from-scratch ResNet-18 needs in that time.
SYNTH_PRESET = dict(backbone='resnet18', pretrained=False, img_size=64, epochs=6, num_triplets=5000,
                    batch_size=32, log_interval=40, channels_last=True, concat_forward=True)


def synth_preset(device):
    """SYNTH_PRESET with the precision chosen for `device`, the one the run will use: bf16 where
    it runs bf16 natively (runtime.bf16_supported), else fp32."""
    return dict(SYNTH_PRESET, amp='bf16' if runtime.bf16_supported(device) else 'off')


def describe_preset():
    """The preset as --help prints it."""
    values = ', '.join(f'{key}={value}' for key, value in SYNTH_PRESET.items())
    return f'{values}, amp=bf16 where the device used (see --no-cuda) runs bf16 natively, else off'


# Flags a checkpoint does not override when resuming (they describe this invocation).
INVOCATION_FLAGS = {'resume', 'test', 'start_epoch', 'no_cuda', 'workers', 'skip_bad_images', 'visualize',
                    'retrieve', 'attribute', 'topk', 'gallery', 'cache_images', 'sync_bn', 'overwrite'}
# The files of a run folder that a new training run would replace.
SNAPSHOTS = ('checkpoint.pth.tar', 'model_best.pth.tar', 'interrupted.pth.tar')


class Interrupted(UserError):
    """Ctrl-C during training, after a resumable snapshot was saved."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) rather than the usage block."""

    def error(self, message):
        self.exit(2, f'error: {message} (see python asen.py --help)\n')


def get_args_parser():
    parser = ArgumentParser(
        description='Attribute-Specific Embedding Network (ASEN): train, or test with --test --resume.',
        formatter_class=utils.HelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('--dataset', default='FashionAI', choices=DATASETS,
                      help='dataset under --data_path; SynthFashion is generated on first use and '
                           f'brings a CPU preset for the flags not given: {describe_preset()}')
    data.add_argument('--data_path', '--data-path', default='data', help='folder holding the datasets')
    data.add_argument('--img_size', '--img-size', type=int, default=224,
                      help='Resize and CenterCrop size; the attention map size follows from it')
    data.add_argument('--num_triplets', '--num-triplets', type=int, default=100000,
                      help='training triplets drawn anew each epoch')
    data.add_argument('--synth-images', '--synth_images', dest='synth_images', type=int, default=2000,
                      help='SynthFashion: training images to generate (valid and test get a quarter each)')
    data.add_argument('--skip-bad-images', dest='skip_bad_images', action='store_true',
                      help='skip listed images that are missing or unreadable, and say how many (without '
                           'it: stop and name the first one)')
    data.add_argument('--workers', type=int, default=None,
                      help='DataLoader worker processes; they decode and resize, the device normalises, and '
                           'the training ones persist across epochs (default: 4 on CUDA, 0 on CPU, as the original)')
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
    net.add_argument('--pretrained', dest='pretrained', action='store_true', default=True,
                     help='start the trunk from ImageNet weights (default, except in the SynthFashion preset)')
    net.add_argument('--no-pretrained', dest='pretrained', action='store_false',
                     help='random init instead of ImageNet weights')
    net.add_argument('--backbone-weights', dest='backbone_weights', default=None, metavar='FILE',
                     help='trunk weights from a local file instead of the ImageNet download: a torchvision '
                          'ResNet state dict (e.g. resnet50-0676ba61.pth) or one written by pretrain.py')
    net.add_argument('--dim_embed', '--dim-embed', type=int, default=1024, help='embedding size')
    net.add_argument('--csn-fixed-masks', dest='csn_fixed_masks', action='store_true',
                     help='ConditionalSimNet: fixed disjoint 0/1 masks, not trained (without it: learned '
                          'masks initialised N(0.9, 0.7))')
    net.add_argument('--csn-reg', dest='csn_reg', action='store_true',
                     help='ConditionalSimNet: add the CSN regularisers to the loss, 5e-3 x embedding L2 norm '
                          '+ 5e-4 x mask L1 norm (without it: none, as the ASEN authors\' CSN baseline)')
    net.add_argument('--stage', type=int, choices=(1, 2), default=None,
                     help='ASENpp: 1 trains the global branch alone (and brings --epochs 50 --step_size 3 '
                          '--decay_rate 0.9); 2 starts from a stage-1 --resume and trains both branches '
                          '(and brings --epochs 20 --step_size 1 --decay_rate 0.9); flags given win '
                          '(default: 1, or the checkpoint\'s stage)')
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
    train.add_argument('--eval-batch-size', '--eval_batch_size', dest='eval_batch_size', type=int, default=64,
                       help='images per batch when embedding the evaluation splits (no gradients, so larger '
                            'than training\'s; the embeddings do not depend on it beyond float rounding)')
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

    perf = parser.add_argument_group('performance (off unless given or preset: the original semantics)')
    perf.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'),
                      help='autocast precision (default: off); fp16 uses a GradScaler. off is fp32, but on '
                           'Ampere and later GPUs PyTorch runs fp32 convolutions in TF32 unless --no-tf32 is '
                           'given (see --tf32): --amp off --no-tf32 is the authors\' full fp32')
    perf.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=None,
                      help='--tf32: fp32 convolutions and matmuls on CUDA in TF32 (10-bit mantissa, faster); '
                           '--no-tf32: both in full fp32; neither (default): PyTorch\'s own setting is left '
                           'as it is (TF32 convolutions, full fp32 matmuls); no effect on CPUs')
    perf.add_argument('--channels-last', dest='channels_last', action=argparse.BooleanOptionalAction,
                      default=False, help='channels_last memory format for the network and its inputs')
    perf.add_argument('--compile', action='store_true',
                      help='torch.compile the network in --compile-mode. Measured on one H100 at commit 180f13d '
                           '(ResNet-50, 224 px, 16 triplets, bf16, channels_last, one forward) in mode default: '
                           '1489 img/s against 2403 eager, i.e. slower; the CUDA-graph modes are measured by '
                           'benchmarks/gpu_check.sh (README, Speed). A last partial batch runs eagerly (no '
                           'recompilation)')
    perf.add_argument('--compile-mode', '--compile_mode', dest='compile_mode', default='default',
                      choices=COMPILE_MODES,
                      help='torch.compile mode for --compile: reduce-overhead and max-autotune replay the '
                           'training step\'s forward and backward as CUDA graphs (static shapes; evaluation '
                           'is compiled without them)')
    perf.add_argument('--concat-forward', dest='concat_forward', action=argparse.BooleanOptionalAction,
                      default=False,
                      help='one forward pass over anchor+negative+positive (changes BatchNorm batch '
                           'statistics; the original does three passes)')
    perf.add_argument('--sync-bn', dest='sync_bn', action='store_true',
                      help='under torchrun on GPUs: SyncBatchNorm (batch statistics over all processes); '
                           'not available on CPUs (torch has no CPU kernel); no effect in one process')

    run = parser.add_argument_group('run')
    run.add_argument('--name', default='ASEN', help='run folder runs/<name>/ for snapshots and logs')
    run.add_argument('--resume', default=None, metavar='CHECKPOINT',
                     help='checkpoint to resume training from or to test; every flag not given is taken from '
                          'it, --name (so the run folder runs/<name>/ it writes to) and --data_path included')
    run.add_argument('--overwrite', action='store_true',
                     help='let a new training run replace the snapshots and metrics.jsonl already in '
                          'runs/<name>/ (default: refuse, so that a finished run is not lost)')
    run.add_argument('--test', action='store_true', help='evaluate --resume on the test split and exit')
    run.add_argument('--no-cuda', '--no_cuda', dest='no_cuda', action='store_true',
                     help='use the CPU even when CUDA is available')
    run.add_argument('--log-interval', '--log_interval', dest='log_interval', type=int, default=400,
                     help='batches between training log lines')
    run.add_argument('--heatmap-every', '--heatmap_every', dest='heatmap_every', type=int, default=0, metavar='N',
                     help='draw the attention of a fixed set of valid images (runs/<name>/heatmaps/ and '
                          'TensorBoard) every N epochs and after the last one; 0: never during training, as '
                          'the original (--visualize draws them afterwards)')
    run.add_argument('--visdom', action='store_true',
                     help="the original's flag: its curves and per-epoch attention go to TensorBoard instead "
                          "(tensorboard --logdir runs), the attention every epoch unless --heatmap-every is given")
    run.add_argument('--visdom_port', '--visdom-port', dest='visdom_port', type=int, default=4655,
                     help="accepted for the original's command lines, unused (default: 4655, the original's)")

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
    """The defaults --dataset brings for flags not given (SynthFashion's CPU preset, its precision
    chosen for the device that --no-cuda leaves), else none."""
    return synth_preset(runtime.resolve_device(args.no_cuda)) if args.dataset == 'SynthFashion' else {}


def apply_defaults(args, values):
    """Set each of `values` on `args` unless the user gave that flag."""
    for key, value in values.items():
        if key not in args.explicit and key in vars(args):
            setattr(args, key, value)


def _whole(low, high=None):
    """Test of an int flag: low <= value (<= high)."""
    return lambda v: low <= v and (high is None or v <= high)


def _finite(test):
    """Test of a float flag: finite and `test`."""
    return lambda v: math.isfinite(v) and test(v)


def _folder_name(v):
    return v not in ('', '.', '..') and '/' not in v and os.sep not in v and '\0' not in v


# The trunk is cut after layer3 (stride 16): a 2x2 attention map needs 32 px.
MIN_IMG_SIZE = 32
# SynthFashion gives valid and test a quarter of --synth-images each, and needs at least 2 images
# per attribute in each (synthfashion._merged_settings).
MIN_SYNTH_IMAGES = 4 * 2 * len(synthfashion.ATTRIBUTES)

# One row a flag: (dest, test of its value, the allowed range in words). Every value is checked
# before anything is read or written; a flag left at None (not given, no default) is not checked.
FLAG_RANGES = [
    ('img_size', _whole(MIN_IMG_SIZE), f'a whole number >= {MIN_IMG_SIZE} (the trunk has stride 16: '
                                       f'{MIN_IMG_SIZE} px give a 2x2 attention map)'),
    ('num_triplets', _whole(1), 'a whole number >= 1'),
    ('synth_images', _whole(MIN_SYNTH_IMAGES), f'a whole number >= {MIN_SYNTH_IMAGES} (valid and test get a '
                                               f'quarter each, and need {MIN_SYNTH_IMAGES // 4} images)'),
    ('workers', _whole(0), 'a whole number >= 0'),
    ('dim_embed', _whole(1), 'a whole number >= 1'),
    ('epochs', _whole(1), 'a whole number >= 1'),
    ('start_epoch', _whole(1), 'a whole number >= 1'),
    ('batch_size', _whole(1), 'a whole number >= 1'),
    ('lr', _finite(lambda v: v > 0), 'a finite number > 0'),
    ('step_size', _whole(1), 'a whole number >= 1'),
    ('decay_rate', _finite(lambda v: 0 < v <= 1), 'a finite number in (0, 1]'),
    ('margin', _finite(lambda v: v > 0), 'a finite number > 0'),
    ('seed', _whole(0, 2**63 - 1), 'a whole number from 0 to 2**63-1'),
    ('log_interval', _whole(1), 'a whole number >= 1'),
    ('topk', _whole(1), 'a whole number >= 1'),
    ('name', _folder_name, "one folder name (not empty, '.' or '..', no '/')"),
    ('eval_batch_size', _whole(1), 'a whole number >= 1'),
    ('heatmap_every', _whole(0), 'a whole number >= 0 (0: never during training)'),
    ('visdom_port', _whole(0, 65535), 'a port number from 0 to 65535'),
]
# Path flags that, when given, must not be empty (an unset shell variable would otherwise turn
# `--resume $CKPT` into a new training run).
PATH_FLAGS = ('data_path', 'resume', 'retrieve', 'attribute', 'gallery', 'backbone_weights', 'collect_out')
# Flags that only --retrieve reads.
RETRIEVE_FLAGS = ('attribute', 'gallery', 'topk')


def flag_name(dest):
    return '--' + dest.replace('_', '-')


def check_args(args, source=''):
    """One line for the first flag out of its range or combination that cannot work; `source` says
    where the values came from when not from the command line."""
    for dest, test, allowed in FLAG_RANGES:
        value = getattr(args, dest, None)
        if value is not None and not test(value):
            raise UserError(f"{flag_name(dest)} {value!r}{source}: must be {allowed}")
    for dest in PATH_FLAGS:
        if getattr(args, dest, None) == '' and dest in args.explicit:
            raise UserError(f"{flag_name(dest)} is empty; give a path or name (an unset shell variable?)")
    if args.start_epoch > args.epochs:
        raise UserError(f"--start_epoch {args.start_epoch}{source}: must be from 1 to --epochs ({args.epochs})")
    unused = [dest for dest in RETRIEVE_FLAGS if dest in args.explicit and not args.retrieve]
    if unused:
        raise UserError(f"{flag_name(unused[0])} applies only with --retrieve IMAGE")


# ----------------------------------------------------------------------------- data

def prepare_dataset(args):
    if os.path.exists(args.data_path) and not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path} is a file, not a folder; pass the folder holding the datasets")
    if args.dataset == 'Zappos50k':
        return zappos.ZapposFiles(args.data_path)
    if args.dataset == 'SynthFashion':
        n_eval = max(args.synth_images // 4, 8)
        try:
            synthfashion.ensure(os.path.join(args.data_path, 'SynthFashion'), n_train=args.synth_images,
                                n_valid=n_eval, n_test=n_eval)
        except synthfashion.NotOurFolder as err:
            raise UserError(f"{err} (or pass another --data_path)") from err
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


def make_loader(dataset, args, device, persistent=False, batch_size=None):
    """Batches of `batch_size` (default --batch-size) in dataset order, on `device` and ready for
    the network (gpuinput.DeviceLoader: uint8 from the workers, flip and normalisation on the
    device, the same floats and flips as the original's transform). `persistent` keeps the workers
    across passes; each pass still gets the triplets that `set_epoch` drew, since the loader hands
    them to the workers batch by batch."""
    workers = args.workers if args.workers is not None else (4 if device.type == 'cuda' else 0)
    if getattr(getattr(dataset, 'dataset', dataset), 'originals', False):
        # ASENpp stage 2: the decoded originals (of many sizes) travel beside the views, through
        # the item path and the dataset's collate_fn; batch_to_device moves them
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size or args.batch_size, num_workers=workers,
                                           pin_memory=device.type == 'cuda', collate_fn=dataset.collate_fn)
    return gpuinput.DeviceLoader(dataset, batch_size or args.batch_size, device, workers, args.channels_last,
                                 persistent)


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
    if not os.path.isfile(path):
        return None
    n_images = len(split_files.filenames(split))
    try:
        regions = synthfashion.read_regions(path, len(split_files.attributes))
    except ValueError as err:
        raise UserError(f"{path}: not a regions file ({' '.join(str(err).split())[:120]}); regenerate the "
                        f"dataset (delete {split_files.root})") from err
    if len(regions) != n_images:
        raise UserError(f"{path}: {len(regions)} lines for {n_images} images in filenames_{split}.txt; "
                        f"regenerate the dataset (delete {split_files.root})")
    return regions


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
    optimizer = runtime.adam(models.param_groups(tnet, getattr(args, 'lr_global', None)), args.lr, device)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.decay_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    best_prec = 0.0
    if checkpoint is not None and 'optimizer' in checkpoint:
        runtime.load_optimizer_state(optimizer, checkpoint['optimizer'])
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
    train_loader = make_loader(train_set, args, device, persistent=True)
    train_model = runtime.distributed_model(tnet, device, args.sync_bn, logger, args.batch_size)
    train_model = compiled(train_model, args)
    eval_model = compiled(tnet.embeddingnet, args, evaluation=True)
    if is_main_process():
        if args.overwrite and not resumes_in(run_dir, args.resume):
            clear_previous_run(run_dir)
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
                if heatmap_due(epoch, args.heatmap_every, args.epochs):
                    valid_heatmaps(tnet.embeddingnet, heatmap_images(valid_sets), split_files.attributes, run_dir,
                                   epoch, writer, device)
            logger.info(f'lr:{lr}')
    except KeyboardInterrupt:
        # the weights are mid-epoch: resuming this file repeats the interrupted epoch from them
        path = os.path.join(run_dir, 'interrupted.pth.tar')
        if not weights_are_finite(tnet):            # a non-finite step not yet checked (see train_one_epoch)
            raise UserError(f"non-finite weights when interrupted in epoch {epoch}; not saved; "
                            f"{last_snapshot_note(run_dir)}; lower --lr or use --amp off")
        if is_main_process():
            try:
                utils.save_atomic(snapshot(epoch - 1, tnet, optimizer, scheduler, scaler, None, best_prec, args),
                                  path)
            except KeyboardInterrupt:
                raise Interrupted(f'interrupted twice in epoch {epoch}: {path} was not written; '
                                  f'{last_snapshot_note(run_dir)}') from None
        raise Interrupted(f'interrupted in epoch {epoch}; saved {path}; continue with --resume {path}')
    finally:
        writer.close()
    minutes = int(time.time() - start) // 60
    logger.info(f'training time {minutes // 60}h {minutes % 60}min')
    return best_prec


def weights_are_finite(tnet):
    """Whether every parameter and buffer of `tnet` is finite (one host sync)."""
    tensors = [t for t in (*tnet.parameters(), *tnet.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def compiled(module, args, evaluation=False):
    """`module` under torch.compile in --compile-mode when --compile is given, else `module`.
    Evaluation runs batches of several sizes (the last of each split is partial): it is compiled
    without CUDA graphs, which would record one graph per size."""
    if not args.compile:
        return module
    mode = args.compile_mode
    if evaluation and mode in CUDA_GRAPH_MODES:
        mode = 'default' if mode == 'reduce-overhead' else 'max-autotune-no-cudagraphs'
    return torch.compile(module, mode=mode)


def train_one_epoch(tnet, loader, optimizer, scaler, device, epoch, args, logger, writer=None):
    """One pass over the epoch's triplets; returns (mean loss, mean triplet accuracy). `loader`
    yields (anchor, negative, positive, attribute) already on `device`, the images normalised,
    flipped and channels_last when asked (make_loader); batch_to_device is then a no-op.

    No host sync per step, so that the host queues the next step while the device runs this one:
    the loss and accuracy accumulate on the device and the non-finite-loss flag is a device
    tensor; all are read at each log interval and at the end of the epoch. A non-finite loss
    therefore stops the run at the next such check, not at its own step: the steps in between
    have updated the weights in memory (from non-finite gradients), but none of it is saved, as
    the epoch's snapshot is written only after this function returns and the Ctrl-C snapshot
    checks the weights first. Under torch.compile a last partial batch runs eagerly (`tnet`'s
    uncompiled module, same weights): the compiled step keeps one static shape, so it neither
    recompiles nor records a second CUDA graph.
    """
    eager = getattr(tnet, '_orig_mod', tnet)                # the module torch.compile wraps, if any
    losses, accs = utils.DeviceMeter(device), utils.DeviceMeter(device)
    non_finite = runtime.NonFiniteTracker(device)
    tnet.train()
    progress = tqdm(loader, desc=f'epoch {epoch}', disable=not sys.stderr.isatty(), leave=False)
    for batch_idx, batch in enumerate(progress):
        anchor, negative, positive, attr, originals = batch_to_device(batch, device, args)
        model = tnet if anchor.size(0) == args.batch_size else eager
        if model is not eager:
            torch.compiler.cudagraph_mark_step_begin()     # a new training step for CUDA graphs
        loss, objective, sim_an, sim_ap = training_step(model, anchor, negative, positive, attr, originals,
                                                        optimizer, scaler, device, args)
        non_finite.update(objective, batch_idx)
        losses.update(loss, anchor.size(0))
        accs.update(utils.triplet_accuracy(sim_an, sim_ap), anchor.size(0))
        if batch_idx % args.log_interval == 0:
            stop_if_non_finite(non_finite, epoch, args)
            log_training(logger, writer, epoch, batch_idx, anchor.size(0), len(loader), len(loader.dataset),
                         losses, accs)
    stop_if_non_finite(non_finite, epoch, args)
    return losses.read()[1], accs.read()[1]


def batch_to_device(batch, device, args):
    """A loader batch (anchor, negative, positive, attr[, originals x 3]) on `device`, the images
    channels_last if --channels-last (non-blocking copies from pinned memory; a no-op for the
    DeviceLoader's batches, already there); returns the four and the originals (None but for
    ASENpp stage 2)."""
    anchor, negative, positive, attr, *originals = batch
    anchor, negative, positive = (to_device(t, device, args.channels_last) for t in (anchor, negative, positive))
    originals = [o.to(device) for o in originals] or None
    return anchor, negative, positive, attr.to(device, non_blocking=True), originals


def training_step(model, anchor, negative, positive, attr, originals, optimizer, scaler, device, args):
    """Forward, triplet loss, backward and optimizer step of one batch on the device; returns
    (loss, objective = loss + regularisers, sim_an, sim_ap) as device tensors, unread.
    `originals` (ASENpp stage 2, else None) are the images the local branch crops from."""
    with autocast(device, args.amp):
        sim_an, sim_ap = model(anchor, negative, positive, attr, originals=originals)
        loss = models.triplet_loss(sim_an.float(), sim_ap.float(), args.margin)
        objective = loss + models.regularisation(model)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(objective).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), objective.detach(), sim_an.detach(), sim_ap.detach()


def stop_if_non_finite(non_finite, epoch, args):
    """The one-line error for the first non-finite loss seen so far (one host sync)."""
    bad = non_finite.first_bad_batch()
    if bad is not None:
        hint = 'lower --lr' + (f' or use --amp off (not --amp {args.amp})' if args.amp != 'off' else '')
        raise UserError(f"non-finite loss at epoch {epoch}, batch {bad}; "
                        f"{last_snapshot_note(os.path.join('runs', args.name))}; {hint}")


def log_training(logger, writer, epoch, batch_idx, batch_size, n_batches, n_triplets, losses, accs):
    """The log line and TensorBoard scalars of a log interval (reads the device meters: one sync)."""
    (loss, loss_avg), (acc, acc_avg) = losses.read(), accs.read()
    logger.info(f'Train Epoch: {epoch} [{batch_idx * batch_size}/{n_triplets}]\t'
                f'Loss: {loss:.4f} ({loss_avg:.4f}) \t'
                f'Acc: {100 * acc:.2f}% ({100 * acc_avg:.2f}%)')
    if writer is not None:
        step = (epoch - 1) * n_batches + batch_idx
        writer.add_scalar('train/loss', loss, step)
        writer.add_scalar('train/triplet_accuracy', 100 * acc, step)


def log_epoch(writer, epoch, lr, result):
    writer.add_scalar('train/lr', lr, epoch)
    per, total = tables.score_keys(result)
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


def saved_args(args):
    return {k: v for k, v in vars(args).items() if k != 'explicit'}


def append_metrics(run_dir, record):
    """One JSON line; a failed write is taken back, so the file never ends in half a line."""
    utils.append_line(os.path.join(run_dir, 'metrics.jsonl'), json.dumps(record))


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
        loader = make_loader(dataset, args, device, batch_size=args.eval_batch_size)
        return extract_embeddings(net, loader, device, args)
    rank, world = runtime.rank_and_world()
    sizes = runtime.shard_sizes(len(dataset), world)
    start = sum(sizes[:rank])
    shard = datasets.IndexShard(dataset, start, start + sizes[rank])
    loader = make_loader(shard, args, device, batch_size=args.eval_batch_size)
    local = extract_embeddings(net, loader, device, args)
    # a rank with an empty shard learns the embedding width (C for ASENet_V2) from the others
    width = runtime.max_over_ranks(0 if local is None else local.shape[1], device)
    if local is None:
        local = torch.zeros(0, width, device=device)
    return runtime.gather_rows(local, sizes)


@torch.inference_mode()
def extract_embeddings(net, loader, device, args):
    """Embeddings (N, D) float32 of a RetrievalDataset in its order, each under its attribute.
    `loader` (make_loader) yields (images, attribute, value, index) already on `device`."""
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
    net = compiled(tnet.embeddingnet, args, evaluation=True)
    sets = evaluation_sets(split_files, 'test', args, logger)
    regions = synth_regions(split_files, 'test')            # read before the evaluation: a bad file stops here
    result, embeddings = evaluate(net, sets, split_files.attributes, device, args, logger)
    random_key = f'Random {tables.score_keys(result)[1]}'
    result[random_key] = random_baseline(embeddings, sets, len(split_files.attributes), args.seed)
    logger.info(f"{random_key}: {result[random_key]:.4f}")
    result.update(split='test', model=asenpp.result_label(args), dataset=args.dataset, checkpoint=args.resume,
                  attributes=split_files.attributes)
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
        source = getattr(dataset, 'meta_path', None)
        where = f"--dataset {dataset.dataset} has {here}" + (f" ({source})" if source else '') if dataset else \
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
    """checkpoint.pth.tar and, when best, model_best.pth.tar: each written whole or not at all."""
    path = os.path.join(run_dir, 'checkpoint.pth.tar')
    utils.save_atomic(state, path)
    if is_best:
        best = os.path.join(run_dir, 'model_best.pth.tar')
        tmp = best + '.tmp'
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
            # a hard link, not a copy of the file (3 x the weights with Adam's moments): save_atomic
            # replaces checkpoint.pth.tar by a new file, so the best one never changes under its name
            os.link(path, tmp)
            os.replace(tmp, best)
        except OSError:                                     # no hard links here: an atomic, guarded copy
            if os.path.lexists(tmp):
                os.remove(tmp)
            utils.copy_atomic(path, best)


def last_snapshot_note(run_dir):
    """What the user still has when a run stops early."""
    kept = [name for name in SNAPSHOTS if os.path.isfile(os.path.join(run_dir, name))]
    if not kept:
        return 'no snapshot was written yet'
    return f"the last good snapshot {os.path.join(run_dir, kept[0])} is kept"


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
        check_args(args, source=f' (from --resume {args.resume})')
    visdom_to_tensorboard(args)
    # ASENpp: its flags checked; True when stage 2 starts from a stage-1 checkpoint's weights alone
    starts_stage2 = asenpp.prepare(args, checkpoint, original_info, dataset_preset(args), is_training(args))
    for flag in ('test', 'visualize', 'retrieve'):
        if getattr(args, flag) and checkpoint is None:
            raise UserError(f"--{flag} needs --resume CHECKPOINT (e.g. runs/<name>/model_best.pth.tar)")
    if args.retrieve and not args.attribute:
        raise UserError("--retrieve needs --attribute NAME (one of the dataset's ATTRIBUTES)")
    check_triplet_flags(args)
    if checkpoint is not None and is_training(args) and not starts_stage2 and 'start_epoch' not in args.explicit:
        args.start_epoch = int(checkpoint.get('epoch') or 0) + 1
        check_epochs_left(args)
    if distributed() and (args.visualize or args.retrieve):
        raise UserError("--visualize and --retrieve run in one process; start them without torchrun")
    device = runtime.resolve_device(args.no_cuda)
    runtime.configure_backends(device, args.tf32)
    utils.seed_everything(args.seed)
    run_dir = os.path.join('runs', args.name)
    with contextlib.ExitStack() as stack:
        make_run_dir(run_dir)
        if is_training(args):
            if is_main_process():
                stack.enter_context(run_lock(run_dir))
            check_not_overwriting(run_dir, args)
        check_writable(run_dir)
        return run_in(run_dir, checkpoint, device, args, starts_stage2)


def run_in(run_dir, checkpoint, device, args, starts_stage2=False):
    """The command, once the run folder is ready (and, for training, locked); `starts_stage2`:
    ASENpp stage 2 takes only the weights of the stage-1 `checkpoint`."""
    logger = utils.setup_logger(os.path.join(run_dir, 'train.log' if is_training(args) else 'test.log')) \
        if is_main_process() else runtime.silent_logger()
    log_invocation(args, run_dir, checkpoint, logger)
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
    if args.retrieve:
        return run_retrieval(tnet, split_files, device, args, run_dir)
    if args.visualize:
        run_visualize(tnet, split_files, device, args, run_dir)
    if args.test:
        return run_test(tnet, split_files, device, args, logger, run_dir)
    if is_training(args):
        return run_training(tnet, split_files, device, args, logger, run_dir, checkpoint)
    return None


def visdom_to_tensorboard(args):
    """The original's --visdom plotted the curves and, every epoch, the attention of a few valid
    images; TensorBoard gets both here, so --visdom draws the heatmaps every epoch unless
    --heatmap-every is given (after --resume, whose checkpoint may hold another value)."""
    if args.visdom and 'heatmap_every' not in args.explicit:
        args.heatmap_every = 1


def log_invocation(args, run_dir, checkpoint, logger):
    """Say which run folder this run writes to (--resume may have set --name), and that the
    original's --visdom is served by TensorBoard."""
    origin = ' (--name from the --resume checkpoint)' if checkpoint is not None and 'name' not in args.explicit \
        else ''
    logger.info(f'writing to {run_dir}{os.sep}{origin}')
    if args.visdom:
        what = 'curves and attention' if args.heatmap_every > 0 else 'curves'
        logger.info(f'--visdom: {what} go to TensorBoard here: tensorboard --logdir runs')


def check_epochs_left(args):
    if args.start_epoch > args.epochs:
        raise UserError(f"--resume {args.resume} already finished epoch {args.start_epoch - 1} and --epochs is "
                        f"{args.epochs}: nothing to train; pass a larger --epochs, or --test to evaluate it")


# ----------------------------------------------------------------------------- the run folder

def make_run_dir(run_dir):
    """Create runs/<name>/, or say in one line why it cannot be."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} exists and is not a folder; move it away or choose another --name")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the run folder {run_dir}: {err.strerror or err}; "
                        f"choose another --name or fix runs/") from err


def check_writable(run_dir):
    """Find a read-only run folder before any work, not when the first snapshot is due."""
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise UserError(f"cannot write in the run folder {run_dir}: {err.strerror or err}; make it "
                        f"writable or choose another --name") from err


@contextlib.contextmanager
def run_lock(run_dir):
    """An exclusive lock on runs/<name>/.lock while this process trains there. flock is released when
    the process ends, however it ends, so a crashed run never leaves the folder locked."""
    try:
        import fcntl
    except ImportError:                                 # no flock (Windows): no lock
        yield
        return
    path = os.path.join(run_dir, '.lock')
    try:
        handle = open(path, 'a')
    except OSError as err:
        raise UserError(f"cannot write in the run folder {run_dir}: {err.strerror or err}; make it "
                        f"writable or choose another --name") from err
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise UserError(f"{run_dir} is in use by another training process (it holds {path}); wait for "
                            f"it to finish or choose another --name") from err
        yield


def check_not_overwriting(run_dir, args):
    """A new run (not --resume of a snapshot in this folder) may not replace the snapshots of an
    earlier one unless --overwrite says so."""
    held = [name for name in SNAPSHOTS if os.path.exists(os.path.join(run_dir, name))]
    if not held or args.overwrite or resumes_in(run_dir, args.resume):
        return
    raise UserError(f"{run_dir} already holds {', '.join(held)} of an earlier run; continue it with "
                    f"--resume {os.path.join(run_dir, held[0])}, pass --overwrite to replace it, or choose "
                    f"another --name")


def resumes_in(run_dir, checkpoint_path):
    return bool(checkpoint_path) and \
        os.path.realpath(os.path.dirname(os.path.abspath(checkpoint_path))) == os.path.realpath(run_dir)


def clear_previous_run(run_dir):
    """--overwrite: the earlier run's snapshots and metrics go, so none is mistaken for this run's."""
    for name in SNAPSHOTS + ('metrics.jsonl',):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def main(argv=None):
    try:
        runtime.check_torch_version()
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    args = parse_args(argv)
    try:
        with runtime.distributed_session(args.no_cuda, args.sync_bn):
            run(args)
    except UserError as err:
        # errors raised in DataLoader workers arrive wrapped in their traceback: keep the message
        message = str(err).strip().splitlines()[-1] if str(err).strip() else 'failed'
        print(f"error: {message.removeprefix('utils.UserError: ')}", file=sys.stderr)
        return 130 if isinstance(err, Interrupted) else 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); the files saved before are kept", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as err:
        line = environment_error(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    return 0


def environment_error(err):
    """One line for a failure of the machine rather than of the code (disk full, no permission,
    a file in the way), else None."""
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ''
        hint = {errno.ENOSPC: 'free disk space', errno.EDQUOT: 'free disk space',
                errno.EACCES: 'check the permissions', errno.EPERM: 'check the permissions',
                errno.EROFS: 'use a writable folder'}.get(err.errno, 'check the path')
        return f"{err.strerror or err}{where}; {hint}; files already saved are kept"
    if utils.is_disk_full(err):
        return f"no space left on device ({' '.join(str(err).split())[:200]}); free disk space; files " \
               f"already saved are kept"
    return None


if __name__ == '__main__':
    sys.exit(main())
