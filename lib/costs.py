"""What a table of reproduce.py costs: training rates read from named measurement files
(benchmarks/gpu_check.sh's project_recipe.json, or an asen.py log of one epoch), the splits'
sizes, and the projected hours of a row.
"""

import json
import os
import re
import shlex
from datetime import datetime

from lib import asenpp, config
from utils import UserError

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARED = os.path.join(os.path.dirname(HERE), 'shared')
BASELINE_LOG = os.path.join(SHARED, 'gpu-baseline', 'proj_default.log')
REFERENCE_SPLITS = os.path.join(SHARED, 'reference-splits')


def read_rates(path=None):
    """The measured rates and where they come from: a gpu_check.sh output folder (its
    project_recipe.json, written by benchmarks/project_recipe.py), or an asen.py training log of one
    epoch (../shared/gpu-baseline/proj_default.log by default). None when no file is found."""
    candidates = [path] if path else [os.path.join('gpu_check_out'), os.path.join(HERE, 'gpu_check_out'),
                                      BASELINE_LOG]
    for candidate in candidates:
        if candidate and os.path.isdir(candidate) and os.path.isfile(os.path.join(candidate, 'project_recipe.json')):
            return rates_from_recipe(os.path.join(candidate, 'project_recipe.json'))
        if candidate and os.path.isfile(candidate):
            if candidate.endswith('.json'):
                return rates_from_recipe(candidate)
            return rates_from_log(candidate)
    if path:
        raise UserError(f"--rates {path}: no such file, nor a folder holding project_recipe.json")
    return None


def rates_from_recipe(file):
    """The `default` variant (asen.py's defaults: the paper's recipe) of project_recipe.json."""
    try:
        with open(file) as f:
            recipe = json.load(f)
        variant = next((r for r in recipe['results'] if r['name'] == 'default'), recipe['results'][0])
        device = recipe['device']
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise UserError(f"{file}: not the JSON of benchmarks/project_recipe.py ({err})") from err
    gpu = device.startswith('cuda')
    return dict(source=f"{file} (benchmarks/gpu_check.sh, variant {variant['name']}, device {device})"
                       + ('' if gpu else '; CPU rates, not a GPU projection'),
                gpu=gpu, train_rate=variant['train_rate'], embed_rate=variant['embed_rate'],
                rank_s=variant.get('rank_s') or 0.0, snapshot_s=variant.get('snapshot_s') or 0.0)


STAMP = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - asen - INFO - (.*)$')


def rates_from_log(file):
    """Training rate of an asen.py log of one epoch: its triplets over the seconds from "Begin
    training" to the MeanAP line (the epoch's validation on that run's small valid split included)."""
    begin = end = triplets = None
    with open(file, errors='replace') as f:
        for line in f:
            m = STAMP.match(line.strip())
            if not m:
                continue
            when = datetime.strptime(m.group(1), '%Y-%m-%d %H:%M:%S,%f')
            if m.group(2).startswith('Begin training') and begin is None:
                begin = when
            count = re.search(r'\[0/(\d+)\]', m.group(2))
            if count and triplets is None:
                triplets = int(count.group(1))
            if m.group(2).startswith('MeanAP') and begin is not None and end is None:
                end = when
    if begin is None or end is None or not triplets:
        raise UserError(f"{file}: no 'Begin training', '[0/N]' and 'MeanAP' lines of an asen.py epoch")
    seconds = (end - begin).total_seconds()
    note = (' (the first H100 runs, at commit 180f13d, before the GPU rework: the current code\'s '
            'rate may differ)' if 'gpu-baseline' in file else '')
    return dict(source=f"{file}: {triplets} triplets in {seconds:.1f} s with its validation{note}; the full "
                       f"validation split's embedding is not in this rate",
                gpu='gpu-baseline' in file, train_rate=triplets / seconds, embed_rate=None, rank_s=0.0,
                snapshot_s=0.0)


def count_lines(path):
    try:
        with open(path, 'rb') as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def split_sizes(dataset, data_path):
    """{split: (images, where counted)} from the dataset's files under --data-path, else the
    authors' split files in ../shared/reference-splits; valid/test also the embedded entries."""
    sizes = {}
    for split in ('train', 'valid', 'test'):
        for root in (os.path.join(data_path, dataset), os.path.join(REFERENCE_SPLITS, dataset)):
            n = count_lines(os.path.join(root, f'filenames_{split}.txt'))
            if n is None and split == 'train':
                n = count_lines(os.path.join(root, 'label_train.txt'))
            if n is not None:
                sizes[split] = (n, root)
                break
    embeds = {}
    for split in ('valid', 'test'):
        for root in (os.path.join(data_path, dataset), os.path.join(REFERENCE_SPLITS, dataset)):
            q, c = (count_lines(os.path.join(root, f'{kind}_{split}.txt')) for kind in ('query', 'candidate'))
            if q is not None and c is not None:
                embeds[split] = q + c
                break
    return sizes, embeds


def recipe_numbers(extra):
    """The configuration of the recipe (asen.py's defaults, the paper's), as --extra changes it."""
    return config.from_flags(shlex.split(extra or ''))


def row_hours(row, rates, embeds, numbers):
    """(hours, epochs) of one training run and its test, from the rates; an ASEN++ row trains its
    stage's epochs (asenpp.STAGE_DEFAULTS) unless --extra gives --epochs."""
    stage = int(row['flags'][row['flags'].index('--stage') + 1]) if '--stage' in row['flags'] else None
    epochs = asenpp.STAGE_DEFAULTS[stage]['epochs'] if stage and 'epochs' not in numbers.explicit else numbers.epochs
    epoch_s = numbers.num_triplets / rates['train_rate'] + rates['rank_s'] + rates['snapshot_s']
    test_s = 0.0
    if rates['embed_rate']:
        epoch_s += embeds.get('valid', 0) / rates['embed_rate']
        test_s = embeds.get('test', 0) / rates['embed_rate'] + rates['rank_s']
    return (epochs * epoch_s + test_s) / 3600, epochs
