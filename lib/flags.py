"""asen.py's flags, each with its rules beside it.

A flag is defined once, by `Flags.add` (called through a group: `data('--img_size', ...)`), with:
  its range and kind   the argparse `type=`: a `Range` (`whole`, `real`, `folder_name`, `path`)
                       refuses a value out of range in argparse's one line, and the same Range
                       checks a value restored from a --resume checkpoint (`check_values`);
  its role in a run    one tag, `role=`: RUN, KEPT or INVOCATION (below).
`RULES` holds the record of every flag (dest -> Rule); nothing reads argparse's internals.
lib/config.py resolves the configuration from these flags.
"""
import argparse
import math
import os
from typing import NamedTuple

import losses
import model
import synthfashion
import utils
from lib import runtime
from utils import UserError

# A flag's role in a run, the one tag given where it is defined:
RUN = 'run'                  # shapes the weights: taken from a --resume checkpoint when not given,
                             # and on --resume auto it must be the snapshot's
KEPT = 'kept'                # taken from the checkpoint when not given, but a --resume auto
                             # continuation may change it (it does not shape the weights; --epochs
                             # only extends the run)
INVOCATION = 'invocation'    # of this command alone: never taken from a checkpoint, free to change

DATASETS = ('FashionAI', 'DARN', 'DeepFashion', 'SynthFashion', 'Zappos50k')
# torch.compile modes of --compile-mode.
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')

# SynthFashion runs out of the box on a CPU in minutes: these replace the defaults of flags not
# given. The fast paths (bf16 where the device has bf16 kernels, channels_last, one concatenated
# forward) buy the triplets a from-scratch ResNet-18 needs in that time.
SYNTH_PRESET = dict(backbone='resnet18', pretrained=False, img_size=64, epochs=6, num_triplets=5000,
                    batch_size=32, log_interval=40, channels_last=True, concat_forward=True)

# The trunk is cut after layer3 (stride 16): a 2x2 attention map needs 32 px.
MIN_IMG_SIZE = 32
# Upper bounds that keep an absurd value (a typo, an extra zero) from reaching an out-of-memory
# traceback: far above the paper's 224 px, 1024-d and 100000 triplets, below what one GPU holds
# (a batch of 16 triplets at 4096 px is 2.4 GB of images before the network).
MAX_IMG_SIZE = 4096
MAX_DIM_EMBED = 65536
MAX_TRIPLETS = 100_000_000
# SynthFashion gives valid and test a quarter of --synth-images each, and needs at least 2 images
# per attribute in each (synthfashion._merged_settings).
MIN_SYNTH_IMAGES = 4 * 2 * len(synthfashion.ATTRIBUTES)


def flag_name(dest):
    """The command-line spelling of an argparse dest: img_size -> --img-size."""
    return '--' + dest.replace('_', '-')


# ----------------------------------------------------------------------------- ranges (type=)

