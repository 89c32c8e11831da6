"""Plumbing shared by the entry points: device meters, seeding, atomic files and checkpoint loading,
logging, and the one-line boundary of a command (CommandBoundary). The retrieval metric is
lib/evaluation.py's."""

if __name__ == '__main__':                       # run as a script: say what to run instead
    print('error: utils.py is a module, not a command; run python asen.py (see python asen.py --help)', file=__import__('sys').stderr)
    raise SystemExit(2)
import argparse
import contextlib
import errno
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch


class UserError(Exception):
    """A mistake in the user's input (flag, file, data): reported as one line, no traceback."""


# ----------------------------------------------------------------------------- meters

class DeviceMeter:
    """Last value and weighted running average of a 0-dim tensor, kept on its device: `update`
    queues two small device ops and never waits for the device; `read` waits once. The sums are
    float64, as the Python floats of a per-step `.item()` loop."""

    def __init__(self, device):
        self.last = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0

    def update(self, value, n=1):
        self.last = value.detach().double()
        self.sum = self.sum + self.last * n
        self.count += n

    def read(self):
        """(last value, average) as Python floats: one host sync."""
        last, total = torch.stack([self.last, self.sum]).tolist()
        return last, total / max(self.count, 1)


# ----------------------------------------------------------------------------- seeding

def seed_everything(seed):
    """Seed Python `random`, numpy and torch (the original code forgot `random`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """All global RNG states, as types that `torch.load(weights_only=True)` accepts."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        'python': [version, list(internal), gauss],
        'numpy': [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `rng_state` returned."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state['numpy']
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------- checkpoints

def is_disk_full(err):
    """A full disk or quota, however it arrives: an OSError, or torch.save's RuntimeError ('file
    write failed', or on a real full disk '... unexpected pos N vs M' chained on the ENOSPC)."""
    seen = set()
    while err is not None and id(err) not in seen:       # the error and what it was raised from
        seen.add(id(err))
        text = str(err)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, RuntimeError) and ('No space left' in text or 'write failed' in text or
                                              'PytorchStreamWriter failed' in text or 'unexpected pos' in text):
            return True
        err = err.__cause__ or err.__context__
    return False


