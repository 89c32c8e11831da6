"""The dataset check (asen.py --check-data, lib/datacheck.py) and what --skip-bad-images records:
the images the split files name that are missing or unreadable, per split and per attribute; the
share of a split that was scored, in test_results.json and the collected tables."""
import json
import os

import numpy as np
import pytest

import datasets
from conftest import TINY
from helpers import assert_one_line_error, private_copy, run_main, tree_hashes
from lib import datacheck, tables


@pytest.fixture()
def damaged(tiny_data, workdir):
    """A private copy of the tiny data with train image 0 missing and valid image 1 unreadable;
    returns (data folder, {split: bad ids})."""
    data = private_copy(tiny_data, workdir / 'data')
    root = data / 'SynthFashion'
    train = (root / 'filenames_train.txt').read_text().splitlines()
    valid = (root / 'filenames_valid.txt').read_text().splitlines()
    (root / train[0]).unlink()
    (root / valid[1]).unlink()
    (root / valid[1]).write_bytes(b'not an image')
    return data, {'train': {0}, 'valid': {1}, 'test': set()}


def expected_entries(split_files, bad):
    """{(split, role): {attribute: [bad, listed]}} counted from the split files directly."""
    expected = {}
    for split, role, name in datacheck.LISTS:
        counts = {a: [0, 0] for a in split_files.attributes}
        with open(split_files.path(name)) as f:
            lines = f.read().splitlines()
        for line in lines:
            fields = [int(f) for f in line.split()]
            for attr in fields[1::2]:
                counts[split_files.attributes[attr]][1] += 1
                counts[split_files.attributes[attr]][0] += fields[0] in bad[split]
        expected[split, role] = counts
    return expected


@pytest.mark.parametrize('workers', [0, 2])
def test_the_check_counts_per_split_and_attribute(damaged, workers):
    data, bad = damaged
    split_files = datasets.SplitFiles(str(data), 'SynthFashion')
    report = datacheck.check(split_files, workers)
    assert report['splits']['train'] == {'images': 48, 'missing': 1, 'unreadable': 0}
    assert report['splits']['valid'] == {'images': 12, 'missing': 0, 'unreadable': 1}
    assert report['splits']['test'] == {'images': 12, 'missing': 0, 'unreadable': 0}
    assert report['entries'] == expected_entries(split_files, bad)
    lines = datacheck.report_lines(report)
    assert any('2 image(s) cannot be used' in line and '--skip-bad-images' in line for line in lines)


def test_check_data_is_its_own_command_and_writes_nothing(damaged, workdir, capsys):
    before = tree_hashes(workdir)
    code, out, err = run_main(['--check-data', '--dataset', 'SynthFashion', '--workers', '0'], capsys)
    assert code == 0, err
    assert 'train' in out and 'missing' in out and '2 image(s) cannot be used' in out
    assert tree_hashes(workdir) == before
    assert not (workdir / 'runs').exists()


def test_check_data_of_a_whole_dataset(tiny_data, workdir, capsys):
    code, out, _ = run_main(['--check-data', '--dataset', 'SynthFashion', '--data_path', str(tiny_data),
                             '--workers', '0'], capsys)
    assert code == 0 and 'every listed image can be read' in out


def test_check_data_of_a_missing_dataset_is_one_line(workdir, capsys):
    code, _, err = run_main(['--check-data', '--dataset', 'DARN'], capsys)
    assert_one_line_error(code, err, 'data/DARN', 'not found', 'docs/datasets.md')
    assert not list(workdir.iterdir())


