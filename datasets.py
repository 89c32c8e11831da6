"""Datasets in the authors' on-disk format (FashionAI, DARN, DeepFashion, SynthFashion).

Layout under `<data_path>/<Dataset>/` (paths in the files are relative to that folder):
  filenames_{train,valid,test}.txt   one image path a line; the 0-based line number is the id
  label_train.txt                    `id attr value [attr value ...]`
  {candidate,query}_{valid,test}.txt `id attr value`
and `<data_path>/meta.json` maps the dataset name to ATTRIBUTES and ATTRIBUTES_NUM. A dataset
may carry its own `<data_path>/<Dataset>/meta.json` (SynthFashion does), which wins, so unpacking
the authors' archive over `data/meta.json` cannot break it. The published files have CRLF ends,
stray CRs and trailing whitespace; every reader here accepts them.
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- file readers

def read_lines(path):
    """Lines of a text file split on LF only, each stripped of CR and surrounding whitespace.

    Splitting on LF alone keeps a stray CR inside a line from shifting the line numbers (ids);
    trailing empty lines are dropped.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    with open(path, 'rb') as f:
        lines = [line.strip() for line in f.read().decode('utf-8').split('\n')]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def read_int_rows(path, pairs=False):
    """Rows of integers from a split file, as a list of (line number, [ints]).

    `pairs=False`: exactly `id attr value`. `pairs=True`: `id attr value [attr value ...]`.
    Blank lines are skipped; anything else malformed is reported as file:line.
    """
    rows = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line:
            continue
        fields = line.split()
        bad_count = len(fields) < 3 or len(fields) % 2 == 0 if pairs else len(fields) != 3
        if bad_count or not all(f.isdigit() for f in fields):
            expected = "'id attr value [attr value ...]'" if pairs else "'id attr value'"
            raise UserError(f"{path}:{number}: malformed line {line!r}; expected {expected} "
                            f"with non-negative integers")
        rows.append((number, [int(f) for f in fields]))
    return rows


def load_meta(data_path, dataset):
    """(ATTRIBUTES list, ATTRIBUTES_NUM list in that order) of `dataset`."""
    candidates = [os.path.join(data_path, dataset, 'meta.json'), os.path.join(data_path, 'meta.json')]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, 'rb') as f:
                meta = json.loads(f.read().decode('utf-8'))
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: not valid JSON ({err})") from err
        if dataset not in meta:
            continue
        entry = meta[dataset]
        try:
            names = list(entry['ATTRIBUTES'])
            counts = [int(entry['ATTRIBUTES_NUM'][name]) for name in names]
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: entry {dataset!r} needs ATTRIBUTES and ATTRIBUTES_NUM for every "
                            f"attribute ({type(err).__name__}: {err})") from err
        return names, counts
    raise UserError(f"no meta.json entry for dataset {dataset!r} in {' or '.join(candidates)}; "
                    f"unpack the authors' split archive into {data_path}/ (see README, 'Datasets')")


# ----------------------------------------------------------------------------- dataset files