def _is_whole(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


CONVERT = {'int': int, 'float': float, 'str': str}


class Range(NamedTuple):
    """A flag's kind and range: argparse's `type=` for the text given, and `accepts` for a value
    that comes from elsewhere (a checkpoint's saved settings)."""
    kind: str               # 'int', 'float' or 'str'
    accepts: object         # test of a value of that kind
    allowed: str            # the range in words, after 'must be'

    def __call__(self, text):
        try:
            value = CONVERT[self.kind](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {self.kind} value: {text!r}; must be {self.allowed}") from None
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"{value!r}: must be {self.allowed}")
        return value


def whole(low, high=None, why='', high_text=None):
    """A whole number, low <= value (<= high, written `high_text` when given); `why` follows the
    range in the error."""
    allowed = f'a whole number from {low} to {high_text or high}' if high is not None else f'a whole number >= {low}'
    return Range('int', lambda v: _is_whole(v) and low <= v and (high is None or v <= high),
                 allowed + (f' ({why})' if why else ''))


def real(test, allowed):
    """A finite number passing `test`, `allowed` in words."""
    return Range('float', lambda v: _is_real(v) and math.isfinite(v) and test(v), f'a finite number {allowed}')


def _is_folder_name(v):
    return isinstance(v, str) and v not in ('', '.', '..') and '/' not in v and os.sep not in v and '\0' not in v


folder_name = Range('str', _is_folder_name, "one folder name (not empty, '.' or '..', no '/')")
# A path that, when given, is not empty: an unset shell variable would otherwise turn
# `--resume $CKPT` into a new training run.
path = Range('str', lambda v: isinstance(v, str) and v != '', 'a path or name, not empty (an unset shell variable?)')


def checkpoint_interval(text):
    """--checkpoint-every's value: N (steps), Nm (minutes) or 0 (off), kept as given; see
    `parse_interval`. Raises ValueError (argparse's one line) for anything else."""
    parse_interval(text)
    return text


def parse_interval(text):
    """(steps, seconds) of --checkpoint-every: '500' -> (500, None), '10m' -> (None, 600.0), '0' -> (None, None)."""
    text = str(text).strip()
    if text.endswith('m'):
        minutes = float(text[:-1])
        if not (math.isfinite(minutes) and minutes > 0):
            raise ValueError(text)
        return None, 60.0 * minutes
    steps = int(text)
    if steps < 0:
        raise ValueError(text)
    return (steps or None), None


# ----------------------------------------------------------------------------- the record of a flag

class Rule(NamedTuple):
    """What `Flags.add` records of one flag."""
    option: str             # its first spelling
    role: str               # RUN, KEPT or INVOCATION
    kind: str               # 'bool', 'int', 'float', 'str' or 'list': what a restored value must be
    range: Range = None     # its type=, when it has a range
    choices: tuple = None
    default: object = None
    negatable: bool = False  # --x / --no-x (argparse.BooleanOptionalAction)


BOOL_ACTIONS = ('store_true', 'store_false', argparse.BooleanOptionalAction)


def kind_of(settings):
    """The kind of the value a flag defined with `settings` (add_argument's keywords) makes."""
    if settings.get('action') in BOOL_ACTIONS:
        return 'bool'
    if settings.get('nargs') in ('+', '*'):
        return 'list'
    value_type = settings.get('type')
    return value_type.kind if isinstance(value_type, Range) else {int: 'int', float: 'float'}.get(value_type, 'str')


class Flags:
    """Defines a parser's flags and records each one's Rule in `rules` (dest -> Rule)."""

    def __init__(self, parser):
        self.parser, self.rules = parser, {}

    def group(self, title):
        """A function that adds a flag to a new group `title`: group(*spellings, role=..., **settings)."""
        group = self.parser.add_argument_group(title)
        return lambda *names, role, **settings: self.add(group, *names, role=role, **settings)

    def add(self, group, *names, role, **settings):
        action = group.add_argument(*names, **settings)
        value_type = settings.get('type')
        self.rules[action.dest] = Rule(
            names[0], role, kind_of(settings), value_type if isinstance(value_type, Range) else None,
            tuple(settings['choices']) if settings.get('choices') is not None else None,
            settings.get('default'), settings.get('action') is argparse.BooleanOptionalAction)
        return action


# ----------------------------------------------------------------------------- the presets

def synth_preset(device):
    """SYNTH_PRESET with the precision chosen for `device`, the one the run will use: bf16 where
    it runs bf16 natively (runtime.bf16_supported), else fp32."""
    return dict(SYNTH_PRESET, amp='bf16' if runtime.bf16_supported(device) else 'off')


def describe_preset():
    """The preset as --help prints it."""
    values = ', '.join(f'{key}={value}' for key, value in SYNTH_PRESET.items())
    return f'{values}, amp=bf16 where the device used (see --no-cuda) runs bf16 natively, else off'


def dataset_preset(dataset, no_cuda):
    """The defaults --dataset brings for flags not given (SynthFashion's CPU preset, its precision
    chosen for the device that --no-cuda leaves), else none."""
    return synth_preset(runtime.resolve_device(no_cuda)) if dataset == 'SynthFashion' else {}


# ----------------------------------------------------------------------------- the flags

def get_args_parser():
    """asen.py's parser; `parser.rules` holds each flag's Rule (the same as RULES)."""
    parser = utils.OneLineArgumentParser(
        command='asen.py',
        description='Attribute-Specific Embedding Network (ASEN): train, or test with --test --resume.',
        formatter_class=utils.HelpFormatter)
    flags = Flags(parser)
    parser.rules = flags.rules

    data = flags.group('data')
    data('--dataset', role=RUN, default='FashionAI', choices=DATASETS,
         help='dataset under --data_path; SynthFashion is generated on first use and '
              f'brings a CPU preset for the flags not given: {describe_preset()}')
    data('--data_path', '--data-path', role=KEPT, type=path, default='data', help='folder holding the datasets')
    data('--img_size', '--img-size', role=RUN, default=224,
         type=whole(MIN_IMG_SIZE, MAX_IMG_SIZE, f'the trunk has stride 16: {MIN_IMG_SIZE} px give a 2x2 attention map'),
         help='Resize and CenterCrop size; the attention map size follows from it')
    data('--num_triplets', '--num-triplets', role=RUN, type=whole(1, MAX_TRIPLETS), default=100000,
         help='training triplets drawn anew each epoch')
    data('--synth-images', '--synth_images', dest='synth_images', role=RUN, default=2000,
         type=whole(MIN_SYNTH_IMAGES, 10_000_000,
                    f'valid and test get a quarter each, and need {MIN_SYNTH_IMAGES // 4} images'),
         help='SynthFashion: training images to generate (valid and test get a quarter each)')
    data('--skip-bad-images', dest='skip_bad_images', role=INVOCATION, action='store_true',
         help='skip listed images that are missing or unreadable, and say how many (without '
              'it: stop and name the first one)')
    data('--check-data', '--check_data', dest='check_data', role=INVOCATION, action='store_true',
         help="count the images the split files name that are missing or cannot be read, per "
              "split and per attribute, in --workers processes (default: one a core, up to 8), "
              "print the report and exit (writes nothing); with --skip-bad-images a training "
              "run logs the same report before it starts. See docs/datasets.md")
    data('--workers', role=INVOCATION, type=whole(0, 256), default=None,
         help='DataLoader worker processes; they decode and resize, the device normalises, and '
              'the training ones persist across epochs (default: 4 on CUDA, 0 on CPU, as the original)')
    data('--allow-large-images', dest='allow_large_images', role=INVOCATION, action='store_true',
         help="decode images of more than PIL's Image.MAX_IMAGE_PIXELS (89,478,485 pixels, about "
              "89 megapixels; without it they are refused by name: PIL itself only warns there and "
              "refuses from twice that); only for images you trust")
    data('--cache-images', '--cache_images', dest='cache_images', role=INVOCATION, action='store_true',
         help='decode and resize each split\'s images once into a uint8 memory-mapped file '
              'data/<Dataset>/cache/<split>_<img-size>.u8 (N x S x S x 3 bytes), rebuilt '
              'when the images, their list or --img-size change')

    net = flags.group('model')
    net('--model', role=RUN, default='ASENet', choices=list(model.MODELS),
        help='network: ASENet and its ablations (_noASA, _noACA); ASENet_V2, the authors\' later '
             'variant (embedding size = trunk channels, e.g. 1024 for resnet50: --dim_embed is '
             'ignored); ASENet_V2_fc, V2 with a final Linear to --dim_embed (their earlier V2 code); '
             'ConditionalSimNet (CSN, Veit et al. 2017); TripletNet, one embedding for all attributes; '
             'ASENpp, ASEN++ (TIP 2021): global and local branches, trained in two --stage runs')
    net('--backbone', role=RUN, default='resnet50', choices=model.BACKBONES,
        help='ResNet trunk, cut after layer3')
    net('--pretrained', role=RUN, action=argparse.BooleanOptionalAction, default=True,
        help='--pretrained: start the trunk from ImageNet weights (the default, except in the SynthFashion '
             'preset); --no-pretrained: random init')
    net('--backbone-weights', dest='backbone_weights', role=RUN, type=path, default=None, metavar='FILE',
        help='trunk weights from a local file instead of the ImageNet download: a torchvision '
             'ResNet state dict (e.g. resnet50-0676ba61.pth) or one written by pretrain.py')
    net('--dim_embed', '--dim-embed', role=RUN, type=whole(1, MAX_DIM_EMBED), default=1024, help='embedding size')
    net('--csn-fixed-masks', dest='csn_fixed_masks', role=RUN, action='store_true',
        help='ConditionalSimNet: fixed disjoint 0/1 masks, not trained (without it: learned '
             'masks initialised N(0.9, 0.7))')
    net('--csn-reg', dest='csn_reg', role=RUN, action='store_true',
        help='ConditionalSimNet: add the CSN regularisers to the loss, --csn-embed-weight x '
             'embedding L2 norm + --csn-mask-weight x mask L1 norm (without it: none, as the ASEN '
             'authors\' CSN baseline)')
    net('--csn-embed-weight', dest='csn_embed_weight', role=RUN, type=real(lambda v: v >= 0, '>= 0'),
        default=losses.CSN_EMBED_WEIGHT,
        help='ConditionalSimNet with --csn-reg: weight of the embedding L2 norm (default: the CSN '
             'authors\' %(default)s)')
    net('--csn-mask-weight', dest='csn_mask_weight', role=RUN, type=real(lambda v: v >= 0, '>= 0'),
        default=losses.CSN_MASK_WEIGHT,
        help='ConditionalSimNet with --csn-reg: weight of the mask L1 norm (default: the CSN '
             'authors\' %(default)s)')
    net('--stage', role=RUN, type=int, choices=(1, 2), default=None,
        help='ASENpp: 1 trains the global branch alone (and brings --epochs 50 --step_size 3 '
             '--decay_rate 0.9); 2 starts from a stage-1 --resume and trains both branches '
             '(and brings --epochs 20 --step_size 1 --decay_rate 0.9); flags given win '
             '(default: 1, or the checkpoint\'s stage)')
    net('--local-backbone', '--local_backbone', dest='local_backbone', role=RUN, default='resnet34',
        choices=model.BACKBONES, help='ASENpp: the local branch\'s ResNet trunk, cut after layer3')
    net('--local-size', '--local_size', dest='local_size', role=RUN, type=whole(1, MAX_IMG_SIZE), default=None,
        help='ASENpp: side of the local branch\'s input crop (default: half of --img-size, '
             '112 at 224)')
    net('--threshold', role=RUN, default=0.1,
        type=real(lambda v: 0 < v < 1, "strictly between 0 and 1 (the authors' stage-2 configs use 0.1)"),
        help='ASENpp: the local crop keeps the box of the attention above this fraction of '
             'its min-max range, in (0, 1)')
    net('--beta', role=RUN, type=real(lambda v: 0 <= v <= 1, 'from 0 to 1 (the authors use 0.6)'), default=0.6,
        help='ASENpp stage 2: weight of the global branch in the test embedding '
             '[sqrt(beta) global; sqrt(1 - beta) local]')
    net('--local-crop', '--local_crop', dest='local_crop', role=RUN, choices=('original', 'view'),
        default='original',
        help='ASENpp stage 2: crop the local input from the original image (the authors\') '
             'or from the --img-size view (a shortcut that loses detail; works with '
             '--cache-images)')

    train = flags.group('training')
    train('--epochs', role=KEPT, type=whole(1, 100_000), default=200, help='last epoch to train')
    train('--start_epoch', '--start-epoch', role=INVOCATION, type=whole(1), default=1,
          help='first epoch (set from the checkpoint with --resume)')
    train('--batch-size', '--batch_size', dest='batch_size', role=RUN, type=whole(1, 65536), default=16,
          help='triplets per batch, per process: under torchrun with N processes a '
               'step sees N x this many triplets')
    train('--eval-batch-size', '--eval_batch_size', dest='eval_batch_size', role=KEPT, type=whole(1, 65536),
          default=64,
          help='images per batch when embedding the evaluation splits (no gradients, so larger '
               'than training\'s; the embeddings do not depend on it beyond float rounding)')
    train('--lr', role=RUN, type=real(lambda v: v > 0, '> 0'), default=1e-4, help='Adam learning rate')
    train('--step_size', '--step-size', role=RUN, type=whole(1), default=1, help='StepLR step, in epochs')
    train('--decay_rate', '--decay-rate', role=RUN, type=real(lambda v: 0 < v <= 1, 'in (0, 1]'), default=0.985,
          help='StepLR gamma')
    train('--margin', role=RUN, type=real(lambda v: v > 0, '> 0'), default=0.2, help='triplet ranking margin')
    train('--lr-global', '--lr_global', dest='lr_global', role=RUN, type=real(lambda v: v > 0, '> 0'),
          default=1e-5,
          help='ASENpp stage 2: learning rate of the global branch and the attribute '
               'embedding (--lr is the local branch\'s)')
    train('--local-weight', '--local_weight', dest='local_weight', role=RUN, type=real(lambda v: v >= 0, '>= 0'),
          default=0.1, help='ASENpp stage 2: weight of the local branch\'s triplet loss')
    train('--align-weight', '--align_weight', dest='align_weight', role=RUN, type=real(lambda v: v >= 0, '>= 0'),
          default=0.1, help='ASENpp stage 2: weight of the global-local alignment loss')
    train('--seed', role=RUN, type=whole(0, 2**63 - 1, high_text='2**63-1'), default=1, help='seeds Python random, numpy and torch')

    perf = flags.group('performance (off unless given or preset: the original semantics)')
    perf('--amp', role=RUN, default='off', choices=('off', 'bf16', 'fp16'),
         help='autocast precision (default: off); fp16 uses a GradScaler. off is fp32, but on '
              'Ampere and later GPUs PyTorch runs fp32 convolutions in TF32 unless --no-tf32 is '
              'given (see --tf32): --amp off --no-tf32 is the authors\' full fp32')
    perf('--tf32', role=KEPT, action=argparse.BooleanOptionalAction, default=None,
         help='--tf32: fp32 convolutions and matmuls on CUDA in TF32 (10-bit mantissa, faster); '
              '--no-tf32: both in full fp32; neither (default): PyTorch\'s own setting is left '
              'as it is (TF32 convolutions, full fp32 matmuls); no effect on CPUs')
    perf('--channels-last', dest='channels_last', role=RUN, action=argparse.BooleanOptionalAction,
         default=False, help='channels_last memory format for the network and its inputs')
    perf('--compile', role=KEPT, action='store_true',
         help='torch.compile the network in --compile-mode (whether it is faster depends on the GPU '
              'and mode: benchmarks/gpu_check.sh measures it); a last partial batch runs eagerly '
              '(no recompilation)')
    perf('--compile-mode', '--compile_mode', dest='compile_mode', role=KEPT, default='default',
         choices=COMPILE_MODES,
         help='torch.compile mode for --compile: reduce-overhead and max-autotune replay the '
              'training step\'s forward and backward as CUDA graphs (static shapes; evaluation '
              'is compiled without them)')
    perf('--concat-forward', dest='concat_forward', role=RUN, action=argparse.BooleanOptionalAction,
         default=False,
         help='one forward pass over anchor+negative+positive (changes BatchNorm batch '
              'statistics; the original does three passes)')
    perf('--sync-bn', dest='sync_bn', role=INVOCATION, action='store_true',
         help='under torchrun on GPUs: SyncBatchNorm (batch statistics over all processes); '
              'not available on CPUs (torch has no CPU kernel); no effect in one process')

    run = flags.group('run')
    run('--name', role=KEPT, type=folder_name, default='ASEN',
        help='run folder runs/<name>/ for snapshots and logs (with --resume, the checkpoint\'s run; '
             'for --test, --visualize or --retrieve of a file outside a run folder, the file\'s name)')
    run('--resume', role=INVOCATION, type=path, default=None, metavar='CHECKPOINT',
        help='checkpoint to resume training from or to test; every flag not given is taken from '
             'it, --name (so the run folder runs/<name>/ it writes to) and --data_path included, '
             'except that --test, --visualize and --retrieve of a file outside a run folder write to '
             'runs/<the file\'s name>/ (runs/<its folder>-model_best/ for a model_best.pth.tar). '
             '"auto": continue from the newest complete snapshot in runs/<name>/ (step or epoch), '
             'or start the run when there is none, or return at once (exit 0) when it has finished; a '
             'snapshot of other settings is refused (docs/reliability.md: one run a folder). A '
             'run stopped by SIGTERM, SIGUSR1 or Ctrl-C finishes its step, writes a step snapshot '
             'and exits with status 75 (requeue); see docs/preemption.md')
    run('--checkpoint-every', '--checkpoint_every', dest='checkpoint_every', role=INVOCATION, default='5m',
        type=checkpoint_interval, metavar='N|Nm',
        help='also write a step snapshot runs/<name>/step.pth.tar every N training steps, or every '
             'N minutes (Nm), from which a killed run continues exactly (--resume auto); 0: only the '
             'epoch snapshots. The default, 5m, loses at most five minutes of training when the '
             'machine goes away, and writing a snapshot (weights, Adam\'s moments, the RNGs) takes '
             'a small fraction of that')
    run('--overwrite', role=INVOCATION, action='store_true',
        help='let a new training run replace the snapshots and metrics.jsonl already in '
             'runs/<name>/ (default: refuse, so that a finished run is not lost)')
    run('--test', role=INVOCATION, action='store_true', help='evaluate --resume on the test split and exit')
    run('--no-cuda', '--no_cuda', dest='no_cuda', role=INVOCATION, action='store_true',
        help='use the CPU even when CUDA is available')
    run('--log-interval', '--log_interval', dest='log_interval', role=KEPT, type=whole(1), default=400,
        help='batches between training log lines')
    run('--heatmap-every', '--heatmap_every', dest='heatmap_every', role=KEPT,
        type=whole(0, why='0: never during training'), default=0, metavar='N',
        help='draw the attention of a fixed set of valid images (runs/<name>/heatmaps/ and '
             'TensorBoard) every N epochs and after the last one; 0: never during training, as '
             'the original (--visualize draws them afterwards)')
    run('--visdom', role=KEPT, action='store_true',
        help="the original's flag: its curves and per-epoch attention go to TensorBoard instead "
             "(tensorboard --logdir runs), the attention every epoch unless --heatmap-every is given")

    use = flags.group('seeing and using a trained model (with --resume)')
    use('--visualize', role=INVOCATION, action='store_true',
        help='write attention overlays of a few test images per attribute to runs/<name>/heatmaps/')
    use('--report', role=INVOCATION, action='store_true',
        help='write runs/<name>/report/index.html (offline, no JavaScript): the run, its test '
             'results, training curves and per attribute attention, retrieval examples, a t-SNE '
             'map and the AP of each value; with --test also test_results.json (docs/report.md)')
    use('--retrieve', role=INVOCATION, type=path, metavar='IMAGE', default=None,
        help='rank the test candidates (or --gallery) by similarity to IMAGE under --attribute')
    use('--attribute', role=INVOCATION, type=path, default=None, help='attribute name for --retrieve')
    use('--topk', role=INVOCATION, type=whole(1), default=10, help='results --retrieve prints and draws')
    use('--gallery', role=INVOCATION, type=path, metavar='DIR', default=None,
        help='rank the images of DIR instead of the test candidates')

    table = flags.group('result tables')
    table('--collect', role=INVOCATION, nargs='+', metavar='RUN', default=None,
          help='print one markdown table of the test results of these runs (runs/<name> '
               'folders or their test_results.json) and exit')
    table('--collect-out', '--collect_out', dest='collect_out', role=INVOCATION, type=path, metavar='FILE',
          default=None, help='also write the collected table as JSON to FILE')
    table('--collect-by', '--collect_by', dest='collect_by', role=INVOCATION, choices=('model', 'run'),
          default='model', help='one row per model (mean ± std over its runs) or per run')
    return parser


RULES = get_args_parser().rules
# Flags a checkpoint does not override when resuming (they describe this invocation).
INVOCATION_FLAGS = frozenset(dest for dest, rule in RULES.items() if rule.role == INVOCATION)


# ----------------------------------------------------------------------------- reading the rules

NOT_GIVEN = object()


def given_flags(argv):
    """Names (dests) of the options given on the command line `argv`: a second parse, on a fresh
    parser whose defaults are all a marker that no command line can give."""
    probe = get_args_parser()
    probe.set_defaults(**{dest: NOT_GIVEN for dest in probe.rules})
    return frozenset(dest for dest, value in vars(probe.parse_args(argv)).items() if value is not NOT_GIVEN)


KIND_TESTS = {'bool': lambda v: isinstance(v, bool), 'int': _is_whole, 'float': _is_real,
              'str': lambda v: isinstance(v, str),
              'list': lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)}
