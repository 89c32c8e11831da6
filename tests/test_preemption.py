"""Preemptible training (docs/preemption.md): step snapshots that continue to the same weights,
stop signals with exit status 75, and --resume auto."""
import os
import random
import re
import signal
import subprocess
import sys
import warnings

import pytest
import torch

import asen
from conftest import ROOT, TINY
from lib import commands, engine, preemption as preemption_module, runtime
from lib.config import Config
from helpers import FAITHFUL, assert_one_line_error, assert_same_run, load, meter_rows, run_main, step_position
from utils import UserError

STEPS_PER_EPOCH = 3                                         # TINY: 24 triplets, batches of 8

# asen.main in a child that, right after optimizer step AT, sends itself SIGNAL (SIGKILL: no handler,
# no `finally` runs, as when the machine goes away). SECOND: a second SIGTERM in the middle of
# writing the step snapshot that the first signal asked for.
CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
import asen
steps, adam_step, real_save = 0, torch.optim.Adam.step, torch.save

def step_then_signal(self, *args, **kwargs):
    global steps
    result = adam_step(self, *args, **kwargs)
    steps += 1
    if steps == {at}:
        os.kill(os.getpid(), {signal})
    return result

def save_interrupted_by_a_second_signal(obj, f, *args, **kwargs):
    if {second} and isinstance(obj, dict) and 'step' in obj and steps == {at}:
        f.write(b'half a snapshot')
        os.kill(os.getpid(), signal.SIGTERM)
    return real_save(obj, f, *args, **kwargs)

torch.optim.Adam.step = step_then_signal
torch.save = save_interrupted_by_a_second_signal
sys.exit(asen.main({argv!r}))
"""


def child(workdir, argv, at, signal_number, second=False):
    code = CHILD.format(root=ROOT, at=at, signal=int(signal_number), second=second, argv=argv)
    return subprocess.run([sys.executable, '-c', code], cwd=workdir, capture_output=True, text=True, timeout=300)


# asen.main in a child whose `module.function` (looked up when called) first runs SIGNALS: code that
# sends the signals at a chosen moment, with `real` the function itself.
PATCHED_CHILD = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import asen
from lib import {module}
real = {module}.{function}

def patched(*args, **kwargs):
    patched.calls += 1
    if patched.calls == 1:
{signals}
    return real(*args, **kwargs)
patched.calls = 0
{module}.{function} = patched
sys.exit(asen.main({argv!r}))
"""


def patched_child(workdir, argv, module, function, signals):
    code = PATCHED_CHILD.format(root=ROOT, module=module, function=function, argv=argv,
                                signals='\n'.join('        ' + line for line in signals.strip().splitlines()))
    return subprocess.run([sys.executable, '-c', code], cwd=workdir, capture_output=True, text=True, timeout=300)


# the signals at the start of the command: while the data is prepared, before any step
ONE_SIGTERM = "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)"
# a second SIGTERM while the first one's stop unwinds through code that catches everything
TWO_SIGTERMS = """
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
except BaseException:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
"""


def random_step(seed):
    """A step of the two epochs after the first, before the last (the first epoch's step 1 and the
    last step leave nothing to continue mid-epoch)."""
    return random.Random(seed).randint(2, 2 * STEPS_PER_EPOCH - 1)


