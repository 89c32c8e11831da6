"""Supervised attribute pretraining of the ResNet trunk: an offline stand-in for ImageNet weights.

The paper starts ASEN from an ImageNet-pretrained ResNet. Offline, the ImageNet weights cannot be
downloaded. Also, a from-scratch trunk trained only on triplets does not learn SynthFashion's small
local attributes (sleeve length, neckline) within CPU budgets. This script trains the trunk (cut
after layer3, global average pooling) with one linear classifier per attribute. The loss is the
summed cross-entropy on the dataset's *training* labels, and an image counts only for the
attributes it is labelled with. It writes the trunk's weights, with torchvision key names, for

    python pretrain.py --dataset SynthFashion --out runs/pretrain-synth/trunk.pth
    python asen.py --dataset SynthFashion --backbone-weights runs/pretrain-synth/trunk.pth

Valid and test images are never read. The classifiers are dropped.
"""
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import datasets
import model
import synthfashion
from lib import runtime
from lib.images import load_image
import utils
from utils import UserError
from lib import inputs, runfolder


def build_parser():
    parser = utils.OneLineArgumentParser(command='pretrain.py', formatter_class=utils.HelpFormatter,
                                         description='Pretrain the ResNet trunk on the training labels of a dataset.')
    parser.add_argument('--dataset', default='SynthFashion', help='dataset folder under --data_path')
    parser.add_argument('--data_path', '--data-path', default='data', help='folder holding the datasets')
    parser.add_argument('--synth-images', dest='synth_images', type=int, default=2000,
                        help='SynthFashion: training images to generate (as asen.py)')
    parser.add_argument('--out', required=True, help='file to write (a state dict for --backbone-weights); '
                                                      'an existing file is refused unless --overwrite')
    parser.add_argument('--overwrite', action='store_true', help='replace the --out file if it exists')
    parser.add_argument('--backbone', default='resnet18', choices=model.BACKBONES, help='ResNet trunk')
    parser.add_argument('--img-size', '--img_size', dest='img_size', type=int, default=64, help='input size S')
    parser.add_argument('--epochs', type=int, default=6, help='passes over the labelled training images')
    parser.add_argument('--batch-size', dest='batch_size', type=int, default=32, help='images per step')
    parser.add_argument('--lr', type=float, default=1e-3, help='Adam learning rate')
    parser.add_argument('--seed', type=int, default=1, help='seed of init, shuffling and flips')
    parser.add_argument('--workers', type=int, default=2, help='data loading processes')
    parser.add_argument('--amp', default=None, choices=('off', 'bf16', 'fp16'),
                        help='mixed precision (default: bf16 where the device used runs bf16 natively, else off)')
    parser.add_argument('--no-cuda', dest='no_cuda', action='store_true', help='stay on the CPU')
    return parser


def label_matrix(train_labels, n_images, n_attributes):
    """(M, 3) rows (id, attr, value) -> (n_images, n_attributes) values, -1 where unlabelled."""
    labels = np.full((n_images, n_attributes), -1, dtype=np.int64)
    labels[train_labels[:, 0], train_labels[:, 1]] = train_labels[:, 2]
    return labels


class LabelledImages(torch.utils.data.Dataset):
    """(image tensor, per-attribute labels) for every training image with at least one label."""

    def __init__(self, root, filenames, labels, transform):
        self.ids = np.flatnonzero((labels >= 0).any(axis=1))
        self.root, self.filenames, self.labels, self.transform = root, filenames, labels, transform

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        image = load_image(os.path.join(self.root, self.filenames[image_id]))
        return self.transform(image), torch.from_numpy(self.labels[image_id])


class AttributeClassifier(nn.Module):
    """Trunk, global average pooling and one linear classifier per attribute."""

    def __init__(self, trunk, values_per_attribute):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(trunk.out_channels, n) for n in values_per_attribute)

    def forward(self, images):
        pooled = self.trunk(images).mean(dim=(2, 3))                        # (N, C)
        return [head(pooled) for head in self.heads]                        # per attribute (N, n_values)


def attribute_losses(logits, labels):
    """Summed cross-entropy over attributes (unlabelled = -1 ignored), and per attribute the number
    of correct and of labelled images in the batch."""
    loss, correct, counted = 0.0, [], []
    for attr, out in enumerate(logits):
        target = labels[:, attr]
        known = target >= 0
        if known.any():
            loss = loss + F.cross_entropy(out.float(), target, ignore_index=-1)
        correct.append(int((out.argmax(dim=1) == target)[known].sum()))
        counted.append(int(known.sum()))
    return loss, np.array(correct), np.array(counted)


