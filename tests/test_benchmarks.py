"""The GPU check's CPU-testable parts: its data generator, its projection arithmetic, its script."""
import filecmp
import json
import os
import sys

import pytest
from PIL import Image

import synthfashion
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import authors_data  # noqa: E402
import bench_train_step  # noqa: E402
import project_recipe  # noqa: E402
from lib import config, inputs, runtime  # noqa: E402


def test_authors_data_is_read_by_asen_as_fashionai(tmp_path):
    assert authors_data.write(str(tmp_path), n_train=12, n_eval=10, jpeg_size=80, workers=2)
    folder = tmp_path / 'FashionAI'
    assert sorted(os.listdir(folder)) == sorted(
        ['images', 'label_train.txt', synthfashion.MARKER] + [f'filenames_{s}.txt' for s in ('train', 'valid', 'test')] +
        [f'{role}_{s}.txt' for role in ('query', 'candidate') for s in ('valid', 'test')])
    meta = json.loads((tmp_path / 'meta.json').read_text())
    assert meta == {'FashionAI': {'ATTRIBUTES': synthfashion.ATTRIBUTES,
                                  'ATTRIBUTES_NUM': {k: len(v) for k, v in synthfashion.VALUES.items()}}}
    with Image.open(folder / 'images' / 'train' / '000000.jpg') as image:
        assert image.size == (80, 80) and image.format == 'JPEG'
    args = config.from_flags(['--dataset', 'FashionAI', '--data_path', str(tmp_path), '--no-pretrained',
                            '--img-size', '32', '--num_triplets', '4'])
    split_files = inputs.prepare_dataset(args)
    train = inputs.training_set(split_files, args)
    anchor, negative, positive, attr = train[0]
    assert anchor.shape == (3, 32, 32) and 0 <= attr < 5
    queries, candidates = inputs.evaluation_of(split_files, 'valid', args, runtime.silent_logger()).datasets
    assert len(queries) + len(candidates) == 10
    assert not authors_data.write(str(tmp_path), n_train=12, n_eval=10, jpeg_size=80, workers=2)   # kept


def test_synthfashion_in_several_processes_writes_the_same_files(tmp_path):
    settings = dict(image_size=32, n_train=3, n_valid=10, n_test=10)
    synthfashion.generate(tmp_path / 'one', **settings)
    synthfashion.generate(tmp_path / 'two', workers=2, **settings)
    compare = filecmp.dircmp(tmp_path / 'one', tmp_path / 'two')
    assert not compare.diff_files and not compare.left_only and not compare.right_only
    for split in synthfashion.SPLITS:
        sub = filecmp.dircmp(tmp_path / 'one' / 'images' / split, tmp_path / 'two' / 'images' / split)
        assert not sub.diff_files and not sub.left_only and not sub.right_only and sub.same_files


def epoch_json(device='cuda'):
    return {'settings': {'device': device}, 'results': [
        dict(name='default', rc=0, train_s=10.0, train_triplets_per_s=600.0, valid_s=3.0, valid_images=300,
             snapshot_s=0.5),
        dict(name='fast', rc=0, train_s=5.0, train_triplets_per_s=1200.0, valid_s=1.0, valid_images=300,
             snapshot_s=0.5),
        dict(name='broken', rc=2, train_s=None, train_triplets_per_s=None, valid_s=None, valid_images=300)]}


def test_recipe_projection_is_the_stated_formula():
    rows = project_recipe.project(epoch_json(), rank_s=0.25, epochs=200, triplets=100000, valid_images=18000)
    assert [r['name'] for r in rows] == ['default', 'fast']
    default, fast = rows
    assert default['epoch_s'] == pytest.approx(100000 / 600 + 18000 / 100 + 0.25 + 0.5)
    assert fast['epoch_s'] == pytest.approx(100000 / 1200 + 18000 / 300 + 0.25 + 0.5)
    assert fast['total_s'] == pytest.approx(200 * fast['epoch_s'])


def test_recipe_projection_reads_the_benchmarks_json(tmp_path, capsys):
    (tmp_path / 'epoch.json').write_text(json.dumps(epoch_json('cuda:0')))
    (tmp_path / 'eval.json').write_text(json.dumps({'results': [{'device': 'cpu', 'seconds': 9.0},
                                                                {'device': 'cuda', 'seconds': 0.25}]}))
    assert project_recipe.main(['--epoch', str(tmp_path / 'epoch.json'), '--eval', str(tmp_path / 'eval.json')]) == 0
    out = capsys.readouterr().out
    assert 'total = 200 x (100000 / train_rate + 18000 / embed_rate + rank_s + snapshot_s)' in out
    result = json.loads(out.strip().splitlines()[-1].removeprefix('JSON: '))
    assert result['rank_s'] == 0.25
    assert result['results'][1]['total_s'] == pytest.approx(200 * (100000 / 1200 + 18000 / 300 + 0.75))


