"""The run-folder rule (lib/runfolder.py, docs/reliability.md): the same command line starts a run
with no snapshot yet, continues it from its newest snapshot, or returns at once (exit 0, one line,
nothing changed) when it has finished; another run's settings are refused in one line naming the
first setting that differs, for --resume auto and an explicit --resume alike."""
import json
import os

import pytest

import asen
from conftest import TINY
from lib import engine
from helpers import NEW, SHARED, assert_one_line_error, run_main, tree_hashes

pytestmark = pytest.mark.filterwarnings('ignore:Detected call of:UserWarning')

# the command line of conftest's trained run (runs/shared: one epoch, finished)
SHARED_RUN = TINY + ['--epochs', '1', '--name', 'shared', '--heatmap-every', '1']


def unchanged_but_the_lock(before, after):
    """Every file as it was, logs grown at most, nothing new but the run folder's .lock."""
    for rel, digest in before.items():
        assert after.get(rel, b'').startswith(digest) if rel.endswith('.log') else after.get(rel) == digest, rel
    assert [rel for rel in after if rel not in before and not rel.endswith('.lock')] == []


def skip_training(monkeypatch):
    monkeypatch.setattr(engine, 'train_one_epoch', lambda *args, **kwargs: {'train_loss': 0.5, 'train_acc': 0.5})


def test_requeue_of_a_finished_run_returns_at_once_and_changes_nothing(world, capsys):
    before = tree_hashes(world.root, logs=True)
    code, out, err = run_main(SHARED_RUN + ['--resume', 'auto'], capsys)
    assert code == 0 and err == '', err
    assert out.strip().count('\n') == 0 and 'already finished' in out and 'epoch 1 of --epochs 1' in out, out
    assert tree_hashes(world.root, logs=True) == before          # not even train.log grew


def test_a_larger_epochs_continues_the_finished_run(world, monkeypatch, capsys):
    skip_training(monkeypatch)
    assert run_main(SHARED_RUN[:-4] + ['--epochs', '2', '--name', 'shared', '--heatmap-every', '1',
                                       '--resume', 'auto'], capsys)[0] == 0
    assert [json.loads(line)['epoch'] for line in open('runs/shared/metrics.jsonl')] == [1, 2]


@pytest.mark.parametrize('resume', [['--resume', 'auto'], []], ids=['resume-auto', 'plain-rerun'])
def test_an_attempt_stopped_before_its_first_snapshot_starts_again(world, monkeypatch, capsys, resume):
    """args.json and train.log of the same run, no snapshot: the same command starts the run."""
    skip_training(monkeypatch)
    argv = NEW + resume
    settings = asen.resolve_configuration(argv).args.as_dict()
    settings['resume'] = None
    world.replace('runs/new/args.json', json.dumps(settings))
    world.replace('runs/new/train.log', 'an earlier attempt\n')
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    assert [json.loads(line)['epoch'] for line in open('runs/new/metrics.jsonl')] == [1]
    assert os.path.isfile('runs/new/checkpoint.pth.tar')
    assert not [name for name in os.listdir('runs') if '.replaced-' in name]


@pytest.mark.parametrize('resume', [['--resume', 'auto'], []], ids=['resume-auto', 'plain-rerun'])
def test_args_json_of_another_run_is_refused_naming_the_setting(world, capsys, resume):
    settings = asen.resolve_configuration(NEW).args.as_dict()
    settings['lr'] = 0.5
    world.replace('runs/new/args.json', json.dumps(settings))
    before = tree_hashes(world.root, logs=True)
    code, _, err = run_main(NEW + resume, capsys)
    assert_one_line_error(code, err, 'runs/new/args.json', 'another run', '--lr', '0.5', '--name')
    unchanged_but_the_lock(before, tree_hashes(world.root, logs=True))


def test_explicit_resume_with_another_dataset_is_refused(world, capsys):
    """The checkpoint's own folder holds its run: an explicit --resume of it on another dataset (here
    DeepFashion) would mix two datasets in one metrics.jsonl."""
    before = tree_hashes(world.root, logs=True)
    code, _, err = run_main(['--resume', SHARED, '--epochs', '2', '--dataset', 'DeepFashion'], capsys)
    assert_one_line_error(code, err, '--dataset', "'SynthFashion'", "'DeepFashion'", 'another run')
    unchanged_but_the_lock(before, tree_hashes(world.root, logs=True))


def test_explicit_resume_of_the_same_run_continues(world, monkeypatch, capsys):
    skip_training(monkeypatch)
    assert run_main(['--resume', SHARED, '--epochs', '2'], capsys)[0] == 0


def test_overwrite_with_resume_auto_is_refused(world, capsys):
    before = tree_hashes(world.root, logs=True)
    code, _, err = run_main(SHARED_RUN + ['--resume', 'auto', '--overwrite'], capsys)
    assert_one_line_error(code, err, '--overwrite', '--resume auto', 'drop one')
    assert tree_hashes(world.root, logs=True) == before


@pytest.mark.parametrize('resume', [['--resume', SHARED], ['--resume', 'auto', '--heatmap-every', '1', '--name',
                                                             'shared'] + TINY], ids=['resume', 'resume-auto'])
def test_a_torn_last_line_of_metrics_is_cut_before_the_next_record(world, monkeypatch, capsys, resume):
    """A record cut short (a process killed mid-append) is cut off; the next one gets its own line."""
    skip_training(monkeypatch)
    path = world.path('runs/shared/metrics.jsonl')
    first = path.read_text()
    world.replace('runs/shared/metrics.jsonl', first + '{"epoch": 2, "train_lo')
    code, _, err = run_main(resume + ['--epochs', '2'], capsys)
    assert code == 0, err
    lines = path.read_text().splitlines()
    assert lines[0] == first.strip() and [json.loads(line)['epoch'] for line in lines] == [1, 2]
    assert 'torn line' in world.path('runs/shared/train.log').read_text()
