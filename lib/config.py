"""The configuration of a run: resolved once, in a visible order, then only read.

`resolve_configuration` applies, in this order, each step changing only flags the user did not
give: the command line (asen.py's flags and their rules: lib/flags.py); the dataset's preset
(SynthFashion's CPU preset); ASEN++'s stage defaults; the --resume checkpoint's settings; values
derived from them (ASEN++'s stage, the first epoch). Every change a step makes is noted
(`Draft.set`) and logged once by the run. `Draft.freeze` then checks the final values once and
returns a read-only `Config`.
"""
import os
import types
from typing import NamedTuple

from lib import asenpp, checkpoints, flags, runfolder, runtime
from lib.flags import flag_name, get_args_parser
from utils import UserError

# Datasets of (anchor, far, close) triplet lists, scored by triplet accuracy rather than mAP.
TRIPLET_DATASETS = ('Zappos50k',)
# The torch.compile modes of --compile-mode (flags.COMPILE_MODES) that replay CUDA graphs: they need static shapes.
CUDA_GRAPH_MODES = ('reduce-overhead', 'max-autotune')
# `--resume auto`: the run folder's newest complete snapshot, or a new run when it holds none.
AUTO_RESUME = 'auto'


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

    def freeze(self, checkpoint_keys=(), resume=None):
        """Check the final values once and return them as a Config. `checkpoint_keys` came from
        --resume `resume`: each must be of its flag's kind and range (its rules in lib/flags.py,
        as argparse makes a flag), and an error about one of them names the checkpoint."""
        values = {k: v for k, v in vars(self).items() if k not in ('explicit', 'notes')}
        flags.check_restored_kinds(values, checkpoint_keys, resume)
        check_values(values, self.explicit, checkpoint_keys, resume)
        return Config(values, self.explicit)


# ----------------------------------------------------------------------------- checks

# Flags that only --retrieve reads.
RETRIEVE_FLAGS = ('attribute', 'gallery', 'topk')
# Flags that --collect reads; any other given with it would be ignored.
COLLECT_FLAGS = ('collect', 'collect_out', 'collect_by')
# Flags of one --model only.
MODEL_FLAGS = {'csn_fixed_masks': 'ConditionalSimNet', 'csn_reg': 'ConditionalSimNet'}


def check_collect(explicit):
    """--collect prints a table and exits: the training flags given with it would be ignored."""
    ignored = sorted(explicit - set(COLLECT_FLAGS))
    if ignored:
        raise UserError(f"{flag_name(ignored[0])} does not apply with --collect (it only reads the runs' "
                        f"test_results.json); drop it")


def check_values(values, explicit, checkpoint_keys=(), resume=None):
    """The final values: each within its flag's range, and no combination that cannot work."""
    flags.check_ranges(values, checkpoint_keys, resume)
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
    keep = draft.explicit | flags.INVOCATION_FLAGS
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


def check_auto_resume(draft):
    """--resume auto continues the run of runs/<name>/: a training run, and not with --overwrite,
    which would move that run aside."""
    if not is_training(draft):
        raise UserError("--resume auto continues a training run; give a checkpoint file to --test, "
                        "--visualize or --retrieve")
    if draft.overwrite:
        raise UserError("--overwrite with --resume auto: --resume auto continues the run in runs/<name>/, "
                        "--overwrite would move it aside and start anew; drop one of them")


# ----------------------------------------------------------------------------- the resolution

class Resolved(NamedTuple):
    args: Config               # every flag's final value, read-only
    checkpoint: dict           # the loaded --resume file, or None
    starts_stage2: bool        # ASEN++ stage 2 starting from the weights of a stage-1 checkpoint
    notes: list                # one line per resolution step that changed flags not given
    original: dict = None      # what an authors' checkpoint's keys told of its network, else None
    finished: str = None       # --resume auto of a finished run: the line to say, and nothing to do


def resolve_configuration(argv=None):
    """The configuration, resolved once in this order, each step changing only flags the user did
    not give: the command line -> the dataset's preset -> ASEN++'s stage defaults -> the --resume
    checkpoint's settings -> derived values (ASEN++'s stage, the first epoch); then checked once."""
    draft = Draft(vars(get_args_parser().parse_args(argv)), flags.given_flags(argv))
    if draft.collect:
        check_collect(draft.explicit)
        return Resolved(draft.freeze(), None, False, [])
    preset = flags.dataset_preset(draft.dataset, draft.no_cuda)
    draft.apply(preset, f'--dataset {draft.dataset} preset')
    if draft.model == 'ASENpp':
        draft.apply(asenpp.stage_defaults(draft.stage or 1, preset), f'ASEN++ stage {draft.stage or 1} defaults')
    checkpoint, from_checkpoint, original = None, set(), None
    if draft.resume == AUTO_RESUME:
        checkpoint, finished = continuation(draft)
        if finished:                                    # a requeue of a finished run: nothing to do
            return Resolved(draft.freeze(), None, False, [], finished=finished)
    elif draft.resume:
        checkpoint = checkpoints.load(draft.resume)
    if checkpoint is not None:
        checkpoints.validate(checkpoint, draft.resume)          # every field read below, before use
        from_checkpoint = restore_from_checkpoint(draft, checkpoint, f'--resume {draft.resume}')
        original = checkpoints.adopt_original(checkpoint, draft.resume)
        if original is not None:
            adopt_original_settings(draft, original, f"--resume {draft.resume} (the authors' layout)")
        name_after_checkpoint(draft, f'--resume {draft.resume} (a file outside runs/)')
    starts_stage2 = asenpp.prepare(draft, checkpoint, original, is_training(draft))
    derive(draft, checkpoint, starts_stage2)
    return Resolved(draft.freeze(from_checkpoint, draft.resume), checkpoint, starts_stage2, draft.describe(),
                    original)


def continuation(draft):
    """--resume auto (the rule of lib/runfolder.py): (the newest complete snapshot of runs/<name>/,
    loaded and now --resume; None) to continue it, (None, None) with no --resume when the folder holds
    none (the run starts), or (the snapshot, the line to say) when the run already finished."""
    check_auto_resume(draft)
    run_dir = os.path.join('runs', draft.name)
    found = checkpoints.newest_snapshot(run_dir)
    if found is None:
        draft.set('resume', None, '--resume auto (no snapshot yet: a new run)')
        return None, None
    path, checkpoint = found
    runfolder.check_same_run(draft, checkpoint.get('args'), path, run_dir, prefix='--resume auto: ')
    draft.set('resume', path, '--resume auto')
    epoch, steps = checkpoints.progress(checkpoint)
    if steps == 0 and epoch >= draft.epochs:
        return checkpoint, runfolder.finished_line(run_dir, path, epoch, draft.epochs)
    return checkpoint, None


def from_flags(argv):
    """The configuration that a command line resolves to, for code that assembles a run without
    asen.main (pretrain.py, the benchmarks, the tests)."""
    return resolve_configuration(list(argv)).args
