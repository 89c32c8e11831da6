"""Device, precision and process-group plumbing shared by asen.py, pretrain.py, the benchmarks and
the tests: nothing here knows about ASEN, its flags or its data.

One `torch.device` is resolved once (`resolve_device`) and passed down; mixed precision has one
code path (`autocast`); under torchrun (WORLD_SIZE > 1) `distributed_session` holds the process
group and the helpers below reduce, broadcast and gather over it, while in a single process they
do nothing.
"""

import logging
import os
import re
import signal
import threading
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from utils import UserError, setup_logger


# ----------------------------------------------------------------------------- torch version

# The oldest torch the code runs on: torch.amp.GradScaler(device) arrived in 2.3 and
# torch.cuda.is_bf16_supported(including_emulation=...) in 2.4 (requirements.txt says the same).
MIN_TORCH = (2, 4)


def check_torch_version(version=None):
    """One clear line (a UserError) when the installed torch is older than MIN_TORCH."""
    version = version or torch.__version__
    found = re.match(r'(\d+)\.(\d+)', version)
    if found and tuple(int(part) for part in found.groups()) < MIN_TORCH:
        need = '.'.join(map(str, MIN_TORCH))
        raise UserError(f"torch {version} is too old: asen needs torch >= {need} (torch.amp.GradScaler(device), "
                        f"torch.cuda.is_bf16_supported(including_emulation=...)); "
                        f"pip install -r requirements.txt")


# ----------------------------------------------------------------------------- device and precision

def resolve_device(no_cuda=False):
    """CUDA (this process's GPU under torchrun) when available and not refused, else the CPU."""
    if torch.cuda.is_available() and not no_cuda:
        return torch.device('cuda', local_rank()) if distributed() else torch.device('cuda')
    return torch.device('cpu')


def bf16_supported(device):
    """Whether `device` runs bf16 natively: a CUDA GPU that torch.cuda.is_bf16_supported() accepts
    without emulation (compute capability 8.0, Ampere, and later; emulated bf16 on older GPUs is
    slower than fp32), or a CPU whose oneDNN has bf16 kernels (AVX512-BF16 or AMX)."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_bf16()


def cpu_has_bf16():
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(device, amp):
    """Autocast to bf16 or fp16 (`amp`), or a no-op context for 'off'."""
    dtype = torch.float16 if amp == 'fp16' else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp != 'off')


def to_device(tensor, device, channels_last):
    """`tensor` on `device` (non-blocking from pinned memory); a 4-D one channels_last if asked."""
    tensor = tensor.to(device, non_blocking=True)
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last and tensor.dim() == 4 else tensor


def configure_backends(device, tf32=None):
    """Backend switches of a run, set once after the device is resolved.

    On CUDA, cuDNN benchmarks the convolution algorithms for each new input shape and keeps the
    fastest (`cudnn.benchmark`, as the authors' code sets it). `tf32` None leaves PyTorch's own
    TF32 setting alone (on Ampere and later GPUs: fp32 convolutions in TF32, fp32 matmuls in full
    fp32); True or False sets both cuDNN convolutions and CUDA matmuls to TF32 or to full fp32.
    TF32 keeps fp32's range with a 10-bit mantissa: about 1e-3 relative error per product.
    """
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    if tf32 is not None:
        torch.backends.cudnn.allow_tf32 = bool(tf32)
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)


def fused_adam_supported(device):
    """Adam's fused kernel (one kernel for all parameters, same update rule) is used on CUDA;
    on the CPU the default implementation stays (tests/test_training_step.py checks that fused and
    unfused make the same update there)."""
    return device.type == 'cuda'


def adam(params, lr, device):
    """torch.optim.Adam, fused where `fused_adam_supported(device)`: the fused step also takes a
    GradScaler's inf check on the device instead of a host sync each step."""
    return torch.optim.Adam(params, lr=lr, fused=True) if fused_adam_supported(device) else \
        torch.optim.Adam(params, lr=lr)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), keeping this optimizer's implementation switches (fused,
    foreach, capturable): a checkpoint saved on a GPU (fused) resumes on a CPU and the reverse,
    with Adam's step counters moved where the implementation wants them."""
    ours = {key: optimizer.param_groups[0].get(key) for key in ('fused', 'foreach', 'capturable')}
    groups = [{**group, **ours} for group in state['param_groups']]
    optimizer.load_state_dict({**state, 'param_groups': groups})


# ----------------------------------------------------------------------------- process group

def distributed():
    """True inside a torchrun process group (never in a single-process run)."""
    return dist.is_available() and dist.is_initialized()