@pytest.mark.slow
def test_sigkill_at_a_random_step_continues_to_the_same_weights(workdir):
    """With 2 loader workers (each replays its flip stream) reading the image cache; 0 workers
    (the main process's stream) are test_stop_signal_...[SIGTERM]'s."""
    args = TINY + FAITHFUL + ['--workers', '2', '--cache-images', '--epochs', '2', '--checkpoint-every', '1',
                              '--resume', 'auto']
    assert asen.main(args + ['--name', 'straight']) == 0          # the first start: no snapshot yet
    at = random_step(seed=2)
    proc = child(workdir, args + ['--name', 'killed'], at, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, (at, proc.stderr[-2000:])
    assert (workdir / 'runs' / 'killed' / 'step.pth.tar').exists() or at % STEPS_PER_EPOCH == 1, at
    assert asen.main(args + ['--name', 'killed']) == 0, at
    assert_same_run(workdir / 'runs' / 'straight', workdir / 'runs' / 'killed')


@pytest.mark.slow
def test_asenpp_stage2_killed_continues_to_the_same_weights(workdir):
    """Stage 2's item loader (the originals) skips the items already trained; one epoch, killed after
    step 2 (after step 1 no step snapshot is written yet, and --resume auto would start anew)."""
    base = TINY + FAITHFUL + ['--workers', '0', '--model', 'ASENpp']
    assert asen.main(base + ['--epochs', '1', '--name', 's1']) == 0
    stage2 = base + ['--stage', '2', '--epochs', '1', '--checkpoint-every', '1']
    first = ['--resume', 'runs/s1/checkpoint.pth.tar']
    assert asen.main(stage2 + first + ['--name', 'straight']) == 0
    proc = child(workdir, stage2 + first + ['--name', 'killed'], 2, signal.SIGKILL)       # of 3 steps
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert asen.main(stage2 + ['--resume', 'auto', '--name', 'killed']) == 0
    assert_same_run(workdir / 'runs' / 'straight', workdir / 'runs' / 'killed')


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
    """(working dir, name) of the uninterrupted 2-epoch run of STOP_ARGS, computed once."""
    root = tmp_path_factory.mktemp('straight')
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert asen.main(STOP_ARGS + ['--name', 'straight']) == 0
    finally:
        os.chdir(cwd)
    return root, 'straight'


STOP_ARGS = TINY + FAITHFUL + ['--workers', '0', '--epochs', '2', '--checkpoint-every', '0', '--resume', 'auto']


@pytest.mark.slow
@pytest.mark.parametrize('signal_number', [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1],
                         ids=['SIGTERM', 'SIGINT', 'SIGUSR1'])
def test_stop_signal_writes_a_step_snapshot_and_exits_75(straight_run, monkeypatch, signal_number):
    """Stopped after step 2 of 3 by a real signal to the training process (SIGINT: Ctrl-C); SIGTERM's
    and SIGINT's runs then continue (0 workers, --resume auto) to the straight run's weights."""
    root, straight = straight_run
    monkeypatch.chdir(root)
    name = signal.Signals(signal_number).name
    proc = child(root, STOP_ARGS + ['--name', name], 2, signal_number)
    assert proc.returncode == runtime.REQUEUE_EXIT == 75, proc.stderr[-2000:]
    assert_one_line_error(proc.returncode, proc.stderr, f'stopped by {name}',
                          'epoch 1, step 2 of 3', 'step.pth.tar', '--resume auto')
    step = load(root / 'runs' / name / 'step.pth.tar')
    assert step['epoch'] == 0 and step['step']['epoch'] == 1 and step['step']['batch'] == 2
    if signal_number in (signal.SIGTERM, signal.SIGINT):           # it continues where it stopped
        assert asen.main(STOP_ARGS + ['--name', name]) == 0
        assert_same_run(root / 'runs' / straight, root / 'runs' / name)


@pytest.mark.slow
def test_second_signal_exits_at_once_and_keeps_the_last_snapshot(workdir):
    args = TINY + FAITHFUL + ['--workers', '0', '--epochs', '1', '--checkpoint-every', '1', '--name', 'twice']
    proc = child(workdir, args, 2, signal.SIGTERM, second=True)
    assert_one_line_error(proc.returncode, proc.stderr, 'second signal', 'last complete snapshot is kept')
    assert proc.returncode == 75
    run = workdir / 'runs' / 'twice'
    assert load(run / 'step.pth.tar')['step']['batch'] == 1          # step 1's, whole
    assert sorted(p.name for p in run.iterdir() if 'tmp' in p.name) == []


def test_a_signal_during_evaluation_stops_after_the_epoch_not_after_the_last(tiny_data, workdir, monkeypatch,
                                                                              capsys):
    """SIGTERM while an epoch is evaluated (after its last step): the run stops once that epoch's
    snapshot is saved (exit 75); in the last epoch nothing is left to continue, and the run ends."""
    real_evaluate = commands.evaluate

    def evaluate_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(commands, 'evaluate', evaluate_then_signal)
    # should training not handle SIGTERM, this handler keeps pytest alive (and the test fails)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        args = TINY + ['--data_path', str(tiny_data), '--epochs', '2', '--name', 'stop', '--resume', 'auto']
        code, _, err = run_main(args, capsys)
        assert_one_line_error(code, err, 'stopped by SIGTERM at the end of epoch 1', 'checkpoint.pth.tar')
        assert code == 75 and load(workdir / 'runs/stop/checkpoint.pth.tar')['epoch'] == 1
        assert run_main(args, capsys)[0] == 0                          # epoch 2, the last: it ends
        assert load(workdir / 'runs/stop/checkpoint.pth.tar')['epoch'] == 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resume_auto_refuses_another_runs_snapshot(trained_run, monkeypatch, capsys):
    root, run = trained_run
    monkeypatch.chdir(root)
    before = sorted(os.listdir(run))
    assert asen.main(TINY + ['--epochs', '2', '--name', 'shared', '--resume', 'auto', '--model', 'TripletNet']) == 2
    err = capsys.readouterr().err
    assert 'is a snapshot of another run' in err and '--model' in err and len(err.strip().splitlines()) == 1
    assert asen.main(['--name', 'shared', '--resume', 'auto', '--no-pretrained']) == 2    # FashionAI here
    assert '--dataset' in capsys.readouterr().err
    assert sorted(os.listdir(run)) == before


def bare_preemption(every, run_dir):
    """A Preemption of a new run (no snapshot to continue) for --checkpoint-every `every`, over a
    one-layer network: --epochs 3 from epoch 1, batches of 8."""
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(net.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    args = Config(dict(checkpoint_every=every, resume=None, epochs=3, start_epoch=1, batch_size=8), explicit=())
    return preemption_module.Preemption(net, optimizer, scheduler, torch.amp.GradScaler('cpu', enabled=False), args,
                                        str(run_dir), torch.device('cpu'), None)


def started(preemption):
    """`preemption` as commands.train readies it for epoch 1 of a run of 4 steps of 8 triplets (one
    process, one loader stream); returns new meters for its steps."""
    preemption.check_processes(1, 1)
    preemption.check_epoch_sizes(4, 32, 0)
    preemption.start_epoch(1)
    return engine.TrainMeters(torch.device('cpu'))


@pytest.fixture()
def clock(monkeypatch):
    """lib/preemption's time.monotonic, stubbed: set clock[0] to the time now (from 1000 s)."""
    now = [1000.0]
    monkeypatch.setattr(preemption_module.time, 'monotonic', lambda: now[0])
    return now


@pytest.mark.parametrize('every', [2, 3])
def test_a_step_snapshot_every_n_steps_counts_from_the_last_snapshot(tmp_path, every):
    """--checkpoint-every N: due after steps N and 2N (never a stop); an epoch snapshot between
    (restart) starts the count again."""
    preemption = bare_preemption(str(every), tmp_path)
    with preemption.stops_deferred():
        due = [preemption._due_after_step() for _ in range(2 * every + 1)]
        preemption.restart()
        after_restart = [preemption._due_after_step()[0] for _ in range(every)]
    assert due == ([(False, False)] * (every - 1) + [(True, False)]) * 2 + [(False, False)]
    assert after_restart == [False] * (every - 1) + [True]


def test_after_a_step_the_snapshot_is_written_when_due_and_the_stop_served(tmp_path):
    """after_step with --checkpoint-every 2: nothing after step 1 (the loss not even checked), a
    step snapshot of step 2 after it (its loss checked first); a stop signal then writes one after
    step 3 and raises Stopped."""
    preemption = bare_preemption('2', tmp_path)
    checked = []
    with preemption.stops_deferred():
        meters = started(preemption)
        preemption.after_step(1, meters, lambda: checked.append(1))
        assert checked == [] and not (tmp_path / 'step.pth.tar').exists()
        preemption.after_step(2, meters, lambda: checked.append(2))
        assert checked == [2] and load(tmp_path / 'step.pth.tar')['step']['batch'] == 2
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(runtime.Stopped, match='stopped by SIGTERM at epoch 1, step 3 of 4'):
            preemption.after_step(3, meters, lambda: checked.append(3))
    assert checked == [2, 3] and load(tmp_path / 'step.pth.tar')['step']['batch'] == 3


def test_after_a_step_snapshot_the_minutes_count_from_it(tmp_path, clock):
    """--checkpoint-every 2m through after_step on a stub clock: the snapshot written at 120 s
    restarts the interval, so the step 10 s later writes none, the one 120 s later does."""
    preemption = bare_preemption('2m', tmp_path)
    written = []
    with preemption.stops_deferred():
        meters = started(preemption)
        for step, now in ((1, 1120.0), (2, 1130.0), (3, 1240.0)):
            clock[0] = now
            preemption.after_step(step, meters, lambda: None)
            written.append(load(tmp_path / 'step.pth.tar')['step']['batch'])
    assert written == [1, 1, 3]


def test_an_epoch_continues_at_the_step_after_its_snapshot_with_its_meters(tmp_path):
    """start_epoch: the step snapshot's epoch starts at the step after it, with the meters of the
    steps done; any other epoch at step 0 with new meters."""
    preemption = bare_preemption('5m', tmp_path)
    continued = position(epoch=2, batch=2, count=16, acc_sum=10.0)
    preemption.position = continued
    first, meters = preemption.start_epoch(2)
    assert first == 2 and torch.equal(engine.meter_row(meters, torch.device('cpu')).cpu(), continued['meters'][0])
    assert preemption.start_epoch(3) == (0, None)


def test_a_step_snapshot_every_n_minutes_is_due_once_they_have_passed(tmp_path, clock):
    """--checkpoint-every 2m: due at the first step that ends 120 s or more after the last snapshot."""
    preemption = bare_preemption('2m', tmp_path)
    with preemption.stops_deferred():
        due = []
        for now in (1060.0, 1119.9, 1120.0, 1130.0):
            clock[0] = now
            due.append(preemption._due_after_step()[0])
            if due[-1]:
                preemption.restart()                    # the snapshot written: 120 s from 1120
        clock[0] = 1240.0
        due.append(preemption._due_after_step()[0])
    assert due == [False, False, True, False, True]


def test_a_stop_signal_is_served_at_the_next_step(tmp_path):
    """A stop signal between steps: the next step writes a step snapshot and stops, whatever the
    interval; at an epoch's end stop_if_asked stops before the last epoch only."""
    preemption = bare_preemption('1000', tmp_path)
    with preemption.stops_deferred():
        assert preemption._due_after_step() == (False, False)
        os.kill(os.getpid(), signal.SIGTERM)            # deferred: noted, served at the step boundary
        assert preemption._due_after_step() == (True, True)
        preemption.stop_if_asked(3)                     # after the last epoch: the run ends, no stop
        with pytest.raises(runtime.Stopped, match='stopped by SIGTERM at the end of epoch 2'):
            preemption.stop_if_asked(2)


def position(epoch=1, batch=2, count=16, acc_sum=10.0, acc_last=1.0):
    """A step snapshot's position: `batch` steps of `epoch` done, its meter row counting `count`
    triplets with these accuracies."""
    return step_position(epoch, batch, meter_rows(count, acc_sum, acc_last))


@pytest.mark.parametrize('entry, refused', [
    (position(), None),
    (position(acc_sum=0.0, acc_last=0.0), None),                     # no triplet right yet
    (position(acc_sum=16.0, acc_last=1.0), None),                    # every triplet right
    (position(batch=3, count=24, acc_sum=24.0), None),               # the epoch's last step
    (position(batch=4, count=24), 'after step 4 of epoch 1'),
    (position(epoch=2), 'of epoch 2, but this run trains epochs 1 to 3'),
    (position(count=15), 'not those of 16 triplets in 2 step(s)'),
    (position(acc_sum=16.5), 'not those of 16 triplets'),
    (position(acc_sum=-0.5), 'not those of 16 triplets'),
    (position(acc_last=1.5), 'not those of 16 triplets'),
    (position(acc_last=-0.5), 'not those of 16 triplets'),
])
def test_a_step_snapshots_position_is_checked_against_the_runs_sizes(tmp_path, entry, refused):
    """check_epoch_sizes for a run of --epochs 3 from epoch 1, 3 steps of 8 of 24 triplets an
    epoch: the step within the epoch, the count of triplets seen and the accuracies within it."""
    preemption = bare_preemption('5m', tmp_path)
    preemption.position = entry
    if refused is None:
        preemption.check_epoch_sizes(3, 24, 0)
    else:
        with pytest.raises(UserError, match=re.escape(refused)):
            preemption.check_epoch_sizes(3, 24, 0)


def test_checkpoint_every_values(capsys):
    from lib.flags import parse_interval
    assert parse_interval('500') == (500, None) and parse_interval('10m') == (None, 600.0)
    assert parse_interval('0') == (None, None)
    for bad in ('10x', '-1', '0m'):
        with pytest.raises(SystemExit):
            asen.get_args_parser().parse_args(['--checkpoint-every', bad])
    assert '--checkpoint-every' in capsys.readouterr().err


# ----------------------------------------------------------------------------- the rule's seams

def run_files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_sigkill_before_the_first_snapshot_then_the_same_command_starts_the_run(straight_run, monkeypatch):
    """Killed after step 1 with no snapshot yet (--checkpoint-every 0): args.json and train.log are
    left; the same command starts the run again and ends as the uninterrupted one."""
    root, straight = straight_run
    monkeypatch.chdir(root)
    proc = child(root, STOP_ARGS + ['--name', 'killed-early'], 1, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = run_files(root / 'runs' / 'killed-early')
    assert 'args.json' in left and 'train.log' in left and not [name for name in left if '.pth' in name], left
    assert asen.main(STOP_ARGS + ['--name', 'killed-early']) == 0
    assert_same_run(root / 'runs' / straight, root / 'runs' / 'killed-early')


@pytest.mark.slow
def test_sigterm_before_the_first_snapshot_exits_75_and_the_same_command_starts_the_run(straight_run,
                                                                                      monkeypatch):
    root, straight = straight_run
    monkeypatch.chdir(root)
    proc = patched_child(root, STOP_ARGS + ['--name', 'early'], 'inputs', 'prepare_dataset', ONE_SIGTERM)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert_one_line_error(proc.returncode, proc.stderr, 'stopped by SIGTERM', 'nothing new to save', '--resume auto')
    assert not (root / 'runs' / 'early' / 'checkpoint.pth.tar').exists()
    assert asen.main(STOP_ARGS + ['--name', 'early']) == 0
    assert_same_run(root / 'runs' / straight, root / 'runs' / 'early')


@pytest.mark.slow
def test_a_second_signal_early_exits_75(tiny_data, workdir):
    args = TINY + ['--data_path', str(tiny_data), '--epochs', '1', '--name', 'twice-early']
    proc = patched_child(workdir, args, 'inputs', 'prepare_dataset', TWO_SIGTERMS)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert_one_line_error(proc.returncode, proc.stderr, 'second signal', 'SIGTERM, then SIGTERM')
    assert not (workdir / 'runs' / 'twice-early' / 'args.json').exists()


@pytest.mark.slow
def test_sigterm_at_an_epochs_last_step_continues_exactly(straight_run, monkeypatch):
    """Stopped after the last step of epoch 1 (its step snapshot is at batch 3 of 3): the resumed
    pass has no batch left, yet leaves the RNG where the uninterrupted pass did."""
    root, straight = straight_run
    monkeypatch.chdir(root)
    proc = child(root, STOP_ARGS + ['--name', 'last-step'], STEPS_PER_EPOCH, signal.SIGTERM)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert_one_line_error(proc.returncode, proc.stderr, f'epoch 1, step {STEPS_PER_EPOCH} of {STEPS_PER_EPOCH}')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert asen.main(STOP_ARGS + ['--name', 'last-step']) == 0
    # the resumed epoch took no optimizer step before the schedule's: no PyTorch warning for it
    assert not [w for w in caught if 'lr_scheduler.step()' in str(w.message)]
    assert_same_run(root / 'runs' / straight, root / 'runs' / 'last-step')


@pytest.mark.slow
def test_sigterm_during_validation_continues_exactly(straight_run, monkeypatch):
    root, straight = straight_run
    monkeypatch.chdir(root)
    proc = patched_child(root, STOP_ARGS + ['--name', 'in-validation'], 'commands', 'evaluate',
                         "os.kill(os.getpid(), signal.SIGTERM)")
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert_one_line_error(proc.returncode, proc.stderr, 'stopped by SIGTERM at the end of epoch 1')
    assert asen.main(STOP_ARGS + ['--name', 'in-validation']) == 0
    assert_same_run(root / 'runs' / straight, root / 'runs' / 'in-validation')
