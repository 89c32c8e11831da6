"""The training step without host syncs, fused Adam, the backend switches and --eval-batch-size,
each checked against the plain code it replaces."""
import logging

import pytest
import torch

import losses as loss_terms
import model as models
from lib import runtime
import utils
from conftest import TINY
from helpers import FAITHFUL, InMemoryLoader, StandInNet, random_batches, tiny_tnet
from lib import commands, config, engine, inputs

CPU = torch.device('cpu')


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.slow
def test_device_accumulation_equals_a_per_step_item_loop():
    """Loss and accuracy read at the log interval and returned at the epoch's end equal those of
    the former loop, which read loss.item() and the accuracy every step (to 1e-12: both sum the
    same float32 values in float64)."""
    args = config.from_flags(TINY + FAITHFUL + ['--batch-size', '4', '--log-interval', '2'])
    data = random_batches(size=32)                   # 32 px: the equalities hold at any size

    tnet = tiny_tnet()
    optimizer = torch.optim.Adam(tnet.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    losses, accs, n = [], [], []
    tnet.train()
    for anchor, negative, positive, attr in data:                # the plain loop, a sync per step
        out = tnet(anchor, negative, positive, attr)
        sim_an, sim_ap = out.sim_an, out.sim_ap
        loss = loss_terms.triplet_loss(sim_an, sim_ap, args.margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accs.append((sim_ap > sim_an).float().mean().item())
        n.append(len(attr))
    want_loss = sum(v * k for v, k in zip(losses, n)) / sum(n)
    want_acc = sum(v * k for v, k in zip(accs, n)) / sum(n)
    want_params = [p.detach().clone() for p in tnet.parameters()]

    tnet = tiny_tnet()
    optimizer = torch.optim.Adam(tnet.parameters(), lr=1e-3)
    logger = logging.getLogger('test_training_step')
    logger.setLevel(logging.INFO)
    handler = Lines()
    logger.addHandler(handler)
    try:
        means = engine.train_one_epoch(tnet, InMemoryLoader(data), optimizer, scaler, CPU, 1, logger=logger,
                                       **commands.train_settings(args, tnet.embeddingnet))
    finally:
        logger.removeHandler(handler)
    assert list(means) == ['train_loss', 'train_acc', 'train_total']        # ASENet: no other term
    assert means['train_loss'] == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    assert means['train_acc'] == pytest.approx(want_acc, rel=1e-12, abs=1e-12)
    assert means['train_total'] == means['train_loss']                      # the total is the triplet loss
    for got, want in zip(tnet.parameters(), want_params):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # log lines at batches 0 and 2: the batch's values and the running averages so far
    run_loss = (losses[0] * 4 + losses[1] * 4 + losses[2] * 4) / 12
    run_acc = (accs[0] * 4 + accs[1] * 4 + accs[2] * 4) / 12
    assert handler.lines == [
        f'Train Epoch: 1 [0/14]\tLoss: {losses[0]:.4f} ({losses[0]:.4f}) \t'
        f'Acc: {100 * accs[0]:.2f}% ({100 * accs[0]:.2f}%) \ttotal: {losses[0]:.4f} ({losses[0]:.4f})',
        f'Train Epoch: 1 [8/14]\tLoss: {losses[2]:.4f} ({run_loss:.4f}) \t'
        f'Acc: {100 * accs[2]:.2f}% ({100 * run_acc:.2f}%) \ttotal: {losses[2]:.4f} ({run_loss:.4f})']


class Linear(StandInNet):
    """A one-layer embedding net, small enough to step by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc = torch.nn.Linear(12, 4)

    def forward(self, images, attribute, norm=True):
        return self.fc(images.flatten(1)) * (attribute[:, None] + 1)


def test_training_step_is_forward_objective_backward_and_one_step():
    """One step: the objective of the batch (its triplet loss and total, returned detached with the
    similarities) and one Adam step on its gradient alone; a second step does not accumulate the first's
    gradient."""
    gen = torch.Generator().manual_seed(4)
    data = [(*[torch.randn(3, 3, 2, 2, generator=gen) for _ in range(3)], torch.tensor([0, 1, 2]), None)
            for _ in range(2)]
    weights = loss_terms.LossWeights(0.5)
    plain = models.TripletWrapper(Linear())
    plain_opt = torch.optim.Adam(plain.parameters(), lr=0.05)
    want = []
    for anchor, negative, positive, attr, _ in data:
        out = plain(anchor, negative, positive, attr)
        loss = loss_terms.triplet_loss(out.sim_an, out.sim_ap, 0.5)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()
        want.append((loss.detach(), out.sim_an.detach(), out.sim_ap.detach()))
    tnet = models.TripletWrapper(Linear())
    optimizer = torch.optim.Adam(tnet.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    for batch, (loss, sim_an, sim_ap) in zip(data, want):
        got = engine.training_step(tnet, batch, optimizer, scaler, 'off', weights)
        assert list(got[0]) == ['triplet']
        assert not any(t.requires_grad for t in (*got[0].values(), *got[1:]))
        torch.testing.assert_close(got[0]['triplet'], loss, rtol=0, atol=0)
        torch.testing.assert_close(got[1], loss, rtol=0, atol=0)          # no extra terms
        torch.testing.assert_close(got[2], sim_an, rtol=0, atol=0)
        torch.testing.assert_close(got[3], sim_ap, rtol=0, atol=0)
    assert want[0][0] > 0.1                                              # the hinge is active
    for got, want_p in zip(tnet.parameters(), plain.parameters()):
        torch.testing.assert_close(got, want_p, rtol=0, atol=0)


def test_training_step_minimises_the_total():
    """The step follows the total, not the logged triplet loss: with a weighted extra term the
    returned total exceeds the triplet loss by the term, and the parameters move along its gradient."""
    class WithExtras(Linear):
        def train_outputs(self, images, attribute):
            emb = self.forward(images, attribute)
            return emb, {'unmasked': emb, 'mask': emb.abs()}
    gen = torch.Generator().manual_seed(5)
    batch = (*[torch.randn(3, 3, 2, 2, generator=gen) for _ in range(3)], torch.tensor([0, 1, 2]), None)
    weights = loss_terms.LossWeights(0.5, csn_embed=1.0, csn_mask=1.0)
    tnet = models.TripletWrapper(WithExtras())
    before = [p.detach().clone() for p in tnet.parameters()]
    out = tnet(*batch[:4])
    total, terms = loss_terms.objective(out, weights)
    triplet = terms['triplet']
    grads = torch.autograd.grad(total, list(tnet.parameters()))
    optimizer = torch.optim.SGD(tnet.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    got_terms, got_total, _, _ = engine.training_step(tnet, batch, optimizer, scaler, 'off', weights)
    loss = got_terms['triplet']
    assert float(got_total) == pytest.approx(float(total.detach())) and float(loss) == pytest.approx(float(triplet.detach()))
    assert list(got_terms) == ['triplet', 'csn_embed', 'csn_mask']
    assert float(got_total) == pytest.approx(float(loss + got_terms['csn_embed'] + got_terms['csn_mask']))
    assert float(got_total) > float(loss) + 0.1
    for p, p0, g in zip(tnet.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g)


def test_batch_to_device_with_and_without_originals():
    gen = torch.Generator().manual_seed(6)
    images = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3)]
    attr = torch.tensor([1, 0])
    anchor, negative, positive, got_attr, originals = engine.batch_to_device((*images, attr), CPU)
    assert originals is None and torch.equal(got_attr, attr)
    for got, want in zip((anchor, negative, positive), images):
        assert torch.equal(got, want) and got.is_contiguous()
    sources = [torch.full((2,), float(i)) for i in range(3)]
    *views, _, originals = engine.batch_to_device((*images, attr, *sources), CPU, channels_last=True)
    assert [o.tolist() for o in originals] == [s.tolist() for s in sources]
    for got, want in zip(views, images):
        assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)
        assert not got.is_contiguous()


def test_device_meter_reads_what_it_summed():
    meter = utils.DeviceMeter(CPU)
    for value, n in ((0.5, 4), (0.25, 2)):
        meter.update(torch.tensor(value), n)
    assert meter.read() == (0.25, pytest.approx((0.5 * 4 + 0.25 * 2) / 6, abs=1e-15))


def test_non_finite_tracker_keeps_the_first_bad_batch():
    tracker = runtime.NonFiniteTracker(CPU)
    tracker.update(torch.tensor(0.3), 0)
    assert tracker.first_bad_batch() is None
    for batch, value in ((1, 0.2), (2, float('inf')), (3, float('nan')), (4, 0.1)):
        tracker.update(torch.tensor(value), batch)
    assert tracker.first_bad_batch() == 2


def test_fused_adam_only_on_cuda():
    assert not runtime.fused_adam_supported(CPU) and runtime.fused_adam_supported(torch.device('cuda'))


@pytest.mark.skipif(not hasattr(torch, '_fused_adam_'), reason='no fused Adam in this torch')
def test_optimizer_state_crosses_between_fused_and_unfused():
    """A checkpoint of a GPU run (fused Adam) resumes with the CPU's default Adam and the reverse:
    the loaded optimizer keeps its own implementation switches and steps."""
    for saved_fused, fused in ((True, False), (False, True)):
        param = torch.nn.Parameter(torch.ones(3))
        source = torch.optim.Adam([param], lr=0.1, fused=saved_fused)
        param.grad = torch.ones(3)
        source.step()
        target_param = torch.nn.Parameter(torch.ones(3))
        target = torch.optim.Adam([target_param], lr=0.1, fused=fused)
        runtime.load_optimizer_state(target, source.state_dict())
        assert target.param_groups[0]['fused'] is fused
        assert float(target.state[target_param]['step']) == 1.0
        target_param.grad = torch.ones(3)
        target.step()
        assert float(target.state[target_param]['step']) == 2.0


@pytest.fixture()
def backends():
    """Restores the switches configure_backends touches."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved


def test_tf32_flags_set_the_backends_as_stated(backends):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    runtime.configure_backends(CPU, None)                       # neither flag: PyTorch's setting stays
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, False)
    runtime.configure_backends(CPU, True)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    runtime.configure_backends(CPU, False)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
    torch.backends.cudnn.benchmark = False
    runtime.configure_backends(CPU, None)
    assert torch.backends.cudnn.benchmark is False              # cuDNN autotuning is a CUDA matter
    runtime.configure_backends(torch.device('cuda'), None)      # sets a flag only; needs no GPU
    assert torch.backends.cudnn.benchmark is True


def test_embeddings_do_not_depend_on_the_eval_batch_size(tiny_data):
    """Evaluation-mode BatchNorm uses running statistics, so a batch's size changes only the float
    rounding of the convolutions: the valid split embedded 3 and 64 images at a time agrees to
    atol 1e-5 (unit-length fp32 embeddings)."""
    base = TINY + ['--data_path', str(tiny_data)] + FAITHFUL
    embeddings = []
    for size in (3, 64):
        args = config.from_flags(base + ['--eval-batch-size', str(size)])
        split_files = inputs.prepare_dataset(args)
        torch.manual_seed(0)
        net = commands.build_network(args, len(split_files.attributes), CPU).embeddingnet
        queries, _ = inputs.evaluation_of(split_files, 'valid', args, logging.getLogger('test')).datasets
        embeddings.append(engine.embed_split(net, queries, CPU, **commands.eval_settings(args)))
    assert len(embeddings[0]) > 3
    torch.testing.assert_close(embeddings[0], embeddings[1], rtol=0, atol=1e-5)


def test_compile_modes_for_training_and_evaluation(monkeypatch):
    """CUDA-graph modes compile the training step as asked; evaluation (partial batches of several
    sizes) gets the same mode without CUDA graphs; no --compile, no compiling."""
    modes = []
    monkeypatch.setattr(torch, 'compile', lambda module, mode: modes.append(mode) or module)
    for mode, eval_mode in (('default', 'default'), ('reduce-overhead', 'default'),
                            ('max-autotune', 'max-autotune-no-cudagraphs'),
                            ('max-autotune-no-cudagraphs', 'max-autotune-no-cudagraphs')):
        args = config.from_flags(['--compile', '--compile-mode', mode])
        engine.compiled(None, commands.compile_mode(args))
        engine.compiled(None, commands.compile_mode(args), evaluation_only=True)
        assert modes[-2:] == [mode, eval_mode]
    assert engine.compiled('net', commands.compile_mode(config.from_flags([]))) == 'net' and len(modes) == 8


class CompiledStandIn(torch.nn.Module):
    """Looks like torch.compile's module (`_orig_mod`) and counts the batches it is given."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module
        self.sizes = []

    @property
    def embeddingnet(self):                                   # torch.compile's module forwards attributes
        return self._orig_mod.embeddingnet

    def forward(self, anchor, *rest, **options):
        self.sizes.append(len(anchor))
        return self._orig_mod(anchor, *rest, **options)


@pytest.mark.slow
def test_last_partial_batch_runs_eagerly_under_compile():
    """A compiled step keeps one shape: the full batches go through it, the partial one through
    the module it wraps, on the same weights."""
    args = config.from_flags(TINY + FAITHFUL + ['--batch-size', '4', '--log-interval', '100'])
    tnet = tiny_tnet()
    stand_in = CompiledStandIn(tnet)
    optimizer = torch.optim.Adam(tnet.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    engine.train_one_epoch(stand_in, InMemoryLoader(random_batches(sizes=(4, 4, 2), size=32)), optimizer, scaler, CPU, 1, logger=logging.getLogger('test_training_step'),
    **commands.train_settings(args, tnet.embeddingnet))
    assert stand_in.sizes == [4, 4]