def is_main_process():
    """Rank 0, or the only process: the one that logs and writes."""
    return not distributed() or dist.get_rank() == 0


def rank_and_world():
    """(this process's rank, number of processes): (0, 1) in a single-process run."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def local_rank():
    return int(os.environ.get('LOCAL_RANK', '0'))


def first_on_node():
    """The process that prepares shared files on its node (all of them in a single-process run)."""
    return not distributed() or local_rank() == 0


@contextmanager
def distributed_session(no_cuda=False, sync_bn=False):
    """Under torchrun (WORLD_SIZE > 1): one process group (NCCL on GPUs, gloo on CPUs) for the
    body, destroyed however the body ends. A single process runs the body without one."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        yield
        return
    if not dist.is_available():
        raise UserError("WORLD_SIZE is set (torchrun) but this torch build has no torch.distributed")
    use_cuda = torch.cuda.is_available() and not no_cuda
    if use_cuda:
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPU(s); "
                            f"give torchrun --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(local_rank())
    elif sync_bn:
        raise UserError("--sync-bn needs GPUs (torch's SyncBatchNorm has no CPU kernel); drop it on CPUs")
    store, rank, world = attempt_store(TIMEOUT)
    dist.init_process_group('nccl' if use_cuda else 'gloo', store=store, rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


# How long a collective waits for the other ranks before it fails.
TIMEOUT = timedelta(minutes=60)


def attempt_store(timeout):
    """(store, rank, world size) of torchrun's env:// rendezvous, the store's keys prefixed by
    torchrun's restart count. torchrun --max-restarts starts the workers again on the same agent
    store: without the prefix the new process group reads the dead attempt's addresses and fails
    to connect ("Gloo connectFullMesh failed ... Connection refused")."""
    store, rank, world = next(dist.rendezvous('env://', timeout=timeout))
    return dist.PrefixStore(f"asen/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store), rank, world


def local_first(fn):
    """fn() on each node's first process, then on the others (they find its files ready)."""
    if not first_on_node():
        dist.barrier()
    result = fn()
    if distributed() and first_on_node():
        dist.barrier()
    return result


def silent_logger():
    """The 'asen' logger with no output (ranks other than 0)."""
    logger = setup_logger(None)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(logging.NullHandler())
    return logger


class NullWriter:
    """Stands in for the TensorBoard writer on ranks other than 0."""

    def add_scalar(self, *args, **kwargs):
        pass

    def add_image(self, *args, **kwargs):
        pass

    def close(self):
        pass


def distributed_model(tnet, device, sync_bn, logger, batch_size):
    """`tnet` wrapped in DistributedDataParallel under torchrun (optionally with SyncBatchNorm,
    converted in place so that checkpoints keep their layout); `tnet` itself otherwise."""
    if not distributed():
        return tnet
    world = dist.get_world_size()
    if sync_bn:
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(tnet)
    logger.info(f'DistributedDataParallel: {world} processes ({dist.get_backend()}), {batch_size} '
                f'triplets per process and step, {world * batch_size} per step in all')
    return torch.nn.parallel.DistributedDataParallel(
        tnet, device_ids=[device.index] if device.type == 'cuda' else None)


# ----------------------------------------------------------------------------- collectives

class NonFiniteTracker:
    """Remembers, on the device, the first batch whose loss was not finite, without a host sync
    per step: `update` queues a few tiny device ops; `first_bad_batch` reads the flag (one sync,
    and under torchrun one all-reduce, so that every rank stops at the same check)."""

    NONE = 2**62                                        # "no bad batch yet" (above any batch index)

    def __init__(self, device):
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def update(self, loss, batch_idx):
        """Record `batch_idx` if `loss` is not finite and no earlier batch was."""
        bad = ~torch.isfinite(loss.detach()).all()
        # a Python scalar goes to the kernel as an argument: no host-to-device copy, no sync
        self.first = torch.where(bad, self.first.clamp(max=batch_idx), self.first)

    def first_bad_batch(self):
        """The first non-finite batch of any rank, or None when all were finite."""
        first = self.first.clone().reshape(1)
        if distributed():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first.item())
        return None if first == self.NONE else first


def global_mean(values, device):
    """Mean of each of `values` over the ranks (every rank holds as many triplets)."""
    if not distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def broadcast_buffers(module):
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank: each rank's last
    training forward updated its own, and evaluation must see the weights rank 0 saves."""
    if distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def shard_sizes(n, world):
    """Sizes of `world` contiguous shards of n items, differing by at most one."""
    return [n // world + (rank < n % world) for rank in range(world)]


def gather_rows(local, sizes):
    """Concatenate every rank's rows (rank r holds sizes[r]), padding to the largest for all_gather."""
    padded = local.new_zeros((max(sizes), local.shape[1]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


# ----------------------------------------------------------------------------- stop signals

# The exit status of a run stopped by a signal once its step snapshot is written (and of one stopped
# at once by a second signal): EX_TEMPFAIL of sysexits.h, "a temporary failure, try again": a
# scheduler requeues on it and the same command line with --resume auto continues the run.
REQUEUE_EXIT = 75
STOP_SIGNALS = ('SIGTERM', 'SIGUSR1', 'SIGINT')


class Stopped(UserError):
    """A stop signal served: the run stopped at a step boundary (or at once, on a second signal)."""
    exit_code = REQUEUE_EXIT


class StopSignals:
    """The stop signals SIGTERM, SIGUSR1 and SIGINT (Ctrl-C), handled from the first moment of a
    command (asen.main installs them before any file is written) to its end.

    Inside `deferred()` (the training loop, commands.train) the first signal only notes the request,
    so the loop finishes its step, writes a step snapshot and raises Stopped. Outside it (the
    start: reading the data, building the network; the end) the first signal raises Stopped at once:
    no training step was taken since the last snapshot, so there is nothing to save, and the same
    command starts (or continues) the run. A second signal raises Stopped at once wherever the main
    thread is (a snapshot being written is abandoned: its temporary file is removed, the previous
    snapshot stays). Each exits with REQUEUE_EXIT. Outside a main thread nothing is installed
    (Python delivers signals to the main thread only); a child process forked while they are
    installed (a multiprocessing pool) gets the signal's default action, as before."""

    active = None                       # the instance installed in this process, if any

    def __init__(self):
        self.signal_name, self.previous, self.deferring = None, {}, False
        self.pid, self.outer = None, None

    @property
    def requested(self):
        return self.signal_name is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.pid, self.outer = os.getpid(), StopSignals.active
            for name in STOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self.previous[number] = signal.signal(number, self._handle)
            StopSignals.active = self
        return self

    def __exit__(self, *exc):
        self._restore()
        if StopSignals.active is self:
            StopSignals.active = self.outer

    def _restore(self):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    @contextmanager
    def deferred(self):
        """While inside: the first signal waits for the training loop's next step boundary."""
        before, self.deferring = self.deferring, True
        try:
            yield self
        finally:
            self.deferring = before

    def _handle(self, number, frame):
        name = signal.Signals(number).name
        if os.getpid() != self.pid:             # a forked child (a pool's worker): the default action
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        if self.signal_name is not None:
            self._restore()                      # a third one gets the default handling
            raise Stopped(f"stopped at once by a second signal ({self.signal_name}, then {name}); the last "
                          f"complete snapshot is kept; continue with the same command and --resume auto "
                          f"(exit status {REQUEUE_EXIT}: requeue)")
        self.signal_name = name
        if not self.deferring:
            raise self.stopped_outside_training()

    @contextmanager
    def errors_as_stops(self):
        """While inside: an error raised once a signal was served (what the signal broke on its way,
        such as a read wrapped in its own error line) is that signal's Stopped."""
        try:
            yield self
        except (UserError, KeyboardInterrupt, OSError) as err:
            if self.requested and not isinstance(err, Stopped):
                raise self.stopped_outside_training() from err
            raise

    def stopped_outside_training(self):
        """The Stopped error of a signal served outside the training steps."""
        return Stopped(f"stopped by {self.signal_name} outside the training steps: nothing new to save (the "
                       f"run folder's snapshots, if any, are kept); the same command with --resume auto starts "
                       f"or continues the run (exit status {REQUEUE_EXIT}: requeue)")


@contextmanager
def stop_signals_deferred():
    """The training loop's stop signals: the command's StopSignals (asen.main installs it) in its
    deferred mode, or one installed for the loop alone when the loop runs without asen.main."""
    if StopSignals.active is not None and StopSignals.active.pid == os.getpid():
        with StopSignals.active.deferred() as signals:
            yield signals
        return
    with StopSignals() as signals, signals.deferred():
        yield signals


def max_of_ranks(values, device):
    """Each of the integers `values`, the largest over the ranks (one all-reduce; as they are in a
    single process)."""
    if not distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def any_rank(flag, device):
    """Whether `flag` is true on any rank (one all-reduce; `flag` itself in a single process): a
    failure on one rank that every rank must act on, as when rank 0 cannot lock the run folder."""
    return bool(max_of_ranks([int(flag)], device)[0])


def gather_from_ranks(tensor):
    """(world, *shape): every rank's `tensor` (of one shape), in rank order; (1, *shape) alone."""
    if not distributed():
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.stack(parts)
