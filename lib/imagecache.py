"""Decoded, resized images of a split as one uint8 memory-mapped array (`--cache-images`).

FashionAI's images are ~512 px JPEGs: decoding and resizing them every epoch dominates the CPU
time of training. The cache holds, for the images a split's datasets use, exactly the pixels of
Resize(S) + CenterCrop(S) (datasets.build_geometry) as an (N, S, S, 3) uint8 array in
`<dataset>/cache/<split>_<S>.u8`, beside a JSON key `<split>_<S>.json` that names the source it
was built from (the filenames file's content, the ids cached, each image's size and mtime, S).
A changed key rebuilds the cache. The data file is written under a temporary name and renamed; the
key is written last, so a killed build leaves no cache that looks valid. Disk: N x S x S x 3 bytes.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import torch

import datasets
from lib import gpuinput
from lib.images import load_image
import utils
from utils import UserError

VERSION = 1


class ImageCache:
    """Read side: image id -> (S, S, 3) uint8 pixels. The memmap opens lazily in each process,
    so the object pickles cheaply into DataLoader workers."""

    def __init__(self, path, ids, size, uncached=()):
        self.path, self.size = path, int(size)
        ids = np.asarray(ids, dtype=np.int64)
        self.row_of = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
        self.row_of[ids] = np.arange(len(ids))
        self.row_of[np.asarray(list(uncached), dtype=np.int64)] = -1
        self.n_rows = len(ids)
        self._array, self._pid = None, None

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_array'], state['_pid'] = None, None
        return state

    def array(self):
        """The (N, S, S, 3) read-only memmap, opened once per process."""
        if self._array is None or self._pid != os.getpid():
            self._array = np.memmap(self.path, dtype=np.uint8, mode='r',
                                    shape=(self.n_rows, self.size, self.size, 3))
            self._pid = os.getpid()
        return self._array

    def rows(self, image_ids):
        """Row of each of `image_ids` in `array()`, -1 for an image not cached."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        rows = np.full(len(image_ids), -1, dtype=np.int64)
        known = image_ids < len(self.row_of)
        rows[known] = self.row_of[image_ids[known]]
        return rows

    def pixels(self, image_id):
        """Cached pixels of `image_id` (a read-only view), or None when it is not cached."""
        if image_id >= len(self.row_of) or self.row_of[image_id] < 0:
            return None
        return self.array()[self.row_of[image_id]]


def cache_paths(root, split, size):
    """(data file, key file) of a split's cache at `size` px."""
    base = os.path.join(root, 'cache', f'{split}_{size}')
    return base + '.u8', base + '.json'


def source_key(split_files, split, ids, size):
    """What the cache depends on: the filenames file, the ids, each image's size and mtime, S."""
    with open(split_files.path(f'filenames_{split}.txt'), 'rb') as f:
        listing = hashlib.sha256(f.read()).hexdigest()
    stats = hashlib.sha256()
    filenames = split_files.filenames(split)
    for image_id in ids:
        try:
            st = os.stat(os.path.join(split_files.root, filenames[image_id]))
            stats.update(f'{image_id} {st.st_size} {st.st_mtime_ns}\n'.encode())
        except OSError:
            stats.update(f'{image_id} missing\n'.encode())
    ids_hash = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()
    return {'version': VERSION, 'size': int(size), 'n': len(ids), 'filenames_sha256': listing,
            'ids_sha256': ids_hash, 'images_sha256': stats.hexdigest()}


class _Decoder(torch.utils.data.Dataset):
    """(row, S x S x 3 uint8 pixels, ok) of each image to cache; decoded in DataLoader workers."""

    def __init__(self, paths, size, skip_bad):
        self.paths, self.geometry, self.size, self.skip_bad = paths, datasets.build_geometry(size), size, skip_bad

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row):
        try:
            image = load_image(self.paths[row])
        except UserError:
            if not self.skip_bad:
                raise
            return row, torch.zeros(self.size, self.size, 3, dtype=torch.uint8), False
        return row, torch.from_numpy(np.asarray(self.geometry(image), dtype=np.uint8).copy()), True


