"""--cache-images: the cached pixels are the transform's, the key rebuilds a stale cache, workers read it."""
import os
import pickle
import traceback
import types

import numpy as np
import pytest
import torch

import asen
import datasets
from lib import imagecache, images
from helpers import FAITHFUL, private_copy
from conftest import TINY
from utils import UserError

SIZE = 40


@pytest.fixture(scope='module')
def split_files(tmp_path_factory, small_synth):
    """A tiny SynthFashion folder of this module's own (the tests below alter its images): a copy
    of the session's (conftest `small_synth`)."""
    root = tmp_path_factory.mktemp('cache') / 'data'
    private_copy(small_synth, root / 'SynthFashion')
    return datasets.SplitFiles(str(root), 'SynthFashion')


def cached(dataset, split_files, split, **kwargs):
    cache = imagecache.ensure(split_files, split, dataset.image_ids, SIZE, log=lambda *_: None, **kwargs)
    dataset.attach_cache(cache)
    return dataset


def test_eval_items_equal_the_uncached_transform(split_files):
    transform = datasets.build_transform(SIZE, train=False)
    plain = datasets.RetrievalDataset(split_files, 'valid', 'candidate', transform)
    fast = cached(datasets.RetrievalDataset(split_files, 'valid', 'candidate', transform), split_files, 'valid')
    assert fast.cache is not None and len(plain) > 4
    for index in range(len(plain)):
        a, b = plain[index], fast[index]
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_train_items_equal_the_uncached_transform_flip_for_flip(split_files):
    """Same torch seed: the cached path draws the flips as RandomHorizontalFlip does; both flip
    outcomes occur and each matches the transform bit for bit."""
    train = datasets.build_transform(SIZE, train=True)
    plain = datasets.TripletDataset(split_files, 12, train, seed=1)
    fast = cached(datasets.TripletDataset(split_files, 12, train, seed=1), split_files, 'train')
    unflipped = datasets.build_transform(SIZE, train=False)
    flips = set()
    for index in range(len(plain)):
        torch.manual_seed(index)
        a = plain[index]
        torch.manual_seed(index)
        b = fast[index]
        for image_a, image_b, image_id in zip(a[:3], b[:3], plain.triplets[index, :3]):
            assert torch.equal(image_a, image_b)
            straight = unflipped(images.load_image(os.path.join(plain.root, plain.filenames[image_id])))
            flips.add(not torch.equal(image_a, straight))
        assert a[3] == b[3]
    assert flips == {True, False}


