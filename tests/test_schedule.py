"""The learning-rate schedule of a training run: StepLR every --step_size epochs by --decay_rate, and
ASEN++'s stage rates (stage 2: the local branch at --lr, the global branch at --lr-global)."""
import json

import pytest

import asen
from conftest import TINY
from lib import commands, engine, evaluation


@pytest.fixture()
def no_training(monkeypatch):
    """Epochs that train nothing and score 0.5, so that a run is its schedule and its snapshots;
    records the learning rates of every parameter group at the start of each epoch."""
    rates = []

    def epoch(tnet, loader, optimizer, *args, **kwargs):
        rates.append([group['lr'] for group in optimizer.param_groups])
        return {'train_loss': 0.0, 'train_acc': 0.0}

    def score(net, evaluation_set, device, args):
        return evaluation.Scores({name: 0.5 for name in evaluation_set.attributes}, 0.5), None
    monkeypatch.setattr(engine, 'train_one_epoch', epoch)
    monkeypatch.setattr(commands, 'evaluate', score)
    return rates


def logged_rates(workdir, name):
    lines = (workdir / 'runs' / name / 'metrics.jsonl').read_text().splitlines()
    return [json.loads(line)['lr'] for line in lines]


def test_steplr_decays_every_step_size_epochs_by_the_decay_rate(workdir, no_training):
    assert asen.main(TINY + ['--epochs', '5', '--lr', '0.01', '--step_size', '2', '--decay_rate', '0.5',
                             '--name', 'steps']) == 0
    # the rate each epoch trained with, then the rate after each epoch's scheduler step (metrics.jsonl)
    assert [r[0] for r in no_training] == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])
    assert logged_rates(workdir, 'steps') == pytest.approx([0.01, 0.005, 0.005, 0.0025, 0.0025])


def test_the_default_schedule_is_the_papers(workdir, no_training):
    """lr 1e-4, decayed by 0.985 after every epoch (Maryeon/asen's defaults)."""
    assert asen.main(TINY + ['--epochs', '3', '--name', 'paper']) == 0
    assert logged_rates(workdir, 'paper') == pytest.approx([1e-4 * 0.985, 1e-4 * 0.985 ** 2, 1e-4 * 0.985 ** 3])


def test_asenpp_stage_rates(workdir, no_training):
    """Stage 1: one group at --lr, StepLR 3 epochs x 0.9 (the authors' s1.yaml); stage 2: the local
    branch at --lr and the global branch with the attribute embedding at --lr-global, both decayed
    0.9 every epoch (s2.yaml)."""
    flags = ['--model', 'ASENpp', '--local-backbone', 'resnet18', '--lr', '0.001']
    assert asen.main(TINY + flags + ['--epochs', '4', '--name', 'pp']) == 0
    assert no_training == [pytest.approx(r) for r in [[0.001]] * 3 + [[0.001 * 0.9]]]
    no_training.clear()
    assert asen.main(TINY + flags + ['--stage', '2', '--epochs', '2', '--lr-global', '0.0001',
                                     '--resume', 'runs/pp/model_best.pth.tar']) == 0
    assert no_training == [pytest.approx([0.001, 0.0001]), pytest.approx([0.001 * 0.9, 0.0001 * 0.9])]
