"""Datasets in the authors' on-disk format (FashionAI, DARN, DeepFashion, SynthFashion).

Layout under `<data_path>/<Dataset>/` (paths in the files are relative to that folder):
  filenames_{train,valid,test}.txt   one image path a line; the 0-based line number is the id
  label_train.txt                    `id attr value [attr value ...]`
  {candidate,query}_{valid,test}.txt `id attr value`
and `<data_path>/meta.json` maps the dataset name to ATTRIBUTES and ATTRIBUTES_NUM. A dataset
may carry its own `<data_path>/<Dataset>/meta.json` (SynthFashion does), which wins, so unpacking
the authors' archive over `data/meta.json` cannot break it. The published files have CRLF ends,
stray CRs and trailing whitespace; every reader here accepts them.

`python build_fashionai.py --root data/FashionAI [--seed 0]` builds FashionAI split files in
this format from the challenge's Annotations/label.csv.
"""

if __name__ == '__main__':                       # run as a script: say what to run instead
    print('error: datasets.py is a module, not a command; run python asen.py to train, or build a FashionAI split with python build_fashionai.py --root data/FashionAI', file=__import__('sys').stderr)
    raise SystemExit(2)
import json
import os

import numpy as np
import torch
from torchvision import transforms

from lib import checks
from lib.images import bad_image_ids, load_image
from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- file readers

def read_lines(path):
    """Lines of a text file split on LF only, each stripped of CR and surrounding whitespace.

    Splitting on LF alone keeps a stray CR inside a line from shifting the line numbers (ids);
    trailing empty lines are dropped. Not a regular file, a BOM or a byte that is not UTF-8 is a
    one-line error (checks.py).
    """
    if not os.path.lexists(path):
        raise UserError(f"{path}: file not found")
    text = checks.decode_utf8(path, checks.read_bytes(path))
    lines = [line.strip() for line in text.split('\n')]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def read_int_rows(path, pairs=False):
    """Rows of integers from a split file, as a list of (line number, [ints]).

    `pairs=False`: exactly `id attr value`. `pairs=True`: `id attr value [attr value ...]`.
    A blank line, or anything else malformed (ids in other than ASCII digits included), is
    reported as file:line.
    """
    rows = []
    lines = read_lines(path)
    checks.refuse_blank_lines(path, lines, 'each line is one labelled image; delete the line')
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        bad_count = len(fields) < 3 or len(fields) % 2 == 0 if pairs else len(fields) != 3
        if bad_count or not all(checks.is_id(f) for f in fields):
            expected = "'id attr value [attr value ...]'" if pairs else "'id attr value'"
            raise UserError(f"{path}:{number}: malformed line {line!r}; expected {expected} "
                            f"with non-negative integers in ASCII digits 0-9")
        rows.append((number, [int(f) for f in fields]))
    return rows


def meta_entry(data_path, dataset):
    """(ATTRIBUTES, ATTRIBUTES_NUM in that order, the meta.json they came from) of `dataset`."""
    candidates = [os.path.join(data_path, dataset, 'meta.json'), os.path.join(data_path, 'meta.json')]
    for path in candidates:
        if not os.path.lexists(path):
            continue
        try:
            meta = json.loads(checks.decode_utf8(path, checks.read_bytes(path, 'meta.json')))
        except ValueError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from err
        entry = checks.check_meta(path, meta, dataset)
        if entry is not None:
            return entry[0], entry[1], path
    raise UserError(f"no meta.json entry for dataset {dataset!r} in {' or '.join(candidates)}; "
                    f"unpack the authors' split archive into {data_path}/ (docs/datasets.md, \"The authors' format\")")


# ----------------------------------------------------------------------------- dataset files

def missing_dataset_message(root):
    """The line for a dataset folder that is not there (relative paths count from the working
    directory, which a command run from elsewhere changes)."""
    where = '' if os.path.isabs(root) else f' (relative to the working directory {os.getcwd()})'
    return (f"dataset folder {root} not found{where}; prepare it as docs/datasets.md says "
            f"(\"The authors' format\") or pass --data_path the folder that holds it")


