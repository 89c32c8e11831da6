"""The input pipeline (gpuinput.py) against the transform path it replaces: the same floats, the
same flips, the same global RNG state after each pass, for any number of workers, persistent or
not, cached or not; each epoch's triplets reach persistent workers; a seeded step gives the same
weights. The reference is the transform path gpuinput replaces: a DataLoader over the datasets'
items (build_transform, or CachedImages.load with --cache-images)."""
import numpy as np
import pytest
import torch

import datasets
from lib import gpuinput
from lib import imagecache
from helpers import (LOADER_BATCH, LOADER_SIZE, assert_same_passes, build_zappos, device_passes, reference_passes,
                     tiny_split, triplet_set)
from lib import zappos
from lib import commands, config, engine, inputs, runtime

SIZE, BATCH = LOADER_SIZE, LOADER_BATCH


@pytest.fixture(scope='module')
def split_files(tmp_path_factory, small_synth):
    return tiny_split(tmp_path_factory.mktemp('gpuinput') / 'data', small_synth)


def test_normalise_equals_to_tensor_and_normalize():
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 7, 9, 3), dtype=torch.uint8, generator=gen)   # N H W C
    flips = torch.tensor([True, False, True, True, False, False])
    want = torch.stack([datasets.to_normalized_tensor(p[:, ::-1] if f else p) for p, f in
                        zip(pixels.numpy(), flips.tolist())])
    for channels_last in (False, True):
        got = gpuinput.normalise(pixels.permute(0, 3, 1, 2), flips, channels_last)
        assert torch.equal(got, want)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert got.is_contiguous(memory_format=layout)
    assert torch.equal(gpuinput.normalise(pixels.permute(0, 3, 1, 2)),
                       torch.stack([datasets.to_normalized_tensor(p) for p in pixels.numpy()]))


def test_draw_flips_draws_as_random_horizontal_flip():
    flip = datasets.build_transform(SIZE, train=True).transforms[2]
    torch.manual_seed(3)
    got = datasets.draw_flips(40, 0.5)
    torch.manual_seed(3)
    probe = torch.arange(2).view(1, 1, 2)                  # flipped iff RandomHorizontalFlip flips it
    want = [bool(flip(probe)[0, 0, 0] == 1) for _ in range(40)]
    assert got.tolist() == want and 0 < sum(want) < 40
    state = torch.get_rng_state()
    assert datasets.draw_flips(5, 0.0) is None and torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize('cached', [False, True])
@pytest.mark.parametrize('workers', [0, 2])
def test_training_batches_equal_the_transform_path(split_files, cached, workers):
    """Two epochs: the same images, flips and attributes, batch for batch, and the same global RNG
    state afterwards; the new loader's workers persist, the reference's are fresh each epoch."""
    dataset = triplet_set(split_files, cached)
    want, want_state = reference_passes(dataset, workers, epochs=(1, 2))
    got, got_state = device_passes(dataset, workers, epochs=(1, 2))
    assert_same_passes(got, want)
    assert torch.equal(got_state, want_state)
    torch.manual_seed(5)
    flips = dataset.load_batch(dataset.triplets)[1]
    assert flips.any() and not flips.all()                 # both outcomes occur in these batches


@pytest.mark.parametrize('cached', [False, True])
@pytest.mark.parametrize('workers', [0, 2])
def test_retrieval_batches_equal_the_transform_path(split_files, cached, workers):
    transform = datasets.build_transform(SIZE, train=False)
    queries = datasets.RetrievalDataset(split_files, 'valid', 'query', transform)
    candidates = datasets.RetrievalDataset(split_files, 'valid', 'candidate', transform)
    if cached:
        cache = imagecache.ensure(split_files, 'valid', np.concatenate([queries.image_ids, candidates.image_ids]),
                                  SIZE, log=lambda *_: None)
        queries.attach_cache(cache)
    shard = datasets.IndexShard(queries, 2, len(queries) - 1)
    for dataset in (queries, shard):
        want, want_state = reference_passes(dataset, workers)
        got, got_state = device_passes(dataset, workers, persistent=False)
        assert_same_passes(got, want)
        assert torch.equal(got_state, want_state)


