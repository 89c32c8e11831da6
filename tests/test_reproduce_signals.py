"""reproduce.py stopped by signals, as real processes: passed on to its asen.py child, waited for,
exit 75, and the same command finishes the table as if never stopped. Its own file, so that the
suite's workers (--dist loadfile) run it beside test_reproduce.py's other slow tests."""
import os
import signal
import subprocess
import sys
import time

import pytest

import reproduce
from conftest import ROOT
from helpers import TINY_EXTRA, assert_same_run, fake_result

# ----------------------------------------------------------------------------- stop signals (real processes)

# reproduce.py as a real process whose asen.py is this stand-in: asen.main, paused after its
# training process's optimizer step $PAUSE_AT (0: before asen.py starts, so before its handlers)
# until $PAUSE_MARK.go exists; at the pause it writes its pid to $PAUSE_MARK.
STAND_IN = """
import os, sys, time
sys.path.insert(0, {root!r})
mark, pause_at = os.environ.get('PAUSE_MARK'), int(os.environ.get('PAUSE_AT', '-1'))

def pause():
    with open(mark, 'w') as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 600          # should the test itself be killed: no process left
    while not os.path.exists(mark + '.go') and time.monotonic() < deadline:
        time.sleep(0.02)

if pause_at == 0 and '--test' not in sys.argv:
    pause()
import torch
import asen
steps, adam_step = 0, torch.optim.Adam.step

def step_then_pause(self, *args, **kwargs):
    global steps
    result = adam_step(self, *args, **kwargs)
    steps += 1
    if steps == pause_at:
        pause()
    return result

torch.optim.Adam.step = step_then_pause
sys.exit(asen.main(sys.argv[1:]))
"""
REPRODUCE = """
import sys
sys.path.insert(0, {root!r})
import reproduce
reproduce.ASEN = {stand_in!r}
sys.exit(reproduce.main({argv!r}))
"""
# One row trained for real (ASEN; Triplet and CSN have results), exactly as asen.py's
# continuation tests do: 0 workers, the paper's arithmetic, epoch snapshots only.
ROW = 'synthfashion-asen-s1'
STOP_EXTRA = TINY_EXTRA.replace('--epochs 1', '--epochs 2') + \
    ' --workers 0 --amp off --no-channels-last --no-concat-forward --checkpoint-every 0'


def table_argv(data):
    return ['deepfashion', '--dataset', 'SynthFashion', '--data-path', str(data), '--extra', STOP_EXTRA]


def with_finished_rows(root):
    fake_result(root, 'synthfashion-triplet-s1', 'TripletNet', [10, 20, 30, 40, 50], random=21.0)
    fake_result(root, 'synthfashion-csn-s1', 'ConditionalSimNet', [11, 21, 31, 41, 51], random=19.0)


@pytest.fixture(scope='module')
def straight_table(tmp_path_factory, tiny_data):
    """The uninterrupted table's folder, its asen.py commands run in this process."""
    import asen
    root = tmp_path_factory.mktemp('straight_table')
    with_finished_rows(root)
    cwd, run_asen = os.getcwd(), reproduce.run_asen
    reproduce.run_asen = lambda command, log, signals: asen.main(command[2:])
    os.chdir(root)
    try:
        assert reproduce.main(table_argv(tiny_data)) == 0
    finally:
        os.chdir(cwd)
        reproduce.run_asen = run_asen
    return root


def alive(pid):
    """Whether process `pid` runs (a zombie no longer trains)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def stopped_reproduce(root, data, pause_at, how, check_paused, label):
    """reproduce.py started, its asen.py paused at `pause_at`, `check_paused(run folder)` run there,
    then stopped by `how` ('group-SIGINT': Ctrl-C to its process group; 'SIGTERM': to it alone);
    (exit status, stderr, the asen.py pid)."""
    mark = root / label
    script = REPRODUCE.format(root=ROOT, stand_in=str(root / 'stand_in.py'), argv=table_argv(data))
    (root / 'stand_in.py').write_text(STAND_IN.format(root=ROOT))
    env = dict(os.environ, PAUSE_AT=str(pause_at), PAUSE_MARK=str(mark))
    proc = subprocess.Popen([sys.executable, '-c', script], cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (mark.exists() and mark.read_text()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mark.exists(), proc.communicate(timeout=60)
        child = int(mark.read_text())
        check_paused(root / 'runs' / ROW)
        if how == 'group-SIGINT':
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        passed_on = proc.stdout.readline()
        while passed_on and 'passed on' not in passed_on:
            passed_on = proc.stdout.readline()
        assert f'passed on to asen.py (pid {child})' in passed_on
        (root / (mark.name + '.go')).touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if mark.exists() and mark.read_text() and alive(int(mark.read_text())):
            os.kill(int(mark.read_text()), signal.SIGKILL)
    return proc.returncode, err, child


@pytest.mark.slow
def test_a_stopped_table_continues_to_the_uninterrupted_one(tmp_path, tiny_data, straight_table):
    """reproduce.py stopped four times, by Ctrl-C to its process group and by SIGTERM to it alone,
    then the same command: before asen.py handles signals and at the row's first step (nothing
    saved yet: the stop saves a step snapshot), then twice in epoch 2 (the row holds epoch 1's
    snapshot). Each stop: exit 75, one line, the asen.py child ended (none left training); each
    rerun continues the row from what the last left (nothing, a step snapshot only, an epoch
    snapshot). Then the row and the table are the uninterrupted run's: weights, metrics, results."""
    root = tmp_path
    with_finished_rows(root)

    def nothing(run):
        assert not run.exists() or not any(run.glob('*.pth.tar'))

    def epoch_snapshot(run):
        assert (run / 'checkpoint.pth.tar').exists()
    # (the stand-in's pause: its process's step, how it is stopped, what the row holds at the pause)
    stops = [(0, 'group-SIGINT', nothing),
             (1, 'SIGTERM', nothing),                                  # epoch 1, step 1 of 3
             (3, 'group-SIGINT', epoch_snapshot),                      # epoch 2, step 1
             (1, 'SIGTERM', epoch_snapshot)]                           # epoch 2, step 2
    for i, (pause_at, how, holds) in enumerate(stops):
        code, err, child = stopped_reproduce(root, tiny_data, pause_at, how, holds, f'stop{i}')
        name = 'SIGINT' if how == 'group-SIGINT' else 'SIGTERM'
        assert code == 75, (i, err)
        assert err.count('\n') == 1 and err.startswith(f'error: stopped by {name} in table deepfashion, row ASEN'), err
        assert 'rerun the same command to continue' in err
        assert not alive(child), i
        if pause_at:                    # asen.py saved a step snapshot at the step it stopped
            assert (root / 'runs' / ROW / 'step.pth.tar').exists(), i
    proc = subprocess.run([sys.executable, '-c', REPRODUCE.format(root=ROOT, stand_in=reproduce.ASEN,
                                                                  argv=table_argv(tiny_data))],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight, continued = straight_table / 'runs', root / 'runs'
    assert_same_run(straight / ROW, continued / ROW)
    assert (continued / ROW / 'test_results.json').read_text() == (straight / ROW / 'test_results.json').read_text()
    assert (continued / 'reproduce' / 'deepfashion.json').read_text() == \
        (straight / 'reproduce' / 'deepfashion.json').read_text()
