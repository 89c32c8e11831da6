"""The run folder runs/<name>/ and the one rule for what is saved in it.

THE RULE. A run folder holds one run, identified by the settings that shape its weights (the flags
tagged RUN in lib/flags.py; the others may change: --epochs may grow, and --workers, --data_path,
--checkpoint-every, ... describe one invocation). The same command line may always:

  start it      when the folder holds no snapshot yet, even if an earlier attempt left args.json
                (of the same run) and train.log: nothing is lost, the run starts from its beginning;
  continue it   (--resume auto) from its newest complete snapshot, step or epoch, bit-identically;
  return        at once, exit 0 and one line, when the run has already finished its --epochs
                (`finished`); nothing in the folder is touched.

A command of another run's settings is refused with one line naming the first setting that differs
(`check_same_run`): for --resume auto against the snapshot it found, and for any training command
against the folder's args.json and, for an explicit --resume of a snapshot of this folder, against
that snapshot's saved settings (so --resume FILE --dataset OTHER cannot mix two datasets in one
metrics.jsonl). An explicit --resume of a file of another folder starts a new run from its weights
in this one. --overwrite (move the earlier run aside, start anew) contradicts --resume auto
(continue it): the two together are refused.

The invariant it serves (docs/reliability.md): a command changes a run folder's snapshots,
metrics.jsonl, args.json or test_results.json only by adding what it produced, or by replacing
them with a complete newer version of the same run. Every command that writes there goes through
`prepare` first:

  training   the folder is locked; the rule above; a new run refuses a folder holding an earlier
             run's snapshots or records unless --overwrite, which moves them aside
             (`set_aside_previous_run`, never a delete); a --resume of a snapshot older than the
             folder's newest epoch is refused; temporary files a killed save left behind are removed
  --test     test_results.json is replaced only by a test of the same checkpoint or of a snapshot
             of this folder (--overwrite moves the earlier file aside)
  --visualize, --retrieve   add images of their own; they only need a writable folder

Each refusal is one line naming the folder, the file and the way out.
"""

import contextlib
import json
import os
import tempfile
import time

import utils
from lib import flags, runtime
from utils import UserError

# The files of a run folder that a new training run would replace.
# The step snapshot: written every --checkpoint-every and on a stop signal, removed once the epoch's
# checkpoint.pth.tar is written (checkpoints.step_snapshot).
STEP_SNAPSHOT = 'step.pth.tar'
SNAPSHOTS = ('checkpoint.pth.tar', 'model_best.pth.tar', 'interrupted.pth.tar', STEP_SNAPSHOT)
# Files that record an earlier training run even when it stopped before its first snapshot.
RUN_RECORDS = ('metrics.jsonl', 'args.json', 'test_results.json')
# What --overwrite moves aside besides those: the earlier run's curves and pictures. train.log
# stays: this run's logger already appends to it (a log only grows).
RUN_EXTRAS_PREFIXES = ('events.out.tfevents',)
RUN_EXTRA_FOLDERS = ('heatmaps', 'retrieval', 'retrieval_cache')
# Prefixes of the temporary files a save writes beside its target (utils.atomic_file, the
# model_best hard link) that a killed process leaves behind.
TEMPORARY_MARKS = ('.tmp-',)
TEMPORARY_SUFFIXES = ('.pth.tar.tmp',)


# ----------------------------------------------------------------------------- one entry point

@contextlib.contextmanager
def prepare(run_dir, args, training, device, checkpoint=None):
    """The run folder checked for the command that will write in it, locked while training.
    `checkpoint`: the loaded --resume file, if any."""
    make_run_dir(run_dir)
    with contextlib.ExitStack() as stack:
        if training:
            lock_for_every_rank(stack, run_dir, device)
            check_not_overwriting(run_dir, args)
            check_recorded_run(run_dir, args, checkpoint)
            check_not_going_back(run_dir, args)
        elif args.test:
            check_test_results(run_dir, args)
        check_writable(run_dir)
        if training and runtime.is_main_process():
            remove_stale_temporaries(run_dir)          # we hold the lock: no save is under way
        yield


def lock_for_every_rank(stack, run_dir, device):
    """Rank 0 (the one that writes) locks the run folder for the body of `stack`. Under torchrun
    every rank learns whether it could: a folder locked by another process stops them all at once,
    where the other ranks would otherwise wait for rank 0 at their first barrier."""
    failure = None
    if runtime.is_main_process():
        try:
            stack.enter_context(run_lock(run_dir))
        except UserError as err:
            failure = err
    if runtime.any_rank(failure is not None, device):
        raise failure or UserError(f"rank 0 could not lock the run folder {run_dir} (its error says why); "
                                   f"every rank stops")


