"""Zappos50k with the triplets of Conditional Similarity Networks (Veit et al., CVPR 2017).

Layout under `<data_path>/Zappos50k/`, as CSN publishes it (andreasveit/conditional-similarity-networks,
get_data.py and triplet_image_loader.py):
  ut-zap50k-images/                  the UT Zappos50K images
  filenames.json                     plain text despite its name: one image path a line, relative
                                     to ut-zap50k-images/; the 0-based line number is the image id
  tripletlists/<cond>_tripletlist_{train,val,test}.txt
                                     `anchor far close` a line (image ids): the anchor is more
                                     similar to `close` than to `far`
The conditions, in CSN's order (its index is the attribute index): class, closure, gender, heel.

Training draws triplets anew each epoch, evenly over the conditions; evaluation scores every
triplet of the val/test lists: correct when s(anchor, close) > s(anchor, far).
"""

import os

import numpy as np
import torch

from lib import checks
from lib.images import bad_image_ids, load_image
import datasets
from utils import UserError

CONDITIONS = ('class', 'closure', 'gender', 'heel')
IMAGE_DIR = 'ut-zap50k-images'
FILENAMES = 'filenames.json'


class ZapposFiles:
    """The file list and triplet lists of a Zappos50k folder, validated on load.

    Offers what the entry point needs of a dataset: `root`, `dataset`, `attributes`.
    """

    def __init__(self, data_path, dataset='Zappos50k'):
        self.folder = os.path.join(data_path, dataset)
        self.dataset = dataset
        self.root = os.path.join(self.folder, IMAGE_DIR)
        self.attributes = list(CONDITIONS)
        for path in (self.folder, self.root, os.path.join(self.folder, 'tripletlists')):
            if not os.path.isdir(path):
                raise UserError(f"Zappos50k folder {path} not found; put ut-zap50k-images/, filenames.json "
                                f"and tripletlists/ of Conditional Similarity Networks into {self.folder} "
                                f"(docs/datasets.md, 'Zappos50k') or pass --data_path")
        self._filenames = None

    def path(self, name):
        return os.path.join(self.folder, name)

    def filenames(self):
        """Image paths (relative to `root`) indexed by id."""
        if self._filenames is None:
            names = datasets.read_lines(self.path(FILENAMES))
            # a blank line takes an id: every later image would be paired with the wrong triplets
            checks.refuse_blank_lines(self.path(FILENAMES), names, 'each line is one image path and its line '
                                      'number is the id; delete the line (or fill in its image)')
            self._filenames = names
        return self._filenames

    def list_path(self, condition, split):
        """Path of the triplet list of condition index `condition`, split train, val or test."""
        return self.path(os.path.join('tripletlists', f'{CONDITIONS[condition]}_tripletlist_{split}.txt'))

    def triplets(self, split):
        """(T, 4) int64 rows (anchor, far, close, condition) of all conditions' lists of `split`."""
        n_images = len(self.filenames())
        return np.concatenate([read_triplet_list(self.list_path(c, split), c, n_images)
                               for c in range(len(CONDITIONS))])


def read_triplet_list(path, condition, n_images):
    """(T, 4) int64 rows (anchor, far, close, condition) of one list; bad lines name file:line."""
    rows = []
    lines = datasets.read_lines(path)
    checks.refuse_blank_lines(path, lines, "each line is one triplet 'anchor far close'; delete the line")
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) != 3 or not all(checks.is_id(f) for f in fields):
            raise UserError(f"{path}:{number}: malformed line {line!r}; expected 'anchor far close' "
                            f"(three image ids, non-negative integers in ASCII digits 0-9)")
        ids = [int(f) for f in fields]
        if max(ids) >= n_images:
            raise UserError(f"{path}:{number}: image id {max(ids)} is past the end of {FILENAMES} "
                            f"({n_images} lines); use the filenames.json that came with the lists")
        rows.append(ids + [condition])
    if not rows:
        raise UserError(f"{path}: no triplets; restore the list from the CSN triplet archive")
    return np.asarray(rows, dtype=np.int64)


def drop_bad_images(files, triplets, listing, skip_bad):
    """`triplets` without those naming a missing (or, with `skip_bad`, unreadable) image.

    Returns (kept triplets, number of bad images); without `skip_bad` a missing image is an error.
    """
    bad = bad_image_ids(files.root, files.filenames(), triplets[:, :3].ravel(), listing, skip_bad)
    keep = ~np.isin(triplets[:, :3], bad).any(axis=1)
    return triplets[keep], len(bad)


# ----------------------------------------------------------------------------- training