def check_dataset_folder(data_path, dataset):
    """A one-line error before anything is written when `<data_path>/<dataset>` is not a folder."""
    root = os.path.join(data_path, dataset)
    if not os.path.isdir(root):
        raise UserError(missing_dataset_message(root))


class SplitFiles:
    """The meta data, file lists and labels of one dataset folder, validated on load."""

    def __init__(self, data_path, dataset):
        self.root = os.path.join(data_path, dataset)
        if not os.path.isdir(self.root):
            raise UserError(missing_dataset_message(self.root))
        self.dataset = dataset
        self.attributes, self.values_per_attribute, self.meta_path = meta_entry(data_path, dataset)
        self._filenames = {}

    def path(self, name):
        return os.path.join(self.root, name)

    def filenames(self, split):
        """Image paths of a split, indexed by id."""
        if split not in self._filenames:
            file = self.path(f'filenames_{split}.txt')
            names = read_lines(file)
            # a blank line would take an id and shift every later image's id by one
            checks.refuse_blank_lines(file, names, 'each line is one image path and its line number is the '
                                                    'id; delete the line (or fill in its image)')
            self._filenames[split] = names
        return self._filenames[split]

    def _check(self, file, number, image_id, attr, value, n_images):
        if image_id >= n_images:
            raise UserError(f"{file}:{number}: image id {image_id} is past the end of its filenames "
                            f"file ({n_images} lines)")
        if attr >= len(self.attributes):
            raise UserError(f"{file}:{number}: attribute {attr} out of range; {self.dataset} has "
                            f"{len(self.attributes)} attributes in {self.meta_path}")
        if value >= self.values_per_attribute[attr]:
            raise UserError(f"{file}:{number}: value {value} out of range for attribute "
                            f"{self.attributes[attr]!r}, which has "
                            f"{self.values_per_attribute[attr]} values in ATTRIBUTES_NUM")

    def train_labels(self):
        """(id, attr, value) int array (M, 3) from label_train.txt, one row per labelled pair."""
        file = self.path('label_train.txt')
        n_images = len(self.filenames('train'))
        triples = []
        for number, fields in read_int_rows(file, pairs=True):
            image_id = fields[0]
            for attr, value in zip(fields[1::2], fields[2::2]):
                self._check(file, number, image_id, attr, value, n_images)
                triples.append((image_id, attr, value))
        return np.asarray(triples, dtype=np.int64).reshape(-1, 3)

    def retrieval_entries(self, split, role):
        """(id, attr, value) int array (M, 3) of `{role}_{split}.txt`, role query or candidate."""
        file = self.path(f'{role}_{split}.txt')
        n_images = len(self.filenames(split))
        triples = []
        for number, (image_id, attr, value) in read_int_rows(file):
            self._check(file, number, image_id, attr, value, n_images)
            triples.append((image_id, attr, value))
        return np.asarray(triples, dtype=np.int64).reshape(-1, 3)


# ----------------------------------------------------------------------------- triplets

