"""torchrun with 2 CPU processes (gloo): training, one DDP step against one process, gathered evaluation,
an elastic restart after a killed worker."""
import json
import os
import re

import pytest
import torch
import torch.distributed as dist

import asen
from lib import runtime
import ddp_step
import losses
from conftest import ROOT, TINY
from helpers import FAITHFUL, assert_same_run, private_copy, tiny_tnet, torchrun
from lib import commands, engine

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason='torch.distributed with gloo is not available')

# No DataLoader workers under torchrun; 4 triplets a process and step: 12 a rank, 3 steps an epoch.
# --checkpoint-every 1 and --resume auto: the uninterrupted run of the elastic-restart test.
DDP_FLAGS = FAITHFUL + ['--workers', '0', '--batch-size', '4', '--checkpoint-every', '1', '--resume', 'auto']


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory, tiny_data):
    """(working dir, torchrun process) of one tiny epoch trained by 2 processes (runs/ddp)."""
    root = tmp_path_factory.mktemp('ddp')
    private_copy(tiny_data, root / 'data')                             # nothing to generate
    proc = torchrun([os.path.join(ROOT, 'asen.py'), *TINY, *DDP_FLAGS, '--epochs', '1', '--name', 'ddp'], root)
    return root, proc


@pytest.mark.slow
def test_torchrun_trains_evaluates_and_saves_once(ddp_run, monkeypatch):
    root, proc = ddp_run
    run = root / 'runs' / 'ddp'
    assert proc.stdout.count('Begin training on SynthFashion') == 1          # rank 0 alone logs
    assert proc.stdout.count('MeanAP: ') == 1
    assert 'DistributedDataParallel: 2 processes (gloo), 4 triplets per process and step' in proc.stdout
    assert 'Train Epoch: 1 [0/12]' in proc.stdout                           # 24 triplets, 12 a rank
    assert len((run / 'metrics.jsonl').read_text().splitlines()) == 1
    ckpt = torch.load(run / 'checkpoint.pth.tar', weights_only=True)
    single = tiny_tnet()
    assert list(ckpt['state_dict']) == list(single.state_dict())            # the unwrapped layout
    monkeypatch.chdir(root)
    assert asen.main(['--test', '--resume', str(run / 'checkpoint.pth.tar'), '--name', 'single']) == 0


@pytest.mark.slow
def test_torchrun_restart_after_a_killed_worker_continues_to_the_same_weights(ddp_run, tmp_path, tiny_data):
    """Rank 1 SIGKILLed after step 2 of 3 (tests/elastic_worker.py): torchrun --max-restarts 1
    starts both ranks again, --resume auto continues from rank 0's step snapshot, and the run ends
    as ddp_run's uninterrupted one."""
    root, _ = ddp_run
    private_copy(tiny_data, tmp_path / 'data')
    marker = tmp_path / 'killed.marker'
    proc = torchrun(['--max-restarts=1', os.path.join(ROOT, 'tests', 'elastic_worker.py'), '2', str(marker),
                     *TINY, *DDP_FLAGS, '--epochs', '1', '--name', 'killed'], tmp_path)
    assert marker.exists(), proc.stderr[-2000:]                       # the first attempt did die
    assert "--resume auto: --resume runs/killed/step.pth.tar" in proc.stdout
    assert_same_run(root / 'runs' / 'ddp', tmp_path / 'runs' / 'killed')


@pytest.mark.slow
def test_gathered_evaluation_equals_one_process(ddp_run, monkeypatch):
    """7 valid/test candidates per attribute are not all even: the shards are uneven and padded."""
    root, _ = ddp_run
    ckpt = str(root / 'runs' / 'ddp' / 'checkpoint.pth.tar')
    monkeypatch.chdir(root)
    assert asen.main(['--test', '--resume', ckpt, '--name', 'one']) == 0
    proc = torchrun([os.path.join(ROOT, 'asen.py'), '--test', '--resume', ckpt, '--name', 'two'], root)
    assert proc.stdout.count('Random MeanAP') == 1
    one = json.loads((root / 'runs' / 'one' / 'test_results.json').read_text())
    two = json.loads((root / 'runs' / 'two' / 'test_results.json').read_text())
    assert two['MeanAP'] == pytest.approx(one['MeanAP'], abs=1e-9)
    for name, value in one['mAP'].items():
        assert two['mAP'][name] == pytest.approx(value, abs=1e-9), name


