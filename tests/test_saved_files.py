"""Nothing saved is ever lost (docs/reliability.md): --overwrite moves the earlier run aside, a
killed save's temporary file is removed by the next run, and a real full disk (a small tmpfs) is
one line with the earlier files kept."""
import json
import os
import subprocess
import uuid

import pytest
import torch

import asen
import utils
from lib import engine, runfolder
from helpers import NEW, SHARED, TEST, assert_one_line_error, temporary_files, tree_hashes

pytestmark = pytest.mark.filterwarnings('ignore:Detected call of:UserWarning')


def skip_training(monkeypatch):
    monkeypatch.setattr(engine, 'train_one_epoch', lambda *args, **kwargs: {'train_loss': 0.5, 'train_acc': 0.5})


# ----------------------------------------------------------------------------- --overwrite

def test_without_overwrite_nothing_is_moved_aside(world, monkeypatch, capsys):
    """A new run in a folder holding only an earlier run's curves and pictures (no snapshot, no
    record: the guard lets it start) leaves them where they are; only --overwrite moves files."""
    skip_training(monkeypatch)
    extras = ['runs/new/heatmaps/epoch_1.png', 'runs/new/events.out.tfevents.1']
    for rel in extras:
        world.replace(rel, b'kept')
    assert asen.main(NEW) == 0, capsys.readouterr().err
    assert all(world.path(rel).read_bytes() == b'kept' for rel in extras)
    assert not [p for p in os.listdir(world.root / 'runs') if '.replaced-' in p]


def test_overwrite_moves_the_earlier_run_aside(world, monkeypatch, capsys):
    skip_training(monkeypatch)
    before = {rel: digest for rel, digest in tree_hashes(world.root, logs=True).items() if rel.startswith('runs/shared/')}
    assert asen.main(NEW[:-1] + ['shared', '--overwrite']) == 0, capsys.readouterr().err
    aside = [name for name in os.listdir('runs') if name.startswith('shared.replaced-')]
    assert len(aside) == 1
    after = tree_hashes(world.root, logs=True)
    for rel, digest in before.items():                    # every earlier file, byte for byte, aside
        name = rel[len('runs/shared/'):]
        if name.endswith('.log') or name == '.lock':
            continue
        assert after[f'runs/{aside[0]}/{name}'] == digest, name
    epochs = [json.loads(line)['epoch'] for line in open('runs/shared/metrics.jsonl')]
    assert epochs == [1]                                   # the new run's, not appended to the old


def test_stale_temporary_file_is_removed_by_the_next_run(world, monkeypatch):
    skip_training(monkeypatch)
    stale = world.path('runs/shared/.tmp-killed-checkpoint.pth.tar')
    stale.write_bytes(b'\0' * 4096)                       # what SIGKILL during torch.save leaves
    assert asen.main(['--resume', SHARED, '--epochs', '2', '--no-cuda']) == 0
    assert not temporary_files(world.root)


def test_test_overwrite_keeps_the_earlier_results(world, capsys):
    other = {'checkpoint': 'elsewhere.pth.tar', 'MeanAP': 1.0}
    world.replace('runs/other/test_results.json', json.dumps(other))
    assert asen.main(TEST + ['--name', 'other', '--overwrite']) == 0, capsys.readouterr().err
    kept = [n for n in os.listdir('runs/other') if n.startswith('test_results.json.replaced-')]
    assert len(kept) == 1 and json.loads(world.path(f'runs/other/{kept[0]}').read_text()) == other
    assert json.loads(world.path('runs/other/test_results.json').read_text())['checkpoint'] != other['checkpoint']


def test_resume_in_the_same_folder_still_continues(world, monkeypatch):
    skip_training(monkeypatch)
    assert asen.main(['--resume', SHARED, '--epochs', '2', '--no-cuda']) == 0
    assert [json.loads(line)['epoch'] for line in open('runs/shared/metrics.jsonl')] == [1, 2]


# ----------------------------------------------------------------------------- a real full disk

@pytest.fixture()
def small_disk(tmp_path):
    """A real 256 kB tmpfs at tmp_path/small (root and a container that allows mount), else skip."""
    folder = tmp_path / 'small'
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {done.stderr.strip()}')
    try:
        yield folder
    finally:
        subprocess.run(['umount', '-l', str(folder)], check=False)


