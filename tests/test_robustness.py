"""Crash-safe exact resume, safe checkpoint loading, and one-line errors for bad input."""
import errno
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

import asen
import losses
import utils
from conftest import ROOT, TINY
from helpers import FAITHFUL, assert_one_line_error, load, private_copy, run_main
from lib import checkpoints, engine, runfolder

# Runs asen.py's main in a child that SIGKILLs itself right after optimizer step KILL_AT_STEP:
# no handler, no `finally`, no flush runs, as when the machine or a scheduler kills a job.
KILLED_CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
import asen
steps, adam_step = 0, torch.optim.Adam.step

def step_then_die(self, *args, **kwargs):
    global steps
    result = adam_step(self, *args, **kwargs)
    steps += 1
    if steps == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

torch.optim.Adam.step = step_then_die
sys.exit(asen.main({argv!r}))
"""


def epochs_logged(run):
    return [json.loads(line)['epoch'] for line in (run / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(workdir, capsys):
    """Killed in the middle of the last epoch (its first step done, the weights in memory already
    past the epoch-1 snapshot), the resumed run trains that epoch again and ends where an
    uninterrupted run ends, bit for bit."""
    args = TINY + FAITHFUL + ['--epochs', '2']
    steps_per_epoch = -(-24 // 8)                           # TINY: 24 triplets, batches of 8
    assert asen.main(args + ['--name', 'straight']) == 0
    child = KILLED_CHILD.format(root=ROOT, kill_at=steps_per_epoch + 1, argv=args + ['--name', 'killed'])
    proc = subprocess.run([sys.executable, '-c', child], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = workdir / 'runs' / 'killed'
    ckpt = run / 'checkpoint.pth.tar'
    assert load(ckpt)['epoch'] == 1 and epochs_logged(run) == [1]
    capsys.readouterr()
    assert asen.main(['--resume', str(ckpt), '--epochs', '2']) == 0
    assert epochs_logged(run) == [1, 2]                     # the resumed process trained epoch 2 ...
    log = capsys.readouterr().out
    assert 'Train Epoch: 2 [0/24]' in log and 'Train Epoch: 1 [' not in log   # ... and only epoch 2
    straight, resumed = load(workdir / 'runs/straight/checkpoint.pth.tar'), load(ckpt)
    assert resumed['epoch'] == 2
    for key, value in straight['state_dict'].items():
        assert torch.equal(value, resumed['state_dict'][key]), key
    assert straight['best_prec'] == resumed['best_prec']


class CreatesFile:
    """Unpickling this would create a file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_checkpoint_loading_runs_no_code(tmp_path):
    target = tmp_path / 'pwned'
    bad = tmp_path / 'evil.pth.tar'
    with open(bad, 'wb') as f:
        pickle.dump({'state_dict': CreatesFile(str(target))}, f)
    torch.save({'epoch': 1, 'payload': CreatesFile(str(target))}, tmp_path / 'evil2.pth.tar')
    target.unlink(missing_ok=True)
    for path in (bad, tmp_path / 'evil2.pth.tar'):
        with pytest.raises(utils.UserError, match='cannot be loaded'):
            utils.load_checkpoint(str(path))
        assert not target.exists()


def test_corrupt_and_foreign_checkpoints(trained_copy, tmp_path, capsys):
    root, run = trained_copy                        # a refused --test still logs to test.log: a copy
    corrupt = tmp_path / 'corrupt.pth.tar'
    corrupt.write_bytes(b'\x80\x04not a checkpoint')
    code, _, err = run_main(['--test', '--resume', str(corrupt)], capsys)
    assert_one_line_error(code, err, 'corrupt.pth.tar', 'cannot be loaded')
    # another model: the ablation without ASA has no asa.* weights
    code, _, err = run_main(['--test', '--resume', str(run / 'checkpoint.pth.tar'), '--model', 'ASENet_noASA'], capsys)
    assert_one_line_error(code, err, 'do not fit', 'ASENet')
    # another attribute count: weights of 5 attributes into a dataset of 2
    ckpt = load(run / 'checkpoint.pth.tar')
    state = {k: v for k, v in ckpt['state_dict'].items()}
    state['embeddingnet.asa.attr_proj.weight'] = state['embeddingnet.asa.attr_proj.weight'][:, :2]
    torch.save(dict(ckpt, state_dict=state), tmp_path / 'two.pth.tar')
    code, _, err = run_main(['--test', '--resume', str(tmp_path / 'two.pth.tar')], capsys)
    assert_one_line_error(code, err, 'attribute count')