# ----------------------------------------------------------------------------- the folder itself

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


def remove_stale_temporaries(run_dir):
    """Temporary files of a save that was killed (SIGKILL, power loss) before its rename: they are
    never a complete file, and one beside a snapshot is as large as it."""
    for name in os.listdir(run_dir):
        if name.startswith(TEMPORARY_MARKS) or name.endswith(TEMPORARY_SUFFIXES):
            path = os.path.join(run_dir, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.remove(path)


# ----------------------------------------------------------------------------- the rule

def check_same_run(settings, saved, source, run_dir, what='a snapshot', prefix=''):
    """`settings` (a Config, or a Draft while resolving) must describe the run whose saved settings
    `saved` (a dict of flags) `source` holds: one line names the first setting that shapes the
    weights and differs (flags.first_difference)."""
    if not isinstance(saved, dict):
        raise UserError(f"{prefix}{source} holds no settings ('args'); it is not {what} of this run; move it "
                        f"away or choose another --name")
    difference = flags.first_difference(settings, saved)
    if difference is not None:
        key, theirs, ours = difference
        raise UserError(f"{prefix}{source} is {what} of another run: its {flags.flag_name(key)} is {theirs!r}, "
                        f"this command's is {ours!r}; {run_dir} holds one run: give the same settings, or "
                        f"choose another --name")


def check_recorded_run(run_dir, args, checkpoint=None):
    """A training command in a folder that records a run (args.json; the --resume snapshot when it
    is one of this folder's) must be that run. --overwrite starts another one: not checked."""
    if args.overwrite:
        return
    path = os.path.join(run_dir, 'args.json')
    if os.path.exists(path):
        try:
            with open(path, encoding='utf-8') as handle:
                saved = json.load(handle)
        except (OSError, ValueError) as err:
            raise UserError(f"{path} cannot be read ({type(err).__name__}), so this folder's run is unknown; "
                            f"pass --overwrite to move it aside, or choose another --name") from err
        check_same_run(args, saved, path, run_dir, what='the record')
    if checkpoint is not None and resumes_in(run_dir, args.resume) and isinstance(checkpoint.get('args'), dict):
        check_same_run(args, checkpoint['args'], f'--resume {args.resume}', run_dir)


def finished_line(run_dir, path, epoch, epochs):
    """What a requeue of a finished run says (exit status 0, nothing changed)."""
    return (f"{run_dir} already finished: {os.path.basename(path)} is at epoch {epoch} of --epochs {epochs}; "
            f"nothing to do (a larger --epochs continues it)")


# ----------------------------------------------------------------------------- training

def resumes_in(run_dir, checkpoint_path):
    return bool(checkpoint_path) and \
        os.path.realpath(os.path.dirname(os.path.abspath(checkpoint_path))) == os.path.realpath(run_dir)


def earlier_run_files(run_dir):
    """The files in `run_dir` that an earlier training run left: snapshots first."""
    return [name for name in SNAPSHOTS + RUN_RECORDS if os.path.exists(os.path.join(run_dir, name))]


def check_not_overwriting(run_dir, args):
    """A new run (not --resume of a snapshot in this folder) may not replace an earlier run's
    snapshots or records (metrics.jsonl, test_results.json) unless --overwrite says so; --overwrite
    moves them aside, see set_aside_previous_run. A folder holding only args.json is an attempt
    stopped before its first snapshot: the same run starts again there (nothing is lost)."""
    held = earlier_run_files(run_dir)
    if not held or args.overwrite or resumes_in(run_dir, args.resume):
        return
    if held == ['args.json']:            # an attempt stopped before its first snapshot: start the run
        return                           # again, if it is this one (check_recorded_run)
    snapshot = next((name for name in held if name in SNAPSHOTS), None)
    way_on = f"continue it with --resume {os.path.join(run_dir, snapshot)}, " if snapshot else ''
    raise UserError(f"{run_dir} already holds {', '.join(held)} of an earlier run; {way_on}pass --overwrite "
                    f"to move it aside to {run_dir}.replaced-<time>, or choose another --name")


def cut_torn_metrics_line(run_dir):
    """metrics.jsonl ending in a torn line (a process killed, or a disk full, mid-append): the
    fragment is cut off before this run appends its first record, which would otherwise be glued
    onto it. Returns the fragment's size in bytes (0: nothing to cut)."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    try:
        with open(path, 'rb+') as handle:
            data = handle.read()
            if not data or data.endswith(b'\n'):
                return 0
            keep = data.rfind(b'\n') + 1                # 0 when the whole file is one torn line
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
            return len(data) - keep
    except FileNotFoundError:
        return 0
    except OSError as err:
        raise UserError(f"cannot repair {path} (it ends in a torn line): {err.strerror or err}; "
                        f"remove its last, incomplete line yourself") from err


def newest_epoch(run_dir):
    """The last epoch the run in `run_dir` finished, from metrics.jsonl (0 when none is recorded)."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    epochs = [0]
    try:
        with open(path, encoding='utf-8', errors='replace') as handle:
            for line in handle:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    epoch = json.loads(line).get('epoch')
                    if isinstance(epoch, int) and not isinstance(epoch, bool):
                        epochs.append(epoch)
    except OSError:
        return 0
    return max(epochs)


def check_not_going_back(run_dir, args):
    """--resume of an older snapshot of this folder (model_best of epoch 2 when checkpoint is at 3)
    would replace the newer checkpoint and record epoch 3 twice in metrics.jsonl: refused."""
    if not resumes_in(run_dir, args.resume) or args.overwrite:
        return
    newest = newest_epoch(run_dir)
    if args.start_epoch <= newest:
        raise UserError(f"--resume {args.resume} continues after epoch {args.start_epoch - 1}, but {run_dir} "
                        f"already recorded epoch {newest} (metrics.jsonl); resuming it here would replace "
                        f"the newer checkpoint.pth.tar; resume {os.path.join(run_dir, 'checkpoint.pth.tar')}, "
                        f"or branch off with --name NEW")


def set_aside_previous_run(run_dir):
    """--overwrite: move the earlier run's files to runs/<name>.replaced-<time>/ (nothing deleted),
    so that none is mistaken for this run's. Returns the folder they went to, or None."""
    names = [name for name in os.listdir(run_dir) if name in SNAPSHOTS + RUN_RECORDS or
             name.startswith(RUN_EXTRAS_PREFIXES) or name in RUN_EXTRA_FOLDERS]
    if not names:
        return None
    aside = aside_name(run_dir)
    try:
        os.makedirs(aside)
        for name in names:                         # a rename in the same file system: no copy, no loss
            os.rename(os.path.join(run_dir, name), os.path.join(aside, name))
    except OSError as err:
        raise UserError(f"--overwrite: cannot move the earlier run of {run_dir} to {aside}: "
                        f"{err.strerror or err}; the files not yet moved are still in {run_dir}") from err
    return aside


def aside_name(path):
    """path.replaced-<YYYYmmdd-HHMMSS>, with -2, -3, ... when taken."""
    base = f"{path.rstrip(os.sep)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f'{base}-{n}'
    return candidate


# ----------------------------------------------------------------------------- --test

def check_test_results(run_dir, args):
    """--test replaces runs/<name>/test_results.json only with a result of the same run: a snapshot
    of this folder, or the checkpoint the earlier result names. --overwrite moves the other aside."""
    path = os.path.join(run_dir, 'test_results.json')
    if not os.path.exists(path) or resumes_in(run_dir, args.resume):
        return
    earlier = tested_checkpoint(path)
    if earlier is not None and os.path.realpath(earlier) == os.path.realpath(args.resume):
        return
    if args.overwrite:
        return
    of = f"of {earlier}" if earlier else "of another model"
    raise UserError(f"{path} holds the test results {of}, not of --resume {args.resume}; choose another "
                    f"--name for this test, or pass --overwrite to move the earlier file aside")


def tested_checkpoint(path):
    """The 'checkpoint' a test_results.json names, or None when it cannot be read."""
    try:
        with open(path, encoding='utf-8') as handle:
            checkpoint = json.load(handle).get('checkpoint')
    except (OSError, ValueError, AttributeError):
        return None
    return checkpoint if isinstance(checkpoint, str) and checkpoint else None


def write_test_results(result, run_dir, overwrite=False):
    """test_results.json, the earlier one (of another checkpoint, allowed by --overwrite) moved
    aside first to test_results.replaced-<time>.json."""
    path = os.path.join(run_dir, 'test_results.json')
    if overwrite and os.path.exists(path) and tested_checkpoint(path) != result.get('checkpoint'):
        aside = aside_name(path)
        try:
            os.rename(path, aside)
        except OSError as err:
            raise UserError(f"--overwrite: cannot move {path} aside: {err.strerror or err}; it is kept") from err
    utils.write_json(result, path)
    return path


# ----------------------------------------------------------------------------- files outside a run

def check_new_output(path, flag, replaceable=None):
    """An output file named by `flag` (--collect-out, --out) is new, or one that `replaceable(path)`
    says holds an earlier output of the same kind; never a folder."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; give the file to write")
    if os.path.lexists(path) and not (replaceable and replaceable(path)):
        raise UserError(f"{flag} {path}: already exists and is not an earlier output of {flag}; choose "
                        f"another file (it is kept)")
