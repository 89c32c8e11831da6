"""Watching a run and using the model: TensorBoard, heatmaps, localisation, retrieval."""
import json
import os

from PIL import Image

import asen


def test_run_folder_has_tensorboard_metrics_and_heatmaps(trained_run):
    _, run = trained_run
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(run))
    record = json.loads((run / 'metrics.jsonl').read_text().splitlines()[0])
    assert record['epoch'] == 1 and {'train_loss', 'train_acc', 'lr', 'MeanAP', 'mAP'} <= set(record)
    assert json.loads((run / 'args.json').read_text())['dataset'] == 'SynthFashion'
    with Image.open(run / 'heatmaps' / 'valid_epoch001.png') as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_tensorboard_holds_the_scalars(trained_run):
    from tensorboard_reader import scalar_tags
    _, run = trained_run
    tags = scalar_tags(run)
    assert {'train/loss', 'train/triplet_accuracy', 'train/lr', 'valid/MeanAP', 'valid/mAP/colour'} <= tags


def test_visualize_writes_overlays(trained_copy, capsys):
    root, run = trained_copy                      # it writes into the run folder: a copy
    assert asen.main(['--visualize', '--resume', str(run / 'checkpoint.pth.tar')]) == 0
    path = run / 'heatmaps' / 'attention_test.png'
    assert f'heatmaps: {os.path.join("runs", "shared", "heatmaps", "attention_test.png")}' in capsys.readouterr().out
    with Image.open(path) as img:
        assert img.mode == 'RGB'


def test_test_reports_localisation_on_synthfashion(trained_copy, capsys):
    root, run = trained_copy                      # it writes into the run folder: a copy
    assert asen.main(['--test', '--resume', str(run / 'checkpoint.pth.tar')]) == 0
    out = capsys.readouterr().out
    assert 'sleeve_length attention in region: ' in out and '(uniform: ' in out
    assert '| model | sleeve_length |' in out
    result = json.loads((run / 'test_results.json').read_text())
    for name, scores in result['attention_localisation'].items():
        assert 0 <= scores['inside'] <= 100 and 0 < scores['uniform'] < 100


def test_retrieve_ranks_and_caches(trained_copy, capsys):
    root, run = trained_copy                      # it writes into the run folder: a copy
    data = root / 'data' / 'SynthFashion'
    first_candidate = int((data / 'candidate_test.txt').read_text().split()[0])
    query = data / (data / 'filenames_test.txt').read_text().splitlines()[first_candidate]
    args = ['--retrieve', str(query), '--attribute', 'colour', '--resume', str(run / 'checkpoint.pth.tar'),
            '--topk', '3']
    assert asen.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ranked = [line.split() for line in lines if ' - asen - ' not in line and line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in ranked] == [1, 2, 3]
    scores = [float(r[1]) for r in ranked]
    assert scores == sorted(scores, reverse=True)
    # the query image is itself a test image: it ranks first with similarity 1
    assert ranked[0][2].endswith(str(query.relative_to(data))) and abs(scores[0] - 1) < 1e-4
    grid = lines[-1].split('grid: ')[1]
    assert os.path.isfile(grid)
    cached = os.listdir(run / 'retrieval_cache')
    assert len(cached) == 1
    assert asen.main(args) == 0
    assert os.listdir(run / 'retrieval_cache') == cached


def test_retrieve_unknown_attribute(trained_copy, capsys):
    root, run = trained_copy                      # the refusal is logged to the run's test.log: a copy
    assert asen.main(['--retrieve', 'x.jpg', '--attribute', 'heel', '--resume', str(run / 'checkpoint.pth.tar')]) == 2
    err = capsys.readouterr().err
    assert "--attribute 'heel'" in err and 'sleeve_length' in err
