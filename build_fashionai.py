"""Build FashionAI split files in the authors' format from the challenge's own annotations.

    python build_fashionai.py --root data/FashionAI [--seed 0] [--force]

(Moved here from `python datasets.py build-fashionai`; same behaviour and flags.)
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from lib import checks
import datasets
import utils
from utils import UserError

SEED_MAX = 2**63 - 1

# ----------------------------------------------------------------------------- FashionAI split builder
#
# When the authors' split archive is not to be had, `python build_fashionai.py` makes a
# split in their format from the challenge's own annotations. FashionAI ships each training archive
# (fashionAI_attributes_train1/, fashionAI_attributes_train2/) with `Annotations/label.csv`, rows
# `Images/<attr>_labels/<id>.jpg,<attr>_labels,nnynnn`: the value is the position of the `y`; an
# `m` marks a value that is also plausible, and such ambiguous rows are left out. Each image is
# labelled under one attribute, so the split is by image: per attribute, its images are shuffled
# (seeded) and cut train/valid/test 8:1:1, and the valid and test images 1:4 into queries and
# candidates (the paper's protocol; the authors' files show the same overall proportions:
# 144335/18000/18000 images, 3600 queries to 14400 candidates).

# The authors' attribute order and value counts (their meta.json).
FASHIONAI_ATTRIBUTES = (('skirt_length', 6), ('sleeve_length', 9), ('coat_length', 8), ('pant_length', 6),
                        ('collar_design', 5), ('lapel_design', 5), ('neckline_design', 10), ('neck_design', 5))
# label.csv's attribute column -> the authors' attribute name.
LABEL_CSV_ATTRIBUTES = {
    'skirt_length_labels': 'skirt_length', 'sleeve_length_labels': 'sleeve_length',
    'coat_length_labels': 'coat_length', 'pant_length_labels': 'pant_length',
    'collar_design_labels': 'collar_design', 'lapel_design_labels': 'lapel_design',
    'neckline_design_labels': 'neckline_design', 'neck_design_labels': 'neck_design',
}
SPLIT_OUTPUTS = ('filenames_train.txt', 'filenames_valid.txt', 'filenames_test.txt', 'label_train.txt',
                 'query_valid.txt', 'candidate_valid.txt', 'query_test.txt', 'candidate_test.txt')


def find_label_files(root):
    """[(label.csv path, image path prefix)]: `root/*/Annotations/label.csv`, then `root/Annotations/label.csv`."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: folder not found; unpack the FashionAI attribute archives into it")
    found = [(os.path.join(root, d, 'Annotations', 'label.csv'), d + '/') for d in sorted(os.listdir(root))
             if os.path.isfile(os.path.join(root, d, 'Annotations', 'label.csv'))]
    if os.path.isfile(os.path.join(root, 'Annotations', 'label.csv')):
        found.append((os.path.join(root, 'Annotations', 'label.csv'), ''))
    if not found:
        raise UserError(f"{root}: no Annotations/label.csv in it or its subfolders; unpack "
                        f"fashionAI_attributes_train1/ (and train2/) there")
    return found


def parse_label_row(path, number, line):
    """(image path, attribute index, value) of a label.csv row, or a skip reason 'm' / 'y'."""
    names = [name for name, _ in FASHIONAI_ATTRIBUTES]
    fields = line.split(',')
    if len(fields) != 3 or fields[1] not in LABEL_CSV_ATTRIBUTES:
        raise UserError(f"{path}:{number}: malformed row {line!r}; expected "
                        f"'Images/<attr>_labels/<id>.jpg,<attr>_labels,nnynn' with <attr>_labels one of "
                        f"{', '.join(LABEL_CSV_ATTRIBUTES)}")
    image, attr_name, label = fields
    attr = names.index(LABEL_CSV_ATTRIBUTES[attr_name])
    n_values = FASHIONAI_ATTRIBUTES[attr][1]
    if len(label) != n_values or set(label) - set('ynm'):
        raise UserError(f"{path}:{number}: label {label!r} of {attr_name} must be {n_values} letters "
                        f"of y, n, m")
    if 'm' in label:
        return 'm'
    if label.count('y') != 1:
        return 'y'
    return image, attr, label.index('y')


