"""The authors' training recipe (Maryeon/asen main.py and image_loader.py), re-written as one plain
script, to time against asen.py on the same data (bench_small_run.py).

What it does, as their code does it on a machine without CUDA: read meta.json and the split files;
draw the epoch's triplets with Python's `random` (an attribute, a value of it, then anchor,
negative and positive by rejection: a different value for the negative, the anchor's value and
another image for the positive); load every image with PIL in the main process (their DataLoader
gets no workers without CUDA) through Resize(224), CenterCrop(224), RandomHorizontalFlip (training
only), ToTensor and ImageNet normalisation; three forward passes a step of the network of
tests/original_networks.py (their module layout, ResNet-50 cut after layer3), MarginRankingLoss
with target -1, the loss read with .item() every step, Adam and StepLR(1, 0.985); after each
epoch the valid candidates and queries embedded in batches of 16 and every query ranked with
np.argsort and a walk over the sorted labels; then torch.save of the checkpoint and a
shutil.copyfile to model_best when the mAP improved. Logging goes to stderr and to <model>.log.

Differences, all outside what is timed as "the recipe": random initialisation (their ResNet-50
starts from ImageNet weights, which cannot be downloaded here; asen is run with --no-pretrained
to match), no visdom, CPU only.

    python benchmarks/original_recipe.py --data_path DATA --dataset FashionAI --epochs 1 --num_triplets 64
"""
import argparse
import json
import logging
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
import original_networks  # noqa: E402  (the authors' networks, re-written for the checkpoint tests)
import bench_map  # noqa: E402  (reference_map: the authors' per-query argsort mAP)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data_path', default='data')
    parser.add_argument('--dataset', default='FashionAI')
    parser.add_argument('--name', default='ASEN')
    parser.add_argument('--epochs', type=int, default=200)
    parser.add_argument('--num_triplets', type=int, default=100000)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--lr', type=float, default=1e-4)
    parser.add_argument('--margin', type=float, default=0.2)
    parser.add_argument('--dim_embed', type=int, default=1024)
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--log-interval', type=int, default=400)
    return parser.parse_args(argv)


def read_lines(path):
    with open(path) as f:
        return [line.rstrip('\n') for line in f]


class TripletDraws:
    """The epoch's triplets as the authors draw them (rejection sampling with Python's random)."""

    def __init__(self, folder, meta):
        names = [line.strip() for line in read_lines(os.path.join(folder, 'filenames_train.txt'))]
        self.attributes = meta['ATTRIBUTES']
        self.n_values = [meta['ATTRIBUTES_NUM'][a] for a in self.attributes]
        self.images = [[] for _ in self.attributes]  # per attribute: (file name, value) pairs
        for line in read_lines(os.path.join(folder, 'label_train.txt')):
            fields = [int(v) for v in line.split()]
            for attr, value in zip(fields[1::2], fields[2::2]):
                self.images[attr].append((names[fields[0]], value))
        for attr, name in enumerate(self.attributes):   # the rejection loops below would never end
            for value in range(self.n_values[attr]):
                if sum(v == value for _, v in self.images[attr]) < 2:
                    sys.exit(f'error: label_train.txt has fewer than 2 images of {name} = {value}; '
                             'the recipe needs two of every value (use more training images)')

    def draw(self, count):
        triplets = []
        for _ in range(count):
            attr = random.randint(0, len(self.attributes) - 1)
            value = random.randint(0, self.n_values[attr] - 1)
            pool = self.images[attr]
            anchor = self.pick(pool, lambda i: pool[i][1] == value)
            negative = self.pick(pool, lambda i: pool[i][1] != value)
            positive = self.pick(pool, lambda i: i != anchor and pool[i][1] == value)
            triplets.append((pool[anchor][0], pool[negative][0], pool[positive][0], attr))
        return triplets

    @staticmethod
    def pick(pool, accept):
        while True:
            i = random.randint(0, len(pool) - 1)
            if accept(i):
                return i


def open_rgb(path):
    return Image.open(path).convert('RGB')


class TripletImages(torch.utils.data.Dataset):
    def __init__(self, folder, draws, count, transform):
        self.folder, self.draws, self.count, self.transform = folder, draws, count, transform
        self.triplets = draws.draw(count)

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, index):
        *names, attr = self.triplets[index]
        return (*(self.transform(open_rgb(os.path.join(self.folder, n))) for n in names), attr)

    def refresh(self):
        self.triplets = self.draws.draw(self.count)


class QueryOrCandidateImages(torch.utils.data.Dataset):
    def __init__(self, folder, split, role, transform):
        self.folder, self.transform = folder, transform
        self.names = read_lines(os.path.join(folder, f'filenames_{split}.txt'))
        rows = [line.split() for line in read_lines(os.path.join(folder, f'{role}_{split}.txt'))]
        self.samples = [(int(r[0]), int(r[1]), int(r[2])) for r in rows]
        np.random.shuffle(self.samples)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, attr, value = self.samples[index]
        return self.transform(open_rgb(os.path.join(self.folder, self.names[image]))), attr, value


