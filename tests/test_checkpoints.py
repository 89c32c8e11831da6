"""Snapshots of a training run: model_best follows the best validation score only, and a resumed
run starts at the next epoch with the optimiser, schedule, scaler and RNGs of the snapshot."""
import random

import numpy as np
import pytest
import torch

import asen
import utils
from conftest import TINY
from helpers import load, step_position
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


def test_restore_needs_no_best_prec_and_the_schedule_steps_without_a_warning():
    """A snapshot without best_prec restores 0.0; the restored optimiser counts as stepped, so the
    schedule's first step warns of no 'lr_scheduler.step() before optimizer.step()'."""
    import warnings
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saved = {'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
             'scaler': torch.amp.GradScaler('cpu', enabled=False).state_dict(), 'rng': utils.rng_state()}
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh, step_size=1, gamma=0.5)
    assert checkpoints.restore_training_state(saved, fresh, fresh_scheduler,
                                              torch.amp.GradScaler('cpu', enabled=False)) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fresh_scheduler.step()
    assert checkpoints.restore_training_state(None, fresh, fresh_scheduler, None) == 0.0


def test_a_step_snapshot_holds_the_last_epoch_the_position_and_the_pass_rng():
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    args = type('Args', (), {'as_dict': lambda self: {'lr': 0.1}})()
    meters = torch.zeros(2, engine.meter_width(), dtype=torch.float64)
    pass_rng = {'python': 'state at the pass'}
    state = checkpoints.step_snapshot(3, 5, meters, pass_rng, 4, net, optimizer, scheduler,
                                      torch.amp.GradScaler('cpu', enabled=False), 0.5, args)
    assert state['epoch'] == 2 and state['prec'] is None and state['best_prec'] == 0.5 and state['args'] == {'lr': 0.1}
    assert state['rng'] == pass_rng and state['rng'] is not pass_rng            # no CUDA here: the pass's, copied
    assert state['step'] == {'epoch': 3, 'batch': 5, 'meters': meters, 'streams': 4, 'world': 2}
    assert checkpoints.progress(state) == (2, 5) and checkpoints.progress({'epoch': None}) == (0, 0)


def test_the_newest_snapshot_is_the_most_advanced_one(tmp_path):
    assert checkpoints.newest_snapshot(str(tmp_path)) is None
    assert checkpoints.last_snapshot_note(str(tmp_path)) == 'no snapshot was written yet'
    step = step_position(3, 5)
    torch.save({'epoch': 3, 'state_dict': {}}, tmp_path / 'checkpoint.pth.tar')
    torch.save({'epoch': 2, 'state_dict': {}, 'step': step}, tmp_path / 'step.pth.tar')
    path, loaded = checkpoints.newest_snapshot(str(tmp_path))
    assert path == str(tmp_path / 'checkpoint.pth.tar') and loaded['epoch'] == 3
    torch.save({'epoch': 3, 'state_dict': {}, 'step': dict(step, epoch=4)}, tmp_path / 'step.pth.tar')
    path, loaded = checkpoints.newest_snapshot(str(tmp_path))
    assert path == str(tmp_path / 'step.pth.tar') and loaded['step']['batch'] == 5
    assert checkpoints.last_snapshot_note(str(tmp_path)) == \
        f"the last good snapshot {tmp_path / 'checkpoint.pth.tar'} is kept"


def test_weights_are_finite_of_every_floating_tensor():
    net = torch.nn.Linear(2, 2)
    assert checkpoints.weights_are_finite(net) and checkpoints.weights_are_finite(torch.nn.ReLU())
    with torch.no_grad():
        net.bias[0] = float('nan')
    assert not checkpoints.weights_are_finite(net)


# ----------------------------------------------------------------------------- the checks of a loaded file (validate)

def a_snapshot(**changes):
    """A snapshot as training writes it (a Linear layer, Adam after one step), then `changes`."""
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    args = type('Args', (), {'as_dict': lambda self: {'lr': 0.1}})()
    state = checkpoints.snapshot(1, net, optimizer, scheduler, torch.amp.GradScaler('cpu', enabled=False), 0.5, 0.5,
                                 args)
    return dict(state, **changes)


def step_entry(**changes):
    """A step snapshot's position: epoch 2 after one step, then `changes`."""
    return {**step_position(2, 1), **changes}


def refusal(checkpoint):
    with pytest.raises(utils.UserError) as raised:
        checkpoints.validate(checkpoint, 'f.pth.tar')
    message = str(raised.value)
    assert message.startswith('--resume f.pth.tar: ') and '\n' not in message
    return message


