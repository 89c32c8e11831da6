"""Snapshots of a training run: model_best follows the best validation score only, and a resumed
run starts at the next epoch with the optimiser, schedule, scaler and RNGs of the snapshot."""
import random

import numpy as np
import pytest
import torch

import asen
import utils
from conftest import TINY
from helpers import load
from lib import checkpoints, commands, engine, evaluation


@pytest.fixture()
def scored_epochs(monkeypatch):
    """Epochs that train nothing and score the next value of `scores` (a list the test fills)."""
    scores = []

    def epoch(*args, **kwargs):
        return {'train_loss': 0.0, 'train_acc': 0.0}

    def score(net, evaluation_set, device, args):
        total = scores.pop(0)
        return evaluation.Scores({name: total for name in evaluation_set.attributes}, total), None
    monkeypatch.setattr(engine, 'train_one_epoch', epoch)
    monkeypatch.setattr(commands, 'evaluate', score)
    return scores


@pytest.mark.parametrize('scores, best_epoch', [([0.5, 0.3, 0.4], 1), ([0.3, 0.5, 0.4], 2),
                                                ([0.3, 0.4, 0.5], 3), ([0.5, 0.5, 0.5], 1)])
def test_model_best_is_kept_only_on_improvement(workdir, scored_epochs, scores, best_epoch):
    scored_epochs.extend(scores)
    assert asen.main(TINY + ['--epochs', '3', '--name', 'best']) == 0
    best = load(workdir / 'runs' / 'best' / 'model_best.pth.tar')
    last = load(workdir / 'runs' / 'best' / 'checkpoint.pth.tar')
    assert best['epoch'] == best_epoch and best['prec'] == max(scores)
    assert last['epoch'] == 3 and last['prec'] == scores[-1] and last['best_prec'] == max(scores)


def test_resume_continues_at_the_next_epoch(trained_run, workdir, monkeypatch):
    """--resume of the one-epoch run trains epochs 2 and 3 only (its start_epoch)."""
    epochs = []
    monkeypatch.setattr(engine, 'train_one_epoch',
                        lambda tnet, loader, optimizer, scaler, device, epoch, **kw: epochs.append(epoch) or {'train_loss': 0.0, 'train_acc': 0.0})
    resolved = asen.resolve_configuration(['--resume', str(trained_run[1] / 'checkpoint.pth.tar'), '--epochs', '3'])
    assert resolved.args.start_epoch == 2 and resolved.checkpoint['epoch'] == 1
    assert asen.main(['--resume', str(trained_run[1] / 'checkpoint.pth.tar'), '--epochs', '3',
                      '--name', 'resumed', '--data_path', str(trained_run[0] / 'data')]) == 0
    assert epochs == [2, 3]


def test_restore_training_state_restores_optimiser_schedule_scaler_and_rngs():
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    utils.seed_everything(7)
    saved = {'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(),
             'rng': utils.rng_state(), 'best_prec': 0.25}
    draws = (random.random(), np.random.rand(), torch.rand(1).item())

    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh, step_size=1, gamma=0.5)
    best = checkpoints.restore_training_state(saved, fresh, fresh_scheduler, torch.amp.GradScaler('cpu', enabled=False))
    assert best == 0.25
    assert fresh.param_groups[0]['lr'] == 0.05 and fresh_scheduler.last_epoch == 1
    assert int(fresh.state_dict()['state'][0]['step']) == 1
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    assert checkpoints.restore_training_state({'state_dict': {}}, fresh, fresh_scheduler, None) == 0.0
