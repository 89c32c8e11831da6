"""The configuration of a run: resolved once, in a visible order, then only read.

asen.resolve_configuration applies, in this order, each step changing only flags the user did not
give: the command line; the dataset's preset (SynthFashion's CPU preset); ASEN++'s stage defaults;
the --resume checkpoint's settings; values derived from them (ASEN++'s stage, the first epoch).
Every change a step makes is noted (`Draft.set`) and logged once by the run. `Draft.freeze` then
checks the final values once and returns a read-only `Config`.
"""

if __name__ == '__main__':                       # run as a script: say what to run instead
    print('error: lib/config.py is a module, not a command; run python asen.py (see python asen.py --help)', file=__import__('sys').stderr)
    raise SystemExit(2)
import argparse
import copy
import math
import os
import types

from lib import runtime
import synthfashion
from utils import UserError

DATASETS = ('FashionAI', 'DARN', 'DeepFashion', 'SynthFashion', 'Zappos50k')
# Datasets of (anchor, far, close) triplet lists, scored by triplet accuracy rather than mAP.
TRIPLET_DATASETS = ('Zappos50k',)
# torch.compile modes of --compile-mode; those that replay CUDA graphs need static shapes.
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
CUDA_GRAPH_MODES = ('reduce-overhead', 'max-autotune')

# SynthFashion runs out of the box on a CPU in minutes: these replace the defaults of flags not
# given. The fast paths (bf16 where the device has bf16 kernels, channels_last, one concatenated
# forward) buy the triplets a from-scratch ResNet-18 needs in that time.
SYNTH_PRESET = dict(backbone='resnet18', pretrained=False, img_size=64, epochs=6, num_triplets=5000,
                    batch_size=32, log_interval=40, channels_last=True, concat_forward=True)

# Flags a checkpoint does not override when resuming (they describe this invocation).
INVOCATION_FLAGS = {'resume', 'test', 'report', 'start_epoch', 'no_cuda', 'workers', 'skip_bad_images', 'visualize',
                    'retrieve', 'attribute', 'topk', 'gallery', 'cache_images', 'sync_bn', 'overwrite',
                    'allow_large_images', 'checkpoint_every'}
# `--resume auto`: the run folder's newest complete snapshot, or a new run when it holds none.
AUTO_RESUME = 'auto'
# Settings a `--resume auto` continuation may change from the snapshot's: they do not change the
# weights (or, --epochs, only extend the run). Every other one must be the snapshot's.
CONTINUATION_MAY_CHANGE = INVOCATION_FLAGS | {'epochs', 'log_interval', 'heatmap_every', 'eval_batch_size',
                                              'visdom', 'visdom_port', 'data_path', 'name', 'tf32', 'compile',
                                              'compile_mode'}


def flag_name(dest):
    """The command-line spelling of an argparse dest: img_size -> --img-size."""
    return '--' + dest.replace('_', '-')


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


def given_flags(parser, argv):
    """Names (dests) of the options given on the command line."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(probe.parse_args(argv)))


# ----------------------------------------------------------------------------- the two objects

class Config(types.SimpleNamespace):
    """The resolved configuration: every flag's final value as an attribute, and `explicit`, the
    flags given on the command line. Read-only: a run reads it, nothing writes it."""

    def __init__(self, values, explicit):
        self.__dict__.update(values, explicit=frozenset(explicit))

    def __setattr__(self, key, value):
        raise AttributeError(f"the configuration is read-only once resolved (tried to set {key})")

    def as_dict(self):
        """The values as saved in a snapshot's 'args' and args.json (without `explicit`)."""
        return {k: v for k, v in vars(self).items() if k != 'explicit'}