def test_partly_cached_batch_decodes_the_rest(split_files):
    """An image the cache lacks (unreadable when it was built) is decoded in the same batch."""
    transform = datasets.build_transform(SIZE, train=False)
    plain = datasets.RetrievalDataset(split_files, 'test', 'candidate', transform)
    cache = imagecache.ensure(split_files, 'test', plain.image_ids, SIZE, log=lambda *_: None)
    missing = plain.entries[1, 0]
    partial = datasets.RetrievalDataset(split_files, 'test', 'candidate', transform)
    partial.attach_cache(imagecache.ImageCache(cache.path, plain.image_ids, SIZE, uncached=[missing]))
    assert partial.cache.pixels(missing) is None and partial.cache.pixels(plain.entries[0, 0]) is not None
    indices = np.arange(min(6, len(plain)))
    assert torch.equal(partial.uint8_pixels(plain.entries[indices, 0]), plain.uint8_pixels(plain.entries[indices, 0]))


def test_triplet_eval_set_batches_equal_its_items(tmp_path):
    folder = build_zappos(tmp_path)
    files = zappos.ZapposFiles(str(folder.parent))
    eval_set = zappos.TripletEvalSet(files, 'val', datasets.build_transform(SIZE, train=False))
    want, _ = reference_passes(eval_set, 0)
    got, _ = device_passes(eval_set, 0)
    assert_same_passes(got, want)


def test_persistent_workers_get_each_epochs_triplets_and_resume_alike(split_files):
    """Epoch e's batches hold set_epoch(e)'s triplets; a run resumed at epoch 2 (fresh workers,
    the RNG state restored) loads exactly what the uninterrupted run's persistent workers load."""
    dataset = triplet_set(split_files, cached=True, num_triplets=12)
    torch.manual_seed(5)
    loader = gpuinput.DeviceLoader(dataset, BATCH, 'cpu', workers=2, persistent=True)
    seen, triplets, states = [], [], []
    for epoch in (1, 2, 3):
        dataset.set_epoch(epoch)
        triplets.append(dataset.triplets.copy())
        states.append(torch.get_rng_state())
        seen.append(list(loader))
        assert torch.equal(torch.cat([b[3] for b in seen[-1]]), torch.from_numpy(triplets[-1][:, 3]))
    assert not np.array_equal(triplets[0], triplets[1])
    assert not all(torch.equal(a, b) for a, b in zip(seen[0][0][:3], seen[1][0][:3]))

    resumed = triplet_set(split_files, cached=True, num_triplets=12)
    torch.set_rng_state(states[1])
    again = gpuinput.DeviceLoader(resumed, BATCH, 'cpu', workers=2, persistent=True)
    for epoch in (2, 3):
        resumed.set_epoch(epoch)
        assert_same_passes([list(again)], [seen[epoch - 1]])


def test_seeded_training_step_gives_the_same_weights(split_files):
    """train_one_epoch on the transform path's loader and on the new one, from the same seed: equal weights."""
    args = config.from_flags(['--backbone', 'resnet18', '--no-pretrained', '--dim_embed', '16', '--img-size',
                            str(SIZE), '--amp', 'off', '--batch-size', str(BATCH), '--workers', '0',
                            '--log-interval', '100'])
    dataset = triplet_set(split_files, cached=False, num_triplets=BATCH)          # one step: keep it cheap
    weights = []
    for new in (False, True):
        torch.manual_seed(0)
        tnet = commands.build_network(args, len(split_files.attributes), torch.device('cpu'))
        optimizer = torch.optim.Adam([p for p in tnet.parameters() if p.requires_grad], lr=args.lr)
        loader = inputs.make_loader(dataset, args.batch_size, torch.device('cpu'), args.workers, args.channels_last) if new else \
            torch.utils.data.DataLoader(dataset, batch_size=BATCH)
        engine.train_one_epoch(tnet, loader, optimizer, torch.amp.GradScaler('cpu', enabled=False),
                             torch.device('cpu'), 1, logger=runtime.silent_logger(), **commands.train_settings(args, tnet.embeddingnet))
        weights.append(tnet.state_dict())
    assert isinstance(inputs.make_loader(dataset, args.batch_size, torch.device('cpu'), args.workers, args.channels_last), gpuinput.DeviceLoader)
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


