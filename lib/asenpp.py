"""ASEN++ in the CLI: its two stages, its flags, its triplets and the original images it crops from.

Dong et al., "Fine-Grained Fashion Similarity Prediction by Attribute-Specific Embedding Learning",
IEEE TIP 30, 2021 (arXiv 2104.02429); the facts are the authors' code, Maryeon/asenpp (config/
<Dataset>/s1.yaml and s2.yaml, modules/config/defaults.py, modules/data/samplers/samplers.py,
modules/solver/build.py, main.py). The network is model.ASENpp, the crop crop.py.

Stage 1 trains the global branch alone; stage 2 starts from a stage-1 checkpoint (its weights only:
a fresh optimizer, epoch 1, the local branch from ImageNet) and trains both branches.
"""

import os

import numpy as np
import torch

import datasets
from lib import flags
from lib.images import load_image
from lib.flags import flag_name
from lib.crop import SourceImages
from utils import UserError

# Each stage's settings in the authors' configs, for the flags not given (lr 1e-4, batch 16,
# 100000 triplets and margin 0.2 are asen.py's defaults already; the rest are ASEN++'s own flags).
STAGE_DEFAULTS = {1: dict(epochs=50, step_size=3, decay_rate=0.9),
                  2: dict(epochs=20, step_size=1, decay_rate=0.9)}
# ASEN++'s own flags (argparse dests)
FLAGS = ('stage', 'local_backbone', 'local_size', 'threshold', 'beta', 'local_crop', 'lr_global',
         'local_weight', 'align_weight')


def stage_defaults(stage, preset):
    """The stage's defaults; a dataset preset's (SynthFashion's CPU budget) win over them."""
    return {k: preset.get(k, v) for k, v in STAGE_DEFAULTS[stage].items()}


# ----------------------------------------------------------------------------- flags and stages

def checkpoint_model(checkpoint, original_info):
    """(model, stage) of a loaded checkpoint: from its saved args, or the authors' layout."""
    if original_info is not None:
        return original_info['model'], original_info.get('stage')
    saved = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if isinstance(saved, dict):
        return saved.get('model'), saved.get('stage')
    return None, None


def prepare(draft, checkpoint, original_info, training):
    """Check ASEN++'s flags against --model and --resume once the checkpoint's settings are in the
    configuration `draft` (config.Draft), and settle the stage; returns True when this run starts
    stage 2 from a stage-1 checkpoint (then the stage-2 defaults replace the restored stage-1
    settings of flags not given, and the run is named <stage-1 name>_s2 unless --name is given)."""
    file_model, file_stage = checkpoint_model(checkpoint, original_info) if checkpoint is not None else (None, None)
    resume = draft.resume
    if draft.model != 'ASENpp':
        given = [f for f in FLAGS if f in draft.explicit]
        if given and 'model' not in draft.explicit and file_model is not None:
            raise UserError(f"--resume {resume}: a {file_model} checkpoint; {flag_name(given[0])} needs an "
                            f"ASENpp one")
        if given:
            raise UserError(f"{flag_name(given[0])} applies only to --model ASENpp")
        return False
    if draft.dataset == 'Zappos50k':
        raise UserError("--model ASENpp: not available for Zappos50k (its training triplets are CSN's "
                        "lists, not the attribute values ASEN++ samples from)")
    if checkpoint is not None and file_model is not None and file_model != 'ASENpp':
        raise UserError(f"--resume {resume}: a {file_model} checkpoint, not ASENpp; resume an ASENpp "
                        f"run or drop --model ASENpp")
    if draft.stage is None:
        draft.set('stage', file_stage or 1, "--resume's stage" if file_stage else 'ASEN++ default stage')
    if draft.stage == 2 and checkpoint is None and training:
        raise UserError("--stage 2 starts from a stage-1 checkpoint: add --resume "
                        "runs/<stage-1 name>/model_best.pth.tar")
    if checkpoint is not None and file_stage == 2 and draft.stage == 1:
        raise UserError(f"--resume {resume}: a stage-2 checkpoint; drop --stage 1")
    starts_stage2 = checkpoint is not None and draft.stage == 2 and file_stage == 1
    if starts_stage2 and not training:
        raise UserError(f"--resume {resume}: a stage-1 checkpoint has no trained local branch; drop "
                        f"--stage 2 to test its global branch, or train stage 2 from it first")
    if starts_stage2:
        preset = flags.dataset_preset(draft.dataset, draft.no_cuda)
        draft.apply(stage_defaults(2, preset), 'ASEN++ stage 2 defaults')
        draft.apply({'name': f'{draft.name}_s2'}, 'ASEN++ stage 2 of the --resume run')
    if uses_originals(draft) and draft.cache_images:
        raise UserError("--cache-images holds only the --img-size view, and ASEN++'s stage 2 crops from "
                        "the original images: add --local-crop view (the shortcut) or drop --cache-images")
    return starts_stage2


def result_label(args):
    """The model's name in test_results.json and the tables: ASENpp's stage-1 (global-only) runs
    are a row of their own, ASENpp-global."""
    return 'ASENpp-global' if args.model == 'ASENpp' and args.stage == 1 else args.model