def test_no_space_left_keeps_the_previous_snapshot(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth.tar'
    utils.save_atomic({'epoch': 1}, str(path))

    def full_disk(obj, f):
        raise OSError(errno.ENOSPC, 'No space left on device')
    with monkeypatch.context() as patch:
        patch.setattr(torch, 'save', full_disk)
        with pytest.raises(utils.UserError, match='No space left'):
            utils.save_atomic({'epoch': 2}, str(path))
    assert load(path)['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint.pth.tar']


@pytest.mark.parametrize('hard_links', [True, False])
def test_best_snapshot_stays_when_later_checkpoints_replace_it(tmp_path, monkeypatch, hard_links):
    """model_best.pth.tar is a hard link to the best checkpoint's file (a copy on a file system
    without hard links); a later checkpoint is a new file, so the best one keeps its epoch."""
    def no_hard_links(*args):
        raise OSError(errno.EPERM, 'Operation not permitted')
    if not hard_links:
        monkeypatch.setattr(os, 'link', no_hard_links)
    checkpoints.save_snapshot({'epoch': 1}, str(tmp_path), is_best=True)
    best, ckpt = tmp_path / 'model_best.pth.tar', tmp_path / 'checkpoint.pth.tar'
    assert os.path.samefile(best, ckpt) == hard_links
    checkpoints.save_snapshot({'epoch': 2}, str(tmp_path), is_best=False)
    assert load(best)['epoch'] == 1 and load(ckpt)['epoch'] == 2
    checkpoints.save_snapshot({'epoch': 3}, str(tmp_path), is_best=True)
    assert load(best)['epoch'] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth.tar', 'model_best.pth.tar']


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_snapshot(workdir, monkeypatch, capsys):
    assert asen.main(TINY + ['--epochs', '1', '--name', 'nan']) == 0
    run = workdir / 'runs/nan'
    snapshots = {name: (run / name).read_bytes() for name in ('checkpoint.pth.tar', 'model_best.pth.tar')}
    real_loss, calls = losses.triplet_loss, []

    def nan_from_the_second_batch(sim_an, sim_ap, margin):      # a diverged loss: NaN, with its graph
        calls.append(1)
        loss = real_loss(sim_an, sim_ap, margin)
        return loss * float('nan') if len(calls) >= 2 else loss
    monkeypatch.setattr(losses, 'triplet_loss', nan_from_the_second_batch)
    # no log line after batch 0: the flag is read at the end of the epoch and still names batch 1
    # a step snapshot after every step: the one after batch 0 is written, none with the diverged weights
    assert asen.main(['--resume', 'runs/nan/checkpoint.pth.tar', '--epochs', '2', '--log-interval', '100',
                      '--checkpoint-every', '1']) == 2
    err = capsys.readouterr().err
    assert 'non-finite loss at epoch 2, batch 1;' in err and len(err.strip().splitlines()) == 1
    assert {name: (run / name).read_bytes() for name in snapshots} == snapshots     # epoch 1's, byte for byte
    step = load(run / runfolder.STEP_SNAPSHOT)
    assert checkpoints.progress(step) == (1, 1)                      # epoch 1 done, 1 step into epoch 2
    assert all(torch.isfinite(w).all() for w in step['state_dict'].values() if w.is_floating_point())


def ctrl_c_after_step(at):
    """engine.training_step, then Ctrl-C (SIGINT to this process) right after step `at`."""
    real_step, steps = engine.training_step, []

    def step_then_ctrl_c(*args, **kwargs):
        result = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == at:
            os.kill(os.getpid(), signal.SIGINT)
        return result
    return step_then_ctrl_c


@pytest.mark.slow
def test_ctrl_c_is_a_stop_signal_the_run_continues(tiny_data, workdir, monkeypatch, capsys):
    """Ctrl-C in a training step: the step finishes, a step snapshot is written, exit 75 (no
    interrupted.pth.tar); the same command continues the run to its end."""
    args = TINY + ['--data_path', str(tiny_data), '--epochs', '2', '--name', 'ctrlc', '--resume', 'auto']
    with monkeypatch.context() as patch:
        patch.setattr(engine, 'training_step', ctrl_c_after_step(2))
        code, _, err = run_main(args, capsys)
    assert_one_line_error(code, err, 'stopped by SIGINT at epoch 1, step 2 of 3', 'step.pth.tar', '--resume auto')
    assert code == 75
    assert load(workdir / 'runs/ctrlc/step.pth.tar')['step']['batch'] == 2
    assert not (workdir / 'runs/ctrlc/interrupted.pth.tar').exists()
    assert run_main(args, capsys)[0] == 0
    assert load(workdir / 'runs/ctrlc/checkpoint.pth.tar')['epoch'] == 2
    assert not (workdir / 'runs/ctrlc/step.pth.tar').exists()


def test_ctrl_c_after_an_unchecked_non_finite_step_saves_nothing(tiny_data, workdir, monkeypatch, capsys):
    """Ctrl-C after a step whose loss went NaN, not yet read (no log line since): the step snapshot
    checks the loss first and is not written; the run stops as a stop signal's does (exit 75), with
    nothing saved, so that the same command continues from the last snapshot."""
    real_loss, calls = losses.triplet_loss, []

    def nan_from_the_second_batch(sim_an, sim_ap, margin):
        calls.append(1)
        loss = real_loss(sim_an, sim_ap, margin)
        return loss * float('nan') if len(calls) >= 2 else loss
    monkeypatch.setattr(losses, 'triplet_loss', nan_from_the_second_batch)
    monkeypatch.setattr(engine, 'training_step', ctrl_c_after_step(2))
    code, _, err = run_main(TINY + ['--data_path', str(tiny_data), '--epochs', '1', '--name', 'nanc',
                                    '--log-interval', '100'], capsys)
    assert_one_line_error(code, err, 'stopped by SIGINT', 'nothing new to save')
    assert code == 75
    assert [p.name for p in (workdir / 'runs/nanc').iterdir() if '.pth' in p.name] == []


def test_unknown_flags_values_are_one_line(workdir, capsys):
    for args, needle in ((['--dataset', 'Nope'], '--dataset'), (['--model', 'Nope'], '--model'),
                         (['--lr', '-1'], '--lr')):
        code, _, err = run_main(args, capsys)
        assert_one_line_error(code, err, needle)


def break_line(path, number, text):
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text('\n'.join(lines) + '\n')


@pytest.fixture()
def data_copy(tiny_data, workdir):
    """A private copy of the tiny SynthFashion data that a test may damage."""
    import shutil
    shutil.copytree(tiny_data, workdir / 'data')
    return workdir / 'data' / 'SynthFashion'


ARGS = TINY + ['--epochs', '1', '--no-cuda']


def test_malformed_line_and_value_out_of_range(data_copy, capsys):
    break_line(data_copy / 'query_valid.txt', 2, '3 x 1')
    code, _, err = run_main(ARGS, capsys)
    assert_one_line_error(code, err, 'query_valid.txt:2', 'malformed')
    break_line(data_copy / 'query_valid.txt', 2, '3 0 9')
    code, _, err = run_main(ARGS, capsys)
    assert_one_line_error(code, err, 'query_valid.txt:2', 'value 9 out of range')


@pytest.mark.slow
def test_missing_image_is_named_and_can_be_skipped(data_copy, workdir, capsys):
    first = (data_copy / 'filenames_train.txt').read_text().splitlines()[0]
    (data_copy / first).unlink()
    code, _, err = run_main(ARGS, capsys)
    assert_one_line_error(code, err, first, '--skip-bad-images')
    # an unreadable one too, then skip both
    second = (data_copy / 'filenames_train.txt').read_text().splitlines()[1]
    (data_copy / second).write_bytes(b'not a jpeg')
    code, out, err = run_main(ARGS + ['--skip-bad-images', '--name', 'skip'], capsys)
    assert code == 0, err
    assert 'left out 2 missing or unreadable image(s) of the training set' in \
        (workdir / 'runs' / 'skip' / 'train.log').read_text()


def test_missing_meta_entry(workdir, capsys):
    (workdir / 'data' / 'DARN').mkdir(parents=True)
    code, _, err = run_main(['--dataset', 'DARN', '--no-pretrained'], capsys)
    assert_one_line_error(code, err, 'meta.json', 'DARN')


@pytest.mark.slow                   # a real process: its stdout is a pipe closed early, as `| head` does
def test_stdout_closed_early_does_not_spam_and_the_log_goes_on(tiny_data, workdir):
    private_copy(tiny_data, workdir / 'data')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'asen.py')] + ARGS + ['--name', 'piped'],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()                  # the first log line, then the reader goes away
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert 'Traceback' not in err and 'Logging error' not in err, err
    assert err.strip().splitlines() == ['note: standard output was closed (a pipe into head?); the log goes on in '
                                        'runs/piped/train.log']
    assert 'training time' in (workdir / 'runs' / 'piped' / 'train.log').read_text()