KIND_WORDS = {'bool': 'true or false', 'int': 'a whole number', 'float': 'a number', 'str': 'a string',
              'list': 'a list of strings'}


def check_restored_kinds(values, checkpoint_keys, resume):
    """Each value taken from the checkpoint is of its flag's kind and among its choices (a saved
    'amp': 'fp8' would otherwise run as bf16, an 'img_size': 'abc' fail deep inside)."""
    for dest in sorted(checkpoint_keys):
        rule = RULES.get(dest)
        value = values.get(dest)
        if rule is None or (value is None and rule.default is None):
            continue
        if not KIND_TESTS[rule.kind](value):
            raise UserError(f"{flag_name(dest)} {value!r} (from --resume {resume}): must be {KIND_WORDS[rule.kind]}; "
                            f"the file's saved settings are damaged; give {flag_name(dest)} on the command line")
        if rule.choices is not None and rule.kind != 'list' and value not in rule.choices:
            raise UserError(f"{flag_name(dest)} {value!r} (from --resume {resume}): must be one of "
                            f"{', '.join(map(str, rule.choices))}; give {flag_name(dest)} on the command line")


def check_ranges(values, checkpoint_keys=(), resume=None):
    """Every final value within its flag's range (those given were checked by argparse; this
    catches those restored from a checkpoint or derived); a value from the checkpoint says so.
    A flag left at None (not given, no default) is not checked."""
    for dest, rule in RULES.items():
        value = values.get(dest)
        if rule.range is not None and value is not None and not rule.range.accepts(value):
            source = f' (from --resume {resume})' if dest in checkpoint_keys else ''
            raise UserError(f"{flag_name(dest)} {value!r}{source}: must be {rule.range.allowed}")


# What tells runs apart most plainly: named first when several settings differ.
IDENTITY_FIRST = ('dataset', 'model', 'stage', 'backbone')


def first_difference(settings, saved):
    """(flag, saved value, this value) of the first setting that shapes the weights (a RUN flag)
    where `settings` (a Config or Draft) differs from the `saved` flags of a run (a snapshot's
    'args', args.json), or None when they describe the same run."""
    def order(key):
        return (key not in IDENTITY_FIRST, IDENTITY_FIRST.index(key) if key in IDENTITY_FIRST else 0, key)
    for key in sorted((k for k in saved if isinstance(k, str)), key=order):
        rule = RULES.get(key)
        if rule is None or rule.role != RUN or key not in vars(settings):
            continue
        if getattr(settings, key) != saved[key]:
            return key, saved[key], getattr(settings, key)
    return None
