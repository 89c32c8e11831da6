"""The bad-input table: what a careless user may type or leave on disk, one case a row.

Each case runs on a private copy of the shared tiny data and trained run (conftest `trained_run`;
large files hard-linked, small ones copied) and asserts: the exit code, exactly one line on stderr
that starts with 'error:' and holds no traceback, the words that name the culprit, that every file
there before the command is byte-identical after it, and that no temporary file is left behind.
Most cases stop in the flag or data validation, before any training; a few train one epoch to
fail while saving. `python -m pytest -q tests/test_bad_input.py` runs the table.
"""
import errno
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lib import analysis
from lib import images
import asen
import datasets
import losses
import synthfashion
import utils
from helpers import (BEST, NEW, RETRIEVE, SHARED, SYNTH, TEST, TINY, assert_kept, assert_one_line_error, check_case,
                     disk_full_on, link_or_copy, meter_rows, no_training, read_only_run_dir, run_cli, step_position,
                     tree_hashes)
from lib import engine, inputs, runfolder
# no_training skips optimizer.step(), so the scheduler's step warns; that is the stub's doing
pytestmark = pytest.mark.filterwarnings('ignore:Detected call of:UserWarning')


# ----------------------------------------------------------------------------- case set-ups

def nothing(w):
    pass


def blank_filenames_line(w):
    w.edit_line(f'{SYNTH}/filenames_train.txt', 5, '')


def latin1_label_file(w):
    rel = f'{SYNTH}/label_train.txt'
    data = w.path(rel).read_bytes().split(b'\n')
    data[2] = data[2] + b' \xe9'
    w.replace(rel, b'\n'.join(data))


def latin1_filenames(w):
    rel = f'{SYNTH}/filenames_valid.txt'
    w.replace(rel, w.path(rel).read_bytes().replace(b'000003', b'00000\xe9', 1))


def empty(rel):
    return lambda w: w.replace(rel, '')


def unreadable_image(index):
    return lambda w: w.replace(w.image('train', index), b'not a jpeg at all')