class Draft(types.SimpleNamespace):
    """The configuration while it is resolved: values change only through `set`, which notes the
    step that changed a flag the user did not give."""

    def __init__(self, values, explicit):
        super().__init__(**values)
        self.__dict__['explicit'] = frozenset(explicit)
        self.__dict__['notes'] = []

    def set(self, key, value, step):
        if getattr(self, key, None) != value:
            self.__dict__[key] = value
            self.notes.append((step, key, value))

    def apply(self, values, step):
        """Each of `values` for the flags not given on the command line."""
        for key, value in values.items():
            if key not in self.explicit and key in vars(self):
                self.set(key, value, step)

    def describe(self):
        """One line a step: 'STEP: --flag value, ...' for the flags it changed."""
        steps = {}
        for step, key, value in self.notes:
            steps.setdefault(step, {})[key] = value
        return [f"{step}: " + ', '.join(f'{flag_name(k)} {v}' for k, v in changes.items())
                for step, changes in steps.items()]

    def freeze(self, checkpoint_keys=(), resume=None, kinds=None):
        """Check the final values once and return them as a Config. `checkpoint_keys` came from
        --resume `resume`: an error about one of them names the checkpoint, and each must be of
        its flag's kind (`kinds`, from flag_kinds: type and choices), as argparse makes a flag."""
        values = {k: v for k, v in vars(self).items() if k not in ('explicit', 'notes')}
        if kinds:
            check_restored_kinds(values, checkpoint_keys, resume, kinds)
        check_values(values, self.explicit, checkpoint_keys, resume)
        return Config(values, self.explicit)


# ----------------------------------------------------------------------------- checks

