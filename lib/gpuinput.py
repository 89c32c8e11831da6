"""The input pipeline: uint8 batches from the workers, float work on the device.

In the way timm's prefetching loader works (timm/data/loader.py), the DataLoader workers only
decode, Resize(S) + CenterCrop(S) (or slice the `--cache-images` memmap) and draw the flips; the
device does the rest:

  worker (CPU)                                     device (GPU, or the CPU itself)
  ----------------------------------------------   ---------------------------------------------
  pixels (N, 3, S, S) uint8, one batch at a time   copy from pinned memory on a side CUDA stream,
  flips (N,) bool, drawn as RandomHorizontalFlip   while the current step runs on the main one;
  labels (int64)                                   flip, float, /255, ImageNet normalisation,
                                                   channels_last when asked (`normalise`)

A dataset served this way offers `batch_keys()` (what one pass iterates, read in the main
process when the pass starts: an epoch's triplet rows, or the item indices) and
`load_batch(keys)` -> `(pixels uint8, flips bool or None, *labels)`; see datasets.CachedImages.
Triplet batches hold their pixels as (3, B, 3, S, S): anchors, negatives, positives.

Exactness (tests/test_gpuinput.py): `normalise` performs ToTensor + Normalize's float operations
in the same order on the same values, so its output equals the transform's bit for bit, and the
flips are the same random draws as the transform path's (a plain DataLoader over the datasets'
items, build_transform), for any number of workers, persistent or not:

- there every pass of a DataLoader draws one int64 "base seed" from the global torch generator when
  its iterator is created; each of its W workers then runs `torch.manual_seed(base seed + worker
  id)`, batch k goes to worker k % W, and each image's RandomHorizontalFlip draws `torch.rand(1)`
  in the process that loads it (in the main process when W = 0).
- `DeviceLoader` draws that same int64 from the global generator at the start of each pass and
  sends it along with every batch; a worker that sees a new pass re-seeds torch with base seed +
  worker id before its first batch of the pass. The DataLoader itself gets a private generator,
  so it moves the global one no further than a plain DataLoader does. The workers can therefore persist
  across epochs (`persistent=True`), and a resumed run draws the flips an uninterrupted one does.
"""

import atexit
import multiprocessing
import warnings
import weakref
from functools import lru_cache

import torch

import utils
from datasets import IMAGENET_MEAN, IMAGENET_STD


# ----------------------------------------------------------------------------- device side

@lru_cache(maxsize=None)
def _constants(device, dtype, width=None):
    """(255, mean, std) as tensors on `device`, made once per device: a fresh CUDA tensor per batch
    would be a blocking host-to-device copy. mean and std are (3, 1, 1) for NCHW tensors, or with
    `width` W (1, 1, W, 3) rows of the channels' values interleaved, for NHWC tensors (a broadcast
    along a contiguous row of the image is much faster on the CPU than one of period 3). 255 is a
    tensor because CUDA divides by a CPU scalar as a multiplication by its reciprocal
    (BinaryDivTrueKernel.cu), which can differ from ToTensor's true division in the last bit."""
    with torch.inference_mode(False):        # ordinary tensors even when first made under inference mode
        scale = torch.tensor(255, dtype=dtype, device=device)
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device)
        std = torch.tensor(IMAGENET_STD, dtype=dtype, device=device)
        if width is None:
            return scale, mean.view(3, 1, 1), std.view(3, 1, 1)
        return scale, mean.repeat(width).view(1, 1, width, 3), std.repeat(width).view(1, 1, width, 3)


def mirror(pixels, flips):
    """(N, 3, S, S) with the images whose `flips` (N,) bool is set mirrored left-right (a new tensor).
    `flips` may live on the CPU whatever the device of `pixels` (the workers draw them there)."""
    if pixels.device.type == 'cpu':
        # image by image: several times faster on the CPU than a torch.where over the batch
        out = pixels.clone()
        for i in torch.nonzero(flips).flatten().tolist():
            out[i] = pixels[i].flip(-1)
        return out
    flips = flips.to(pixels.device, non_blocking=True)
    return torch.where(flips.view(-1, 1, 1, 1), pixels.flip(-1), pixels)


def normalise(pixels, flips=None, channels_last=False):
    """(N, 3, S, S) uint8 -> (N, 3, S, S) float (the default dtype) on the same device: the images
    whose `flips` (N,) bool is set mirrored left-right, then exactly ToTensor's `.to(float).div(255)`
    and Normalize's `.sub_(mean).div_(std)`, elementwise in that order; channels_last memory format
    when asked, else contiguous. The float ops run in the output's layout (NHWC for channels_last),
    so no float tensor is transposed."""
    dtype = torch.get_default_dtype()
    if not channels_last:
        pixels = pixels.contiguous()
        if flips is not None:
            pixels = mirror(pixels, flips)
        scale, mean, std = _constants(pixels.device, dtype)
        return pixels.to(dtype).div_(scale).sub_(mean).div_(std)
    pixels = pixels.contiguous(memory_format=torch.channels_last)     # workers' batches already are
    if flips is not None:
        pixels = mirror(pixels, flips)
    nhwc = pixels.permute(0, 2, 3, 1)                                    # (N, S, S, 3)
    scale, mean, std = _constants(pixels.device, dtype, nhwc.shape[2])
    images = nhwc.to(dtype).div_(scale).sub_(mean).div_(std).permute(0, 3, 1, 2)
    return images.contiguous(memory_format=torch.channels_last)        # a no-op unless mirror changed it


