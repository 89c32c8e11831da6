"""One training step of asen under DDP, for tests/test_distributed.py.

Run with `torchrun --nproc_per_node=2 tests/ddp_step.py OUT.pt`: each rank takes its strided half
of a fixed global batch of 2 x BATCH triplets and does one asen.train_one_epoch step through the
DistributedDataParallel model asen builds; rank 0 saves the global mean loss, the weights and the
(averaged) gradients for two networks: BatchNorm in training mode, and BatchNorm frozen.
The test computes the single-process references with the same functions.
"""
import os
import sys

import torch
import torch.distributed as dist
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import runtime  # noqa: E402
from lib import commands, config, engine  # noqa: E402

BATCH, N_ATTRIBUTES, SIZE = 4, 5, 32
FLAGS = ['--backbone', 'resnet18', '--no-pretrained', '--dim_embed', '16', '--img-size', str(SIZE),
         '--amp', 'off', '--batch-size', str(BATCH), '--log-interval', '1', '--workers', '0']


def settings():
    return config.from_flags(FLAGS)


def freeze_batchnorm(module):
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding its statistics (in place)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ('weight', 'bias', 'running_mean', 'running_var'):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def network(frozen_bn, args):
    """The same TripletNet on every call (seeded), on the CPU."""
    torch.manual_seed(0)
    tnet = commands.build_network(args, N_ATTRIBUTES, torch.device('cpu'))
    with torch.no_grad():                        # non-trivial BatchNorm statistics to freeze
        for module in tnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return freeze_batchnorm(tnet) if frozen_bn else tnet


def global_batch():
    """(anchor, negative, positive, attribute) of 2 x BATCH triplets."""
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(2 * BATCH, 3, SIZE, SIZE, generator=gen) for _ in range(3)]
    return (*images, torch.randint(0, N_ATTRIBUTES, (2 * BATCH,), generator=gen))


def loader(batch, rows, batch_size):
    """A DataLoader over the triplets `rows` of `batch` (a slice), in order."""
    tensors = torch.utils.data.TensorDataset(*(t[rows] for t in batch))
    return torch.utils.data.DataLoader(tensors, batch_size=batch_size)


def optimizer_of(tnet, args):
    """Plain SGD: the step under test is DDP's gradient averaging. Adam's first step is about
    lr x sign(gradient), which turns float noise in near-zero gradients (summation order differs
    between 1 and 2 threads, 4 and 8 images) into lr-sized weight differences."""
    return torch.optim.SGD([p for p in tnet.parameters() if p.requires_grad], lr=0.1)


def outcome(tnet, loss):
    return {'loss': loss, 'weights': {k: v.detach().clone() for k, v in tnet.named_parameters()},
            'grads': {k: v.grad.detach().clone() for k, v in tnet.named_parameters() if v.grad is not None}}


def distributed_step(frozen_bn, args):
    """This rank's step on its strided half (triplets rank, rank + 2, ...), as asen shards."""
    tnet = network(frozen_bn, args)
    model = runtime.distributed_model(tnet, torch.device('cpu'), args.sync_bn, runtime.silent_logger(),
                                      args.batch_size)
    optimizer = optimizer_of(tnet, args)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    rows = slice(dist.get_rank(), None, dist.get_world_size())
    loss = engine.train_one_epoch(model, loader(global_batch(), rows, BATCH), optimizer, scaler,
                                   torch.device('cpu'), 1, logger=runtime.silent_logger(), **commands.train_settings(args, tnet.embeddingnet))['train_loss']
    loss, = runtime.global_mean([loss], torch.device('cpu'))
    return outcome(tnet, loss)


def main(out_path):
    args = settings()
    with runtime.distributed_session(args.no_cuda, args.sync_bn):
        assert runtime.distributed() and dist.get_world_size() == 2
        results = {'train_bn': distributed_step(False, args), 'frozen_bn': distributed_step(True, args)}
        if runtime.is_main_process():
            torch.save(results, out_path)


if __name__ == '__main__':
    main(sys.argv[1])