def _is_whole(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _whole(low, high=None):
    """Test of an int flag: a whole number, low <= value (<= high)."""
    return lambda v: _is_whole(v) and low <= v and (high is None or v <= high)


def _finite(test):
    """Test of a float flag: a finite number and `test`."""
    return lambda v: _is_real(v) and math.isfinite(v) and test(v)


def _folder_name(v):
    return isinstance(v, str) and v not in ('', '.', '..') and '/' not in v and os.sep not in v and '\0' not in v


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

# One row a flag: (dest, test of its value, the allowed range in words). A flag left at None (not
# given, no default) is not checked.
FLAG_RANGES = [
    ('img_size', _whole(MIN_IMG_SIZE, MAX_IMG_SIZE),
     f'a whole number from {MIN_IMG_SIZE} to {MAX_IMG_SIZE} (the trunk has stride 16: {MIN_IMG_SIZE} px '
     f'give a 2x2 attention map)'),
    ('num_triplets', _whole(1, MAX_TRIPLETS), f'a whole number from 1 to {MAX_TRIPLETS}'),
    ('synth_images', _whole(MIN_SYNTH_IMAGES, 10_000_000),
     f'a whole number from {MIN_SYNTH_IMAGES} to 10000000 (valid and test get a quarter each, and need '
     f'{MIN_SYNTH_IMAGES // 4} images)'),
    ('workers', _whole(0, 256), 'a whole number from 0 to 256'),
    ('dim_embed', _whole(1, MAX_DIM_EMBED), f'a whole number from 1 to {MAX_DIM_EMBED}'),
    ('epochs', _whole(1, 100_000), 'a whole number from 1 to 100000'),
    ('start_epoch', _whole(1), 'a whole number >= 1'),
    ('batch_size', _whole(1, 65536), 'a whole number from 1 to 65536'),
    ('lr', _finite(lambda v: v > 0), 'a finite number > 0'),
    ('step_size', _whole(1), 'a whole number >= 1'),
    ('decay_rate', _finite(lambda v: 0 < v <= 1), 'a finite number in (0, 1]'),
    ('margin', _finite(lambda v: v > 0), 'a finite number > 0'),
    ('seed', _whole(0, 2**63 - 1), 'a whole number from 0 to 2**63-1'),
    ('log_interval', _whole(1), 'a whole number >= 1'),
    ('topk', _whole(1), 'a whole number >= 1'),
    ('name', _folder_name, "one folder name (not empty, '.' or '..', no '/')"),
    ('eval_batch_size', _whole(1, 65536), 'a whole number from 1 to 65536'),
    ('heatmap_every', _whole(0), 'a whole number >= 0 (0: never during training)'),
    ('visdom_port', _whole(0, 65535), 'a port number from 0 to 65535'),
    # ASEN++'s own
    ('threshold', _finite(lambda v: 0 < v < 1), "a finite number strictly between 0 and 1 (the authors' "
                                                "stage-2 configs use 0.1)"),
    ('beta', _finite(lambda v: 0 <= v <= 1), 'a finite number from 0 to 1 (the authors use 0.6)'),
    ('local_weight', _finite(lambda v: v >= 0), 'a finite number >= 0'),
    ('align_weight', _finite(lambda v: v >= 0), 'a finite number >= 0'),
    # CSN's own (with --csn-reg)
    ('csn_embed_weight', _finite(lambda v: v >= 0), 'a finite number >= 0'),
    ('csn_mask_weight', _finite(lambda v: v >= 0), 'a finite number >= 0'),
    ('lr_global', _finite(lambda v: v > 0), 'a finite number > 0'),
    ('local_size', _whole(1, MAX_IMG_SIZE), f'a whole number from 1 to {MAX_IMG_SIZE}'),
]
# Path flags that, when given, must not be empty (an unset shell variable would otherwise turn
# `--resume $CKPT` into a new training run).
PATH_FLAGS = ('data_path', 'resume', 'retrieve', 'attribute', 'gallery', 'backbone_weights', 'collect_out')
# Flags that only --retrieve reads.
RETRIEVE_FLAGS = ('attribute', 'gallery', 'topk')
# Flags that --collect reads; any other given with it would be ignored.
COLLECT_FLAGS = ('collect', 'collect_out', 'collect_by')
# Flags of one --model only.
MODEL_FLAGS = {'csn_fixed_masks': 'ConditionalSimNet', 'csn_reg': 'ConditionalSimNet'}


def check_flag_ranges(values, checkpoint_keys=(), resume=None):
    """One line for the first flag out of its range; a value from the checkpoint says so."""
    for dest, test, allowed in FLAG_RANGES:
        value = values.get(dest)
        if value is not None and not test(value):
            source = f' (from --resume {resume})' if dest in checkpoint_keys else ''
            raise UserError(f"{flag_name(dest)} {value!r}{source}: must be {allowed}")


def flag_kinds(parser):
    """{dest: (kind, choices, may be None)} of the parser's options, the kind one of 'bool', 'int',
    'float', 'str', 'list': what a value restored from a checkpoint must be, as argparse would make it."""
    kinds = {}
    for action in parser._actions:
        if action.dest == 'help':
            continue
        if action.nargs == 0:                            # store_true/false, BooleanOptionalAction
            kind = 'bool'
        elif action.nargs in ('+', '*'):
            kind = 'list'
        else:
            kind = {int: 'int', float: 'float'}.get(action.type, 'str')
        kinds[action.dest] = (kind, action.choices, action.default is None)
    return kinds


KIND_TESTS = {'bool': lambda v: isinstance(v, bool), 'int': _is_whole, 'float': _is_real,
              'str': lambda v: isinstance(v, str),
              'list': lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)}
KIND_WORDS = {'bool': 'true or false', 'int': 'a whole number', 'float': 'a number', 'str': 'a string',
              'list': 'a list of strings'}


def check_restored_kinds(values, checkpoint_keys, resume, kinds):
    """Each value taken from the checkpoint is of its flag's type and among its choices (a saved
    'amp': 'fp8' would otherwise run as bf16, an 'img_size': 'abc' fail deep inside)."""
    for dest in sorted(checkpoint_keys):
        if dest not in kinds:
            continue
        kind, choices, nullable = kinds[dest]
        value = values.get(dest)
        if value is None and nullable:
            continue
        if not KIND_TESTS[kind](value):
            raise UserError(f"{flag_name(dest)} {value!r} (from --resume {resume}): must be {KIND_WORDS[kind]}; "
                            f"the file's saved settings are damaged; give {flag_name(dest)} on the command line")
        if choices is not None and kind != 'list' and value not in list(choices):
            raise UserError(f"{flag_name(dest)} {value!r} (from --resume {resume}): must be one of "
                            f"{', '.join(map(str, choices))}; give {flag_name(dest)} on the command line")


