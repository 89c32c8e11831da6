"""GPU paths (skipped without CUDA; benchmarks/gpu_check.sh runs them on a GPU machine)."""
import copy
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
            loss = models.triplet_loss(*(s.float() for s in tnet(anchor, negative, positive, attr)), 0.2)
        assert torch.isfinite(loss)
        if step == 0:
            assert dtypes == {'conv': AMP_DTYPE[amp], 'linear': AMP_DTYPE[amp]}
            with torch.no_grad():
                want = models.triplet_loss(*reference(anchor, negative, positive, attr), 0.2)
            assert abs(loss.item() - want.item()) <= AMP_LOSS_ATOL[amp], (loss.item(), want.item())
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
