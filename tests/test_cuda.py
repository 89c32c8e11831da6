"""GPU paths (skipped without CUDA; benchmarks/gpu_check.sh runs them on a GPU machine).

Tests that compare two fp32 computations (layouts, compiled against eager) switch TF32 off
(`full_fp32`): on Ampere and later GPUs PyTorch runs fp32 convolutions in TF32 by default (10-bit
mantissa), and NCHW and NHWC take different kernels, so their outputs differ by about 1e-4 there
(1.3e-4 seen on an H100) and the comparison would measure TF32's rounding, not the layout.
"""
import copy
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

import losses
from lib import runtime
from conftest import ROOT, TINY
from helpers import device_batches, random_batches, tiny_tnet
from lib import commands, config, engine, evaluation, inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
CUDA = torch.device('cuda')


@pytest.fixture()
def full_fp32():
    """fp32 convolutions and matmuls in full fp32 (--no-tf32) for the test, then PyTorch's setting back."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    runtime.configure_backends(CUDA, tf32=False)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tiny_net(channels_last=False, concat=False):
    tnet = tiny_tnet(concat_forward=concat).cuda()
    return tnet.to(memory_format=torch.channels_last) if channels_last else tnet


def batch(n=4, size=64):
    return random_batches([n], size, device='cuda')[0]


# |AMP loss - fp32 loss| allowed on the first step (same weights, same batch). The loss is a mean of
# margin + cos(a, n) - cos(a, p) over unit embeddings, so its error is that of the similarities,
# a few unit roundoffs of the autocast dtype (BatchNorm renormalises every block, so errors do
# not compound over depth): bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3) and gets
# 1e-2, fp16 keeps 11 (2^-12 = 2.4e-4) and gets 2e-3, about 5 and 8 roundoffs. The fp32 reference
# may itself run cuDNN's TF32 convolutions (10-bit mantissa, fp16's), inside the same bound.
# Measured with torch's CPU autocast on this network: bf16 within 1e-3, fp16 within 1.3e-4.
AMP_DTYPE = {'bf16': torch.bfloat16, 'fp16': torch.float16}
AMP_LOSS_ATOL = {'bf16': 1e-2, 'fp16': 2e-3}


def record_output_dtypes(tnet):
    """Forward hooks noting the output dtype of the first convolution and of the last Linear."""
    conv = next(m for m in tnet.modules() if isinstance(m, torch.nn.Conv2d))
    seen = {}

    def hook_for(name):
        def note_dtype(module, inputs, output):
            seen.setdefault(name, output.dtype)              # returns nothing: the output is kept
        return note_dtype
    for name, module in (('conv', conv), ('linear', tnet.embeddingnet.feature_fc)):
        module.register_forward_hook(hook_for(name))
    return seen


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_amp_train_step_runs_in_low_precision_and_matches_fp32(amp):
    if amp == 'bf16' and not torch.cuda.is_bf16_supported():
        pytest.skip('no bf16 on this GPU')
    device = torch.device('cuda')
    tnet = tiny_net(channels_last=True)
    reference = copy.deepcopy(tnet)
    before = tnet.embeddingnet.feature_fc.weight.detach().clone()
    dtypes = record_output_dtypes(tnet)
    optimizer = torch.optim.Adam(tnet.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cuda', enabled=amp == 'fp16')
    for step in range(3):
        anchor, negative, positive, attr = (runtime.to_device(t, device, True) for t in batch())
        with runtime.autocast(device, amp):
            out = tnet(anchor, negative, positive, attr)
            loss = losses.triplet_loss(out.sim_an.float(), out.sim_ap.float(), 0.2)
        assert torch.isfinite(loss)
        if step == 0:
            assert dtypes == {'conv': AMP_DTYPE[amp], 'linear': AMP_DTYPE[amp]}
            with torch.no_grad():
                ref = reference(anchor, negative, positive, attr)
                want = losses.triplet_loss(ref.sim_an, ref.sim_ap, 0.2)
            assert abs(loss.item() - want.item()) <= AMP_LOSS_ATOL[amp], (loss.item(), want.item())
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert not torch.equal(before, tnet.embeddingnet.feature_fc.weight)


def test_channels_last_gives_the_same_embeddings(full_fp32):
    images, _, _, attr = batch()
    plain, fast = tiny_net().eval(), tiny_net(channels_last=True).eval()
    with torch.no_grad():
        want = plain.embeddingnet(images, attr)
        got = fast.embeddingnet(images.contiguous(memory_format=torch.channels_last), attr)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_compiled_network_matches_eager(full_fp32):
    images, _, _, attr = batch()
    net = tiny_net().embeddingnet.eval()
    with torch.no_grad():
        want = net(images, attr)
        got = torch.compile(net)(images, attr)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_map_on_gpu_equals_cpu():
    gen = torch.Generator().manual_seed(0)
    cand, query = torch.randn(500, 32, generator=gen), torch.randn(120, 32, generator=gen)
    c_lab, q_lab = torch.randint(0, 6, (500,), generator=gen), torch.randint(0, 6, (120,), generator=gen)
    cpu = evaluation.mean_average_precision(cand, query, c_lab, q_lab)
    gpu = evaluation.mean_average_precision(cand.cuda(), query.cuda(), c_lab.cuda(), q_lab.cuda())
    assert gpu == pytest.approx(cpu, abs=1e-9)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='DDP with NCCL needs 2 GPUs')
def test_torchrun_nccl_trains_on_two_gpus(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(ROOT, 'asen.py'), *TINY, '--epochs', '1', '--name', 'nccl', '--workers', '0'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'DistributedDataParallel: 2 processes (nccl)' in proc.stdout
    assert (tmp_path / 'runs' / 'nccl' / 'checkpoint.pth.tar').is_file()


def test_tf32_flags_reach_the_cuda_backends():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        runtime.configure_backends(CUDA, tf32=True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_adam_is_fused_on_cuda():
    assert runtime.adam([torch.nn.Parameter(torch.ones(1, device=CUDA))], 1e-3, CUDA).defaults['fused']


def epoch_args(*flags):
    return config.from_flags(TINY + ['--amp', 'bf16', '--channels-last', '--concat-forward', '--batch-size', '4',
                                   '--log-interval', '1000', *flags])


def syncs_of_an_epoch(tnet, optimizer, steps, args):
    """Host syncs CUDA reports (sync debug mode 'warn') during train_one_epoch over `steps` batches."""
    scaler = torch.amp.GradScaler('cuda', enabled=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            engine.train_one_epoch(tnet, device_batches([4] * steps), optimizer, scaler, CUDA, 1, logger=logging.getLogger('test_cuda'), **commands.train_settings(args, tnet.embeddingnet))
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return sum('synchroniz' in str(w.message) for w in caught)


def test_training_steps_do_not_sync_the_host():
    """The host syncs of an epoch do not grow with its steps: 3 and 9 steps between log lines sync
    as often (the reads at batch 0 and at the epoch's end)."""
    args = epoch_args()
    tnet = tiny_net(channels_last=True, concat=True)
    optimizer = runtime.adam(list(tnet.parameters()), 1e-4, CUDA)
    syncs_of_an_epoch(tnet, optimizer, 2, args)                      # cuDNN autotuning, allocator warm-up
    few, many = syncs_of_an_epoch(tnet, optimizer, 3, args), syncs_of_an_epoch(tnet, optimizer, 9, args)
    assert 0 < few == many, (few, many)                              # 0 would mean no sync was seen at all


def test_cuda_graph_step_does_not_recompile_for_the_last_partial_batch():
    """--compile --compile-mode reduce-overhead: an epoch ending in a partial batch (run eagerly)
    compiles nothing more than an epoch of full batches, and its losses stay finite."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    args = epoch_args('--compile', '--compile-mode', 'reduce-overhead')
    tnet = tiny_net(channels_last=True, concat=True)
    optimizer = runtime.adam(list(tnet.parameters()), 1e-4, CUDA)
    scaler = torch.amp.GradScaler('cuda', enabled=False)
    model = engine.compiled(tnet, commands.compile_mode(args))
    logger = logging.getLogger('test_cuda')
    loss = engine.train_one_epoch(model, device_batches([4, 4, 4]), optimizer, scaler, CUDA, 1, logger=logger, **commands.train_settings(args, tnet.embeddingnet))['train_loss']
    graphs = counters['stats']['unique_graphs']
    loss_partial = engine.train_one_epoch(model, device_batches([4, 4, 2]), optimizer, scaler, CUDA, 2, logger=logger, **commands.train_settings(args, tnet.embeddingnet))['train_loss']
    assert counters['stats']['unique_graphs'] == graphs
    assert torch.isfinite(torch.tensor([loss, loss_partial])).all()


def test_eval_batch_size_does_not_change_embeddings_on_cuda(full_fp32, tiny_data):
    """The valid split embedded 3 and 64 images at a time in fp32 (TF32 off) agrees to atol 1e-4:
    with cudnn.benchmark, cuDNN may pick another algorithm (FFT, Winograd) for each batch size, and
    their fp32 roundings differ more than the CPU's (1e-5 there)."""
    embeddings = []
    for size in (3, 64):
        args = config.from_flags(TINY + ['--data_path', str(tiny_data), '--amp', 'off', '--eval-batch-size',
                                       str(size)])
        split_files = inputs.prepare_dataset(args)
        torch.manual_seed(0)
        net = commands.build_network(args, len(split_files.attributes), CUDA).embeddingnet
        queries, _ = inputs.evaluation_of(split_files, 'valid', args, logging.getLogger('test_cuda')).datasets
        embeddings.append(engine.embed_split(net, queries, CUDA, **commands.eval_settings(args)))
    torch.testing.assert_close(embeddings[0], embeddings[1], rtol=0, atol=1e-4)


def test_normalise_on_the_gpu_equals_the_transform():
    """Flip, float, /255 and ImageNet normalisation on the GPU: ToTensor + Normalize's floats bit
    for bit (255 divides as a tensor: CUDA turns division by a CPU scalar into a multiplication)."""
    import datasets
    from lib import gpuinput
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (8, 40, 40, 3), dtype=torch.uint8, generator=gen)       # N H W C
    flips = torch.rand(8, generator=gen) < 0.5
    want = torch.stack([datasets.to_normalized_tensor(p[:, ::-1] if f else p)
                        for p, f in zip(pixels.numpy(), flips.tolist())])
    for channels_last in (False, True):
        got = gpuinput.normalise(pixels.permute(0, 3, 1, 2).cuda(), flips.cuda(), channels_last)
        assert got.is_cuda and torch.equal(got.cpu(), want)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize('cached', [False, True])
