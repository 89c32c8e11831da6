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


# ----------------------------------------------------------------------------- the rule's parts, one by one

def folder_args(**given):
    from types import SimpleNamespace
    return SimpleNamespace(**dict(dict(overwrite=False, resume=None, start_epoch=1, test=False), **given))


def test_runfolder_a_new_run_is_told_the_snapshot_to_continue_from(tmp_path):
    from lib import runfolder
    from utils import UserError
    run = tmp_path / 'r'
    run.mkdir()
    (run / 'args.json').write_text('{}')
    runfolder.check_not_overwriting(str(run), folder_args())          # an attempt before its first snapshot
    (run / 'metrics.jsonl').write_text('{"epoch": 1}\n')
    with pytest.raises(UserError) as refused:                          # an attempt that recorded an epoch
        runfolder.check_not_overwriting(str(run), folder_args())
    assert 'continue it with' not in str(refused.value) and 'metrics.jsonl, args.json' in str(refused.value)
    (run / 'checkpoint.pth.tar').write_bytes(b'x')
    with pytest.raises(UserError, match=f'continue it with --resume {run}/checkpoint.pth.tar, '):
        runfolder.check_not_overwriting(str(run), folder_args())
    runfolder.check_recorded_run(str(run), folder_args(resume=str(run / 'checkpoint.pth.tar')), None)


def test_runfolder_a_torn_line_is_cut_and_its_size_returned(tmp_path):
    from lib import runfolder
    path = tmp_path / 'metrics.jsonl'
    assert runfolder.cut_torn_metrics_line(str(tmp_path)) == 0                 # no file
    path.write_bytes(b'')
    assert runfolder.cut_torn_metrics_line(str(tmp_path)) == 0
    path.write_bytes(b'{"epoch": 1}\n')
    assert runfolder.cut_torn_metrics_line(str(tmp_path)) == 0 and path.read_bytes() == b'{"epoch": 1}\n'
    path.write_bytes(b'{"epoch": 1}\n{"ep')
    assert runfolder.cut_torn_metrics_line(str(tmp_path)) == 4 and path.read_bytes() == b'{"epoch": 1}\n'


def test_runfolder_newest_epoch_reads_whole_epochs_only(tmp_path):
    from lib import runfolder
    assert runfolder.newest_epoch(str(tmp_path)) == 0                         # no metrics.jsonl
    path = tmp_path / 'metrics.jsonl'
    path.write_text('')
    assert runfolder.newest_epoch(str(tmp_path)) == 0
    path.write_text('{"epoch": true}\n{"epoch": "3"}\n[1]\nnot json\n')
    assert runfolder.newest_epoch(str(tmp_path)) == 0
    path.write_text('{"epoch": 2}\n{"epoch": 3}\n{"epoch": "9"}\n')
    assert runfolder.newest_epoch(str(tmp_path)) == 3


def test_runfolder_a_resume_may_not_go_back_in_its_own_folder(tmp_path):
    from lib import runfolder
    from utils import UserError
    run = tmp_path / 'r'
    run.mkdir()
    (run / 'metrics.jsonl').write_text('{"epoch": 1}\n')
    own, elsewhere = str(run / 'model_best.pth.tar'), str(tmp_path / 'model_best.pth.tar')
    runfolder.check_not_going_back(str(run), folder_args(resume=own, start_epoch=2))
    with pytest.raises(UserError, match='already recorded epoch 1'):
        runfolder.check_not_going_back(str(run), folder_args(resume=own, start_epoch=1))
    runfolder.check_not_going_back(str(run), folder_args(resume=own, start_epoch=1, overwrite=True))
    runfolder.check_not_going_back(str(run), folder_args(resume=elsewhere, start_epoch=1))


def test_runfolder_test_results_are_replaced_only_by_the_same_checkpoints(tmp_path, monkeypatch):
    from lib import runfolder
    from utils import UserError
    monkeypatch.chdir(tmp_path)
    run = tmp_path / 'r'
    run.mkdir()
    runfolder.check_test_results(str(run), folder_args(resume='a.pth.tar'))       # no earlier result
    (run / 'test_results.json').write_text(json.dumps({'checkpoint': str(tmp_path / 'a.pth.tar')}))
    runfolder.check_test_results(str(run), folder_args(resume='a.pth.tar'))       # the same file, relative
    runfolder.check_test_results(str(run), folder_args(resume='r/checkpoint.pth.tar'))    # this folder's
    with pytest.raises(UserError, match=f'of {tmp_path}/a.pth.tar, not of --resume b.pth.tar'):
        runfolder.check_test_results(str(run), folder_args(resume='b.pth.tar'))
    runfolder.check_test_results(str(run), folder_args(resume='b.pth.tar', overwrite=True))
    (run / 'test_results.json').write_text(json.dumps({'checkpoint': ''}))
    assert runfolder.tested_checkpoint(str(run / 'test_results.json')) is None
    with pytest.raises(UserError, match='of another model'):
        runfolder.check_test_results(str(run), folder_args(resume='b.pth.tar'))


def test_runfolder_write_test_results_moves_another_checkpoints_aside_only_when_told(tmp_path):
    from lib import runfolder
    runfolder.write_test_results({'checkpoint': 'a'}, str(tmp_path), overwrite=True)        # nothing to move
    runfolder.write_test_results({'checkpoint': 'b'}, str(tmp_path))                        # not told: replaced
    runfolder.write_test_results({'checkpoint': 'b', 'x': 1}, str(tmp_path), overwrite=True)  # the same one
    assert os.listdir(tmp_path) == ['test_results.json']
    runfolder.write_test_results({'checkpoint': 'c'}, str(tmp_path), overwrite=True)
    aside = [n for n in os.listdir(tmp_path) if n != 'test_results.json']
    assert len(aside) == 1 and json.loads((tmp_path / aside[0]).read_text()) == {'checkpoint': 'b', 'x': 1}


def test_runfolder_aside_names_count_up_from_2(tmp_path, monkeypatch):
    from lib import runfolder
    monkeypatch.setattr(runfolder.time, 'strftime', lambda fmt: '20260101-000000')
    base = str(tmp_path / 'r') + '.replaced-20260101-000000'
    assert runfolder.aside_name(str(tmp_path / 'r') + '/') == base
    os.mkdir(base)
    assert runfolder.aside_name(str(tmp_path / 'r')) == base + '-2'
    os.mkdir(base + '-2')
    assert runfolder.aside_name(str(tmp_path / 'r')) == base + '-3'


def test_runfolder_an_output_file_is_new_or_an_earlier_output(tmp_path):
    from lib import runfolder
    from utils import UserError
    path = str(tmp_path / 'out.json')
    runfolder.check_new_output(path, '--out')
    (tmp_path / 'out.json').write_text('{}')
    with pytest.raises(UserError, match='already exists'):
        runfolder.check_new_output(path, '--out')
    with pytest.raises(UserError, match='already exists'):
        runfolder.check_new_output(path, '--out', lambda p: False)
    runfolder.check_new_output(path, '--out', lambda p: True)
    with pytest.raises(UserError, match='is a folder'):
        runfolder.check_new_output(str(tmp_path), '--out', lambda p: True)