def test_compile_mode_configs_are_named_by_suffix():
    assert bench_train_step.config_of('bf16 channels_last concat +reduce-overhead') == dict(
        amp='bf16', channels_last=True, concat=True, compile=True, compile_mode='reduce-overhead')
    assert bench_train_step.config_of('fp32 concat +compile')['compile_mode'] == 'default'
    assert bench_train_step.config_of('fp32 concat')['compile'] is False


def test_goal_summary_reads_gpu_check_outputs(tmp_path, capsys):
    import gpu_summary
    steps = {'results': [{'name': 'fp32 3-forward (original)', 'images_per_s': 900.0},
                         {'name': 'bf16 channels_last concat', 'images_per_s': 2400.0}]}
    graphs = {'results': [{'name': 'bf16 channels_last concat +reduce-overhead', 'images_per_s': 3600.0}]}
    epoch = epoch_json()
    epoch['results'][1]['train_vs_steps_alone'] = 0.95
    for name, obj in (('bench_train_step', steps), ('bench_train_step_graphs', graphs), ('bench_epoch', epoch)):
        (tmp_path / f'{name}.json').write_text(json.dumps(obj))
    assert gpu_summary.main([str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix('JSON: '))['rows']
    by_goal = {r['goal']: r for r in rows}
    assert by_goal['steps alone, fastest (bf16 channels_last concat +reduce-overhead)']['met'] is True
    assert by_goal['steps alone, fastest against fp32 eager']['measured'] == '4.00x'
    assert by_goal['training pass of the fast epoch against the steps alone']['met'] is True
    # defaults 10 + 3 s against fast 5 + 1 s: 2.17x, below the 5x goal
    assert by_goal['train + validate, defaults against fast']['measured'].endswith('= 2.17x')
    assert by_goal['train + validate, defaults against fast']['met'] is False


def test_original_recipe_draws_triplets_as_the_authors(tmp_path):
    """Anchor and positive: two different images of the drawn value; negative: another value."""
    import numpy as np
    import original_recipe
    rng = np.random.default_rng(0)
    meta = {'ATTRIBUTES': ['a', 'b', 'c'], 'ATTRIBUTES_NUM': {'a': 2, 'b': 3, 'c': 4}}
    names = [f'images/{i}.jpg' for i in range(40)]
    value_of, lines = {}, []
    for i, name in enumerate(names):   # every image labelled for two of the three attributes
        attrs = sorted(rng.choice(3, size=2, replace=False))
        fields = [i]
        for attr in attrs:
            value = i % meta['ATTRIBUTES_NUM'][meta['ATTRIBUTES'][attr]]
            value_of[name, attr] = value
            fields += [attr, value]
        lines.append(' '.join(map(str, fields)))
    (tmp_path / 'filenames_train.txt').write_text('\n'.join(names) + '\n')
    (tmp_path / 'label_train.txt').write_text('\n'.join(lines) + '\n')
    original_recipe.random.seed(0)
    triplets = original_recipe.TripletDraws(str(tmp_path), meta).draw(300)
    for anchor, negative, positive, attr in triplets:
        assert anchor != positive
        assert value_of[anchor, attr] == value_of[positive, attr] != value_of[negative, attr]
    assert {t[3] for t in triplets} == {0, 1, 2}
    (tmp_path / 'label_train.txt').write_text('0 0 0\n1 0 1\n2 0 1\n3 0 1\n')   # a = 0: one image
    with pytest.raises(SystemExit, match='a = 0'):
        original_recipe.TripletDraws(str(tmp_path), meta)


def test_original_recipe_average_precision_is_the_projects():
    import numpy as np
    import original_recipe
    from lib import evaluation
    rng = np.random.default_rng(0)
    queries, candidates = rng.normal(size=(7, 5)), rng.normal(size=(30, 5))
    q_values, c_values = rng.integers(0, 3, 7), rng.integers(0, 3, 30)
    loop = original_recipe.bench_map.reference_map(candidates, queries, c_values, q_values)
    assert abs(loop - evaluation.mean_average_precision(candidates, queries, c_values, q_values)) < 1e-6


def test_small_run_alternates_the_order_of_its_variants():
    import bench_small_run
    assert bench_small_run.run_order(['a', 'b'], 3) == ['a', 'b', 'b', 'a', 'a', 'b']


def test_small_run_reads_the_phases_from_both_log_formats():
    import datetime
    import bench_small_run
    asen_log = 'x\n2026-11-27 22:11:52,548 - asen - INFO - Begin training on FashionAI dataset.\n'
    original_log = '2026-11-27 22:11:52,548 - Begin training on FashionAI dataset.\n'
    expected = datetime.datetime(2026, 11, 27, 22, 11, 52, 548000).timestamp()
    for log in (asen_log, original_log):
        assert bench_small_run.log_time(log, 'Begin training') == expected
    assert bench_small_run.log_time(asen_log, 'lr:') is None