def cut_jpeg(w):
    rel = w.image('train', 2)
    data = w.path(rel).read_bytes()
    w.replace(rel, data[:len(data) // 2])


def float_image(w):
    rel = w.image('valid', 0)
    w.path(rel).unlink()
    Image.fromarray(np.full((40, 40), 0.5, dtype=np.float32), 'F').save(w.path(rel), format='TIFF')


def all_queries_bad(w):
    for line in w.lines(f'{SYNTH}/query_valid.txt'):
        w.replace(w.image('valid', int(line.split()[0])), b'broken')


def attribute_out_of_range(w):
    w.edit_line(f'{SYNTH}/query_valid.txt', 1, '0 7 0')


def meta_elsewhere(w):
    """A dataset whose meta.json entry is data/meta.json (two attributes), not data/<Dataset>/meta.json."""
    shutil.copytree(w.path(SYNTH), w.path('data/DARN'), copy_function=link_or_copy)
    w.path('data/DARN/meta.json').unlink()
    w.replace('data/meta.json', json.dumps({'DARN': {'ATTRIBUTES': ['a', 'b'],
                                                      'ATTRIBUTES_NUM': {'a': 4, 'b': 4}}}))


def bad_meta_json(w):
    w.replace(f'{SYNTH}/meta.json', '{"SynthFashion": ')


def foreign_synth_folder(w):
    """data/ holds a SynthFashion/ the generator did not make (no marker, no settings.json)."""
    w.replace('mine/SynthFashion/notes.txt', 'my own notes')


def synth_folder_is_a_file(w):
    w.replace('mine/SynthFashion', 'a file')


def damaged_settings_not_ours(w):
    w.replace('mine/SynthFashion/settings.json', '{not json')


def run_dir_is_a_file(w):
    w.replace('runs/new', 'a file in the way')


def runs_is_a_file(w):
    shutil.rmtree(w.path('runs'))
    w.replace('runs', 'a file in the way')


def read_only_run_dir_in(w):
    """runs/new is a folder nobody may write in (helpers.read_only_run_dir)."""
    read_only_run_dir(w.root)


def locked_run_dir(w):
    """Another process trains in runs/new: it holds the lock (a second open file description of
    it in this process conflicts the same way)."""
    w.path('runs/new').mkdir()
    handle = open(w.path('runs/new/.lock'), 'a')
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    w.handles.append(handle)


def snapshots_in(name):
    def setup(w):
        shutil.copytree(w.path('runs/shared'), w.path(f'runs/{name}'), copy_function=link_or_copy)
    return setup


STEPPED = TINY + ['--epochs', '1', '--heatmap-every', '1', '--name', 'stepped', '--resume', 'auto']


def step_snapshot_with(**changes):
    """runs/stepped/step.pth.tar: the shared run's snapshot made a step snapshot of epoch 1 after
    step 2 of 3 (16 triplets seen), then `changes` to its entries ('epoch' the snapshot's own)."""
    def setup(w):
        entries = dict(changes)             # a copy: the same case may be set up again (a second session)
        state = torch.load(w.path(SHARED), weights_only=True)
        state['epoch'] = entries.pop('snapshot_epoch', 0)
        step = entries.pop('step', step_position(1, 2, meter_rows(16)))
        if isinstance(step, dict):
            step.update(entries)
        state['step'] = step
        w.path('runs/stepped').mkdir(parents=True)
        torch.save(state, w.path('runs/stepped/step.pth.tar'))
    return setup


def pickled_list_snapshot(w):
    w.path('runs/listed').mkdir(parents=True)
    torch.save([1, 2, 3], w.path('runs/listed/checkpoint.pth.tar'))


def gallery_folder(files):
    def setup(w):
        w.path('gallery').mkdir()
        for name in files:
            w.replace(f'gallery/{name}', 'x')
    return setup


def disk_full_on_fsync(w):
    def fail(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    w.mp.setattr(utils.os, 'fsync', fail)


def disk_full_generating(w):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    w.mp.setattr(synthfashion, '_write_split_files', fail)


def ctrl_c_in_training(w):
    """A KeyboardInterrupt in the first epoch that no stop signal served (raised by code, not by
    Ctrl-C, which the stop signals handle): nothing is saved for it."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    w.mp.setattr(engine, 'train_one_epoch', interrupt)


def ctrl_c_while_loading(w):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    w.mp.setattr(inputs, 'prepare_dataset', interrupt)


# ----------------------------------------------------------------------------- the table

def checkpoint_with_bad_margin(w):
    """A snapshot whose saved settings hold --margin -5 (written by an older version)."""
    state = torch.load(w.path(SHARED), weights_only=True)
    state['args']['margin'] = -5.0
    w.path('old').mkdir()
    torch.save(state, w.path('old/c.pth.tar'))


def short_regions(w):
    w.replace(f'{SYNTH}/regions_test.txt', '\n'.join(w.lines(f'{SYNTH}/regions_test.txt')[:-1]) + '\n')


def damaged_regions(w):
    w.edit_line(f'{SYNTH}/regions_test.txt', 3, '1 2 3')


def nan_loss(w):
    """A diverged loss: NaN, with its graph (the step runs backward before the deferred check)."""
    triplet_loss = losses.triplet_loss
    w.mp.setattr(losses, 'triplet_loss', lambda *args: triplet_loss(*args) * float('nan'))


def case(name, argv, needles, setup=nothing, code=2, allow=(), absent=()):
    """`needles` must be in the error line, `absent` must not; files named in `allow` may change."""
    return pytest.param(argv, setup, needles, code, allow, absent, id=name)


RANGE = 'must be'
CASES = [
    # flags out of range: one line naming the flag and the range, before anything is read or written
    case('decay_rate-nan', NEW + ['--decay_rate', 'nan'], ['--decay-rate', 'nan', '(0, 1]']),
    case('decay_rate-negative', NEW + ['--decay_rate', '-1'], ['--decay-rate', '(0, 1]']),
    case('decay_rate-zero', NEW + ['--decay_rate', '0'], ['--decay-rate', '(0, 1]']),
    case('decay_rate-above-1', NEW + ['--decay_rate', '1.5'], ['--decay-rate', '(0, 1]']),
    case('margin-negative', NEW + ['--margin', '-5'], ['--margin', '> 0']),
    case('margin-nan', NEW + ['--margin', 'nan'], ['--margin', 'finite']),
    case('margin-zero', NEW + ['--margin', '0'], ['--margin', '> 0']),
    case('lr-nan', NEW + ['--lr', 'nan'], ['--lr', 'finite']),
    case('lr-inf', NEW + ['--lr', 'inf'], ['--lr', 'finite']),
    case('lr-zero', NEW + ['--lr', '0'], ['--lr', '> 0']),
    case('img-size-7', NEW + ['--img-size', '7'], ['--img-size', 'from 32 to 4096', '2x2']),
    case('img-size-31', NEW + ['--img-size', '31'], ['--img-size', 'from 32 to 4096']),
    case('name-empty', NEW + ['--name', ''], ['--name', 'folder name']),
    case('name-with-slash', NEW + ['--name', 'a/b'], ['--name', "no '/'"]),
    case('name-dotdot', NEW + ['--name', '..'], ['--name', 'folder name']),
    case('name-dot', NEW + ['--name', '.'], ['--name', 'folder name']),
    case('synth-images-39', NEW + ['--synth-images', '39'], ['--synth-images', 'from 40 to']),
    case('synth-images-zero', NEW + ['--synth-images', '0'], ['--synth-images', 'from 40 to']),
    case('start-epoch-beyond-epochs', NEW + ['--start_epoch', '5', '--epochs', '3'], ['--start_epoch 5', '--epochs']),
    case('start-epoch-zero', NEW + ['--start_epoch', '0'], ['--start-epoch', '>= 1']),
    case('epochs-zero', NEW + ['--epochs', '0'], ['--epochs', 'from 1 to 100000']),
    case('workers-negative', NEW + ['--workers', '-1'], ['--workers', 'from 0 to 256']),
    case('log-interval-zero', NEW + ['--log-interval', '0'], ['--log-interval', '>= 1']),
    case('seed-negative', NEW + ['--seed', '-1'], ['--seed', 'from 0']),
    case('seed-too-large', NEW + ['--seed', str(2**64)], ['--seed', '2**63-1']),
    case('batch-size-zero', NEW + ['--batch-size', '0'], ['--batch-size', 'from 1 to 65536']),
    case('num-triplets-zero', NEW + ['--num_triplets', '0'], ['--num-triplets', 'from 1 to 100000000']),
    case('dim-embed-zero', NEW + ['--dim_embed', '0'], ['--dim-embed', 'from 1 to 65536']),
    case('step-size-zero', NEW + ['--step_size', '0'], ['--step-size', '>= 1']),
    case('topk-zero', RETRIEVE + ['--topk', '0'], ['--topk', '>= 1']),
    case('lr-not-a-number', NEW + ['--lr', 'fast'], ['--lr', 'invalid float']),
    case('epochs-not-whole', NEW + ['--epochs', '1.5'], ['--epochs', 'invalid int']),
    case('amp-unknown', NEW + ['--amp', 'fp8'], ['--amp', 'fp8']),
    case('unknown-flag', NEW + ['--learning-rate', '1'], ['--learning-rate']),
    # empty paths (an unset shell variable) and flags that do nothing without --retrieve
    case('resume-empty', NEW + ['--resume', ''], ['--resume', 'empty']),
    case('retrieve-empty', TEST + ['--retrieve', ''], ['--retrieve', 'empty']),
    case('data-path-empty', NEW + ['--data_path', ''], ['--data-path', 'empty']),
    case('data-path-is-a-file', NEW + ['--data_path', 'runs/shared/args.json'], ['--data_path', 'not a folder']),
    case('name-too-long', NEW[:-1] + ['n' * 300], ['cannot create the run folder', 'too long']),
    case('topk-without-retrieve', TEST + ['--topk', '3'], ['--topk', '--retrieve']),
    case('attribute-without-retrieve', TEST + ['--attribute', 'colour'], ['--attribute', '--retrieve']),
    case('gallery-without-retrieve', TEST + ['--gallery', 'data'], ['--gallery', '--retrieve']),
    # commands that need something else
    case('test-without-resume', ['--test'], ['--test needs --resume']),
    case('visualize-without-resume', ['--visualize'], ['--visualize needs --resume']),
    case('retrieve-without-attribute', ['--resume', BEST, '--retrieve', 'x.jpg'], ['--attribute']),
    case('retrieve-unknown-attribute', RETRIEVE[:-1] + ['hemline'], ['--attribute', 'hemline', 'colour']),
    case('retrieve-missing-image', RETRIEVE[:4] + ['nope.jpg', '--attribute', 'colour'], ['--retrieve', 'nope.jpg']),
    case('gallery-missing', RETRIEVE + ['--gallery', 'nowhere'], ['--gallery', 'nowhere']),
    case('gallery-without-images', RETRIEVE + ['--gallery', 'gallery'], ['--gallery', 'no images'],
         gallery_folder(['notes.txt'])),
    case('resume-missing-file', ['--resume', 'runs/shared/nope.pth.tar'], ['nope.pth.tar', 'no such file']),
    case('resume-a-folder', ['--test', '--resume', 'runs/shared'], ['runs/shared', 'is a folder']),
    case('resume-with-bad-saved-settings', ['--resume', 'old/c.pth.tar', '--epochs', '2'],
         ['--margin -5', 'from --resume old/c.pth.tar'], checkpoint_with_bad_margin),
    case('resume-finished-run', ['--resume', SHARED, '--epochs', '1'], ['epoch 1', '--epochs', 'nothing to train']),
    # the rule of lib/runfolder.py: one run a folder
    case('resume-of-another-dataset', ['--resume', SHARED, '--epochs', '2', '--dataset', 'DARN'],
         ['--dataset', "'SynthFashion'", "'DARN'", 'another run']),
    # damaged step snapshots (--resume auto): checked whole, against the run's own sizes, before anything is written
    case('step-entry-none', STEPPED, ["'step' is None", 'step.pth.tar'], step_snapshot_with(step=None)),
    case('step-entry-not-a-position', STEPPED, ["'step' is a list", 'step.pth.tar'], step_snapshot_with(step=[1, 2])),
    case('step-epoch-past-the-snapshot', STEPPED, ['step snapshot of epoch 5', 'weights of epoch 0'],
         step_snapshot_with(epoch=5)),
    case('step-epoch-past-epochs', STEPPED, ['epoch 1', '--epochs is 1', 'nothing to train'],
         step_snapshot_with(snapshot_epoch=1, epoch=2)),
    case('step-epoch-not-the-start-epoch', STEPPED + ['--epochs', '3', '--start_epoch', '2'],
         ['step snapshot of epoch 1', 'trains epochs 2 to 3'], step_snapshot_with()),
    case('step-batch-past-the-epoch', STEPPED, ['after step 7 of epoch 1', 'has 3 steps'],
         step_snapshot_with(batch=7, meters=meter_rows(24))),
    case('step-batch-zero', STEPPED, ["batch is 0", 'whole number >= 1'], step_snapshot_with(batch=0)),
    case('step-meters-garbage', STEPPED, ['meters', 'not those of 16 triplets'],
         step_snapshot_with(meters=meter_rows(999))),
    case('step-meters-accuracy-garbage', STEPPED, ['meters', 'not those of 16 triplets'],
         step_snapshot_with(meters=meter_rows(16, acc_sum=1e9))),
    case('step-meters-wrong-width', STEPPED, ['meters are (1, 3)', f'(1, {engine.meter_width()})'],
         step_snapshot_with(meters=torch.zeros(1, 3, dtype=torch.float64))),
    case('step-meters-not-a-tensor', STEPPED, ['meters are str'], step_snapshot_with(meters='garbage')),
    case('step-meters-not-finite', STEPPED, ['meters are not finite'],
         step_snapshot_with(meters=meter_rows(float('nan')))),
    case('step-world-mismatch', STEPPED, ['meters are (1,', '(2,'], step_snapshot_with(world=2)),
    case('resume-auto-of-a-pickled-list', NEW[:-1] + ['listed', '--resume', 'auto'],
         ['runs/listed/checkpoint.pth.tar', 'holds a list'], pickled_list_snapshot),
    case('overwrite-with-resume-auto', NEW + ['--resume', 'auto', '--overwrite'], ['--overwrite', '--resume auto']),
    # the run folder: never overwritten by accident, never written by two at once
    case('new-run-over-snapshots', NEW[:-1] + ['shared'], ['runs/shared', '--resume', '--overwrite']),
    case('default-name-twice', NEW[:-2], ['runs/ASEN', 'checkpoint.pth.tar', '--overwrite'], snapshots_in('ASEN')),
    case('resume-into-another-run', ['--resume', SHARED, '--epochs', '2', '--name', 'other'],
         ['runs/other', '--overwrite'], snapshots_in('other')),
    case('run-dir-is-a-file', NEW, ['runs/new', 'not a folder'], run_dir_is_a_file),
    case('runs-is-a-file', NEW, ['runs/new', 'cannot create'], runs_is_a_file),
    case('run-dir-read-only', NEW, ['runs/new', 'cannot write'], read_only_run_dir_in),
    case('test-into-read-only-run-dir', TEST + ['--name', 'new'], ['runs/new', 'cannot write'], read_only_run_dir_in),
    case('run-dir-locked', NEW, ['runs/new', 'another training process', '.lock'], locked_run_dir),
    # the data: every split file parsed and every image's header read before the first epoch
    case('blank-line-in-filenames', NEW, ['filenames_train.txt:5', 'blank line'], blank_filenames_line),
    case('not-utf8-label-file', NEW, ['label_train.txt:3', 'UTF-8'], latin1_label_file),
    case('not-utf8-filenames', NEW, ['filenames_valid.txt:4', 'UTF-8'], latin1_filenames),
    case('empty-query-file', NEW, ['query_valid.txt', 'no query entries'], empty(f'{SYNTH}/query_valid.txt')),
    case('empty-candidate-file', NEW, ['candidate_valid.txt', 'no candidate entries'],
         empty(f'{SYNTH}/candidate_valid.txt')),
    case('empty-test-queries', TEST, ['query_test.txt', 'no query entries'], empty(f'{SYNTH}/query_test.txt')),
    case('every-query-image-bad', NEW + ['--skip-bad-images'], ['query_valid.txt', '--skip-bad-images dropped'],
         all_queries_bad),
    case('undecodable-image', NEW, ['000001.jpg', 'unreadable', '--skip-bad-images'], unreadable_image(1)),
    case('jpeg-cut-short', NEW, ['000002.jpg', 'truncated', '--skip-bad-images'], cut_jpeg),
    case('float-image-mode', NEW, ['mode F', '8-bit'], float_image),
    case('attribute-out-of-range', NEW, ['query_valid.txt:1', 'attribute 7', 'data/SynthFashion/meta.json'],
         attribute_out_of_range),
    case('attribute-count-mismatch', TEST + ['--dataset', 'DARN'], ['attribute count', 'data/meta.json'],
         meta_elsewhere),
    case('damaged-regions-file', TEST, ['regions_test.txt', 'not a regions file', 'regenerate'], damaged_regions),
    case('regions-file-a-line-short', TEST, ['regions_test.txt', 'lines for', 'images in filenames_test.txt',
                                              'regenerate'], short_regions),
    case('meta-json-not-json', NEW, ['meta.json', 'not valid JSON'], bad_meta_json),
    case('synth-folder-not-ours', NEW + ['--data_path', 'mine'], ['mine/SynthFashion', 'did not write'],
         foreign_synth_folder),
    case('synth-folder-is-a-file', NEW + ['--data_path', 'mine'], ['mine/SynthFashion', 'not a SynthFashion'],
         synth_folder_is_a_file),
    case('synth-settings-damaged-not-ours', NEW + ['--data_path', 'mine'], ['mine/SynthFashion', 'did not write'],
         damaged_settings_not_ours),
    # the environment: one line, the last good snapshot kept, no temporary file left
    case('disk-full-saving-checkpoint', ['--resume', SHARED, '--epochs', '2', '--no-cuda'],
         ['checkpoint.pth.tar', 'No space left'],
         disk_full_on('save', RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0; '
                                           'No space left on device')), allow=('train.log', 'args.json')),
    case('disk-full-copying-model-best', NEW, ['model_best.pth.tar', 'No space left'],
         disk_full_on('copy', OSError(errno.ENOSPC, 'No space left on device'))),
    case('disk-full-writing-test-results', TEST, ['test_results.json', 'No space left'], disk_full_on_fsync,
         allow=('test.log',)),
    case('disk-full-generating-data', NEW + ['--data_path', 'fresh'], ['No space left', 'free disk space'],
         disk_full_generating, code=1),
    case('ctrl-c-in-training', NEW, ['interrupted (Ctrl-C)', 'files saved before are kept'], ctrl_c_in_training,
         code=130),
    case('ctrl-c-while-loading', NEW, ['interrupted'], ctrl_c_while_loading, code=130),
    # a non-finite loss in a new run: no snapshot to speak of, and no --amp to blame
    case('nan-loss-without-snapshot', NEW + ['--amp', 'off'], ['non-finite loss', 'no snapshot was written'],
         nan_loss, absent=['--amp', 'is kept']),
]


@pytest.mark.slow                   # the table as a whole: about half a minute of in-process cases
@pytest.mark.parametrize('argv, setup, needles, code, allow, absent', CASES)
def test_bad_input(world, capsys, argv, setup, needles, code, allow, absent):
    check_case(world, capsys, asen.main, argv, setup, needles, code, allow, absent)


# ----------------------------------------------------------------------------- a few as real processes

@pytest.mark.slow                   # real processes (a fresh interpreter each)
@pytest.mark.parametrize('argv, setup, needles', [
    (NEW + ['--decay_rate', 'nan'], nothing, ['--decay-rate']),
    (NEW, empty(f'{SYNTH}/query_valid.txt'), ['query_valid.txt']),
], ids=['flag', 'empty-query-file'])
def test_no_traceback_reaches_stderr(world, argv, setup, needles):
    setup(world)
    before = tree_hashes(world.root, logs=True)
    code, _, err = run_cli(argv, world.root)
    assert code == 2
    assert_one_line_error(code, err, *needles)
    assert_kept(before, tree_hashes(world.root, logs=True))


# ----------------------------------------------------------------------------- what is kept, what loads

def test_overwrite_and_resume_are_the_ways_out(world, capsys):
    """Refused without them; --resume of the run's own snapshot continues it; --overwrite starts over."""
    no_training(world)
    assert asen.main(['--resume', SHARED, '--epochs', '2', '--no-cuda']) == 0
    assert torch.load(SHARED, weights_only=True)['epoch'] == 2
    assert asen.main(NEW[:-1] + ['shared', '--overwrite']) == 0
    assert torch.load(SHARED, weights_only=True)['epoch'] == 1
    assert [json.loads(line)['epoch'] for line in open('runs/shared/metrics.jsonl')] == [1]


def test_a_crashed_run_leaves_no_lock(world):
    """flock dies with its process: a run killed while holding the lock does not block the next."""
    os.makedirs('runs/new')
    holder = ("import fcntl, os; f = open('runs/new/.lock', 'a'); "
              "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); os._exit(9)")
    assert subprocess.run([sys.executable, '-c', holder], cwd=world.root).returncode == 9
    with runfolder.run_lock('runs/new'):
        pass


def test_failed_append_is_taken_back(tmp_path, monkeypatch):
    """Half the line reaches the disk, then it is full: the half line is cut off again."""
    path = tmp_path / 'metrics.jsonl'
    utils.append_line(str(path), '{"epoch": 1}')

    class HalfThenFull:
        def __init__(self, name, mode, buffering):
            self.file = io.open(name, mode, buffering=buffering)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def seek(self, *args):
            return self.file.seek(*args)

        def truncate(self, size):
            return self.file.truncate(size)

        def write(self, data):
            if self.file.tell() == len('{"epoch": 1}\n'):
                return self.file.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(utils, 'open', HalfThenFull, raising=False)
    with pytest.raises(utils.UserError, match='No space left'):
        utils.append_line(str(path), '{"epoch": 2, "long": "' + 'x' * 100 + '"}')
    monkeypatch.undo()
    assert path.read_text() == '{"epoch": 1}\n'


def test_snapshots_keep_the_umask_mode(tmp_path):
    utils.save_atomic({'epoch': 1}, str(tmp_path / 'a.pth.tar'))
    utils.copy_atomic(str(tmp_path / 'a.pth.tar'), str(tmp_path / 'b.pth.tar'))
    for name in ('a.pth.tar', 'b.pth.tar'):
        assert (tmp_path / name).stat().st_mode & 0o777 == utils.NEW_FILE_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.pth.tar', 'b.pth.tar']


# ----------------------------------------------------------------------------- unusual image modes

def pixel(img):
    return tuple(np.asarray(img)[0, 0])


@pytest.mark.parametrize('mode, value, expected', [
    ('I;16', 30000, 117),          # 30000 * 255 / 65535 = 116.7: not clipped to white
    ('I;16', 65535, 255),
    ('I', 1000, 4),
])
def test_sixteen_bit_grey_is_scaled(tmp_path, mode, value, expected):
    path = tmp_path / 'grey.png'
    Image.fromarray(np.full((6, 6), value, dtype=np.uint16)).save(path)
    img = Image.open(path)
    if mode == 'I':
        img = img.convert('I')
    assert img.mode == mode
    assert pixel(images.to_rgb(img, path)) == (expected,) * 3
    if mode != 'I':
        assert pixel(images.load_image(path)) == (expected,) * 3


def test_transparency_is_laid_over_white(tmp_path):
    la = Image.fromarray(np.zeros((4, 4, 2), dtype=np.uint8), 'LA')        # black, fully transparent
    la.save(tmp_path / 'la.png')
    assert pixel(images.load_image(tmp_path / 'la.png')) == (255, 255, 255)
    palette = Image.new('P', (4, 4), 0)
    palette.putpalette([0, 0, 0] + [200, 0, 0] * 255)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / 'p.png', transparency=0)                       # index 0 (black) transparent
    rgb = np.asarray(images.load_image(tmp_path / 'p.png'))
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[1, 1]) == (200, 0, 0)


@pytest.mark.parametrize('mode', ['1', 'L', 'CMYK', 'P'])
def test_plain_modes_load_as_rgb(tmp_path, mode):
    Image.new(mode, (4, 4)).save(tmp_path / 'x.tif')
    img = images.load_image(tmp_path / 'x.tif')
    assert img.mode == 'RGB' and img.size == (4, 4)


# ----------------------------------------------------------------------------- caches and generated data

def test_retrieval_cache_rebuilt_when_damaged_or_an_image_changes(tmp_path):
    calls = []

    class Net(torch.nn.Module):
        def forward(self, images, attr):
            calls.append(len(images))
            return images.mean(dim=(2, 3))                                   # (N, 3)

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f'{i}.png'))
        Image.new('RGB', (8, 8), (40 * i, 0, 0)).save(paths[-1])
    ckpt = tmp_path / 'c.pth.tar'
    ckpt.write_bytes(b'x')
    transform = datasets.build_transform(8, train=False)
    args = (Net(), paths, 0, 'colour', transform, 8, torch.device('cpu'), str(ckpt), str(tmp_path / 'cache'))
    first, cached = analysis.gallery_embeddings(*args)
    assert not cached and analysis.gallery_embeddings(*args)[1]
    for cache in (tmp_path / 'cache').iterdir():
        cache.write_bytes(b'damaged')
    again, cached = analysis.gallery_embeddings(*args)
    assert not cached and torch.equal(again, first)
    Image.new('RGB', (8, 8), (0, 0, 250)).save(paths[1])                   # same name, new picture
    os.utime(paths[1], ns=(1, 1))
    changed, cached = analysis.gallery_embeddings(*args)
    assert not cached and not torch.equal(changed[1], first[1])


def test_synthfashion_replaces_only_its_own_folders(tmp_path):
    root = tmp_path / 'SynthFashion'
    small = dict(n_train=10, n_valid=10, n_test=10, image_size=32)
    synthfashion.generate(root, **small)
    assert (root / synthfashion.MARKER).is_file()
    assert synthfashion.ensure(root, **dict(small, seed=1))                 # ours: regenerated
    (root / synthfashion.MARKER).unlink()
    (root / 'settings.json').unlink()
    with pytest.raises(synthfashion.NotOurFolder):
        synthfashion.ensure(root, **small)
    assert (root / 'meta.json').is_file()
    empty_folder = tmp_path / 'empty' / 'SynthFashion'
    empty_folder.mkdir(parents=True)
    assert synthfashion.ensure(empty_folder, **small)                       # nothing to lose