class FakeStream:
    """Records the stream calls of DeviceLoader._prefetched (CUDA-only code, run here on the CPU)."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append((self.name, 'waits for', other.name))


def test_prefetch_loop_orders_its_streams(split_files, monkeypatch):
    """The side-stream loop on fake streams: the same batches as the plain path; each batch is
    prepared on the side stream, then the main stream waits for the side one and every tensor is
    recorded on the main stream before the batch is handed out, one batch behind the loader."""
    import contextlib
    log = []
    main, side = FakeStream('main', log), FakeStream('side', log)
    current = [main]

    @contextlib.contextmanager
    def on_stream(stream):
        log.append(('enter', stream.name))
        current[0] = stream
        yield
        current[0] = main

    def record_stream(tensor, stream):
        log.append(('record', stream.name, tensor.data_ptr()))

    monkeypatch.setattr(torch.cuda, 'Stream', lambda device=None: side)
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: main)
    monkeypatch.setattr(torch.cuda, 'stream', on_stream)
    monkeypatch.setattr(torch.Tensor, 'record_stream', record_stream)
    dataset = triplet_set(split_files, cached=True)
    want, want_state = device_passes(dataset, 0)
    torch.manual_seed(5)
    loader = gpuinput.DeviceLoader(dataset, BATCH, 'cpu', 0)
    loader.tasks.begin_pass(torch.empty((), dtype=torch.int64).random_().item())   # what __iter__ draws
    got = []
    for batch in loader._prefetched():
        recorded = {entry[2] for entry in log if entry[0] == 'record' and entry[1] == 'main'}
        assert all(t.data_ptr() in recorded for t in batch)
        got.append(batch)
        log.append(('yielded',))
    assert_same_passes([got], want)
    assert torch.equal(torch.get_rng_state(), want_state)
    assert log[0] == ('side', 'waits for', 'main')
    events = [e[:2] if e[0] != 'record' else ('record',) for e in log[1:]]
    n = len(got)
    steps = [('enter', 'side'), ('main', 'waits for'), ('record',), ('record',), ('record',), ('record',)]
    expected = steps + [e for _ in range(n - 1) for e in [('enter', 'side'), ('yielded',)] + steps[1:]] + [('yielded',)]
    assert events == expected


# ----------------------------------------------------------------------------- a pass resumed mid-way

@pytest.mark.parametrize('workers', [0, 2])
def test_a_pass_started_at_batch_k_is_the_rest_of_the_whole_pass(split_files, workers):
    """start_at(k): the next pass yields batches k, k + 1, ... of an uninterrupted pass, the same
    images and flips (each worker's stream replays the draws of the batches skipped), leaves the
    global RNG where the whole pass leaves it, and the pass after it starts at batch 0 again."""
    dataset = triplet_set(split_files, cached=True, num_triplets=5 * BATCH)
    whole, whole_state = device_passes(dataset, workers, epochs=(None, None), persistent=False)
    for first in (1, 3):
        torch.manual_seed(5)
        loader = gpuinput.DeviceLoader(dataset, BATCH, 'cpu', workers)
        loader.start_at(first)
        assert len(loader) == 5
        rest = list(loader)
        assert len(rest) == 5 - first
        assert_same_passes([rest], [whole[0][first:]])
        assert_same_passes([list(loader)], [whole[1]])
        assert torch.equal(torch.get_rng_state(), whole_state)


def test_batch_count_and_slices_of_a_pass():
    """len() counts a last partial batch; a pass slices batch_keys() into consecutive batches."""
    class Keys:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def batch_keys(self):
            return np.arange(self.n)

    for n, want in ((8, 2), (9, 3), (1, 1)):
        tasks = gpuinput._BatchTasks(Keys(n), 4, workers=0)
        tasks.begin_pass(0)
        assert len(tasks) == want
        assert [t.keys.tolist() for t in tasks] == [list(range(n))[s:s + 4] for s in range(0, n, 4)]


# ----------------------------------------------------------------------------- lib/inputs.py: which pipeline, which transform

def test_each_pipeline_gets_its_transform_and_loader(split_files, monkeypatch):
    """Training triplets flip (p 0.5) at --img-size; ASEN++'s do not (the authors' GlobalTransform);
    evaluation sets never flip, and share one image cache with --cache-images. Triplets and
    evaluation sets load through DeviceLoader, not persistent unless asked; ASEN++'s originals
    through a plain DataLoader with the dataset's collate_fn, pinned only for CUDA."""
    import types
    args = config.from_flags(['--img-size', str(SIZE), '--num_triplets', '8', '--workers', '2'])
    train = inputs.training_set(split_files, args)
    assert type(train) is datasets.TripletDataset and datasets.transform_settings(train.transform) == (SIZE, 0.5)
    loader = inputs.make_loader(train, BATCH, torch.device('cpu'), args.workers, args.channels_last)
    assert isinstance(loader, gpuinput.DeviceLoader) and not loader.loader.persistent_workers
    assert inputs.make_loader(train, BATCH, torch.device('cpu'), 2, True, persistent=True).loader.persistent_workers
    assert inputs.make_loader(train, BATCH, torch.device('cpu'), 2, True).channels_last
    pp = config.from_flags(['--model', 'ASENpp', '--img-size', str(SIZE), '--num_triplets', '8'])
    pp_train = inputs.training_set(split_files, pp)
    assert datasets.transform_settings(pp_train.transform) == (SIZE, 0.0)
    pp_train.originals = True                               # what stage 2 with --local-crop original sets
    plain = inputs.make_loader(pp_train, BATCH, torch.device('cpu'), 0, False)
    assert type(plain) is torch.utils.data.DataLoader and plain.collate_fn == pp_train.collate_fn
    assert not plain.pin_memory
    lines = []
    logger = types.SimpleNamespace(info=lines.append)
    valid = inputs.evaluation_of(split_files, 'valid', args, logger)
    for dataset in valid.datasets:
        assert datasets.transform_settings(dataset.transform) == (SIZE, 0.0) and dataset.cache is None
    cached = config.from_flags(['--img-size', str(SIZE), '--cache-images', '--workers', '0'])
    valid = inputs.evaluation_of(split_files, 'valid', cached, logger)
    assert valid.queries.cache is valid.candidates.cache and valid.queries.cache.size == SIZE