# ----------------------------------------------------------------------------- worker side

class _Task:
    """One batch to load: the pass it belongs to, the pass's base seed, its keys, and the flip stream
    that draws for it: `stream` (batch index % workers: the worker that loads it in a pass from the
    start) and, for the first batch of a pass resumed mid-way, `skip` draws that the batches before
    it took from that stream."""

    def __init__(self, pass_number, base_seed, keys, stream=0, skip=0):
        self.pass_number, self.base_seed, self.keys = pass_number, base_seed, keys
        self.stream, self.skip = stream, skip


class _BatchTasks(torch.utils.data.Sampler):
    """Yields one `_Task` per batch: consecutive slices of `dataset.batch_keys()`, read when the
    pass starts (in the main process, so persistent workers see each epoch's triplets)."""

    def __init__(self, dataset, batch_size, workers):
        self.dataset, self.batch_size, self.streams = dataset, batch_size, max(workers, 1)
        self.in_process = workers == 0          # the flips are drawn from this process's generator
        self.pass_number, self.base_seed, self.first_batch = 0, None, 0

    def begin_pass(self, base_seed, first_batch=0):
        self.pass_number += 1
        self.base_seed, self.first_batch = base_seed, first_batch

    def __len__(self):
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        keys = self.dataset.batch_keys()
        slices = [keys[start:start + self.batch_size] for start in range(0, len(keys), self.batch_size)]
        skipped = self._draws_skipped(slices)
        for index in range(self.first_batch, len(slices)):
            stream = index % self.streams
            # the first batch of each stream in this pass replays that stream's skipped draws
            skip = skipped.pop(stream, 0)
            yield _Task(self.pass_number, self.base_seed, slices[index], stream, skip)
        if self.in_process:
            # a pass resumed after its last batch (a stop at an epoch's last step) has no batch to
            # replay the draws on: this process's generator must still end the pass where an
            # uninterrupted one leaves it (the next epoch's flips and seeds are drawn from it)
            for _ in range(sum(skipped.values())):
                torch.rand(1)

    def _draws_skipped(self, slices):
        """{stream: random draws its batches before `first_batch` took} (nothing from a pass's start)."""
        skipped = {}
        count = getattr(self.dataset, 'random_draws', lambda keys: 0)
        for index in range(self.first_batch):
            stream = index % self.streams
            skipped[stream] = skipped.get(stream, 0) + count(slices[index])
        return skipped


class _BatchFetcher(torch.utils.data.Dataset):
    """What the DataLoader indexes with a `_Task`: one whole batch from `dataset.load_batch`."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.pass_number = None         # the last pass this copy (one per worker) has seen

    def __getitem__(self, task):
        worker = torch.utils.data.get_worker_info()
        if worker is not None and task.pass_number != self.pass_number:
            # what a fresh DataLoader worker does before its first item (torch.utils.data._utils.worker);
            # from a pass's start, stream == worker id (batch k goes to worker k % W)
            torch.manual_seed(task.base_seed + task.stream)
            self.pass_number = task.pass_number
        for _ in range(task.skip):          # a resumed pass: the draws of the batches already trained
            torch.rand(1)
        return self.dataset.load_batch(task.keys)


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: the stop signals (Ctrl-C, SIGTERM, SIGUSR1) are the main process's
    to handle (runtime.StopSignals); a worker killed by one would break the step it is finishing.
    The main process ends the workers when it is done with them."""
    import signal
    for number in (signal.SIGINT, signal.SIGTERM, getattr(signal, 'SIGUSR1', None)):
        if number is not None:
            signal.signal(number, signal.SIG_IGN)


def stop_workers(kill_leftovers=False):
    """End the workers of every DeviceLoader alive (their persistent workers too); with
    `kill_leftovers`, at the interpreter's exit, also SIGKILL any daemonic child left: the workers
    ignore SIGTERM (`ignore_stop_signals`), so multiprocessing's own exit hook, which sends SIGTERM
    and then waits, would wait for ever. Registered with atexit below, so it runs before torch's
    exit hook turns the DataLoaders' own shutdown into a no-op."""
    for loader in list(_LOADERS):
        loader.close()
    if kill_leftovers:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()
                child.join(timeout=5)