def read_fashionai_labels(label_files):
    """({image path: [(attr, value)]} in file order, {'m': rows skipped, 'y': rows without one y})."""
    images, origin, skipped = {}, {}, {'m': 0, 'y': 0}
    for path, prefix in label_files:
        for number, line in enumerate(datasets.read_lines(path), start=1):
            if not line:
                continue
            row = parse_label_row(path, number, line)
            if isinstance(row, str):
                skipped[row] += 1
                continue
            image, attr, value = prefix + row[0], row[1], row[2]
            labels = dict(images.setdefault(image, []))
            if labels.get(attr, value) != value:
                raise UserError(f"{path}:{number}: {image} has another value for this attribute at "
                                f"{origin[image, attr]}; fix one of the two rows")
            if attr not in labels:
                images[image].append((attr, value))
                origin[image, attr] = f'{path}:{number}'
    return images, skipped


def split_counts(n):
    """(train, valid, test) sizes of n images at 8:1:1, valid and test rounded half up."""
    held = int(n / 10 + 0.5)
    return n - 2 * held, held, held


def assign_splits(images, seed):
    """{'train'|'valid'|'test': image paths in id order}, {'valid'|'test': set of query paths}.

    Stratified by each image's first attribute: every attribute is cut 8:1:1, its valid and test
    images 1:4 into queries and candidates. Each split's order is shuffled too, so ids do not group
    by attribute. Deterministic for a seed and the same label files.
    """
    rng = np.random.default_rng(seed)
    by_attr = {}
    for image, labels in images.items():
        by_attr.setdefault(labels[0][0], []).append(image)
    splits, queries = {'train': [], 'valid': [], 'test': []}, {'valid': set(), 'test': set()}
    for attr in sorted(by_attr):
        group = [by_attr[attr][i] for i in rng.permutation(len(by_attr[attr]))]
        n_train, n_valid, _ = split_counts(len(group))
        parts = {'train': group[:n_train], 'valid': group[n_train:n_train + n_valid],
                 'test': group[n_train + n_valid:]}
        for split, part in parts.items():
            splits[split] += part
            if split in queries:
                queries[split].update(part[:int(len(part) / 5 + 0.5)])
    return {s: [paths[i] for i in rng.permutation(len(paths))] for s, paths in splits.items()}, queries


def split_file_texts(images, splits, queries):
    """{output file name: text} of the split, in the authors' format (LF line ends)."""
    texts = {f'filenames_{s}.txt': ''.join(p + '\n' for p in paths) for s, paths in splits.items()}
    texts['label_train.txt'] = ''.join(
        f'{i} ' + ' '.join(f'{a} {v}' for a, v in images[p]) + '\n' for i, p in enumerate(splits['train']))
    for split in ('valid', 'test'):
        for role in ('query', 'candidate'):
            texts[f'{role}_{split}.txt'] = ''.join(
                f'{i} {a} {v}\n' for i, p in enumerate(splits[split]) if (p in queries[split]) == (role == 'query')
                for a, v in images[p])
    return texts


def check_no_empty_split(label_files, images, texts):
    """Refuse a split with an empty file (too few usable rows: the valid and test splits of an
    attribute take a tenth of its images each, and a fifth of those are queries), which asen.py
    would refuse later in a less telling way."""
    empty = [name for name, text in texts.items() if not text]
    if empty:
        raise UserError(f"{', '.join(p for p, _ in label_files)}: only {len(images)} usable image(s), too few "
                        f"for a split ({', '.join(sorted(empty))} would be empty); an attribute needs about "
                        f"25 labelled images for its valid and test queries: unpack all the annotations")