@pytest.mark.slow
def test_a_run_folder_locked_by_another_process_stops_every_rank_at_once(tmp_path):
    """Rank 0 cannot lock runs/<name>/.lock (this process holds it): every rank stops with an
    error line, none waits for rank 0 at a barrier (60 minutes before the collective times out)."""
    import fcntl
    run = tmp_path / 'runs' / 'locked'
    run.mkdir(parents=True)
    with open(run / '.lock', 'a') as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = torchrun([os.path.join(ROOT, 'asen.py'), *TINY, *FAITHFUL, '--epochs', '1', '--name', 'locked'],
                        tmp_path, ok=False, timeout=120)
    assert proc.returncode != 0
    assert 'error: runs/locked is in use by another training process' in proc.stderr
    assert 'error: rank 0 could not lock the run folder runs/locked' in proc.stderr
    ours = re.compile(rf'File "{re.escape(ROOT)}/(?!\.venv/)')         # a frame of our code, not of a venv inside it
    assert not ours.search(proc.stderr)                      # no traceback of ours (torchrun prints its own)
    assert sorted(p.name for p in run.iterdir()) == ['.lock']


def assert_tensors_close(got, want, what, atol):
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=atol, msg=f'{what} {key}')


def assert_same_step(got, want):
    """Gradients to 1e-5 of the largest one (some, like the bias before a softmax, are float noise
    around 0); weights after one SGD step (lr 0.1) to 1e-6, a tenth of the gradient tolerance."""
    assert got['loss'] == pytest.approx(want['loss'], rel=1e-5)
    largest = max(g.abs().max().item() for g in want['grads'].values())
    assert_tensors_close(got['grads'], want['grads'], 'gradient', 1e-5 * largest)
    assert_tensors_close(got['weights'], want['weights'], 'weight', max(1e-6, 1e-6 * largest))


@pytest.fixture(scope='module')
def ddp_step_result(tmp_path_factory):
    out = tmp_path_factory.mktemp('step') / 'step.pt'
    torchrun([os.path.join(ROOT, 'tests', 'ddp_step.py'), str(out)], ROOT)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_ddp_step_with_frozen_batchnorm_equals_one_process_at_twice_the_batch(ddp_step_result):
    """Frozen BatchNorm makes each triplet's loss independent of its batch mates: 2 ranks x 4
    triplets must give the loss, gradients and SGD step (ddp_step.optimizer_of) of 1 process x 8
    triplets."""
    args = ddp_step.settings()
    tnet = ddp_step.network(True, args)
    optimizer = ddp_step.optimizer_of(tnet, args)
    loss = engine.train_one_epoch(tnet, ddp_step.loader(ddp_step.global_batch(), slice(None), 2 * ddp_step.BATCH),
                                   optimizer, torch.amp.GradScaler('cpu', enabled=False), torch.device('cpu'), 1, logger=runtime.silent_logger(),
    **commands.train_settings(args, tnet.embeddingnet))['train_loss']
    want, got = ddp_step.outcome(tnet, loss), ddp_step_result['frozen_bn']
    assert_same_step(got, want)
    assert not torch.equal(got['weights']['embeddingnet.feature_fc.weight'],
                           ddp_step.network(True, args).state_dict()['embeddingnet.feature_fc.weight'])


@pytest.mark.slow
def test_ddp_step_with_batchnorm_equals_the_mean_loss_of_the_two_halves(ddp_step_result):
    """Training-mode BatchNorm normalises each rank's half by that half's statistics (no
    SyncBatchNorm on CPUs), so the reference is one process computing the mean of the two halves'
    losses, each half in its own forward pass: same loss, averaged gradients, same SGD step."""
    args = ddp_step.settings()
    tnet = ddp_step.network(False, args)
    tnet.train()
    optimizer = ddp_step.optimizer_of(tnet, args)
    batch, total = ddp_step.global_batch(), 0.0
    optimizer.zero_grad()
    for rank in range(2):
        anchor, negative, positive, attr = (t[rank::2] for t in batch)
        out = tnet(anchor, negative, positive, attr)
        loss = losses.triplet_loss(out.sim_an, out.sim_ap, args.margin) / 2
        loss.backward()
        total += loss.item()
    optimizer.step()
    want, got = ddp_step.outcome(tnet, total), ddp_step_result['train_bn']
    assert_same_step(got, want)


def test_triplet_shards_partition_each_epochs_draw(tiny_data):
    """Rank r keeps triplets r, r + W, ... of the same (seed, epoch) draw; W shards of equal length
    cover the first num_triplets // W * W triplets exactly once."""
    import datasets
    split = datasets.SplitFiles(str(tiny_data), 'SynthFashion')
    transform = datasets.build_transform(32, train=False)
    full = datasets.TripletDataset(split, 11, transform, seed=4)
    full.set_epoch(3)
    shards = []
    for rank in range(3):
        shard = datasets.TripletDataset(split, 11, transform, seed=4)
        shard.shard(rank, 3)
        shard.set_epoch(3)
        shards.append(shard.triplets)
    assert [len(s) for s in shards] == [3, 3, 3]
    for rank, triplets in enumerate(shards):
        assert (triplets == full.triplets[rank:9:3]).all()


def test_nonfinite_loss_check_in_one_process():
    tracker = runtime.NonFiniteTracker(torch.device('cpu'))
    tracker.update(torch.tensor(0.5), 0)
    assert tracker.first_bad_batch() is None
    tracker.update(torch.tensor(float('nan')), 1)
    assert tracker.first_bad_batch() == 1
