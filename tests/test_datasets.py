"""Readers of the authors' split files (the triplet samplers: test_sampler.py)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import datasets
from utils import UserError

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'reference-splits'
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason='../shared/reference-splits is absent')


def write(path, text):
    path.write_bytes(text.encode())
    return path


def test_read_lines_handles_crlf_stray_cr_and_trailing_whitespace(tmp_path):
    f = write(tmp_path / 'f.txt', 'a/b.jpg\r\nc/d.jpg \t\r\n\re/f.jpg\r\n\r\n')
    assert datasets.read_lines(f) == ['a/b.jpg', 'c/d.jpg', 'e/f.jpg']
    f = write(tmp_path / 'g.txt', 'x.jpg\ny.jpg')          # no final newline
    assert datasets.read_lines(f) == ['x.jpg', 'y.jpg']


def test_malformed_line_names_file_and_line(tmp_path):
    f = write(tmp_path / 'query_valid.txt', '0 1 2\r\n3 x 1\r\n')
    with pytest.raises(UserError, match=r'query_valid.txt:2: malformed'):
        datasets.read_int_rows(f)
    f = write(tmp_path / 'label_train.txt', '0 1 2 3\n')
    with pytest.raises(UserError, match=r'label_train.txt:1'):
        datasets.read_int_rows(f, pairs=True)


def make_dataset(root, meta_entry, files):
    (root / 'Toy').mkdir(parents=True)
    write(root / 'meta.json', json.dumps({'Toy': meta_entry}))
    for name, text in files.items():
        write(root / 'Toy' / name, text)
    return datasets.SplitFiles(str(root), 'Toy')


META = {'ATTRIBUTES': ['a', 'b'], 'ATTRIBUTES_NUM': {'a': 2, 'b': 3}}


def test_value_out_of_range_is_reported(tmp_path):
    split = make_dataset(tmp_path, META, {'filenames_valid.txt': 'x.jpg\ny.jpg\n',
                                          'query_valid.txt': '0 0 1\n1 1 3\n'})
    with pytest.raises(UserError, match=r"query_valid.txt:2: value 3 out of range for attribute 'b'"):
        split.retrieval_entries('valid', 'query')


def test_id_past_filenames_is_reported(tmp_path):
    split = make_dataset(tmp_path, META, {'filenames_valid.txt': 'x.jpg\n', 'query_valid.txt': '5 0 1\n'})
    with pytest.raises(UserError, match=r'query_valid.txt:1: image id 5'):
        split.retrieval_entries('valid', 'query')


def test_missing_dataset_and_meta(tmp_path):
    with pytest.raises(UserError, match='dataset folder'):
        datasets.SplitFiles(str(tmp_path), 'FashionAI')
    (tmp_path / 'FashionAI').mkdir()
    with pytest.raises(UserError, match='meta.json'):
        datasets.SplitFiles(str(tmp_path), 'FashionAI')


def test_dataset_meta_wins_over_shared_meta(tmp_path):
    split = make_dataset(tmp_path, {'ATTRIBUTES': ['z'], 'ATTRIBUTES_NUM': {'z': 2}}, {})
    write(tmp_path / 'Toy' / 'meta.json', json.dumps({'Toy': META}))
    assert datasets.SplitFiles(str(tmp_path), 'Toy').attributes == ['a', 'b']
    assert split.attributes == ['z']


@needs_shared
@pytest.mark.parametrize('dataset', ['FashionAI', 'DARN', 'DeepFashion'])
def test_reference_retrieval_files_parse(dataset):
    split = datasets.SplitFiles(str(SHARED), dataset)
    expected = {'FashionAI': 8, 'DARN': 9, 'DeepFashion': 5}[dataset]
    assert len(split.attributes) == expected
    for name in ('valid', 'test'):
        filenames = split.filenames(name)
        assert filenames and all(f and f == f.strip() for f in filenames)
        queries = split.retrieval_entries(name, 'query')
        candidates = split.retrieval_entries(name, 'candidate')
        assert set(np.unique(queries[:, 1])) == set(range(expected))
        # each valid/test image is a query or a candidate, not both
        assert not set(queries[:, 0]) & set(candidates[:, 0])


@needs_shared
def test_reference_fashionai_train_labels_parse():
    split = datasets.SplitFiles(str(SHARED), 'FashionAI')
    rows = datasets.read_int_rows(str(SHARED / 'FashionAI' / 'label_train.txt'), pairs=True)
    assert len(rows) > 100000
    for _, fields in rows:
        for attr, value in zip(fields[1::2], fields[2::2]):
            assert value < split.values_per_attribute[attr]


@needs_shared
@pytest.mark.parametrize('name', ['label_valid.txt', 'label_test.txt'])
def test_reference_deepfashion_raw_labels_parse(name):
    lines = datasets.read_lines(str(SHARED / 'DeepFashion' / name))
    assert len(lines) == len(datasets.read_lines(str(SHARED / 'DeepFashion' / 'filenames_valid.txt')))
    assert all(all(f.isdigit() for f in line.split()) for line in lines)


def test_every_reference_file_is_covered():
    if not SHARED.is_dir():
        pytest.skip('../shared/reference-splits is absent')
    covered = {'meta.json', 'README.md', 'label_train.txt', 'label_valid.txt', 'label_test.txt'}
    covered |= {f'{kind}_{s}.txt' for kind in ('filenames', 'query', 'candidate') for s in ('valid', 'test')}
    assert {p.name for p in SHARED.rglob('*') if p.is_file()} <= covered


def test_datasets_refuse_a_missing_image_unless_told_to_skip(tmp_path, small_synth):
    """The training and retrieval sets stop at a missing image by default (one error naming it);
    --skip-bad-images (skip_bad=True) leaves it out."""
    from helpers import private_copy
    private_copy(small_synth, tmp_path / 'SynthFashion')
    split = datasets.SplitFiles(str(tmp_path), 'SynthFashion')
    transform = datasets.build_transform(16, train=False)
    for make, split_name, listed in (
            (lambda **kw: datasets.TripletDataset(split, 4, transform, seed=1, **kw), 'train', split.train_labels()[:, 0].max()),
            (lambda **kw: datasets.RetrievalDataset(split, 'valid', 'query', transform, **kw), 'valid',
             split.retrieval_entries('valid', 'query')[:, 0].max())):       # an id no attribute or value number equals
        name = split.filenames(split_name)[listed]
        (tmp_path / 'SynthFashion' / name).unlink()
        with pytest.raises(UserError, match=name):
            make()
        skipping = make(skip_bad=True)
        assert skipping.skipped == 1 and listed not in skipping.image_ids


def test_triplet_dataset_epochs_and_shards(small_synth):
    """Epoch e's triplets are the sampler's draw from (seed, e), all of them; shard r of W keeps
    rows r, r + W, ... of the first T // W * W (every rank as many), for every epoch."""
    split = datasets.SplitFiles(str(small_synth.parent), small_synth.name)
    transform = datasets.build_transform(16, train=True)
    whole = datasets.TripletDataset(split, 10, transform, seed=3)
    draws = {e: whole.sampler.sample(10, np.random.default_rng([3, e])) for e in (1, 2)}
    assert len(whole) == 10 and np.array_equal(whole.triplets, draws[1])
    assert np.array_equal(whole.image_ids, np.unique(split.train_labels()[:, 0]))      # what a cache holds
    whole.set_epoch(2)
    assert np.array_equal(whole.triplets, draws[2])
    for rank in range(3):
        shard = datasets.TripletDataset(split, 10, transform, seed=3)
        shard.shard(rank, 3)
        assert np.array_equal(shard.triplets, draws[1][rank:9:3]) and len(shard) == 3
        shard.set_epoch(2)
        assert np.array_equal(shard.triplets, draws[2][rank:9:3])


def test_retrieval_dataset_items_and_image_ids(small_synth):
    """A retrieval set's items are its entries in order (image, attribute, value, index); its image
    ids (what a cache holds) are those of its entries."""
    split = datasets.SplitFiles(str(small_synth.parent), small_synth.name)
    queries = datasets.RetrievalDataset(split, 'valid', 'query', lambda image: image.size)
    entries = split.retrieval_entries('valid', 'query')
    assert np.array_equal(queries.entries, entries) and len(queries) == len(entries)
    assert np.array_equal(queries.image_ids, np.unique(entries[:, 0]))
    _, attr, value, index = queries[len(queries) - 1]
    assert (attr, value, index) == (entries[-1, 1], entries[-1, 2], len(queries) - 1)
    assert queries.image_path(len(queries) - 1) == os.path.join(split.root, split.filenames('valid')[entries[-1, 0]])