def test_skipped_evaluation_images_are_counted_over_queries_and_candidates(split_files):
    """--skip-bad-images: the log line counts the images left out of the queries and of the candidates."""
    import os
    import types
    query, candidate = (split_files.retrieval_entries('test', role)[0, 0] for role in ('query', 'candidate'))
    bad = [os.path.join(split_files.root, split_files.filenames('test')[i]) for i in (query, candidate)]
    originals = [open(path, 'rb').read() for path in bad]
    lines = []
    try:
        for path in bad:
            with open(path, 'wb') as f:
                f.write(b'not an image')
        args = config.from_flags(['--img-size', str(SIZE), '--skip-bad-images'])
        inputs.evaluation_of(split_files, 'test', args, types.SimpleNamespace(info=lines.append))
    finally:
        for path, original in zip(bad, originals):
            with open(path, 'wb') as f:
                f.write(original)
    listed = [len(split_files.retrieval_entries('test', role)) for role in ('query', 'candidate')]
    assert lines == ['--skip-bad-images: left out 2 missing or unreadable image(s) of the test split',
                     f'--skip-bad-images: the test split is scored on {listed[0] - 1} of {listed[0]} queries '
                     f'and {listed[1] - 1} of {listed[1]} candidates']


def test_worker_counts(monkeypatch):
    """--workers wins (0 included); else 4 on CUDA and 0 on the CPU for the loaders, and up to 4 (the
    cores, at least 1) for building the image cache."""
    import types
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert [inputs.default_workers(w, d) for w, d in ((None, cpu), (None, cuda), (0, cuda), (3, cpu))] == [0, 4, 0, 3]
    cache_workers = lambda workers: inputs.cache_workers(types.SimpleNamespace(workers=workers))
    for cores, want in ((2, 2), (16, 4), (None, 1)):
        monkeypatch.setattr(inputs.os, 'cpu_count', lambda cores=cores: cores)
        assert cache_workers(None) == want
    assert cache_workers(0) == 0 and cache_workers(7) == 7