def check_collect(values, explicit):
    """--collect prints a table and exits: the training flags given with it would be ignored."""
    ignored = sorted(explicit - set(COLLECT_FLAGS))
    if ignored:
        raise UserError(f"{flag_name(ignored[0])} does not apply with --collect (it only reads the runs' "
                        f"test_results.json); drop it")
    for dest in ('collect_out',):
        if values.get(dest) == '' and dest in explicit:
            raise UserError(f"{flag_name(dest)} is empty; give a path")


def check_values(values, explicit, checkpoint_keys=(), resume=None):
    """The final values: ranges, empty paths, and combinations that cannot work."""
    check_flag_ranges(values, checkpoint_keys, resume)
    for dest in PATH_FLAGS:
        if values.get(dest) == '' and dest in explicit:
            raise UserError(f"{flag_name(dest)} is empty; give a path or name (an unset shell variable?)")
    if values['start_epoch'] > values['epochs']:
        raise UserError(f"--start_epoch {values['start_epoch']}: must be from 1 to --epochs ({values['epochs']})")
    unused = [dest for dest in RETRIEVE_FLAGS if dest in explicit and not values['retrieve']]
    if unused:
        raise UserError(f"{flag_name(unused[0])} applies only with --retrieve IMAGE")
    for dest, model_name in MODEL_FLAGS.items():
        if values.get(dest) and values['model'] != model_name:
            raise UserError(f"{flag_name(dest)} applies only to --model {model_name}")
    for dest in ('csn_embed_weight', 'csn_mask_weight'):
        if dest in explicit and not values['csn_reg']:
            raise UserError(f"{flag_name(dest)} applies only with --csn-reg (--model ConditionalSimNet)")
    for flag in ('test', 'report', 'visualize', 'retrieve'):
        if values[flag] and not values['resume']:
            raise UserError(f"--{flag} needs --resume CHECKPOINT (e.g. runs/<name>/model_best.pth.tar)")
    if values['retrieve'] and not values['attribute']:
        raise UserError("--retrieve needs --attribute NAME (one of the dataset's ATTRIBUTES)")
    for dest in ('visualize', 'retrieve', 'cache_images'):
        if values[dest] and values['dataset'] in TRIPLET_DATASETS:
            raise UserError(f"{flag_name(dest)} is not available for {values['dataset']} (it has triplet "
                            f"lists, not the authors' split files)")
    if runtime.distributed() and (values['visualize'] or values['retrieve']):
        raise UserError("--visualize and --retrieve run in one process; start them without torchrun")


# ----------------------------------------------------------------------------- steps on a Draft

def is_training(args):
    return not (args.test or args.report or args.visualize or args.retrieve)


def restore_from_checkpoint(draft, checkpoint, step):
    """The checkpoint's settings for every flag the user did not give; returns the keys taken."""
    saved = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        return set()
    keep = draft.explicit | INVOCATION_FLAGS
    taken = {key: value for key, value in saved.items() if key not in keep and key in vars(draft)}
    for key, value in taken.items():
        draft.set(key, value, step)
    return set(taken)


def adopt_original_settings(draft, info, step):
    """What the authors' checkpoint's keys tell (model, backbone, ...) for the flags not given."""
    draft.apply({key: info[key] for key in ('model', 'backbone', 'dim_embed', 'local_backbone', 'stage')
                 if info.get(key) is not None}, step)