def train_one_epoch(net, loader, optimizer, device, amp):
    """One pass; returns (mean loss, per-attribute training accuracy in %)."""
    net.train()
    total_loss, steps = 0.0, 0
    correct, counted = 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with runtime.autocast(device, amp):
            logits = net(images)
        loss, batch_correct, batch_counted = attribute_losses(logits, labels)
        if not torch.isfinite(loss):
            raise UserError("pretraining loss is not finite; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss, steps = total_loss + float(loss.detach()), steps + 1
        correct, counted = correct + batch_correct, counted + batch_counted
    return total_loss / max(steps, 1), 100.0 * correct / np.maximum(counted, 1)


# (flag, value's test, the allowed range in words), checked before anything is read or written
MIN_SYNTH_IMAGES = 4 * synthfashion.MIN_IMAGES            # valid and test get a quarter each (as asen.py)
FLAG_RANGES = [
    ('--img-size', 'img_size', lambda v: v >= 32, 'a whole number >= 32 (the trunk has stride 16)'),
    ('--epochs', 'epochs', lambda v: v >= 1, 'a whole number >= 1'),
    ('--batch-size', 'batch_size', lambda v: v >= 1, 'a whole number >= 1'),
    ('--workers', 'workers', lambda v: v >= 0, 'a whole number >= 0'),
    ('--synth-images', 'synth_images', lambda v: v >= MIN_SYNTH_IMAGES, f'a whole number >= {MIN_SYNTH_IMAGES}'),
    ('--lr', 'lr', lambda v: math.isfinite(v) and v > 0, 'finite and > 0'),
    ('--seed', 'seed', lambda v: 0 <= v <= 2**63 - 1, 'from 0 to 2**63-1'),
]


def check_args(args):
    for flag, dest, test, allowed in FLAG_RANGES:
        utils.check_range(flag, getattr(args, dest), allowed, test(getattr(args, dest)))
    for flag, dest in (('--out', 'out'), ('--data_path', 'data_path'), ('--dataset', 'dataset')):
        if not getattr(args, dest):
            raise UserError(f"{flag} is empty; give a path or name (an unset shell variable?)")
    check_out(args.out, args.overwrite)
    if args.dataset == 'Zappos50k':
        raise UserError("--dataset Zappos50k: has no attribute labels to pretrain on (only triplet lists)")


def check_out(path, overwrite):
    """--out never replaces a folder, nor a file (it may be a run's model_best) without --overwrite."""
    if os.path.isdir(path):
        raise UserError(f"--out {path}: is a folder; give the file to write, e.g. {os.path.join(path, 'trunk.pth')}")
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"--out {path}: already exists; choose another file, or pass --overwrite to replace it")
    if os.path.lexists(path) and os.path.basename(path) in runfolder.SNAPSHOTS + runfolder.RUN_RECORDS:
        # the run-folder invariant (lib/runfolder.py): a run's own files are replaced only by that run
        raise UserError(f"--out {path}: is a run's {os.path.basename(path)}, which --overwrite does not replace; "
                        f"choose another file")


def run(args):
    check_args(args)
    utils.seed_everything(args.seed)
    device = runtime.resolve_device(args.no_cuda)
    amp = args.amp or ('bf16' if runtime.bf16_supported(device) else 'off')
    split_files = inputs.prepare_dataset(args)
    n_attributes = len(split_files.attributes)
    filenames = split_files.filenames('train')
    labels = label_matrix(split_files.train_labels(), len(filenames), n_attributes)
    values = [int(n) for n in split_files.values_per_attribute]
    data = LabelledImages(split_files.root, filenames, labels, datasets.build_transform(args.img_size, train=True))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         generator=torch.Generator().manual_seed(args.seed),
                                         persistent_workers=args.workers > 0)
    net = AttributeClassifier(model.build_backbone(args.backbone, pretrained=False), values).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    print(f"pretraining a {args.backbone} trunk on {len(data)} {args.dataset} training images, "
          f"{n_attributes} attributes, {args.epochs} epochs at {args.img_size} px")
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        loss, accuracy = train_one_epoch(net, loader, optimizer, device, amp)
        per_attr = ', '.join(f'{name} {acc:.1f}%' for name, acc in zip(split_files.attributes, accuracy))
        print(f"epoch {epoch}: loss {loss:.4f}, train accuracy {per_attr} ({time.time() - start:.0f} s)")
    state = {k: v.cpu() for k, v in net.trunk.state_dict().items()}
    utils.save_atomic({'state_dict': state, 'backbone': args.backbone, 'dataset': args.dataset,
                       'img_size': args.img_size, 'epochs': args.epochs, 'seed': args.seed,
                       'train_accuracy': [float(a) for a in accuracy]}, args.out, 'trunk weights')
    print(f"wrote {args.out}; use it with: python asen.py --dataset {args.dataset} "
          f"--backbone {args.backbone} --backbone-weights {args.out}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    return utils.run_command(checked_run, args)


def checked_run(args):
    runtime.check_torch_version()
    run(args)


if __name__ == '__main__':
    sys.exit(main())