class TripletSampler:
    """Draws training triplets as the authors do (TripletGenerator in their image_loader.py).

    Attribute uniform; value uniform; anchor and positive two distinct labelled entries with that
    value; negative a labelled entry of the same attribute with another value. Values with fewer
    than two images are never drawn (the original loops forever on them).
    """

    def __init__(self, labels, n_attributes):
        """`labels`: (M, 3) rows (image id, attribute, value)."""
        self.groups = []    # per attribute: {value: image ids}
        self.entries = []   # per attribute: (image ids, values) of all its entries
        for attr in range(n_attributes):
            rows = labels[labels[:, 1] == attr]
            by_value = {int(v): rows[rows[:, 2] == v, 0] for v in np.unique(rows[:, 2])}
            self.groups.append({v: ids for v, ids in by_value.items() if len(ids) >= 2})
            self.entries.append((rows[:, 0], rows[:, 2]))
        usable = [a for a in range(n_attributes)
                  if self.groups[a] and len(np.unique(self.entries[a][1])) >= 2]
        if not usable:
            raise UserError("label_train.txt: no attribute has two values with training images; "
                            "cannot form triplets")
        self.usable_attributes = np.asarray(usable)

    def sample(self, num_triplets, rng):
        """(num, 4) int64 array of (anchor id, negative id, positive id, attribute)."""
        out, attrs = attribute_draws(self.usable_attributes, num_triplets, rng)
        for attr in np.unique(attrs):
            rows = np.flatnonzero(attrs == attr)
            values = np.asarray(sorted(self.groups[attr]))
            chosen = values[rng.integers(0, len(values), len(rows))]
            all_ids, all_values = self.entries[attr]
            for value in np.unique(chosen):
                sel = rows[chosen == value]
                out[sel, 0], out[sel, 2] = distinct_pairs(self.groups[attr][int(value)], len(sel), rng)
                others = all_ids[all_values != value]
                out[sel, 1] = others[rng.integers(0, len(others), len(sel))]
        return out


def attribute_draws(usable_attributes, num_triplets, rng):
    """(out, attrs): a (num, 4) int64 triplet array whose last column holds attributes drawn
    uniformly from `usable_attributes`, and that column."""
    out = np.empty((num_triplets, 4), dtype=np.int64)
    out[:, 3] = usable_attributes[rng.integers(0, len(usable_attributes), num_triplets)]
    return out, out[:, 3]


def distinct_pairs(ids, n, rng):
    """n (anchor, positive) pairs of two distinct entries of `ids` (at least two), uniformly."""
    anchor = rng.integers(0, len(ids), n)
    positive = rng.integers(0, len(ids) - 1, n)
    positive += positive >= anchor                                  # skip the anchor itself
    return ids[anchor], ids[positive]


# ----------------------------------------------------------------------------- images

def build_geometry(img_size):
    """The decoding-side half of the transform: Resize(S) + CenterCrop(S), PIL in, PIL out."""
    return transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size)])


def transform_settings(transform):
    """(CenterCrop size S, horizontal-flip probability) of a `build_transform` transform."""
    size, flip = None, 0.0
    for step in getattr(transform, 'transforms', [transform]):
        if isinstance(step, transforms.CenterCrop):
            size = int(step.size[0])
        elif isinstance(step, transforms.RandomHorizontalFlip):
            flip = float(step.p)
    if size is None:
        raise ValueError('the transform has no CenterCrop; build it with datasets.build_transform')
    return size, flip


def to_normalized_tensor(pixels):
    """(S, S, 3) uint8 array -> (3, S, S) float tensor, with exactly ToTensor + Normalize's arithmetic."""
    tensor = torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1).contiguous()
    tensor = tensor.to(torch.get_default_dtype()).div(255)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def build_transform(img_size, train):
    """The original's transform: Resize, CenterCrop, (train) random flip, ToTensor, Normalize."""
    steps = [transforms.Resize(img_size), transforms.CenterCrop(img_size)]
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def draw_flips(n, p):
    """(n,) bool: one `torch.rand(1) < p` per image from the current torch generator, in order, as
    n calls of torchvision's RandomHorizontalFlip(p) draw them. None, and no draw, when p is 0."""
    if not p:
        return None
    return torch.tensor([bool(torch.rand(1) < p) for _ in range(n)], dtype=torch.bool)