def embed_by_attribute(loader, enet, n_attributes):
    features = [[] for _ in range(n_attributes)]
    values = [[] for _ in range(n_attributes)]
    with torch.no_grad():
        for images, attrs, truth in loader:
            embedded = enet(images, attrs)
            for i in range(embedded.size(0)):
                features[attrs[i].item()].append(embedded[i].numpy())
                values[attrs[i].item()].append(int(truth[i]))
    return [np.array(f) for f in features], [np.array(v) for v in values]


def validate(candidates, queries, enet, attributes, epoch, logger):
    enet.eval()
    cand, cand_values = embed_by_attribute(candidates, enet, len(attributes))
    query, query_values = embed_by_attribute(queries, enet, len(attributes))
    weighted, n_queries = 0.0, 0
    for a, name in enumerate(attributes):
        m_ap = bench_map.reference_map(cand[a], query[a], cand_values[a], query_values[a])
        weighted, n_queries = weighted + m_ap * len(query[a]), n_queries + len(query[a])
        logger.info(f'{name} mAP: {100 * m_ap:.4f}')
    mean_ap = weighted / n_queries
    logger.info(f'Epoch {epoch} MeanAP: {100 * mean_ap:.4f}')
    return mean_ap


def train(loader, tnet, criterion, optimizer, epoch, log_interval, logger):
    tnet.train()
    for step, (anchor, negative, positive, attr) in enumerate(loader):
        sim_an, sim_ap = tnet(anchor, negative, positive, attr)
        loss = criterion(sim_an, sim_ap, torch.full_like(sim_an, -1.0))
        accuracy = (sim_ap > sim_an).float().mean().item()
        loss_value = loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_interval == 0:
            logger.info(f'Train Epoch: {epoch} [{step * len(anchor)}/{len(loader.dataset)}] '
                        f'Loss: {loss_value:.4f} Acc: {100 * accuracy:.2f}%')


def make_logger(model_name):
    logger = logging.getLogger('original_recipe')
    logger.setLevel(logging.INFO)
    for handler in (logging.FileHandler(f'{model_name}.log', 'w'), logging.StreamHandler()):
        handler.setFormatter(logging.Formatter('%(asctime)s - %(message)s'))
        logger.addHandler(handler)
    return logger


def main(argv=None):
    args = parse_args(argv)
    logger = make_logger('ASENet')
    torch.manual_seed(args.seed)
    with open(os.path.join(args.data_path, 'meta.json')) as f:
        meta = json.load(f)[args.dataset]
    attributes = meta['ATTRIBUTES']
    folder = os.path.join(args.data_path, args.dataset)

    enet = original_networks.ASENet(original_networks.FeatureResNet(50), args.dim_embed, len(attributes))
    tnet = original_networks.Tripletnet(enet)
    logger.info(f'  + Number of params: {sum(p.numel() for p in tnet.parameters())}')
    criterion = nn.MarginRankingLoss(margin=args.margin)
    optimizer = torch.optim.Adam([p for p in tnet.parameters() if p.requires_grad], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.985)

    normalise = transforms.Normalize(MEAN, STD)
    resize = [transforms.Resize(224), transforms.CenterCrop(224)]
    train_transform = transforms.Compose(resize + [transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise])
    eval_transform = transforms.Compose(resize + [transforms.ToTensor(), normalise])
    train_set = TripletImages(folder, TripletDraws(folder, meta), args.num_triplets, train_transform)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    candidates, queries = (torch.utils.data.DataLoader(QueryOrCandidateImages(folder, 'valid', role, eval_transform),
                                                       batch_size=args.batch_size, shuffle=True)
                           for role in ('candidate', 'query'))

    logger.info(f'Begin training on {args.dataset} dataset.')
    run_dir = os.path.join('runs', args.name)
    os.makedirs(run_dir, exist_ok=True)
    best, start = 0.0, time.time()
    for epoch in range(1, args.epochs + 1):
        train(train_loader, tnet, criterion, optimizer, epoch, args.log_interval, logger)
        train_set.refresh()
        mean_ap = validate(candidates, queries, enet, attributes, epoch, logger)
        path = os.path.join(run_dir, 'checkpoint.pth.tar')
        torch.save({'epoch': epoch, 'state_dict': tnet.state_dict(), 'prec': mean_ap}, path)
        if mean_ap > best:
            shutil.copyfile(path, os.path.join(run_dir, 'model_best.pth.tar'))
        best = max(best, mean_ap)
        scheduler.step()
        logger.info(f"lr:{optimizer.param_groups[0]['lr']}")
    logger.info(f'training time {int(time.time() - start)} s')


if __name__ == '__main__':
    main()