def test_device_loader_on_cuda_equals_the_cpu_path(tmp_path, small_synth, cached):
    """Pinned memory, side stream, persistent workers: two epochs of batches equal the CPU path's
    (itself equal to the transform's, tests/test_gpuinput.py). The main stream sleeps before it
    copies each batch, so a missing wait_stream or record_stream would show as wrong pixels."""
    from lib import gpuinput
    from helpers import LOADER_BATCH as BATCH, assert_same_passes, device_passes, tiny_split, triplet_set
    dataset = triplet_set(tiny_split(tmp_path / 'data', small_synth), cached, num_triplets=22)
    want, want_state = device_passes(dataset, 2, epochs=(1, 2), channels_last=True)
    torch.manual_seed(5)
    loader = gpuinput.DeviceLoader(dataset, BATCH, torch.device('cuda'), workers=2, channels_last=True,
                                   persistent=True)
    got = []
    for epoch in (1, 2):
        dataset.set_epoch(epoch)
        kept = []
        for batch in loader:
            assert all(t.is_cuda for t in batch)
            assert all(t.is_contiguous(memory_format=torch.channels_last) for t in batch[:3])
            torch.cuda._sleep(20_000_000)
            kept.append([t.clone() for t in batch])
        got.append(kept)
    torch.cuda.synchronize()
    assert_same_passes([[[t.cpu() for t in b] for b in p] for p in got], want)
    assert torch.equal(torch.get_rng_state(), want_state)