def fashionai_meta_entry():
    """The FashionAI entry of meta.json, in the authors' attribute order."""
    return {'ATTRIBUTES': [n for n, _ in FASHIONAI_ATTRIBUTES], 'ATTRIBUTES_NUM': dict(FASHIONAI_ATTRIBUTES)}


def meta_text(root):
    """`root/meta.json` with its FashionAI entry set (other entries kept)."""
    meta_path = os.path.join(root, 'meta.json')
    meta = {}
    if os.path.lexists(meta_path):
        try:
            meta = json.loads(checks.decode_utf8(meta_path, checks.read_bytes(meta_path, 'meta.json')))
        except ValueError as err:
            raise UserError(f"{meta_path}: not valid JSON ({err}); fix or remove it") from err
        if not isinstance(meta, dict):
            raise UserError(f"{meta_path}: holds a JSON {type(meta).__name__}, not an object of dataset "
                            f"entries; fix or remove it")
    meta['FashionAI'] = fashionai_meta_entry()
    return json.dumps(meta, indent=2) + '\n'


def check_not_clobbering(root, force):
    existing = [name for name in SPLIT_OUTPUTS if os.path.exists(os.path.join(root, name))]
    if existing and not force:
        raise UserError(f"{root} already holds a split ({', '.join(existing)}); it may be the authors'; "
                        f"pass --force to replace it")


def write_files_atomically(root, texts):
    """Write every file to a temporary folder inside `root`, then move each into place."""
    tmp = tempfile.mkdtemp(dir=root, prefix='.build-split-')
    try:
        for name, text in texts.items():
            with open(os.path.join(tmp, name), 'w', newline='\n') as f:
                f.write(text)
        for name in texts:
            os.replace(os.path.join(tmp, name), os.path.join(root, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_fashionai(root, seed=0, force=False):
    """Build the FashionAI split files and meta.json in `root`; returns a summary dict."""
    label_files = find_label_files(root)
    check_not_clobbering(root, force)
    images, skipped = read_fashionai_labels(label_files)
    if not images:
        raise UserError(f"{', '.join(p for p, _ in label_files)}: no usable row")
    splits, queries = assign_splits(images, seed)
    texts = split_file_texts(images, splits, queries)
    check_no_empty_split(label_files, images, texts)
    texts['meta.json'] = meta_text(root)
    write_files_atomically(root, texts)
    return {'images': {s: len(p) for s, p in splits.items()}, 'queries': {s: len(q) for s, q in queries.items()},
            'skipped_m': skipped['m'], 'skipped_no_single_y': skipped['y'], 'seed': seed,
            'label_files': [p for p, _ in label_files]}


def build_parser():
    parser = utils.OneLineArgumentParser(
        command='build_fashionai.py', formatter_class=utils.HelpFormatter,
        description="Build FashionAI split files in the authors' format from the challenge's Annotations/label.csv.")
    parser.add_argument('--root', default=os.path.join('data', 'FashionAI'), help='the FashionAI folder')
    parser.add_argument('--seed', type=int, default=0, help='seed of the split')
    parser.add_argument('--force', action='store_true', help='replace split files already in --root')
    return parser


def check_args(args):
    if not args.root:
        raise UserError("--root is empty; give the FashionAI folder (an unset shell variable?)")
    utils.check_range('--seed', args.seed, 'from 0 to 2**63-1', 0 <= args.seed <= SEED_MAX)


def build_and_report(args):
    check_args(args)
    summary = build_fashionai(args.root, args.seed, args.force)
    n, q = summary['images'], summary['queries']
    print(f"{args.root}: {n['train']} train, {n['valid']} valid ({q['valid']} queries), {n['test']} test "
          f"({q['test']} queries) images, seed {args.seed}; left out {summary['skipped_m']} rows with 'm' "
          f"and {summary['skipped_no_single_y']} rows without exactly one 'y'")


def main(argv=None):
    """`python build_fashionai.py --root data/FashionAI [--seed 0] [--force]`; the exit status."""
    args = build_parser().parse_args(argv)
    return utils.run_command(build_and_report, args)


if __name__ == '__main__':
    sys.exit(main())
