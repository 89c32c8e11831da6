"""GPU paths (skipped without CUDA; benchmarks/gpu_check.sh runs them on a GPU machine)."""
import os
import subprocess
import sys

import pytest
import torch

import model as models
import runtime
import utils
from conftest import ROOT, TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def tiny_net(channels_last=False, concat=False):
    torch.manual_seed(0)
    tnet = models.TripletNet(models.build_model('ASENet', 5, 'resnet18', False, 16), concat_forward=concat)
    tnet = tnet.cuda()
    return tnet.to(memory_format=torch.channels_last) if channels_last else tnet


def batch(n=4, size=64):
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(n, 3, size, size, generator=gen).cuda() for _ in range(3)]
    return (*images, torch.randint(0, 5, (n,), generator=gen).cuda())


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_amp_train_step_changes_the_weights_and_stays_finite(amp):
    if amp == 'bf16' and not torch.cuda.is_bf16_supported():
        pytest.skip('no bf16 on this GPU')
    device = torch.device('cuda')
    tnet = tiny_net(channels_last=True)
    before = tnet.embeddingnet.feature_fc.weight.detach().clone()
    optimizer = torch.optim.Adam(tnet.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cuda', enabled=amp == 'fp16')
    for _ in range(3):
        anchor, negative, positive, attr = (runtime.to_device(t, device, True) for t in batch())
        with runtime.autocast(device, amp):
            loss = models.triplet_loss(*(s.float() for s in tnet(anchor, negative, positive, attr)), 0.2)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert not torch.equal(before, tnet.embeddingnet.feature_fc.weight)


def test_channels_last_gives_the_same_embeddings():
    images, _, _, attr = batch()
    plain, fast = tiny_net().eval(), tiny_net(channels_last=True).eval()
    with torch.no_grad():
        want = plain.embeddingnet(images, attr)
        got = fast.embeddingnet(images.contiguous(memory_format=torch.channels_last), attr)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_compiled_network_matches_eager():
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
    cpu = utils.mean_average_precision(cand, query, c_lab, q_lab)
    gpu = utils.mean_average_precision(cand.cuda(), query.cuda(), c_lab.cuda(), q_lab.cuda())
    assert gpu == pytest.approx(cpu, abs=1e-9)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='DDP with NCCL needs 2 GPUs')
def test_torchrun_nccl_trains_on_two_gpus(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(ROOT, 'asen.py'), *TINY, '--epochs', '1', '--name', 'nccl', '--workers', '0'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'DistributedDataParallel: 2 processes (nccl)' in proc.stdout
    assert (tmp_path / 'runs' / 'nccl' / 'checkpoint.pth.tar').is_file()


def test_normalise_on_the_gpu_equals_the_transform():
    """Flip, float, /255 and ImageNet normalisation on the GPU: ToTensor + Normalize's floats bit
    for bit (255 divides as a tensor: CUDA turns division by a CPU scalar into a multiplication)."""
    import datasets
    import gpuinput
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
def test_device_loader_on_cuda_equals_the_cpu_path(tmp_path, cached):
    """Pinned memory, side stream, persistent workers: two epochs of batches equal the CPU path's
    (itself equal to the transform's, tests/test_gpuinput.py). The main stream sleeps before it
    copies each batch, so a missing wait_stream or record_stream would show as wrong pixels."""
    import gpuinput
    from test_gpuinput import BATCH, assert_same_passes, device_passes, tiny_split, triplet_set
    dataset = triplet_set(tiny_split(tmp_path / 'data'), cached, num_triplets=22)
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