def test_stale_cache_is_rebuilt(split_files, tmp_path):
    ids = np.arange(8)
    logs = []
    first = imagecache.ensure(split_files, 'test', ids, SIZE, log=logs.append)
    data_path, key_path = imagecache.cache_paths(split_files.root, 'test', SIZE)
    assert os.path.getsize(data_path) == 8 * SIZE * SIZE * 3 and os.path.isfile(key_path)
    assert len(logs) == 1 and first.pixels(3).shape == (SIZE, SIZE, 3)
    imagecache.ensure(split_files, 'test', ids, SIZE, log=logs.append)
    assert len(logs) == 1                                    # up to date: reused
    image = os.path.join(split_files.root, split_files.filenames('test')[2])
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    imagecache.ensure(split_files, 'test', ids, SIZE, log=logs.append)
    assert len(logs) == 2                                    # an image changed: rebuilt
    imagecache.ensure(split_files, 'test', ids[:5], SIZE, log=logs.append)
    assert len(logs) == 3                                    # other ids: rebuilt
    other = imagecache.ensure(split_files, 'test', ids, SIZE // 2, log=logs.append)
    assert len(logs) == 4 and other.pixels(0).shape == (SIZE // 2, SIZE // 2, 3)
    assert os.path.isfile(imagecache.cache_paths(split_files.root, 'test', SIZE)[0])   # sizes coexist
    with pytest.raises(UserError, match='stale'):
        imagecache.ensure(split_files, 'test', ids, SIZE, may_build=False)


def test_workers_read_the_cache(split_files):
    transform = datasets.build_transform(SIZE, train=False)
    fast = cached(datasets.RetrievalDataset(split_files, 'test', 'query', transform), split_files, 'test')
    fast.cache.array()                                       # opened here: the workers must reopen theirs
    batches = list(torch.utils.data.DataLoader(fast, batch_size=4, num_workers=1))
    images = torch.cat([b[0] for b in batches])
    assert torch.equal(images, torch.stack([fast[i][0] for i in range(len(fast))]))


def test_unreadable_image_is_not_cached_with_skip_bad(split_files):
    filenames = split_files.filenames('valid')
    bad = os.path.join(split_files.root, filenames[5])
    original = open(bad, 'rb').read()
    try:
        with open(bad, 'wb') as f:
            f.write(b'not an image')
        with pytest.raises(UserError, match=filenames[5]):
            imagecache.ensure(split_files, 'valid', np.arange(8), SIZE, workers=0, log=lambda *_: None)
        cache = imagecache.ensure(split_files, 'valid', np.arange(8), SIZE, skip_bad=True, log=lambda *_: None)
        assert cache.pixels(5) is None and cache.pixels(4) is not None
        reopened = imagecache.ensure(split_files, 'valid', np.arange(8), SIZE, may_build=False)
        assert reopened.pixels(5) is None
    finally:
        with open(bad, 'wb') as f:
            f.write(original)


@pytest.mark.slow
def test_training_on_the_cache_gives_the_same_weights(workdir, tiny_data):
    """One epoch with and without --cache-images (fp32, the original path): identical checkpoints."""
    private_copy(tiny_data, workdir / 'data')                # the session's data; the cache lands in the copy
    flags = TINY + ['--epochs', '1', '--workers', '0'] + FAITHFUL
    assert asen.main(flags + ['--name', 'plain']) == 0
    assert asen.main(flags + ['--name', 'cached', '--cache-images']) == 0
    cache_dir = workdir / 'data' / 'SynthFashion' / 'cache'
    assert {'train_64.u8', 'train_64.json', 'valid_64.u8', 'valid_64.json'} <= set(os.listdir(cache_dir))
    load = lambda name: torch.load(workdir / 'runs' / name / 'checkpoint.pth.tar', weights_only=True)  # noqa: E731
    plain, fast = load('plain'), load('cached')
    for key, value in plain['state_dict'].items():
        assert torch.equal(value, fast['state_dict'][key]), key
    assert plain['prec'] == fast['prec']


def image_that_fails(split_files, row, error):
    """Patch load_image to raise `error` for the image of `row` of the valid split."""
    bad = os.path.join(split_files.root, split_files.filenames('valid')[row])
    real = imagecache.load_image

    def load_image(path, *args, **kwargs):
        if path == bad:
            raise error
        return real(path, *args, **kwargs)
    return load_image


@pytest.mark.parametrize('error, workers', [(UserError('cannot read image'), 2), (KeyboardInterrupt(), 0),
                                            (OSError(28, 'No space left on device'), 0)],
                         ids=['unreadable image, 2 workers', 'Ctrl-C', 'full disk'])
def test_a_failed_build_leaves_nothing_behind(split_files, tmp_path, monkeypatch, error, workers):
    """An unreadable image, Ctrl-C or a full disk in the middle of a build: no temporary file, no
    cache file without its key, not even the cache folder the build made."""
    monkeypatch.setattr(imagecache, "load_image", image_that_fails(split_files, 5, error))
    filenames = split_files.filenames('valid')
    paths = [os.path.join(split_files.root, filenames[i]) for i in range(8)]
    (tmp_path / 'data').mkdir()
    data_path, key_path = imagecache.cache_paths(str(tmp_path / 'data'), 'valid', SIZE)
    with pytest.raises((UserError, KeyboardInterrupt, OSError)) as failure:
        imagecache.build(paths, SIZE, data_path, key_path, {'size': SIZE}, workers, skip_bad=False)
    # A worker's exception, re-raised by torch, holds the DataLoader iterator in a reference cycle;
    # freed later by the garbage collector, with its queues already closed, the iterator waits 5 s
    # a worker for them to exit. Clearing the frames frees it now, its workers exiting at once.
    traceback.clear_frames(failure.tb)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')) == ['data']


def test_a_key_that_cannot_be_written_takes_its_cache_file_away(split_files, tmp_path, monkeypatch):
    def disk_full(*args):
        raise UserError('cannot write file: No space left on device')
    monkeypatch.setattr(imagecache.utils, 'write_json', disk_full)
    filenames = split_files.filenames('valid')
    paths = [os.path.join(split_files.root, filenames[i]) for i in range(4)]
    (tmp_path / 'data').mkdir()
    data_path, key_path = imagecache.cache_paths(str(tmp_path / 'data'), 'valid', SIZE)
    with pytest.raises(UserError, match='No space left'):
        imagecache.build(paths, SIZE, data_path, key_path, {'size': SIZE}, 0, skip_bad=False)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')) == ['data']


# ----------------------------------------------------------------------------- ImageCache, the read side

def test_image_cache_rows_and_pixels(tmp_path):
    """Image ids map to their rows in the file; ids not cached (absent, past the largest, or
    unreadable when it was built) have row -1 and no pixels."""
    pixels = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)
    path = tmp_path / 'cache.u8'
    pixels.tofile(path)
    cache = imagecache.ImageCache(str(path), np.array([2, 5, 7]), np.int64(2), uncached=[5])
    assert cache.rows([7, 2, 5, 0, 3, 8, 100]).tolist() == [2, 0, -1, -1, -1, -1, -1]
    assert np.array_equal(cache.pixels(2), pixels[0]) and np.array_equal(cache.pixels(7), pixels[2])
    assert [cache.pixels(i) for i in (0, 3, 5, 8, 100)] == [None] * 5


def test_image_cache_opens_its_file_once_per_process(tmp_path, monkeypatch):
    """array() opens the memmap once, and again in another process (a DataLoader worker): a
    pickled cache carries no open file."""
    path = tmp_path / 'cache.u8'
    np.zeros((2, 2, 2, 3), dtype=np.uint8).tofile(path)
    cache = imagecache.ImageCache(str(path), [0, 1], 2)
    first = cache.array()
    assert cache.array() is first
    monkeypatch.setattr(imagecache.os, 'getpid', lambda: -1)
    other = cache.array()
    assert other is not first and cache.array() is other
    assert pickle.loads(pickle.dumps(cache))._array is None


def test_build_needs_exactly_the_cache_files_bytes_free(split_files, tmp_path, monkeypatch):
    """A build checks the free space for its file, N * S * S * 3 bytes, before decoding: exactly that
    much free is enough, one byte less is one line naming the file."""
    filenames = split_files.filenames('valid')
    paths = [os.path.join(split_files.root, filenames[i]) for i in range(3)]
    need = 3 * SIZE * SIZE * 3
    for free, fits in ((need, True), (need - 1, False)):
        monkeypatch.setattr(imagecache.shutil, 'disk_usage', lambda folder, free=free: types.SimpleNamespace(free=free))
        folder = tmp_path / str(free)
        folder.mkdir()
        data_path, key_path = imagecache.cache_paths(str(folder), 'valid', SIZE)
        if fits:
            assert imagecache.build(paths, SIZE, data_path, key_path, {'size': SIZE}, 0, skip_bad=False) == []
            assert os.path.getsize(data_path) == need
        else:
            with pytest.raises(UserError, match=f'image cache {data_path} needs'):
                imagecache.build(paths, SIZE, data_path, key_path, {'size': SIZE}, 0, skip_bad=False)


def test_skipped_images_are_logged_when_the_cache_is_built(split_files):
    """Building with --skip-bad-images logs the build and how many images were left out."""
    filenames = split_files.filenames('test')
    bad = os.path.join(split_files.root, filenames[2])
    original = open(bad, 'rb').read()
    lines = []
    try:
        with open(bad, 'wb') as f:
            f.write(b'not an image')
        cache = imagecache.ensure(split_files, 'test', np.arange(4), SIZE, skip_bad=True, log=lines.append)
    finally:
        with open(bad, 'wb') as f:
            f.write(original)
    assert cache.pixels(2) is None and cache.pixels(3) is not None
    assert lines[0].startswith('building image cache ') and lines[0].endswith(f': 4 images at {SIZE} px, 0.0 MiB')
    assert lines[1:] == ['--skip-bad-images: 1 unreadable image(s) of the test split not cached']


def test_a_cache_of_another_size_is_refused_and_none_detaches(split_files):
    transform = datasets.build_transform(SIZE, train=False)
    queries = datasets.RetrievalDataset(split_files, 'valid', 'query', transform)
    other = imagecache.ImageCache('unused', queries.image_ids, SIZE + 1)
    with pytest.raises(ValueError, match=f'image cache holds {SIZE + 1} px images, the transform wants {SIZE} px'):
        queries.attach_cache(other)
    cached(queries, split_files, 'valid')
    queries.attach_cache(None)
    assert queries.cache is None


def test_cached_item_flips_as_random_horizontal_flip_at_p(split_files, monkeypatch):
    """The cached item path draws as RandomHorizontalFlip: a draw equal to p does not flip."""
    train = cached(datasets.TripletDataset(split_files, 4, datasets.build_transform(SIZE, train=True), seed=1),
                   split_files, 'train')
    image_id = train.triplets[0, 0]
    want = datasets.to_normalized_tensor(train.cache.pixels(image_id))
    monkeypatch.setattr(torch, 'rand', lambda *size, **kwargs: torch.full(size, 0.5))
    assert torch.equal(train.load(image_id), want)
    monkeypatch.setattr(torch, 'rand', lambda *size, **kwargs: torch.full(size, 0.25))
    assert torch.equal(train.load(image_id), want.flip(-1))


def test_a_truncated_cache_file_is_rebuilt(split_files):
    """A data file shorter than its key says (cut by a full disk or a copy) is rebuilt, not mapped."""
    ids = np.arange(3)
    imagecache.ensure(split_files, 'test', ids, SIZE, log=lambda *_: None)
    data_path, _ = imagecache.cache_paths(split_files.root, 'test', SIZE)
    with open(data_path, 'r+b') as f:
        f.truncate(SIZE * SIZE * 3)
    lines = []
    cache = imagecache.ensure(split_files, 'test', ids, SIZE, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith('building image cache')
    assert os.path.getsize(data_path) == 3 * SIZE * SIZE * 3 and cache.pixels(2) is not None
