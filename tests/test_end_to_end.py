"""A tiny SynthFashion run through the real entry point: train, test, resume, errors."""
import json
import os
import re
import types

import pytest

import asen
from conftest import TINY
from helpers import load, run_main
from lib import commands


def test_metrics_hold_the_epoch_means_the_log_shows(trained_run):
    """metrics.jsonl's train_loss and train_acc (a percent) are the epoch's means, which the last
    step's line shows as its running averages; the log ends with the training time."""
    _, run = trained_run
    metrics = json.loads((run / 'metrics.jsonl').read_text().splitlines()[-1])
    log = (run / 'train.log').read_text().splitlines()
    last_step = [line for line in log if 'Train Epoch: 1 [16/24]' in line][-1]      # 3 steps of 8
    loss, acc = re.search(r'Loss: \S+ \((\S+)\).*Acc: \S+% \((\S+)%\)', last_step).groups()
    assert metrics['train_loss'] == pytest.approx(float(loss), abs=5e-5)
    assert metrics['train_acc'] == pytest.approx(float(acc), abs=5e-3)
    assert log[-1].endswith(' - training time 0h 0min')                            # under a minute


def test_training_time_is_logged_in_hours_and_minutes(tiny_data, workdir, monkeypatch, capsys):
    """The run's last line: 3725 s of training (a stub clock) is 1 h 2 min."""
    clock = iter([1000.0, 4725.0])                       # train's start, then its end
    monkeypatch.setattr(commands, 'time', types.SimpleNamespace(time=lambda: next(clock)))
    assert asen.main(TINY + ['--data_path', str(tiny_data), '--epochs', '1', '--name', 'clock']) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(' - training time 1h 2min')


@pytest.mark.slow
def test_train_then_test_then_resume(workdir, capsys):
    assert asen.main(TINY + ['--epochs', '1', '--name', 'tiny']) == 0
    run = workdir / 'runs' / 'tiny'
    assert {'checkpoint.pth.tar', 'model_best.pth.tar', 'train.log', 'args.json',
            'metrics.jsonl'} <= set(os.listdir(run))
    log = (run / 'train.log').read_text()
    assert 'Train Epoch: 1 [0/24]' in log and 'sleeve_length mAP: ' in log and 'MeanAP: ' in log
    ckpt = load(run / 'checkpoint.pth.tar')
    assert ckpt['epoch'] == 1 and 0.0 <= ckpt['prec'] <= 1.0
    assert {'state_dict', 'optimizer', 'scheduler', 'best_prec', 'args', 'rng'} <= set(ckpt)

    # test with only the checkpoint: dataset, model and sizes come from it
    assert asen.main(['--test', '--resume', str(run / 'model_best.pth.tar')]) == 0
    result = json.loads((run / 'test_results.json').read_text())
    assert result['split'] == 'test' and set(result['mAP']) == {
        'sleeve_length', 'neckline_design', 'coat_length', 'colour', 'pattern'}
    assert 0 < result['Random MeanAP'] < 100
    assert 'Random MeanAP: ' in (run / 'test.log').read_text()

    # resume continues at the next epoch
    assert asen.main(['--resume', str(run / 'checkpoint.pth.tar'), '--epochs', '2']) == 0
    assert load(run / 'checkpoint.pth.tar')['epoch'] == 2
    assert 'Train Epoch: 2 [0/24]' in (run / 'train.log').read_text()
    assert len((run / 'metrics.jsonl').read_text().splitlines()) == 2


def test_missing_resume_is_a_one_line_error(workdir, capsys):
    code, _, err = run_main(['--test', '--resume', 'runs/nope/model_best.pth.tar'], capsys)
    assert code != 0
    assert 'Traceback' not in err
    assert err.strip().count('\n') == 0 and 'runs/nope/model_best.pth.tar' in err


def test_missing_dataset_is_a_one_line_error(workdir, capsys):
    code, _, err = run_main(['--dataset', 'FashionAI', '--no-pretrained'], capsys)
    assert code != 0 and 'Traceback' not in err
    assert 'data/FashionAI' in err and 'docs/datasets.md' in err     # the README's section is gone
