"""Each tested checkpoint has its own results: --test, --visualize and --retrieve of a file outside
runs/ with no --name write to runs/<the file's name>/ (config.name_after_checkpoint), so several
downloaded checkpoints are tested one after another; a file in a run folder keeps its run's."""
import json
import os
import shutil

import pytest

import asen
from lib import config
from helpers import file_hash


@pytest.mark.parametrize('path, name', [
    ('their_asen.pth.tar', 'their_asen'),
    ('downloads/asenv2_fashionai.pth', 'asenv2_fashionai'),
    ('downloads/fashionai/model_best.pth.tar', 'fashionai-model_best'),     # our snapshot's name: its folder
    ('downloads/darn/checkpoint.pth.tar', 'darn-checkpoint'),
    ('downloads/darn/step.pth.tar', 'darn-step'),
    ('downloads/darn/interrupted.pth.tar', 'darn-interrupted'),
    ('weights', 'weights'),
    ('downloads/.pth', '.pth'),                                             # a suffix alone is the name
])
def test_the_folder_is_named_after_the_file(path, name):
    assert config.checkpoint_run_name(path) == name


def test_a_file_in_a_run_folder_keeps_its_runs_name(workdir):
    assert config.in_a_run_folder('runs/shared/model_best.pth.tar')
    assert config.in_a_run_folder('/elsewhere/runs/shared/model_best.pth.tar')
    assert not config.in_a_run_folder('downloads/model_best.pth.tar')
    assert not config.in_a_run_folder('runs/model_best.pth.tar')          # runs/ itself is no run folder


@pytest.mark.slow
def test_two_checkpoints_outside_runs_tested_one_after_the_other(trained_copy, capsys):
    """A.pth.tar then B.pth.tar (the authors' files, say): both results kept, each in its own folder
    naming its file; the run they were saved by (runs/shared) is untouched; testing A again
    replaces A's own result only; --name still wins; --visualize the same."""
    root, run = trained_copy
    downloads = root / 'downloads'
    downloads.mkdir()
    shutil.copy(run / 'checkpoint.pth.tar', downloads / 'A.pth.tar')
    shutil.copy(run / 'model_best.pth.tar', downloads / 'B.pth.tar')
    before = {p.name: file_hash(p) for p in run.iterdir() if p.is_file()}
    for name in ('A', 'B'):
        assert asen.main(['--test', '--resume', os.path.join('downloads', f'{name}.pth.tar')]) == 0
        assert f"writing to {os.path.join('runs', name)}{os.sep}" in capsys.readouterr().out
    results = {name: json.loads((root / 'runs' / name / 'test_results.json').read_text()) for name in 'AB'}
    assert {name: os.path.basename(r['checkpoint']) for name, r in results.items()} == \
        {'A': 'A.pth.tar', 'B': 'B.pth.tar'}
    assert before == {p.name: file_hash(p) for p in run.iterdir() if p.is_file()}
    assert not (run / 'test_results.json').exists()
    # A again: its own result, replaced by the same file's
    assert asen.main(['--test', '--resume', 'downloads/A.pth.tar']) == 0
    assert json.loads((root / 'runs' / 'B' / 'test_results.json').read_text()) == results['B']
    # an explicit --name wins
    assert asen.main(['--test', '--resume', 'downloads/B.pth.tar', '--name', 'mine']) == 0
    assert (root / 'runs' / 'mine' / 'test_results.json').exists()
    capsys.readouterr()
    assert asen.main(['--visualize', '--resume', 'downloads/B.pth.tar']) == 0
    assert os.path.join('runs', 'B', 'heatmaps', 'attention_test.png') in capsys.readouterr().out
    assert (root / 'runs' / 'B' / 'heatmaps' / 'attention_test.png').exists()