def nchw(pixels):
    """(N, S, S, 3) uint8 ndarray -> (N, 3, S, S) uint8 tensor sharing its memory: channels_last
    strides, no copy here; gpuinput.normalise sets the layout on the device."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)


class CachedImages:
    """Mixin: read an image through `self.cache` (an imagecache.ImageCache) when one is attached.

    Two ways out. `load(id)`, the item path: the transformed image, a float tensor; cached pixels
    are Resize + CenterCrop already applied and the flip draws `torch.rand(1)` as
    RandomHorizontalFlip does, so a cached and an uncached dataset give the same tensors under the
    same torch seed. `load_batch(keys)`, the batch path of gpuinput.DeviceLoader: the Resize +
    CenterCrop pixels as uint8 (`uint8_pixels`) with the flips drawn as the item path draws them,
    image by image in order (`draw_flips`); the device flips and normalises them
    (gpuinput.normalise), to the same floats.
    """
    cache = None
    _geometry = None

    def attach_cache(self, cache):
        """Serve images from `cache` (None detaches); its size must be the transform's."""
        size, self.flip_p = transform_settings(self.transform)
        if cache is not None and cache.size != size:
            raise ValueError(f'image cache holds {cache.size} px images, the transform wants {size} px')
        self.cache = cache

    def load(self, image_id):
        """The transformed image `image_id` of this split."""
        pixels = self.cache.pixels(image_id) if self.cache is not None else None
        if pixels is None:
            return self.transform(load_image(os.path.join(self.root, self.filenames[image_id])))
        if self.flip_p and torch.rand(1) < self.flip_p:
            pixels = pixels[:, ::-1]
        return to_normalized_tensor(pixels)

    def flip_probability(self):
        return transform_settings(self.transform)[1]

    def uint8_pixels(self, image_ids):
        """(M, 3, S, S) uint8 Resize + CenterCrop pixels of `image_ids` (no random draw). The cached
        images are one gather from the memmap; the others are decoded and resized here."""
        size = transform_settings(self.transform)[0]
        rows = self.cache.rows(image_ids) if self.cache is not None else np.full(len(image_ids), -1)
        if self.cache is not None and (rows >= 0).all():
            return nchw(self.cache.array()[rows])
        pixels = np.empty((len(image_ids), size, size, 3), dtype=np.uint8)
        cached = rows >= 0
        if cached.any():
            pixels[cached] = self.cache.array()[rows[cached]]
        if self._geometry is None:
            self._geometry = build_geometry(size)
        for i in np.flatnonzero(~cached):
            path = os.path.join(self.root, self.filenames[image_ids[i]])
            pixels[i] = np.asarray(self._geometry(load_image(path)), dtype=np.uint8)
        return nchw(pixels)

    def batch_keys(self):
        """What one loader pass iterates (gpuinput.DeviceLoader): the item indices."""
        return np.arange(len(self))

    images_per_key = 1

    def random_draws(self, keys):
        """How many random numbers `load_batch(keys)` draws (one flip per image, none without
        flips): what a pass resumed mid-way skips (gpuinput.DeviceLoader.start_at)."""
        return len(keys) * self.images_per_key if self.flip_probability() else 0


class TripletDataset(CachedImages, torch.utils.data.Dataset):
    """`num_triplets` triplets, drawn anew for each epoch from a generator seeded by (seed, epoch).

    Seeding by epoch makes the triplets of epoch e the same whether or not the run was resumed.
    """

    def __init__(self, split_files, num_triplets, transform, seed, skip_bad=False):
        self.root = split_files.root
        self.filenames = split_files.filenames('train')
        labels = split_files.train_labels()
        bad = bad_image_ids(self.root, self.filenames, labels[:, 0], split_files.path('label_train.txt'), skip_bad)
        labels = labels[~np.isin(labels[:, 0], bad)]
        self.skipped = len(bad)
        self.sampler = TripletSampler(labels, len(split_files.attributes))
        self.image_ids = np.unique(labels[:, 0])
        self.num_triplets, self.transform, self.seed = num_triplets, transform, seed
        self.rank, self.world_size = 0, 1
        self.set_epoch(1)

    def shard(self, rank, world_size):
        """Keep every `world_size`-th triplet from `rank` on (distributed training); redraws epoch 1."""
        self.rank, self.world_size = rank, world_size
        self.set_epoch(1)

    def set_epoch(self, epoch):
        """Draw epoch `epoch`'s triplets; a shard keeps triplets rank, rank + W, ... of the first
        num_triplets // W * W, so every rank has as many and global batch k holds the triplets of
        batch k of one process with W times the batch size."""
        triplets = self.sampler.sample(self.num_triplets, np.random.default_rng([self.seed, epoch]))
        usable = len(triplets) // self.world_size * self.world_size
        self.triplets = triplets[self.rank:usable:self.world_size]

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, index):
        anchor, negative, positive, attr = self.triplets[index]
        return self.load(anchor), self.load(negative), self.load(positive), int(attr)

    images_per_key = 3                  # a triplet row: anchor, negative, positive

    def batch_keys(self):
        """What one loader pass iterates: this epoch's triplet rows (T, 4), read when the pass
        starts, in the main process (so persistent workers get each epoch's triplets)."""
        return self.triplets

    def load_batch(self, rows):
        """Triplet rows (B, 4) -> (pixels (3, B, 3, S, S) uint8: anchors, negatives, positives;
        flips (3, B) bool; attributes (B,) int64). The flips are drawn triplet by triplet, anchor,
        negative, positive, as `__getitem__` draws them."""
        rows = np.asarray(rows)
        flips = draw_flips(3 * len(rows), self.flip_probability())       # a0 n0 p0 a1 n1 p1 ...
        if flips is not None:
            flips = flips.view(len(rows), 3).t().contiguous()            # (3, B) like the pixels
        pixels = self.uint8_pixels(rows[:, :3].T.reshape(-1))            # a0 a1 ... n0 n1 ... p0 p1 ...
        return pixels.unflatten(0, (3, len(rows))), flips, torch.from_numpy(rows[:, 3].copy())