def _new_file_mode():
    """The mode open() gives a new file under this process's umask (mkstemp makes them 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


NEW_FILE_MODE = _new_file_mode()    # read once, at import: os.umask cannot be read without setting it


@contextlib.contextmanager
def atomic_file(path, what):
    """A binary file object for a temporary beside `path`, fsynced and renamed onto `path` at the end;
    on any failure the temporary is removed, `path` is untouched, and a full disk or a refused write
    is one UserError naming `what` and `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='-' + os.path.basename(path))
        with os.fdopen(fd, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, NEW_FILE_MODE)
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not is_disk_full(err):
            raise
        raise UserError(f"cannot write {what} {path}: {describe_write_error(err)}; the previous file is "
                        f"kept") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def describe_write_error(err):
    if is_disk_full(err):
        return 'No space left on device; free disk space or choose another --name'
    return f"{getattr(err, 'strerror', None) or err}; check the folder's permissions or choose another --name"


def save_atomic(obj, path, what='checkpoint'):
    """torch.save to a temporary file beside `path`, then rename: a kill never leaves half a file."""
    with atomic_file(path, what) as f:
        torch.save(obj, f)


def copy_atomic(source, path):
    """Copy `source` onto `path` as `save_atomic` writes (model_best.pth.tar from the checkpoint)."""
    with atomic_file(path, 'checkpoint') as f, open(source, 'rb') as src:
        shutil.copyfileobj(src, f, 1 << 20)


def append_line(path, line):
    """Append `line` and a newline; on failure the file is cut back to its old length."""
    try:
        with open(path, 'ab', buffering=0) as f:
            size = f.seek(0, os.SEEK_END)
            data = memoryview(line.encode('utf-8') + b'\n')
            try:
                while data:
                    data = data[f.write(data):]
            except OSError:
                f.truncate(size)
                raise
    except OSError as err:
        raise UserError(f"cannot append to {path}: {describe_write_error(err)}") from err


def load_checkpoint(path, flag='--resume', expected='runs/<name>/checkpoint.pth.tar or model_best.pth.tar'):
    """Load a checkpoint safely (weights_only=True: no code runs), with one-line errors naming `flag`
    (and, for a missing file, what `expected` it to be)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; pass a checkpoint file ({expected})")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; check the path ({expected})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        raise UserError(f"{flag} {path}: cannot be loaded as a checkpoint ({type(err).__name__}); it is "
                        f"corrupt, truncated, or holds objects other than weights, which are refused "
                        f"so that a downloaded file cannot run code") from err


def state_dict_mismatch(expected, given, limit=4):
    """One line naming how the state dict `given` differs from `expected` (a module's state dict):
    missing keys, unexpected keys, shape differences; '' when they fit."""
    def names(keys):
        keys = sorted(keys)
        more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
        return ', '.join(keys[:limit]) + more
    missing, unexpected = set(expected) - set(given), set(given) - set(expected)
    shapes = [f"{k} {tuple(given[k].shape)} in the file vs {tuple(expected[k].shape)} here"
              for k in sorted(set(expected) & set(given))
              if hasattr(given[k], 'shape') and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f'missing keys: {names(missing)}')
    if unexpected:
        parts.append(f'unexpected keys: {names(unexpected)}')
    if shapes:
        parts.append('shapes differ: ' + '; '.join(shapes[:limit]) + (f' (+{len(shapes) - limit} more)' if len(shapes) > limit else ''))
    return '; '.join(parts)


def write_json(obj, path):
    """Write JSON atomically (a UserError naming `path` when it cannot be written)."""
    with atomic_file(path, 'file') as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode('utf-8'))


# ----------------------------------------------------------------------------- logging

class StrictFileHandler(logging.FileHandler):
    """A log file whose write errors (a full disk) reach the caller, which reports them in one line,
    instead of logging's 'Logging error' traceback on stderr for every record."""

    def handleError(self, record):
        raise                                       # the exception being handled in emit()


class ConsoleHandler(logging.StreamHandler):
    """The console's log handler. A console that went away (stdout piped into `head`, which exits)
    does not stop the run, nor print logging's 'Logging error' traceback for every record: stdout
    is pointed at /dev/null, one line says where the log goes on, and the log file keeps every
    record."""

    def __init__(self, stream, log_file=None):
        super().__init__(stream)
        self.log_file = log_file

    def handleError(self, record):
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            silence_stdout()
            where = f'; the log goes on in {self.log_file}' if self.log_file else ''
            print(f'note: standard output was closed (a pipe into head?){where}', file=sys.stderr)
            return
        super().handleError(record)


def silence_stdout():
    """Point stdout (the file descriptor) at /dev/null: what is still buffered, and every later
    write, goes nowhere instead of raising BrokenPipeError again (also at the interpreter's exit)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def setup_logger(log_file=None):
    """Console logger in the original's format, also writing to `log_file` when given."""
    logger = logging.getLogger('asen')
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter('%(asctime)s - %(name)s - %(levelname)s - %(message)s')
    handlers = [ConsoleHandler(sys.stdout, log_file)]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(StrictFileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


# ----------------------------------------------------------------------------- command lines

class HelpFormatter(argparse.HelpFormatter):
    """argparse help that states each option's default once: ' (default: X)' is appended only where
    the help does not already speak of its default and there is a value worth printing. Switches
    (store_true/store_false) say in their help what they change, since a bare '(default: True)'
    under a `--no-x` switch would read as if the switch were on; None and SUPPRESS print nothing;
    a --flag/--no-flag pair prints on or off."""

    def _get_help_string(self, action):
        text = action.help or ''
        if isinstance(action, argparse.BooleanOptionalAction):
            # Python 3.9 and 3.10 append their own '(default: %(default)s)' here: say on/off instead
            text = text.replace(' (default: %(default)s)', '')
        if not action.option_strings or 'default' in text.lower():
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return text + ' (default: %(default)s)'


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flag is one `error:` line on stderr (exit 2) rather than the usage block,
    and which refuses a value holding bytes that are not UTF-8 (run folders, logs, args.json and
    the result files are UTF-8 text: such a --name would fail in the middle of writing them)."""

    def __init__(self, *args, command, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = command

    def parse_known_args(self, args=None, namespace=None):
        words = sys.argv[1:] if args is None else list(args)
        for index, word in enumerate(words):
            if isinstance(word, str) and not is_utf8(word):
                flag = words[index - 1] + ' ' if index and words[index - 1].startswith('-') else ''
                shown = str(os.fsencode(word))[2:-1]
                self.error(f"{flag}'{shown}' holds a byte that is not UTF-8; run folders, logs and "
                           f"args.json are UTF-8 text: give it in UTF-8 (e.g. rename the file or choose "
                           f"another --name)")
        return super().parse_known_args(args, namespace)

    def error(self, message):
        self.exit(2, f'error: {message} (see python {self.command} --help)\n')


def is_utf8(text):
    """False for a str holding lone surrogates: bytes that were not UTF-8 in a command line or a
    file name (Python decodes those with surrogateescape)."""
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


def check_range(name, value, allowed, ok):
    """A one-line error naming flag `name` unless `ok` (the value's test) holds; `allowed` says what is."""
    if not ok:
        raise UserError(f"{name} {value!r}: must be {allowed}")


def environment_error(err):
    """One line for a failure of the machine rather than of the code (disk full, no permission,
    a file in the way), else None."""
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ''
        hint = {errno.ENOSPC: 'free disk space', errno.EDQUOT: 'free disk space',
                errno.EACCES: 'check the permissions', errno.EPERM: 'check the permissions',
                errno.EROFS: 'use a writable folder'}.get(err.errno, 'check the path')
        return f"{err.strerror or err}{where}; {hint}; files already saved are kept"
    if is_disk_full(err):
        return f"no space left on device ({' '.join(str(err).split())[:200]}); free disk space; files " \
               f"already saved are kept"
    if isinstance(err, MemoryError):
        return ("out of memory (in this process or a data loading worker); lower --batch-size, "
                "--eval-batch-size or --workers; files already saved are kept")
    if isinstance(err, RuntimeError) and str(err).startswith('DataLoader worker'):
        # torch's words for a worker that died (killed by the kernel's OOM killer, or by hand)
        return (f"{' '.join(str(err).split())[:160].rstrip('. ')}: a data loading worker died, most often "
                f"killed when memory ran out; lower --workers or --batch-size, or pass --workers 0; files "
                f"already saved are kept")
    return None


_COMMAND_END = []          # what every command does when it ends, however (at_command_end)


def at_command_end(cleanup):
    """Run `cleanup()` whenever a command's CommandBoundary is left, failed or not (gpuinput ends the data
    loading workers a failed pass left: they must not outlive the command)."""
    if cleanup not in _COMMAND_END:
        _COMMAND_END.append(cleanup)


class CommandBoundary:
    """The one-line boundary of a command, as a `with` block that records its exit status: leaving
    it, `status` is 0; 2 for a UserError (or the error's own `exit_code`: 75 for a stop signal's
    runtime.Stopped); 130 for Ctrl-C; 1 for a failure of the machine (environment_error). Each
    failure is one `error:` line on stderr, and the block swallows it; any other exception (a bug)
    passes with its traceback. However the block ends, the at_command_end cleanups run, after
    the line."""

    def __init__(self):
        self.status = None

    def __enter__(self):
        return self

    def __exit__(self, kind, err, traceback):
        try:
            self.status = exit_status(err)
        finally:
            for cleanup in _COMMAND_END:
                cleanup()
        return err is not None and self.status is not None


def exit_status(err):
    """The exit status of a command that ended with `err` (None: it succeeded), its `error:` line
    printed; None for an error that is not the user's nor the machine's."""
    if err is None:
        return 0
    if isinstance(err, UserError):
        # errors raised in DataLoader workers arrive wrapped in their traceback: keep the message
        message = str(err).strip().splitlines()[-1] if str(err).strip() else 'failed'
        print(f"error: {message.removeprefix('utils.UserError: ')}", file=sys.stderr)
        return getattr(err, 'exit_code', 2)
    if isinstance(err, KeyboardInterrupt):
        print("error: interrupted (Ctrl-C); the files saved before are kept", file=sys.stderr)
        return 130
    line = environment_error(err) if isinstance(err, (OSError, RuntimeError, MemoryError)) else None
    if line is not None:
        print(f"error: {line}", file=sys.stderr)
        return 1
    return None


def run_command(work, *args):
    """`work(*args)` behind a CommandBoundary; returns its exit status."""
    boundary = CommandBoundary()
    with boundary:
        work(*args)
    return boundary.status