@pytest.mark.slow                   # a tiny training run and its test
def test_skip_bad_images_logs_the_check_and_records_the_share_scored(damaged, workdir, capsys):
    data, _ = damaged
    root = data / 'SynthFashion'
    query = int((root / 'query_test.txt').read_text().split()[0])       # a test query's image
    test_names = (root / 'filenames_test.txt').read_text().splitlines()
    (root / test_names[query]).unlink()
    argv = TINY + ['--epochs', '1', '--no-cuda', '--name', 'skip', '--skip-bad-images']
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    log = (workdir / 'runs' / 'skip' / 'train.log').read_text()
    assert 'dataset check of' in log and '3 image(s) cannot be used' in log
    code, out, err = run_main(['--test', '--resume', 'runs/skip/model_best.pth.tar', '--no-cuda',
                               '--skip-bad-images'], capsys)
    assert code == 0, err
    result = json.loads((workdir / 'runs' / 'skip' / 'test_results.json').read_text())
    listed = len((root / 'query_test.txt').read_text().splitlines())
    dropped = sum(int(line.split()[0]) == query for line in (root / 'query_test.txt').read_text().splitlines())
    assert result['scored']['queries'] == [listed - dropped, listed]
    assert result['scored']['share'] == pytest.approx((listed - dropped) / listed)
    assert '* scored on part of the split' in out
    table = tables.build_table(['runs/skip'])
    assert table['rows'][0]['scored_share'] == pytest.approx((listed - dropped) / listed)


@pytest.mark.parametrize('flags, scanned', [([], False), (['--skip-bad-images'], True)])
def test_the_dataset_is_scanned_before_training_only_with_skip_bad_images(tiny_data, caplog, flags, scanned):
    """Without --skip-bad-images a bad image stops the run when it is read: no scan of every image
    first (it reads the whole dataset), and nothing of it in the log."""
    import logging
    from lib import config, inputs
    args = config.from_flags(TINY + ['--data_path', str(tiny_data)] + flags)
    with caplog.at_level(logging.INFO, logger='asen'):
        inputs.prepare_dataset(args)
    assert any('dataset check of' in r.getMessage() for r in caplog.records) == scanned


def test_a_caller_without_skip_bad_images_gets_no_scan(tiny_data, caplog):
    """pretrain.py's settings have no --skip-bad-images: its data is never scanned first."""
    import argparse
    import logging
    from lib import inputs
    args = argparse.Namespace(data_path=str(tiny_data), dataset='SynthFashion', synth_images=48, test=False)
    with caplog.at_level(logging.INFO, logger='asen'):
        inputs.prepare_dataset(args)
    assert not any('dataset check of' in r.getMessage() for r in caplog.records)


def test_a_whole_split_records_no_share():
    class Set:
        def __init__(self, n, listed):
            self.n, self.listed = n, listed

        def __len__(self):
            return self.n
    from lib import evaluation
    whole = type('E', (), {'queries': Set(4, 4), 'candidates': Set(9, 9)})()
    part = type('E', (), {'queries': Set(3, 4), 'candidates': Set(9, 9)})()
    assert evaluation.scored_share(whole) is None
    assert evaluation.scored_share(part) == {'queries': [3, 4], 'candidates': [9, 9], 'share': 0.75}
    # every query scored (one), candidates left out: recorded, and the share is the queries' whole
    one_query = type('E', (), {'queries': Set(1, 1), 'candidates': Set(2, 3)})()
    assert evaluation.scored_share(one_query) == {'queries': [1, 1], 'candidates': [2, 3], 'share': 1.0}
    no_query = type('E', (), {'queries': Set(0, 0), 'candidates': Set(2, 3)})()
    assert evaluation.scored_share(no_query)['share'] == 0.0


def test_tables_mark_a_partly_scored_row():
    result = {'mAP': {'a': 50.0}, 'MeanAP': 50.0, 'attributes': ['a'], 'model': 'ASENet'}
    whole = tables.markdown_of_result(result)
    part = tables.markdown_of_result(dict(result, scored={'queries': [9, 10], 'candidates': [5, 5], 'share': 0.9}))
    assert '*' not in whole
    assert '| ASENet * |' in part and 'ASENet 90.0% of its queries' in part
    assert np.isclose(tables.table_of([('r', dict(result, scored={'share': 0.9}))])['rows'][0]['scored_share'], 0.9)


def test_the_scan_before_training_reuses_the_check_but_not_for_a_changed_image(damaged):
    from lib import images
    data, _ = damaged
    split_files = datasets.SplitFiles(str(data), 'SynthFashion')
    datacheck.check(split_files, 0)
    path = str(data / 'SynthFashion' / split_files.filenames('train')[1])
    assert images.image_problem(path) is None
    os.unlink(path)                                    # (maybe hard-linked to the shared data)
    with open(path, 'wb') as f:                        # cut short after the check: read again
        f.write(b'\xff\xd8\xff')
    assert images.image_problem(path) is not None