def test_real_full_disk_save_is_one_error_and_keeps_the_file(small_disk):
    path = small_disk / 'checkpoint.pth.tar'
    utils.save_atomic({'w': torch.zeros(8)}, str(path))
    earlier = path.read_bytes()
    with pytest.raises(utils.UserError, match='No space left'):
        utils.save_atomic({'w': torch.zeros(1 << 20)}, str(path))         # 4 MB on 256 kB
    assert path.read_bytes() == earlier
    assert os.listdir(small_disk) == ['checkpoint.pth.tar']


def test_real_full_disk_torch_error_is_recognised(small_disk):
    """torch.save straight onto the full disk: the error it raises (RuntimeError ... unexpected pos,
    chained on ENOSPC, or the ENOSPC itself) is what utils.is_disk_full recognises."""
    with pytest.raises((RuntimeError, OSError)) as caught:
        torch.save({'w': torch.zeros(1 << 20)}, str(small_disk / f'{uuid.uuid4().hex}.pt'))
    assert utils.is_disk_full(caught.value), repr(caught.value)


def test_real_full_disk_training_run(world, monkeypatch, small_disk, capsys):
    """A run whose folder is a full disk: one line, exit 2, and no temporary file left there."""
    skip_training(monkeypatch)
    os.symlink(small_disk, world.path('runs/new'))
    code = asen.main(NEW)
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_line_error(code, err, 'No space left')
    assert not [n for n in os.listdir(small_disk) if '.tmp' in n]


def test_is_disk_full_follows_the_chain():
    inner = OSError(28, 'No space left on device')
    outer = RuntimeError('[enforce fail at inline_container.cc:603] . write error')
    outer.__cause__ = inner
    assert utils.is_disk_full(outer)
    assert not utils.is_disk_full(RuntimeError('shape mismatch'))


def test_set_aside_leaves_train_log_and_lock(tmp_path):
    run = tmp_path / 'r'
    run.mkdir()
    for name in ('checkpoint.pth.tar', 'metrics.jsonl', 'args.json', 'train.log', '.lock'):
        (run / name).write_text(name)
    aside = runfolder.set_aside_previous_run(str(run))
    assert sorted(os.listdir(run)) == ['.lock', 'train.log']
    assert sorted(os.listdir(aside)) == ['args.json', 'checkpoint.pth.tar', 'metrics.jsonl']


# ----------------------------------------------------------------------------- the lock and the temporaries

def test_a_locked_folder_stops_every_rank_with_rank_0s_reason(tmp_path, monkeypatch):
    """Rank 0's own error (the folder is in use) when it cannot lock; on the other ranks, which
    lock nothing, one line saying that rank 0 could not."""
    import contextlib
    from lib import runtime
    run = str(tmp_path / 'r')
    os.makedirs(run)
    with runfolder.run_lock(run):
        with contextlib.ExitStack() as stack, pytest.raises(utils.UserError, match='in use by another training'):
            runfolder.lock_for_every_rank(stack, run, torch.device('cpu'))
    monkeypatch.setattr(runtime, 'is_main_process', lambda: False)
    monkeypatch.setattr(runtime, 'any_rank', lambda flag, device: True)
    with contextlib.ExitStack() as stack, pytest.raises(utils.UserError, match='rank 0 could not lock'):
        runfolder.lock_for_every_rank(stack, run, torch.device('cpu'))


def test_only_training_removes_temporaries_and_only_plain_files(tmp_path):
    """A command that does not train holds no lock: a save may be under way, its temporary file is
    left alone. Training removes the temporary files, not a link or a folder of that name."""
    from types import SimpleNamespace
    run = tmp_path / 'r'
    run.mkdir()
    outside = tmp_path / 'kept.pth.tar'
    outside.write_bytes(b'kept')
    (run / '.tmp-save').write_bytes(b'\0' * 64)
    (run / 'c.pth.tar.tmp').write_bytes(b'\0' * 64)
    (run / '.tmp-folder').mkdir()
    os.symlink(outside, run / '.tmp-link')
    args = SimpleNamespace(test=False, resume=None, overwrite=False)
    with runfolder.prepare(str(run), args, training=False, device=torch.device('cpu')):
        pass
    assert sorted(os.listdir(run)) == ['.tmp-folder', '.tmp-link', '.tmp-save', 'c.pth.tar.tmp']
    runfolder.remove_stale_temporaries(str(run))
    assert sorted(os.listdir(run)) == ['.tmp-folder', '.tmp-link'] and outside.read_bytes() == b'kept'
