"""Data loading workers end with the run: an error met in a worker (an image that cannot be decoded,
memory running out, a worker killed) is one `error:` line, the command returns within seconds, and
no worker process is left behind, for 0, 2 and 4 workers, with and without --cache-images.

The bad image is a JPEG whose start and end markers are whole but whose data is not: the header
check before training passes it (images.image_problem reads headers only), so it is met by the
worker that decodes it, mid-epoch (or while the image cache is built).
"""
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import utils
from conftest import ROOT, TINY
from helpers import assert_one_line_error, run_main
from lib import gpuinput

NEW = TINY + ['--epochs', '1', '--no-cuda', '--name', 'new']
BAD = '000003.jpg'


def garble_listed_image(root):
    """Replace train image 3 by a JPEG whose markers are whole but whose data is zeros."""
    path = root / 'data' / 'SynthFashion' / 'images' / 'train' / BAD
    data = path.read_bytes()
    path.unlink()                                  # the shared copy is hard-linked: replace, not write
    path.write_bytes(data[:200] + bytes(len(data) - 202) + data[-2:])


def processes_in_group(group):
    """Pids of the live processes whose process group is `group` (read from /proc)."""
    found = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue                               # ended meanwhile
        if fields[0] != 'Z' and int(fields[2]) == group:
            found.append(int(entry))
    return found


SLOW = pytest.mark.slow              # each case starts a run and its workers


@pytest.mark.parametrize('workers, cache', [
    pytest.param(0, False, marks=SLOW), (2, False), pytest.param(4, False, marks=SLOW),
    pytest.param(0, True, marks=SLOW), pytest.param(2, True, marks=SLOW), (4, True)])
def test_bad_image_in_a_worker_is_one_line_and_no_worker_is_left(world, capsys, workers, cache):
    garble_listed_image(world.root)
    argv = NEW + ['--workers', str(workers)] + (['--cache-images'] if cache else [])
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert_one_line_error(code, err, BAD, 'cannot be read', 'replace it')
    assert not multiprocessing.active_children()


@pytest.mark.slow                   # a real process: the hang was at the interpreter's exit
@pytest.mark.parametrize('workers, extra', [(2, []), (4, ['--cache-images'])], ids=['2-workers', '4-cached'])
def test_bad_image_in_a_worker_ends_the_process_and_its_group(world, workers, extra):
    garble_listed_image(world.root)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'asen.py')] + NEW + ['--workers', str(workers)] + extra,
                            cwd=world.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)              # its own process group: its workers join it
    try:
        first = proc.stderr.readline()                           # blocks until the error line comes
        seen = time.monotonic()
        code = proc.wait(timeout=30)
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - seen < 30
    assert code == 2
    assert_one_line_error(code, first + rest, BAD, 'cannot be read')
    deadline = time.monotonic() + 5
    while processes_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_in_group(proc.pid), 'a data loading worker outlived the run'


# ----------------------------------------------------------------------------- the loader itself

class Failing(torch.utils.data.Dataset):
    """A batch dataset (gpuinput's protocol) whose batch 1 fails in the worker as `how` says."""

    def __init__(self, how):
        self.how = how

    def __len__(self):
        return 8

    def batch_keys(self):
        return np.arange(8)

    def load_batch(self, keys):
        if keys[0] >= 2:
            if self.how == 'memory':
                raise MemoryError()
            os.kill(os.getpid(), signal.SIGKILL)                  # as the kernel's OOM killer would
        return torch.zeros(len(keys), 3, 4, 4, dtype=torch.uint8), None, torch.from_numpy(np.asarray(keys))


@pytest.mark.parametrize('how, code, needles', [
    ('memory', 1, ['out of memory', '--workers']),
    ('killed', 1, ['DataLoader worker', 'died', '--workers 0']),
])
@pytest.mark.parametrize('persistent', [False, True], ids=['per-pass', 'persistent'])
def test_a_worker_out_of_memory_or_killed_is_one_line(capsys, how, code, needles, persistent):
    loader = gpuinput.DeviceLoader(Failing(how), 2, 'cpu', workers=2, persistent=persistent)

    def one_pass():
        for _ in loader:
            pass
    result = utils.run_command(one_pass)
    err = capsys.readouterr().err
    assert result == code
    assert_one_line_error(result, err, *needles)
    assert not multiprocessing.active_children()


def test_a_pass_left_early_keeps_its_persistent_workers():
    """Breaking out of a pass (a stop signal's end of step) is no error: the workers stay."""
    class Fine(Failing):
        def load_batch(self, keys):
            return torch.zeros(len(keys), 3, 4, 4, dtype=torch.uint8), None, torch.from_numpy(np.asarray(keys))
    loader = gpuinput.DeviceLoader(Fine('none'), 2, 'cpu', workers=2, persistent=True)
    for _ in loader:
        break
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    assert len(list(loader)) == 4
    assert multiprocessing.active_children() == workers           # the same processes, kept
    gpuinput.stop_workers()
    assert not multiprocessing.active_children()


def test_a_commands_end_leaves_other_daemon_processes_alone():
    """stop_workers at the end of each command ends the loaders' workers only: a daemonic process
    the caller (an in-process user of asen.main) started itself stays; only the interpreter's exit
    (kill_leftovers) kills what is left."""
    other = multiprocessing.get_context('fork').Process(target=time.sleep, args=(60,), daemon=True)
    other.start()
    try:
        gpuinput.stop_workers()
        assert other.is_alive()
        gpuinput.stop_workers(kill_leftovers=True)
        other.join(timeout=10)
        assert not other.is_alive()
    finally:
        if other.is_alive():
            other.kill()
            other.join()


class FailsWhileFlagged(torch.utils.data.Dataset):
    """Items 0-3; item 2 raises while the file `flag` exists (read in the worker, at each fetch)."""
    def __init__(self, flag):
        self.flag = flag

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2 and os.path.exists(self.flag):
            raise ValueError('an unreadable image')
        return torch.tensor(i)


def test_a_failed_pass_leaves_the_loader_able_to_start_another(tmp_path):
    """shut_down_on_error ends a persistent loader's workers when its pass fails and forgets that
    pass, so that the next pass starts new workers instead of reusing the ended ones."""
    flag = tmp_path / 'flag'
    flag.touch()
    loader = torch.utils.data.DataLoader(FailsWhileFlagged(str(flag)), batch_size=1, num_workers=1,
                                         persistent_workers=True)
    with pytest.raises(ValueError, match='an unreadable image'):
        list(gpuinput.shut_down_on_error(loader))
    flag.unlink()
    assert [int(b) for b in gpuinput.shut_down_on_error(loader)] == [0, 1, 2, 3]
    loader._iterator._shutdown_workers()