class SplitFiles:
    """The meta data, file lists and labels of one dataset folder, validated on load."""

    def __init__(self, data_path, dataset):
        self.root = os.path.join(data_path, dataset)
        if not os.path.isdir(self.root):
            raise UserError(f"dataset folder {self.root} not found; prepare it as the README's "
                            f"'Datasets' section says or pass --data_path")
        self.dataset = dataset
        self.attributes, self.values_per_attribute = load_meta(data_path, dataset)
        self._filenames = {}

    def path(self, name):
        return os.path.join(self.root, name)

    def filenames(self, split):
        """Image paths of a split, indexed by id."""
        if split not in self._filenames:
            self._filenames[split] = read_lines(self.path(f'filenames_{split}.txt'))
        return self._filenames[split]

    def _check(self, file, number, image_id, attr, value, n_images):
        if image_id >= n_images:
            raise UserError(f"{file}:{number}: image id {image_id} is past the end of its filenames "
                            f"file ({n_images} lines)")
        if attr >= len(self.attributes):
            raise UserError(f"{file}:{number}: attribute {attr} out of range; {self.dataset} has "
                            f"{len(self.attributes)} attributes in meta.json")
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
        out = np.empty((num_triplets, 4), dtype=np.int64)
        attrs = self.usable_attributes[rng.integers(0, len(self.usable_attributes), num_triplets)]
        out[:, 3] = attrs
        for attr in np.unique(attrs):
            rows = np.flatnonzero(attrs == attr)
            values = np.asarray(sorted(self.groups[attr]))
            chosen = values[rng.integers(0, len(values), len(rows))]
            all_ids, all_values = self.entries[attr]
            for value in np.unique(chosen):
                sel = rows[chosen == value]
                same = self.groups[attr][int(value)]
                anchor = rng.integers(0, len(same), len(sel))
                positive = rng.integers(0, len(same) - 1, len(sel))
                positive += positive >= anchor                      # distinct from the anchor
                others = all_ids[all_values != value]
                out[sel, 0] = same[anchor]
                out[sel, 1] = others[rng.integers(0, len(others), len(sel))]
                out[sel, 2] = same[positive]
        return out


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


def load_image(path):
    """An RGB PIL image; a missing or unreadable file raises a UserError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except FileNotFoundError as err:
        raise UserError(f"image {path} is listed but missing; restore it or fix the filenames file") from err
    except OSError as err:
        raise UserError(f"image {path} cannot be read ({err}); replace it") from err


def _readable(path):
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def bad_image_ids(root, filenames, ids, listing, skip_bad):
    """Ids among `ids` whose image cannot be used, found before training starts.

    Without `skip_bad` the first missing image is an error naming it; with it, missing and
    unreadable images (checked with PIL's verify) are returned so the caller can drop them.
    """
    bad = []
    for image_id in np.unique(ids):
        path = os.path.join(root, filenames[image_id])
        if not os.path.isfile(path) or (skip_bad and not _readable(path)):
            bad.append(image_id)
    if bad and not skip_bad:
        raise UserError(f"{len(bad)} image(s) listed in {listing} are missing under {root}, e.g. "
                        f"{filenames[bad[0]]}; download the images as the README says, or pass "
                        f"--skip-bad-images to leave them out")
    return np.asarray(bad, dtype=np.int64)


class CachedImages:
    """Mixin: read an image through `self.cache` (an imagecache.ImageCache) when one is attached.

    Cached pixels are Resize + CenterCrop already applied; the flip draws `torch.rand(1)` as
    RandomHorizontalFlip does, so a cached and an uncached dataset give the same tensors under
    the same torch seed.
    """
    cache = None

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


class RetrievalDataset(CachedImages, torch.utils.data.Dataset):
    """The query or candidate images of a valid/test split: (image, attribute, value, index)."""

    def __init__(self, split_files, split, role, transform, skip_bad=False):
        self.root = split_files.root
        self.filenames = split_files.filenames(split)
        entries = split_files.retrieval_entries(split, role)
        bad = bad_image_ids(self.root, self.filenames, entries[:, 0], split_files.path(f'{role}_{split}.txt'), skip_bad)
        self.entries = entries[~np.isin(entries[:, 0], bad)]
        self.skipped = len(bad)
        self.image_ids = np.unique(self.entries[:, 0])
        self.transform = transform

    def __len__(self):
        return len(self.entries)

    def image_path(self, index):
        return os.path.join(self.root, self.filenames[self.entries[index, 0]])

    def __getitem__(self, index):
        image_id, attr, value = self.entries[index]
        return self.load(image_id), int(attr), int(value), index


class IndexShard(torch.utils.data.Dataset):
    """Items start..stop-1 of a RetrievalDataset, their index shifted to count from 0."""

    def __init__(self, dataset, start, stop):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, index):
        image, attr, value, full_index = self.dataset[self.start + index]
        return image, attr, value, full_index - self.start