def local_size(args):
    """The local branch's input size: --local-size, else half the global view (112 at 224)."""
    return args.local_size if args.local_size is not None else max(args.img_size // 2, 1)


def uses_originals(args):
    return args.model == 'ASENpp' and args.stage == 2 and args.local_crop == 'original'


def model_options(args, local_imagenet):
    """model.build_asenpp's options from the flags."""
    return dict(stage=args.stage, local_backbone=args.local_backbone,
                local_pretrained=args.pretrained and local_imagenet, view_size=args.img_size,
                local_size=local_size(args), threshold=args.threshold, beta=args.beta)


# ----------------------------------------------------------------------------- triplets

class ValuePairSampler:
    """ASEN++'s triplets (Maryeon/asenpp, samplers.py, TripletSampler): an attribute uniformly; two
    distinct values of it uniformly (the first with at least two images); anchor and positive two
    distinct entries of the first value, the negative an entry of the second.

    Unlike ASEN's sampler (datasets.TripletSampler), the negative's value is uniform over the other
    values rather than weighted by their image counts. The authors' code fails on a value with
    fewer than two images; here such a value is never the positive one.
    """

    def __init__(self, entries):
        """`entries`: per attribute, (image ids, values) of its labelled entries."""
        self.by_value = []
        for ids, values in entries:
            self.by_value.append({int(v): ids[values == v] for v in np.unique(values)})
        usable = [a for a, groups in enumerate(self.by_value)
                  if len(groups) >= 2 and any(len(ids) >= 2 for ids in groups.values())]
        if not usable:
            raise UserError("label_train.txt: no attribute has two values with training images, one "
                            "of them with two; cannot form triplets")
        self.usable_attributes = np.asarray(usable)

    def sample(self, num_triplets, rng):
        """(num, 4) int64 array of (anchor id, negative id, positive id, attribute)."""
        out, attrs = datasets.attribute_draws(self.usable_attributes, num_triplets, rng)
        for attr in np.unique(attrs):
            rows = np.flatnonzero(attrs == attr)
            groups = self.by_value[attr]
            values = np.asarray(sorted(groups))
            positive_values = values[[len(groups[v]) >= 2 for v in values]]
            first = positive_values[rng.integers(0, len(positive_values), len(rows))]
            other = rng.integers(0, len(values) - 1, len(rows))               # uniform over the rest
            other += other >= np.searchsorted(values, first)
            second = values[other]
            for value in np.unique(first):
                sel = rows[first == value]
                out[sel, 0], out[sel, 2] = datasets.distinct_pairs(groups[int(value)], len(sel), rng)
            for value in np.unique(second):
                sel = rows[second == value]
                ids = groups[int(value)]
                out[sel, 1] = ids[rng.integers(0, len(ids), len(sel))]
        return out


# ----------------------------------------------------------------------------- data with originals

class OriginalsMixin:
    """Serve, beside each transformed view, the decoded original image as a uint8 (3, H, W) tensor,
    from one decode (the authors crop the local input from the original: crop.py)."""
    originals = False

    def load_with_original(self, image_id):
        image = load_image(os.path.join(self.root, self.filenames[image_id]))
        return self.transform(image), torch.from_numpy(np.array(image)).permute(2, 0, 1)


class OriginalsTripletDataset(OriginalsMixin, datasets.TripletDataset):
    """ASEN++'s training triplets: ValuePairSampler, and the originals when `originals`."""

    def __init__(self, split_files, num_triplets, transform, seed, skip_bad=False, originals=False):
        self.originals = originals
        super().__init__(split_files, num_triplets, transform, seed, skip_bad)
        self.sampler = ValuePairSampler(self.sampler.entries)
        self.set_epoch(1)

    def __getitem__(self, index):
        if not self.originals:
            return super().__getitem__(index)
        anchor, negative, positive, attr = self.triplets[index]
        (a, a_orig), (n, n_orig), (p, p_orig) = (self.load_with_original(i) for i in (anchor, negative, positive))
        return a, n, p, int(attr), a_orig, n_orig, p_orig

    def collate_fn(self, batch):
        if not self.originals:
            return torch.utils.data.default_collate(batch)
        a, n, p, attr, a_orig, n_orig, p_orig = zip(*batch)
        return (torch.stack(a), torch.stack(n), torch.stack(p), torch.tensor(attr),
                SourceImages.stack(a_orig), SourceImages.stack(n_orig), SourceImages.stack(p_orig))


class OriginalsRetrievalDataset(OriginalsMixin, datasets.RetrievalDataset):
    """Queries or candidates with their originals: (image, attribute, value, index, original)."""
    originals = True

    def __getitem__(self, index):
        image_id, attr, value = self.entries[index]
        image, original = self.load_with_original(image_id)
        return image, int(attr), int(value), index, original

    @staticmethod
    def collate_fn(batch):
        images, attrs, values, indices, originals = zip(*batch)
        return (torch.stack(images), torch.tensor(attrs), torch.tensor(values), torch.tensor(indices),
                SourceImages.stack(originals))


def training_set(split_files, args):
    """ASEN++'s triplets at the global view, without the random flip (the authors' GlobalTransform)."""
    transform = datasets.build_transform(args.img_size, train=False)
    return OriginalsTripletDataset(split_files, args.num_triplets, transform, args.seed, args.skip_bad_images,
                          originals=uses_originals(args))