def _read_key(key_path):
    try:
        with open(key_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _check_space(directory, n_bytes, data_path):
    free = shutil.disk_usage(directory).free
    if free < n_bytes:
        raise UserError(f"image cache {data_path} needs {n_bytes / 2**30:.1f} GiB, {directory} has "
                        f"{free / 2**30:.1f} GiB free; free space or drop --cache-images")


def build(paths, size, data_path, key_path, key, workers, skip_bad):
    """Decode `paths` into a new cache file; returns the rows that could not be read (skip_bad).
    A build that fails, however (an unreadable image, a full disk, Ctrl-C), leaves nothing behind:
    no temporary file, no data file without its key, not the cache folder it made."""
    n_bytes = len(paths) * size * size * 3
    folder = os.path.dirname(data_path)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder} is a file where the image cache's folder should be; move it away, "
                        f"or drop --cache-images")
    made_folder = not os.path.isdir(folder)
    tmp = f'{data_path}.tmp-{os.getpid()}'
    done = False
    try:
        os.makedirs(folder, exist_ok=True)
        _check_space(folder, n_bytes, data_path)
        bad_rows = _decode_into(tmp, paths, size, workers, skip_bad)
        if os.path.exists(key_path):
            os.remove(key_path)                      # no valid-looking key beside a half-replaced file
        os.replace(tmp, data_path)
        utils.write_json(dict(key, uncached_rows=bad_rows), key_path)
        done = True
    except OSError as err:
        hint = 'free space' if utils.is_disk_full(err) else 'check the folder and its permissions'
        raise UserError(f"cannot write image cache {data_path}: {err.strerror or err}; {hint} "
                        f"or drop --cache-images") from err
    finally:
        if not done:
            _remove_failed_build(tmp, data_path, key_path, folder if made_folder else None)
    return bad_rows


def _decode_into(tmp, paths, size, workers, skip_bad):
    """Decode `paths` into a new memory-mapped file `tmp`; returns the rows that could not be read."""
    array = np.memmap(tmp, dtype=np.uint8, mode='w+', shape=(len(paths), size, size, 3))
    # its own generator: building must not move the global torch RNG (the flips draw from it)
    loader = torch.utils.data.DataLoader(_Decoder(paths, size, skip_bad), batch_size=32, num_workers=workers,
                                         generator=torch.Generator())
    bad_rows = []
    for rows, pixels, ok in gpuinput.shut_down_on_error(loader):
        array[rows.numpy()] = pixels.numpy()
        bad_rows += rows[~ok].tolist()
    array.flush()
    return bad_rows


def _remove_failed_build(tmp, data_path, key_path, made_folder):
    """Take away what a failed build wrote: its temporary file, a data file whose key could not be
    written (the old key is gone: it is no cache), the cache folder if the build made it and it is
    empty."""
    for path in (tmp, data_path) if not os.path.exists(key_path) else (tmp,):
        if os.path.exists(path):
            os.remove(path)
    if made_folder and os.path.isdir(made_folder) and not os.listdir(made_folder):
        os.rmdir(made_folder)


def ensure(split_files, split, ids, size, workers=0, skip_bad=False, may_build=True, log=print):
    """An ImageCache of images `ids` of `split` at `size` px, built or rebuilt when its key differs.

    `may_build=False` (ranks other than a node's first under torchrun) only opens a cache that is
    up to date, and raises otherwise.
    """
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if not len(ids):
        return None
    data_path, key_path = cache_paths(split_files.root, split, size)
    key = source_key(split_files, split, ids, size)
    saved = _read_key(key_path)
    current = saved is not None and {k: saved.get(k) for k in key} == key and os.path.isfile(data_path) \
        and os.path.getsize(data_path) == len(ids) * size * size * 3
    if current:
        bad_rows = saved.get('uncached_rows', [])
    elif not may_build:
        raise UserError(f"image cache {data_path} is missing or stale after the first process of this "
                        f"node built it; is {split_files.root} shared between nodes that see other files?")
    else:
        log(f'building image cache {data_path}: {len(ids)} images at {size} px, '
            f'{len(ids) * size * size * 3 / 2**20:.1f} MiB')
        filenames = split_files.filenames(split)
        paths = [os.path.join(split_files.root, filenames[i]) for i in ids]
        bad_rows = build(paths, size, data_path, key_path, key, workers, skip_bad)
        if bad_rows:
            log(f'--skip-bad-images: {len(bad_rows)} unreadable image(s) of the {split} split not cached')
    return ImageCache(data_path, ids, size, uncached=ids[np.asarray(bad_rows, dtype=np.int64)])