def test_validate_accepts_what_training_and_the_authors_write():
    weights = {'embeddingnet.w': torch.ones(2), 'embeddingnet.n': torch.tensor([1, 2])}
    accepted = [
        a_snapshot(),
        a_snapshot(epoch=0, prec=None, best_prec=0.0),                          # a step snapshot's first epoch
        a_snapshot(optimizer=dict(a_snapshot()['optimizer'], param_groups=[{'params': [0, 1]}])),  # no lr saved
        a_snapshot(step=step_entry()),                                          # the smallest position
        a_snapshot(step=step_entry(meters=torch.zeros(1, engine.LEGACY_METER_ROW_WIDTH, dtype=torch.float64))),
        a_snapshot(epoch=None, step=step_entry(epoch=4)),                       # no epoch: no order to check
        {'epoch': 7, 'state_dict': weights, 'prec': 0.5},                       # Maryeon/asen's file
        {'epoch': 7, 'state_dict': weights, 'prec': torch.tensor(41.5)},        # ... with a tensor score
        {'epoch': 20, 'model': weights, 'mAP': 0.5},                            # Maryeon/asenpp's main.py
    ]
    for checkpoint in accepted:
        checkpoints.validate(checkpoint, 'f.pth.tar')


def test_validate_names_the_first_damaged_field():
    assert "'model' is missing, not a dict of tensors" in refusal({'epoch': 1})
    assert "'state_dict' is a list" in refusal({'state_dict': [1], 'epoch': 1})
    assert "'model' is a str" in refusal({'model': 'weights', 'mAP': 0.5})
    assert 'entry 3 is a Tensor' in refusal({'state_dict': {3: torch.ones(1)}})     # names are strings
    assert "'epoch' is tensor(3)" in refusal(a_snapshot(epoch=torch.tensor(3)))     # a whole number, not a tensor
    assert "'epoch' is 1.0" in refusal(a_snapshot(epoch=1.0))
    assert "'epoch' is True" in refusal(a_snapshot(epoch=True))
    assert "'prec' is tensor([1., 2.])" in refusal(a_snapshot(prec=torch.tensor([1.0, 2.0])))
    assert "'mAP' is inf" in refusal({'model': {}, 'mAP': float('inf')})
    assert "'args' are a dict, not a dict of flags" in refusal(a_snapshot(args={1: 'lr'}))
    optimizer = a_snapshot()['optimizer']
    assert "'optimizer' is not an optimiser state" in refusal(a_snapshot(optimizer=dict(optimizer, param_groups=[])))
    assert "optimiser's eps is inf" in refusal(a_snapshot(optimizer=dict(
        optimizer, param_groups=[dict(optimizer['param_groups'][0], eps=float('inf'))])))
    moments = {0: dict(optimizer['state'][0], exp_avg=torch.full((2, 3), float('nan')))}
    assert "optimiser's exp_avg is not finite" in refusal(a_snapshot(optimizer=dict(optimizer, state=moments)))
    assert "'scheduler' is a NoneType" in refusal(a_snapshot(scheduler=None))
    assert "'scaler' is a list" in refusal(a_snapshot(scaler=[]))
    assert "streams is 0" in refusal(a_snapshot(step=step_entry(streams=0)))
    assert "world is True" in refusal(a_snapshot(step=step_entry(world=True)))
    assert 'without batch, world' in refusal(a_snapshot(step={k: v for k, v in step_entry().items()
                                                                 if k not in ('batch', 'world')}))
    assert "meters are (1, 2, 9)" in refusal(a_snapshot(step=step_entry(meters=torch.zeros(1, 2, 9))))
    assert "meters are (1, 5)" in refusal(a_snapshot(step=step_entry(meters=torch.zeros(1, 5, dtype=torch.long))))


def test_checking_the_rng_states_leaves_the_generators_as_they_were():
    saved = a_snapshot()                                    # the RNG states of now
    malformed = a_snapshot(rng=dict(saved['rng'], torch=torch.zeros(3)))
    torch.rand(3), np.random.rand(), random.random()        # ... which the generators have left
    before = utils.rng_state()
    checkpoints.validate(saved, 'f.pth.tar')
    assert "'rng' are malformed" in refusal(malformed)
    after = utils.rng_state()
    assert torch.equal(after['torch'], before['torch']) and after['python'] == before['python']
    assert torch.equal(after['numpy'][1], before['numpy'][1]) and after['numpy'][2] == before['numpy'][2]
