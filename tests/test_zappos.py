"""Zappos50k with the CSN triplet lists: reader, sampler, triplet accuracy, train and test end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import asen
from lib import zappos
from helpers import TINY_ZAPPOS
from utils import UserError


def is_multiple(value, step):
    return abs(value / step - round(value / step)) < 1e-6


@pytest.mark.slow
def test_train_then_test_through_main(zappos_dir, workdir, capsys):
    assert asen.main(TINY_ZAPPOS + ['--heatmap-every', '1']) == 0
    run = workdir / 'runs' / 'zap'
    log = (run / 'train.log').read_text()
    for cond in zappos.CONDITIONS:
        assert f'{cond} accuracy: ' in log
    assert 'Accuracy: ' in log and 'Train Epoch: 1 [0/16]' in log
    assert (run / 'model_best.pth.tar').exists() and (run / 'heatmaps' / 'valid_epoch001.png').exists()
    metrics = json.loads((run / 'metrics.jsonl').read_text().splitlines()[0])
    assert set(metrics['accuracy']) == set(zappos.CONDITIONS)
    # 6 valid triplets per condition: each accuracy a multiple of 100/6; overall, the mean over
    # the 24 triplets, as the log says it
    assert all(is_multiple(value, 100 / 6) for value in metrics['accuracy'].values())
    assert metrics['Accuracy'] == pytest.approx(np.mean(list(metrics['accuracy'].values())), abs=1e-9)
    assert f"Accuracy: {metrics['Accuracy']:.4f}" in log

    capsys.readouterr()
    assert asen.main(['--test', '--resume', str(run / 'model_best.pth.tar')]) == 0
    table = capsys.readouterr().out
    assert '| model | class | closure | gender | heel | Accuracy |' in table
    result = json.loads((run / 'test_results.json').read_text())
    assert result['dataset'] == 'Zappos50k' and result['attributes'] == list(zappos.CONDITIONS)
    assert is_multiple(result['Random Accuracy'], 100 / 24)        # random embeddings, the same 24 triplets
    # 6 test triplets per condition: every accuracy is a multiple of 1/6, overall their mean
    assert all(is_multiple(value, 100 / 6) for value in result['accuracy'].values())
    assert abs(np.mean(list(result['accuracy'].values())) - result['Accuracy']) < 1e-6
    assert 'heel accuracy: ' in (run / 'test.log').read_text()


def test_vectorised_accuracy_equals_a_loop():
    rng = np.random.default_rng(1)
    emb = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    rows = rng.integers(0, 30, (200, 3))
    conditions = rng.integers(0, 3, 200)              # condition 3 has no triplets: scores 0
    hits, totals = np.zeros(4), np.zeros(4)
    for (a, f, c), cond in zip(rows, conditions):
        hits[cond] += float(emb[a] @ emb[c]) > float(emb[a] @ emb[f])
        totals[cond] += 1
    per, overall = zappos.condition_accuracy(emb, rows, conditions, 4)
    expected = [h / t if t else 0.0 for h, t in zip(hits, totals)]
    assert np.allclose(per, expected) and per[3] == 0.0
    assert overall == pytest.approx(hits.sum() / totals.sum())
    assert 0.2 < overall < 0.8


def test_eval_set_embeds_each_image_condition_once(zappos_dir):
    files = zappos.ZapposFiles(str(zappos_dir.parent))
    eval_set = zappos.TripletEvalSet(files, 'test', transform=lambda img: img)
    triplets = files.triplets('test')
    assert len(eval_set.rows) == len(triplets) == 24
    assert len({tuple(e) for e in eval_set.entries}) == len(eval_set)
    for (a, f, c, cond), rows in zip(triplets, eval_set.rows):
        assert [tuple(eval_set.entries[r]) for r in rows] == [(a, cond), (f, cond), (c, cond)]
    image, cond, _, index = eval_set[0]
    assert isinstance(image, Image.Image) and cond == eval_set.entries[0, 1] and index == 0


def test_training_dataset_items_and_epochs(zappos_dir):
    files = zappos.ZapposFiles(str(zappos_dir.parent))
    train = zappos.ZapposTripletDataset(files, 8, transform=lambda img: img.size, seed=2)
    first = train.triplets.copy()
    assert len(train) == 8 and np.bincount(first[:, 3]).tolist() == [2, 2, 2, 2]
    anchor, negative, positive, attr = train[0]
    assert anchor == negative == positive == (32, 24) and attr == first[0, 3]
    train.set_epoch(2)
    assert not np.array_equal(first, train.triplets)
    train.set_epoch(1)
    assert np.array_equal(first, train.triplets)


def test_malformed_line_names_file_and_line(zappos_dir):
    path = zappos_dir / 'tripletlists' / 'gender_tripletlist_val.txt'
    path.write_text('1 2 3\n4 5\n')
    files = zappos.ZapposFiles(str(zappos_dir.parent))
    with pytest.raises(UserError, match=r'gender_tripletlist_val.txt:2: malformed'):
        files.triplets('val')
    path.write_text('1 2 3\n4 5 99\n')
    with pytest.raises(UserError, match=r'gender_tripletlist_val.txt:2: image id 99'):
        files.triplets('val')


def test_errors_through_main_are_one_line(zappos_dir, workdir, capsys):
    (zappos_dir / 'tripletlists' / 'heel_tripletlist_train.txt').write_text('0 1 2\nx 1 2\n')
    assert asen.main(TINY_ZAPPOS) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'heel_tripletlist_train.txt:2' in err
    (zappos_dir / 'ut-zap50k-images' / 'Shoes' / 'Brand 0' / '0.0.jpg').unlink()
    (zappos_dir / 'tripletlists' / 'heel_tripletlist_train.txt').write_text('3 4 5\n0 1 2\n')
    assert asen.main(TINY_ZAPPOS) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'missing' in err and '0.0.jpg' in err
    assert asen.main(TINY_ZAPPOS + ['--skip-bad-images']) == 0


def test_missing_folder_is_one_line(workdir, capsys):
    assert asen.main(TINY_ZAPPOS) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'data/Zappos50k' in err and 'docs/datasets.md' in err
    (workdir / 'data' / 'Zappos50k' / 'ut-zap50k-images').mkdir(parents=True)
    assert asen.main(TINY_ZAPPOS) == 2
    assert 'tripletlists' in capsys.readouterr().err


def test_visualize_is_not_available(zappos_dir, workdir, capsys):
    ckpt = workdir / 'fake.pth.tar'
    torch.save({'state_dict': {}, 'args': {'dataset': 'Zappos50k'}}, ckpt)
    assert asen.main(['--visualize', '--resume', str(ckpt)]) == 2
    assert 'not available for Zappos50k' in capsys.readouterr().err


def test_triplet_accuracy_is_strict_and_in_float32():
    """A triplet counts when s(anchor, close) > s(anchor, far): a tie is wrong; bf16 embeddings (under
    autocast) are compared in float32 (1 * 256 + 1 * 1 = 257 is 256 in bf16, a tie with the far one)."""
    emb = torch.tensor([[1.0, 1.0], [256.0, 0.0], [256.0, 1.0], [256.0, 0.0]])
    rows = np.array([[0, 1, 2], [0, 1, 3]])                        # (anchor, far, close)
    assert zappos.triplet_correct(emb, rows).tolist() == [True, False]
    assert zappos.triplet_correct(emb.bfloat16(), rows).tolist() == [True, False]
    assert zappos.triplet_correct(emb, rows[:, [0, 2, 1]]).tolist() == [False, False]


def test_training_accuracy_is_strict_too():
    """The training log's accuracy (evaluation.triplet_accuracy, the share of s_ap > s_an) counts a tie
    as wrong, as the evaluation does: a float share, not a count."""
    from lib import evaluation
    sim_an = torch.tensor([0.5, 0.5, 0.5, 0.2])
    sim_ap = torch.tensor([0.5, 0.6, 0.4, 0.9])                     # tie, right, wrong, right
    acc = evaluation.triplet_accuracy(sim_an, sim_ap)
    assert acc.dtype == torch.float32 and acc.item() == 0.5
    assert evaluation.triplet_accuracy(sim_an, sim_an).item() == 0.0


def test_accuracy_without_triplets_is_zero():
    rows, conditions = np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)
    assert zappos.condition_accuracy(torch.eye(3), rows, conditions, 2) == ([0.0, 0.0], 0.0)


def test_triplet_evaluation_scores_and_random_row():
    """lib/evaluation.py's TripletEvaluation: accuracy per condition name and over all triplets of the
    eval set's rows; the Random row is the accuracy of seeded l2-normalised N(0, 1) embeddings."""
    from types import SimpleNamespace
    from lib.evaluation import TripletEvaluation
    rng = np.random.default_rng(4)
    eval_set = SimpleNamespace(rows=rng.integers(0, 20, (60, 3)), conditions=rng.integers(0, 2, 60))
    emb = torch.nn.functional.normalize(torch.randn(20, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    evaluation = TripletEvaluation(eval_set, ['heel', 'toe'])
    scores = evaluation.score((emb,))
    per, total = zappos.condition_accuracy(emb, eval_set.rows, eval_set.conditions, 2)
    assert scores.per == {'heel': per[0], 'toe': per[1]} and scores.total == total
    rand = torch.nn.functional.normalize(torch.randn(20, 5, generator=torch.Generator().manual_seed(7)), dim=1)
    want = zappos.condition_accuracy(rand, eval_set.rows, eval_set.conditions, 2)[1]
    assert evaluation.random_score((emb,), seed=7) == want
    assert evaluation.random_score((torch.zeros(20, 5),), seed=7) == want
    assert evaluation.random_score((emb,), seed=8) != want