def test_loader_from_batch_k_yields_the_rest():
    """LoaderFrom (a resumed epoch of ASEN++ stage 2's item loader): batches k, k + 1, ... of the
    whole loader; its length stays the whole loader's."""
    whole = torch.utils.data.DataLoader(torch.arange(10), batch_size=4)
    rest = inputs.LoaderFrom(whole, 1)
    assert len(rest) == 3 and rest.dataset is whole.dataset
    assert [b.tolist() for b in rest] == [[4, 5, 6, 7], [8, 9]]


def test_workers_ignore_the_stop_signals():
    """ignore_stop_signals (every loader's worker_init_fn): Ctrl-C, SIGTERM and SIGUSR1 are the main
    process's to handle; a worker ignores them."""
    import signal
    numbers = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    saved = [signal.getsignal(n) for n in numbers]
    try:
        for n in numbers:
            signal.signal(n, signal.SIG_DFL)
        gpuinput.ignore_stop_signals(0)
        assert [signal.getsignal(n) for n in numbers] == [signal.SIG_IGN] * 3
    finally:
        for n, handler in zip(numbers, saved):
            signal.signal(n, handler)


def test_flip_draws_at_the_probability_itself_as_random_horizontal_flip(monkeypatch):
    """A draw equal to p does not flip, in RandomHorizontalFlip and in draw_flips alike; an
    image's item path draws once per image: random_draws counts one per image of a key."""
    flip = datasets.build_transform(SIZE, train=True).transforms[2]
    monkeypatch.setattr(torch, 'rand', lambda *size, **kwargs: torch.full(size, 0.5))
    probe = torch.arange(2).view(1, 1, 2)
    assert torch.equal(flip(probe), probe)
    assert datasets.draw_flips(3, 0.5).tolist() == [False] * 3


def test_random_draws_of_a_pass_resumed_mid_way(split_files):
    """The draws a resumed pass skips: one per image with a random flip (three per triplet), none
    without."""
    train = datasets.TripletDataset(split_files, 8, datasets.build_transform(SIZE, train=True), seed=1)
    assert train.random_draws(train.triplets[:5]) == 15
    flipped = datasets.RetrievalDataset(split_files, 'valid', 'query', datasets.build_transform(SIZE, train=True))
    plain = datasets.RetrievalDataset(split_files, 'valid', 'query', datasets.build_transform(SIZE, train=False))
    assert flipped.random_draws(np.arange(5)) == 5 and plain.random_draws(np.arange(5)) == 0


def test_normalise_is_contiguous_unless_asked_for_channels_last():
    pixels = torch.randint(0, 256, (2, 5, 5, 3), dtype=torch.uint8).permute(0, 3, 1, 2)     # NHWC strides
    assert gpuinput.normalise(pixels).is_contiguous()
    assert gpuinput.normalise(pixels, torch.tensor([True, False])).is_contiguous()


def test_normalise_constants_made_under_inference_mode_are_ordinary_tensors():
    """The first evaluation may run under torch.inference_mode and make the cached (255, mean, std):
    they stay ordinary tensors, usable by the training steps after it."""
    gpuinput._constants.cache_clear()
    with torch.inference_mode():
        gpuinput.normalise(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
        gpuinput.normalise(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), channels_last=True)
    made = gpuinput._constants(torch.device('cpu'), torch.get_default_dtype()) + \
        gpuinput._constants(torch.device('cpu'), torch.get_default_dtype(), 2)
    assert not any(t.is_inference() for t in made)