class ConditionSampler:
    """Draws training triplets evenly over the conditions from the CSN train lists.

    Same interface as `datasets.TripletSampler`: `sample(num, rng)` gives (num, 4) rows
    (anchor, negative, positive, condition), negative = far and positive = close. Condition c
    gets num // C triplets, the first num % C conditions one more; within a condition the
    triplets are drawn without replacement while the list is long enough; rows are shuffled so
    that every batch mixes the conditions.
    """

    def __init__(self, triplets, n_conditions):
        self.by_condition = [triplets[triplets[:, 3] == c] for c in range(n_conditions)]
        if not all(len(t) for t in self.by_condition):
            empty = [CONDITIONS[c] for c, t in enumerate(self.by_condition) if not len(t)]
            raise UserError(f"Zappos50k: no usable training triplets for condition(s) {', '.join(empty)}")

    def sample(self, num_triplets, rng):
        n_conditions = len(self.by_condition)
        counts = [num_triplets // n_conditions + (c < num_triplets % n_conditions) for c in range(n_conditions)]
        parts = []
        for pool, count in zip(self.by_condition, counts):
            parts.append(pool[rng.choice(len(pool), size=count, replace=count > len(pool))])
        out = np.concatenate(parts)
        return out[rng.permutation(len(out))]


class ZapposTripletDataset(datasets.TripletDataset):
    """`num_triplets` training triplets a epoch, drawn from a generator seeded by (seed, epoch).

    Items are (anchor, negative, positive, condition) as `datasets.TripletDataset` gives them;
    only the source of the triplets differs, so only `__init__` is replaced.
    """

    def __init__(self, files, num_triplets, transform, seed, skip_bad=False):
        self.root, self.filenames = files.root, files.filenames()
        listing = files.path(os.path.join('tripletlists', '*_tripletlist_train.txt'))
        triplets, self.skipped = drop_bad_images(files, files.triplets('train'), listing, skip_bad)
        self.sampler = ConditionSampler(triplets, len(CONDITIONS))
        self.image_ids = np.unique(triplets[:, :3])
        self.num_triplets, self.transform, self.seed = num_triplets, transform, seed
        self.rank, self.world_size = 0, 1
        self.set_epoch(1)


# ----------------------------------------------------------------------------- evaluation

class TripletEvalSet(datasets.CachedImages, torch.utils.data.Dataset):
    """The distinct (image, condition) pairs of a val/test split, and its triplets as pair rows.

    Items are (image, condition, 0, index), the shape of `datasets.RetrievalDataset` items, so
    the entry point embeds each pair once with the same code (and `load_batch` the batches of
    `datasets.RetrievalDataset.load_batch`). `entries` (P, 2) holds the pairs
    (image id, condition); `rows` (T, 3) the pair index of each triplet's anchor, far and close;
    `conditions` (T,) each triplet's condition.
    """

    def __init__(self, files, split, transform, skip_bad=False):
        self.root, self.filenames, self.transform = files.root, files.filenames(), transform
        listing = files.path(os.path.join('tripletlists', f'*_tripletlist_{split}.txt'))
        triplets, self.skipped = drop_bad_images(files, files.triplets(split), listing, skip_bad)
        if not len(triplets):
            raise UserError(f"{listing}: no triplet left with readable images")
        self.conditions = triplets[:, 3]
        keys = triplets[:, :3] * len(CONDITIONS) + self.conditions[:, None]     # (image, condition) key
        unique, inverse = np.unique(keys, return_inverse=True)
        self.entries = np.stack([unique // len(CONDITIONS), unique % len(CONDITIONS)], axis=1)
        self.rows = inverse.reshape(-1, 3)

    def __len__(self):
        return len(self.entries)

    def image_path(self, index):
        return os.path.join(self.root, self.filenames[self.entries[index, 0]])

    def __getitem__(self, index):
        return self.transform(load_image(self.image_path(index))), int(self.entries[index, 1]), 0, index

    def load_batch(self, indices):
        """Indices (B,) -> (pixels (B, 3, S, S) uint8, flips or None, conditions, zeros, indices)."""
        indices = np.asarray(indices)
        flips = datasets.draw_flips(len(indices), self.flip_probability())
        pixels = self.uint8_pixels(self.entries[indices, 0])
        condition = torch.from_numpy(self.entries[indices, 1].copy())
        return pixels, flips, condition, torch.zeros_like(condition), torch.from_numpy(indices.copy())


def triplet_correct(embeddings, rows):
    """Bool tensor (T,): s(anchor, close) > s(anchor, far), dot products of rows of `embeddings`."""
    rows = torch.as_tensor(rows, device=embeddings.device)
    anchor, far, close = (embeddings[rows[:, k]].float() for k in range(3))
    return (anchor * close).sum(dim=1) > (anchor * far).sum(dim=1)


def condition_accuracy(embeddings, rows, conditions, n_conditions):
    """(accuracy per condition (list of fractions), accuracy over all triplets), vectorised.

    A condition without triplets scores 0. The overall figure weights the conditions by their
    numbers of triplets, as CSN's test loop does.
    """
    correct = triplet_correct(embeddings, rows).cpu().numpy()
    conditions = np.asarray(conditions)
    hits = np.bincount(conditions, weights=correct, minlength=n_conditions)
    totals = np.bincount(conditions, minlength=n_conditions)
    per_condition = [float(h / t) if t else 0.0 for h, t in zip(hits, totals)]
    return per_condition, float(correct.mean()) if len(correct) else 0.0

