"""Tests of the SynthFashion generator (small sizes, a few seconds)."""

import argparse
import json
import os

import numpy as np
import pytest
from PIL import Image

import synthfashion

SMALL = dict(n_train=40, n_valid=20, n_test=20, image_size=64)
EVAL_SPLITS = ("valid", "test")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small generated dataset folder."""
    root = tmp_path_factory.mktemp("synth") / "SynthFashion"
    synthfashion.generate(root, **SMALL)
    return root


def read_rows(path):
    """Integer rows of a whitespace separated text file."""
    with open(path) as handle:
        return [[int(token) for token in line.split()] for line in handle]


def read_filenames(root, split):
    """Image paths of a split, in id order."""
    with open(root / f"filenames_{split}.txt") as handle:
        return handle.read().splitlines()


def meta(root):
    """The SynthFashion entry of meta.json."""
    return json.loads((root / "meta.json").read_text())["SynthFashion"]


def all_files(root):
    """{relative path: bytes} of every file under root."""
    return {os.path.relpath(os.path.join(folder, name), root):
            open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(root) for name in names}


def test_generation_is_deterministic(dataset, tmp_path):
    again = tmp_path / "again"
    synthfashion.generate(again, **SMALL)
    assert all_files(dataset) == all_files(again)


def test_seed_changes_the_data(dataset, tmp_path):
    other = tmp_path / "other"
    synthfashion.generate(other, seed=1, **SMALL)
    assert (other / "label_train.txt").read_text() != (dataset / "label_train.txt").read_text()


def test_ensure_reuses_and_regenerates(tmp_path):
    root = tmp_path / "data"
    assert synthfashion.ensure(root, **SMALL) is True
    assert synthfashion.ensure(root, **SMALL) is False
    changed = dict(SMALL, n_train=30)
    assert synthfashion.ensure(root, **changed) is True
    assert len(read_filenames(root, "train")) == 30
    assert json.loads((root / "settings.json").read_text()) == dict(
        synthfashion.DEFAULT_SETTINGS, **changed)
    assert os.listdir(tmp_path) == ["data"]  # no temporary folder left


@pytest.mark.parametrize("n_train, n_eval", [(42, 10), (43, 10), (200, 50)])
def test_training_generates_a_quarter_of_the_images_for_validation_and_test(tmp_path, n_train, n_eval):
    """--synth-images N: training generates N training images and N // 4 each for validation and
    test (a whole number: 42 gives 10, not 10.5), and testing then finds it as it asked."""
    from lib import config, inputs
    argv = ["--dataset", "SynthFashion", "--synth-images", str(n_train), "--data_path", str(tmp_path)]
    inputs.prepare_dataset(config.from_flags(argv))
    root = tmp_path / "SynthFashion"
    assert [len(read_filenames(root, split)) for split in ("train", "valid", "test")] == [n_train, n_eval, n_eval]
    testing = argparse.Namespace(**dict(vars(config.from_flags(argv)), test=True))
    inputs.prepare_dataset(testing)                 # testing never generates: it finds the folder as it asks


def test_unknown_setting_is_rejected(tmp_path):
    with pytest.raises(TypeError, match=r"unknown SynthFashion settings: \['colour_count'\]"):
        synthfashion.ensure(tmp_path / "x", colour_count=3)
    assert not (tmp_path / "x").exists()            # refused before anything is written


def test_meta(dataset):
    info = meta(dataset)
    assert info["ATTRIBUTES"] == list(synthfashion.ATTRIBUTES)
    for name in info["ATTRIBUTES"]:
        assert info["ATTRIBUTES_NUM"][name] == len(info["VALUES"][name])
        assert info["REGION_KIND"][name] in ("local", "global")


def test_filenames_point_to_rgb_images(dataset):
    for split in synthfashion.SPLITS:
        paths = read_filenames(dataset, split)
        assert len(paths) == SMALL[f"n_{split}"]
        assert len(set(paths)) == len(paths)
        for path in paths:
            assert path.startswith(f"images/{split}/") and path.endswith(".jpg")
            with Image.open(dataset / path) as image:
                assert image.mode == "RGB" and image.size == (64, 64)


def test_train_labels(dataset):
    num = meta(dataset)["ATTRIBUTES_NUM"]
    names = meta(dataset)["ATTRIBUTES"]
    rows = read_rows(dataset / "label_train.txt")
    assert [row[0] for row in rows] == list(range(SMALL["n_train"]))
    for row in rows:
        pairs = list(zip(row[1::2], row[2::2]))
        assert [a for a, _ in pairs] == list(range(len(names)))
        assert all(0 <= v < num[names[a]] for a, v in pairs)


@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_queries_and_candidates(dataset, split):
    names, num = meta(dataset)["ATTRIBUTES"], meta(dataset)["ATTRIBUTES_NUM"]
    queries = read_rows(dataset / f"query_{split}.txt")
    candidates = read_rows(dataset / f"candidate_{split}.txt")
    ids = sorted(row[0] for row in queries + candidates)
    assert ids == list(range(SMALL[f"n_{split}"]))  # each image exactly once
    for image_id, attribute, value in queries + candidates:
        assert 0 <= value < num[names[attribute]]
    for attribute in range(len(names)):
        assert any(row[1] == attribute for row in queries)
        assert any(row[1] == attribute for row in candidates)
    assert len(candidates) > 2 * len(queries)


@pytest.mark.parametrize("split", synthfashion.SPLITS)
def test_regions(dataset, split):
    info = meta(dataset)
    names = info["ATTRIBUTES"]
    regions = synthfashion.read_regions(dataset / f"regions_{split}.txt", len(names))
    assert regions.shape == (SMALL[f"n_{split}"], len(names), synthfashion.MAX_BOXES, 4)
    x0, y0, x1, y1 = np.moveaxis(regions, -1, 0)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 64).all() and (y1 <= 64).all()
    used = (x0 < x1) & (y0 < y1)
    assert (regions[~used] == 0).all()                    # unused boxes are 0 0 0 0
    sleeve = names.index("sleeve_length")
    assert used[:, sleeve].all()                           # one box per sleeve
    assert used[:, :, 0].all() and not used[:, np.arange(len(names)) != sleeve, 1].any()
    area = (x1 - x0) * (y1 - y0) * used
    garment = area[:, names.index("colour"), 0]
    for name in ("neckline_design", "coat_length"):
        assert area[:, names.index(name), 0].mean() < 0.5 * garment.mean()
    centre_x = (x0 + x1) / 2                               # one box per arm, either side of the neck
    neck_x = centre_x[:, names.index("neckline_design"), 0]
    arm_x = np.sort(centre_x[:, sleeve], axis=1)
    assert (arm_x[:, 0] < neck_x).all() and (arm_x[:, 1] > neck_x).all()
    assert (area[:, sleeve] < 0.2 * 64 * 64).all()               # an arm, not the figure


def test_read_regions_accepts_version_1_files(tmp_path):
    """Version 1 wrote one box per attribute: it reads as a single-box region."""
    path = tmp_path / "regions_test.txt"
    path.write_text("1 2 3 4 5 6 7 8\n9 10 11 12 13 14 15 16\n")
    regions = synthfashion.read_regions(path, 2)
    assert regions.shape == (2, 2, 1, 4) and regions[1, 0, 0].tolist() == [9, 10, 11, 12]


def test_region_box_follows_layer_rotation():
    canvas = synthfashion.Canvas(64)
    canvas.ellipse([44, 9, 46, 11], (255, 255, 255, 255))
    alpha = np.asarray(canvas.rotated((30, 34), 8))[..., 3]
    ys, xs = np.nonzero(alpha > 127)
    x0, y0, x1, y1 = synthfashion._rotated_bbox([(45, 10)], (30, 34), 8, 64)
    assert abs(xs.mean() - x0) <= 1.5 and abs(ys.mean() - y0) <= 1.5
