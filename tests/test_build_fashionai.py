"""python build_fashionai.py: FashionAI split files from the challenge's label.csv."""
import json

import numpy as np
import pytest

import build_fashionai
import datasets
from utils import UserError

ATTRS = build_fashionai.FASHIONAI_ATTRIBUTES


def label(n_values, value, maybe=None):
    letters = ['n'] * n_values
    letters[value] = 'y'
    if maybe is not None:
        letters[maybe] = 'm'
    return ''.join(letters)


def write_labels(root, per_attribute=50, seed=0):
    """Two archives' label.csv: per attribute `per_attribute` usable rows (30 in train1, the rest in
    train2), plus one 'm' row each; returns {image path relative to root: (attr, value)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    rows = {'fashionAI_attributes_train1': [], 'fashionAI_attributes_train2': []}
    for attr, (name, n_values) in enumerate(ATTRS):
        for i in range(per_attribute + 1):
            archive = 'fashionAI_attributes_train1' if i < 30 else 'fashionAI_attributes_train2'
            image = f'Images/{name}_labels/{name}{i:03d}.jpg'
            value = int(rng.integers(n_values))
            if i == per_attribute:                      # ambiguous: left out
                rows[archive].append(f'{image},{name}_labels,{label(n_values, value, (value + 1) % n_values)}')
                continue
            rows[archive].append(f'{image},{name}_labels,{label(n_values, value)}')
            truth[f'{archive}/{image}'] = (attr, value)
    for archive, lines in rows.items():
        (root / archive / 'Annotations').mkdir(parents=True)
        (root / archive / 'Annotations' / 'label.csv').write_text('\r\n'.join(lines) + '\r\n')
    return truth


@pytest.fixture()
def fashionai(tmp_path):
    root = tmp_path / 'FashionAI'
    return root, write_labels(root)


def read_split(root):
    split = datasets.SplitFiles(str(root.parent), 'FashionAI')
    return split, {s: split.filenames(s) for s in ('train', 'valid', 'test')}


def test_proportions_values_and_format(fashionai):
    root, truth = fashionai
    summary = build_fashionai.build_fashionai(str(root), seed=0)
    assert summary['skipped_m'] == len(ATTRS) and summary['skipped_no_single_y'] == 0
    split, names = read_split(root)
    assert split.attributes == [n for n, _ in ATTRS] and split.values_per_attribute == [n for _, n in ATTRS]
    # 50 images per attribute: 40 / 5 / 5; of each 5, 1 query and 4 candidates
    labels = split.train_labels()
    assert np.bincount(labels[:, 1]).tolist() == [40] * len(ATTRS)
    for part in ('valid', 'test'):
        queries, candidates = split.retrieval_entries(part, 'query'), split.retrieval_entries(part, 'candidate')
        assert np.bincount(queries[:, 1]).tolist() == [1] * len(ATTRS)
        assert np.bincount(candidates[:, 1]).tolist() == [4] * len(ATTRS)
        assert not set(queries[:, 0]) & set(candidates[:, 0])
        for image_id, attr, value in np.concatenate([queries, candidates]):
            assert truth[names[part][image_id]] == (attr, value)        # value = position of the y
    for image_id, attr, value in labels:
        assert truth[names['train'][image_id]] == (attr, value)
    # every usable image once, in one split; the 'm' rows nowhere
    listed = names['train'] + names['valid'] + names['test']
    assert sorted(listed) == sorted(truth) and len(set(listed)) == len(listed)
    assert all(p.startswith('fashionAI_attributes_train') for p in listed)
    assert not any(p.endswith('050.jpg') for p in listed)


def test_deterministic_by_seed(tmp_path):
    outputs = {}
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        root = tmp_path / name / 'FashionAI'
        write_labels(root)
        build_fashionai.build_fashionai(str(root), seed=seed)
        outputs[name] = {f: (root / f).read_text() for f in build_fashionai.SPLIT_OUTPUTS + ('meta.json',)}
    assert outputs['a'] == outputs['b']
    assert outputs['a']['filenames_train.txt'] != outputs['c']['filenames_train.txt']


def test_ids_are_not_grouped_by_attribute(fashionai):
    root, _ = fashionai
    build_fashionai.build_fashionai(str(root))
    attrs = datasets.SplitFiles(str(root.parent), 'FashionAI').train_labels()[:, 1]
    assert (np.diff(attrs) != 0).sum() > 50


def test_existing_split_is_kept_unless_forced(fashionai, capsys):
    root, _ = fashionai
    (root / 'filenames_train.txt').write_text('authors\n')
    assert build_fashionai.main(['--root', str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'filenames_train.txt' in err and '--force' in err
    assert (root / 'filenames_train.txt').read_text() == 'authors\n'
    (root / 'meta.json').write_text(json.dumps({'Other': {'ATTRIBUTES': ['x'], 'ATTRIBUTES_NUM': {'x': 2}}}))
    assert build_fashionai.main(['--root', str(root), '--force', '--seed', '3']) == 0
    assert '320 train, 40 valid (8 queries), 40 test (8 queries)' in capsys.readouterr().out
    meta = json.loads((root / 'meta.json').read_text())
    assert set(meta) == {'Other', 'FashionAI'}
    assert not [p for p in root.iterdir() if p.name.startswith('.build-split-')]


@pytest.mark.parametrize('row, message', [
    ('Images/x.jpg,sleeve_length_labels', 'malformed row'),
    ('Images/x.jpg,hat_labels,nyn', 'malformed row'),
    ('Images/x.jpg,neck_design_labels,nnyn', "label 'nnyn' of neck_design_labels must be 5 letters"),
    ('Images/x.jpg,neck_design_labels,nnynx', "label 'nnynx' .* must be 5 letters of y, n, m"),
])
def test_malformed_row_names_file_and_line(fashionai, row, message):
    root, _ = fashionai
    path = root / 'fashionAI_attributes_train2' / 'Annotations' / 'label.csv'
    lines = path.read_text().splitlines()
    path.write_text('\n'.join(lines[:2] + [row] + lines[2:]) + '\n')
    with pytest.raises(UserError, match=rf'label.csv:3: {message}'):
        build_fashionai.build_fashionai(str(root))


def test_conflicting_duplicate_and_rows_without_one_y(fashionai):
    root, _ = fashionai
    path = root / 'fashionAI_attributes_train1' / 'Annotations' / 'label.csv'
    first = path.read_text().splitlines()[0]
    image, attr, lab = first.split(',')
    other = label(len(lab), (lab.index('y') + 1) % len(lab))
    path.write_text(path.read_text() + f'{first}\nImages/z.jpg,{attr},{"n" * len(lab)}\n')
    summary = build_fashionai.build_fashionai(str(root))                # exact duplicate kept once
    assert summary['skipped_no_single_y'] == 1
    path.write_text(path.read_text() + f'{image},{attr},{other}\n')
    with pytest.raises(UserError, match=r'label.csv:\d+: .* another value .*label.csv:1;'):
        build_fashionai.build_fashionai(str(root), force=True)


def test_missing_root_or_labels(tmp_path):
    with pytest.raises(UserError, match='folder not found'):
        build_fashionai.build_fashionai(str(tmp_path / 'nope'))
    with pytest.raises(UserError, match='no Annotations/label.csv'):
        build_fashionai.build_fashionai(str(tmp_path))