def shut_down_on_error(loader):
    """The batches of one pass of a torch DataLoader, its workers ended as soon as the pass fails (an
    unreadable image, a worker out of memory or killed) rather than when the garbage collector
    finds the iterator, which a failed pass's frames keep alive; a pass left early (GeneratorExit)
    is no failure. The pass starts here, as `for batch in loader` starts it (its workers prefetch)."""
    return _ending_workers_on_error(loader, iter(loader))


def _ending_workers_on_error(loader, iterator):
    try:
        yield from iterator
    except Exception:
        if hasattr(iterator, '_shutdown_workers'):
            iterator._shutdown_workers()
        if getattr(loader, '_iterator', None) is iterator:
            loader._iterator = None
        raise


# torch warns when --workers exceeds the cores it counts; the user chose the number (and the
# warning would break the promise of one line on stderr for a failed run)
warnings.filterwarnings('ignore', message='This DataLoader will create', category=UserWarning)

_LOADERS = weakref.WeakSet()           # the DeviceLoaders alive, for stop_workers
atexit.register(stop_workers, kill_leftovers=True)   # after torch's hook (imported above): atexit runs last first
utils.at_command_end(stop_workers)     # and at the end of each command, for in-process callers


def _as_is(batch):
    """The batch as `load_batch` made it (no collation: it is one already)."""
    return batch


# ----------------------------------------------------------------------------- the loader

class DeviceLoader:
    """Batches of a dataset on `device`, ready for the network; see the module docstring.

    Yields `(images, *labels)`, or for triplet datasets `(anchor, negative, positive, *labels)`,
    every tensor on `device`, images float, normalised, flipped and channels_last when asked.
    On CUDA the workers' batches arrive in pinned memory and the next batch is copied and
    normalised on a side stream while the caller works on the current one. `len()` is the
    number of batches; `.dataset` the dataset.
    """

    def __init__(self, dataset, batch_size, device, workers=0, channels_last=False, persistent=False):
        self.dataset, self.device, self.channels_last = dataset, torch.device(device), channels_last
        self.tasks = _BatchTasks(dataset, batch_size, workers)
        self.side_stream = None                   # made on the first CUDA pass, kept for the next ones
        # a private generator: the pass's base seed is drawn by __iter__ from the global one instead
        self.loader = torch.utils.data.DataLoader(
            _BatchFetcher(dataset), batch_size=None, sampler=self.tasks, num_workers=workers,
            collate_fn=_as_is, pin_memory=self.device.type == 'cuda', generator=torch.Generator(),
            persistent_workers=persistent and workers > 0, worker_init_fn=ignore_stop_signals)
        self.first_batch = 0                      # the next pass starts here (a resumed epoch)
        _LOADERS.add(self)

    def __len__(self):
        return len(self.tasks)

    def start_at(self, batch):
        """Let the next pass start at batch `batch`, with the random draws (flips) that an
        uninterrupted pass gives it: the pass draws its base seed as always, and each worker's
        stream first replays the draws of its batches skipped (see `_BatchTasks`). Only that pass."""
        self.first_batch = batch

    def __iter__(self):
        self.tasks.begin_pass(torch.empty((), dtype=torch.int64).random_().item(), self.first_batch)
        self.first_batch = 0
        if self.device.type == 'cuda':
            return self._prefetched()
        return (self._ready(batch) for batch in shut_down_on_error(self.loader))

    def close(self):
        """End the workers now (the persistent ones too); a later pass starts new ones."""
        iterator = getattr(self.loader, '_iterator', None)
        self.loader._iterator = None
        if iterator is not None and hasattr(iterator, '_shutdown_workers'):
            iterator._shutdown_workers()

    def _ready(self, batch):
        """A worker's batch on the device: the images normalised, the labels moved."""
        pixels, flips, *labels = batch
        triplets = pixels.dim() == 5                                  # (3, B, 3, S, S)
        pixels = pixels.to(self.device, non_blocking=True)     # the flips stay where they are: see mirror
        labels = [label.to(self.device, non_blocking=True) for label in labels]
        if triplets:
            images = normalise(pixels.flatten(0, 1), None if flips is None else flips.flatten(),
                               self.channels_last)
            return (*images.unflatten(0, pixels.shape[:2]).unbind(0), *labels)
        return (normalise(pixels, flips, self.channels_last), *labels)

    def _prefetched(self):
        """timm's prefetch loop: batch k + 1 is copied and normalised on a side stream before batch
        k is handed out; the main stream waits for it before the caller's step k + 1."""
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(self.device)
        main, side = torch.cuda.current_stream(self.device), self.side_stream
        side.wait_stream(main)                    # nothing of the side stream's runs before what is queued
        pending = None
        for batch in shut_down_on_error(self.loader):
            with torch.cuda.stream(side):
                ready = self._ready(batch)
            if pending is not None:
                yield pending
            main.wait_stream(side)
            for tensor in ready:
                # made on the side stream, used on the main one: the caching allocator must not
                # hand their memory back to the side stream before the main stream is done with them
                tensor.record_stream(main)
            pending = ready
        if pending is not None:
            yield pending