class RetrievalDataset(CachedImages, torch.utils.data.Dataset):
    """The query or candidate images of a valid/test split: (image, attribute, value, index)."""

    def __init__(self, split_files, split, role, transform, skip_bad=False):
        self.root = split_files.root
        self.filenames = split_files.filenames(split)
        entries = split_files.retrieval_entries(split, role)
        bad = bad_image_ids(self.root, self.filenames, entries[:, 0], split_files.path(f'{role}_{split}.txt'), skip_bad)
        self.entries = entries[~np.isin(entries[:, 0], bad)]
        self.skipped, self.listed = len(bad), len(entries)     # images left out, entries the file lists
        if not len(self.entries):
            left = f' left once --skip-bad-images dropped {len(bad)} image(s)' if len(bad) else ''
            raise UserError(f"{split_files.path(f'{role}_{split}.txt')}: no {role} entries{left}; the {split} "
                            f"split needs queries and candidates ('id attr value' lines)")
        self.image_ids = np.unique(self.entries[:, 0])
        self.transform = transform

    def __len__(self):
        return len(self.entries)

    def image_path(self, index):
        return os.path.join(self.root, self.filenames[self.entries[index, 0]])

    def __getitem__(self, index):
        image_id, attr, value = self.entries[index]
        return self.load(image_id), int(attr), int(value), index

    def load_batch(self, indices):
        """Indices (B,) -> (pixels (B, 3, S, S) uint8, flips (B,) bool or None without a random
        flip, attributes, values, indices)."""
        indices = np.asarray(indices)
        flips = draw_flips(len(indices), self.flip_probability())
        pixels = self.uint8_pixels(self.entries[indices, 0])
        attr, value = (torch.from_numpy(self.entries[indices, k].copy()) for k in (1, 2))
        return pixels, flips, attr, value, torch.from_numpy(indices.copy())


class IndexShard(torch.utils.data.Dataset):
    """Items start..stop-1 of a RetrievalDataset, their index shifted to count from 0."""

    def __init__(self, dataset, start, stop):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self):
        return self.stop - self.start

    @property
    def collate_fn(self):
        return getattr(self.dataset, 'collate_fn', None)

    def __getitem__(self, index):
        image, attr, value, full_index, *extra = self.dataset[self.start + index]   # extra: ASENpp's original
        return (image, attr, value, full_index - self.start, *extra)

    def batch_keys(self):
        return np.arange(len(self))

    def load_batch(self, indices):
        pixels, flips, attr, value, full_index = self.dataset.load_batch(np.asarray(indices) + self.start)
        return pixels, flips, attr, value, full_index - self.start