def derive(draft, checkpoint, starts_stage2):
    """Values that follow from the others: --visdom's heatmaps, the first epoch of a resumed run."""
    if draft.visdom:
        # the original's --visdom plotted curves and, every epoch, the attention of a few valid
        # images; TensorBoard gets both here
        draft.apply({'heatmap_every': 1}, '--visdom')
    if checkpoint is not None and is_training(draft) and not starts_stage2:
        draft.apply({'start_epoch': int(checkpoint.get('epoch') or 0) + 1}, 'the epoch after --resume\'s')
        if draft.start_epoch > draft.epochs:
            raise UserError(f"--resume {draft.resume} already finished epoch {draft.start_epoch - 1} and "
                            f"--epochs is {draft.epochs}: nothing to train; pass a larger --epochs, or --test "
                            f"to evaluate it")


# File names of the project's own snapshots: a copy of one outside runs/ says nothing of its model by
# its name alone, so the folder that holds it names its results too.
SNAPSHOT_STEMS = ('checkpoint', 'model_best', 'step', 'interrupted')
CHECKPOINT_SUFFIXES = ('.pth.tar', '.pth', '.pt', '.tar', '.ckpt')


def checkpoint_run_name(path):
    """The run folder name of a checkpoint file outside runs/: its file name less the extension
    (their_asen.pth.tar -> their_asen); for a file named as our snapshots are, its folder's name
    first (downloads/fashionai/model_best.pth.tar -> fashionai-model_best)."""
    base = os.path.basename(os.path.normpath(path))
    stem = next((base[:-len(s)] for s in CHECKPOINT_SUFFIXES if base.endswith(s) and len(base) > len(s)), base)
    if stem in SNAPSHOT_STEMS:
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        stem = f'{folder}-{stem}' if folder not in ('', '.', '..') else stem
    return stem


def name_after_checkpoint(draft, step):
    """--test, --visualize or --retrieve of a file outside runs/ with no --name: its results go to
    runs/<checkpoint_run_name>/, so that each tested file keeps its own (the name the file was saved
    under would put two files of one run, or every authors' file, in one folder). A file in a run
    folder (runs/<name>/, this one's or another working directory's) keeps its run's name; a training
    run keeps the name it resumes."""
    if 'name' in draft.explicit or is_training(draft) or not draft.resume or draft.resume == AUTO_RESUME:
        return
    if in_a_run_folder(draft.resume):
        return
    draft.set('name', checkpoint_run_name(draft.resume), step)


def in_a_run_folder(path):
    """Whether file `path` lies in runs/<name>/ (of any working directory)."""
    run_folder = os.path.dirname(os.path.abspath(path))
    return os.path.basename(os.path.dirname(run_folder)) == 'runs'


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


# What tells runs apart most plainly: named first when several settings differ.
IDENTITY_FIRST = ('dataset', 'model', 'stage', 'backbone')


def first_difference(settings, saved):
    """(flag, saved value, this value) of the first setting that shapes the weights (not in
    CONTINUATION_MAY_CHANGE) where `settings` (a Config or Draft) differs from the `saved` flags of a
    run (a snapshot's 'args', args.json), or None when they describe the same run."""
    def order(key):
        return (key not in IDENTITY_FIRST, IDENTITY_FIRST.index(key) if key in IDENTITY_FIRST else 0, key)
    for key in sorted((k for k in saved if isinstance(k, str)), key=order):
        if key in CONTINUATION_MAY_CHANGE or key not in vars(settings):
            continue
        if getattr(settings, key) != saved[key]:
            return key, saved[key], getattr(settings, key)
    return None


def check_auto_resume(draft):
    """--resume auto continues the run of runs/<name>/: a training run, and not with --overwrite,
    which would move that run aside."""
    if not is_training(draft):
        raise UserError("--resume auto continues a training run; give a checkpoint file to --test, "
                        "--visualize or --retrieve")
    if draft.overwrite:
        raise UserError("--overwrite with --resume auto: --resume auto continues the run in runs/<name>/, "
                        "--overwrite would move it aside and start anew; drop one of them")


def from_flags(argv):
    """The configuration that a command line resolves to, for code that assembles a run without
    asen.main (pretrain.py, the benchmarks, the tests). The flags live in asen.py, the entry point;
    it is imported here, when called, to keep the modules free of a cycle."""
    import asen
    return asen.resolve_configuration(list(argv)).args
