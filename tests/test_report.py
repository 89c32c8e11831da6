"""--report: runs/<name>/report/index.html. The numbers behind its pictures are those --test scores,
its bad inputs are one line each and change nothing, and the page loads whole in a real browser."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import asen
import browser
import original_networks as orig
from helpers import assert_one_line_error, private_copy, read_only_run_dir, run_main, tree_hashes
from lib import engine, report

BEST = 'runs/shared/model_best.pth.tar'
REPORT = ['--report', '--resume', BEST, '--no-cuda']
ATTRIBUTES = ['sleeve_length', 'neckline_design', 'coat_length', 'colour', 'pattern']


def read_record(run_dir):
    return json.loads((run_dir / 'report' / report.RECORD).read_text())


# ----------------------------------------------------------------------------- the numbers

@pytest.fixture(scope='module')
def spied_report(_trained_once, tmp_path_factory):
    """`--test --report` on a copy of the trained run (made once for the tests of the numbers), with
    what commands.test handed the report (evaluation set, embeddings, result), the t-SNE inputs and
    the number of embedding passes."""
    source, _, _ = _trained_once
    root = tmp_path_factory.mktemp('spied')
    private_copy(source / 'data', root / 'data')
    private_copy(source / 'runs' / 'shared', root / 'runs' / 'shared')
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(root)
        yield root / 'runs' / 'shared', spy_on_report(monkeypatch)


def spy_on_report(monkeypatch):
    seen = dict(passes=0, tsne_parts=[], tsne_maps=[])
    write, tsne_part, tsne_map = report.Writer.write, report.Writer.tsne_part, report.tsne_map
    extract = engine.extract_embeddings

    def spy_write(self, net, split_files, evaluation_set, embeddings, result, device, logger):
        seen.update(evaluation_set=evaluation_set, embeddings=embeddings, result=result)
        return write(self, net, split_files, evaluation_set, embeddings, result, device, logger)

    def spy_part(self, out, points, values, value_name, attr_name, attr):
        seen['tsne_parts'].append((attr, points.copy()))
        return tsne_part(self, out, points, values, value_name, attr_name, attr)

    def spy_map(points, seed):
        seen['tsne_maps'].append(points.copy())
        return tsne_map(points, seed)

    def spy_extract(*args, **kwargs):
        seen['passes'] += 1
        return extract(*args, **kwargs)
    monkeypatch.setattr(report.Writer, 'write', spy_write)
    monkeypatch.setattr(report.Writer, 'tsne_part', spy_part)
    monkeypatch.setattr(report, 'tsne_map', spy_map)
    monkeypatch.setattr(report, 'TSNE_MIN_POINTS', 3)          # the tiny split has a few images an attribute
    monkeypatch.setattr(engine, 'extract_embeddings', spy_extract)
    assert asen.main(['--test'] + REPORT) == 0
    return seen


def test_test_and_report_share_one_embedding_of_the_test_split(spied_report):
    run_dir, seen = spied_report
    assert seen['passes'] == len(seen['evaluation_set'].datasets) == 2        # queries, candidates: once each
    tested = json.loads((run_dir / 'test_results.json').read_text())
    record = read_record(run_dir)
    assert record['result']['mAP'] == pytest.approx(tested['mAP']) and record['result']['MeanAP'] == tested['MeanAP']
    assert (run_dir / 'report' / 'index.html').is_file()


def test_per_value_ap_averages_to_the_attribute_map(spied_report):
    """Weighted by their queries, as the metric averages over queries; the attributes weighted by
    their queries give MeanAP."""
    run_dir, seen = spied_report
    record, tested = read_record(run_dir), seen['result']
    total_queries, weighted = 0, 0.0
    for name in ATTRIBUTES:
        per_value = record['attributes'][name]['per_value']
        queries = sum(v['queries'] for v in per_value)
        mean = sum(v['queries'] * v['AP'] for v in per_value) / queries
        assert mean == pytest.approx(tested['mAP'][name], abs=1e-9)
        assert record['attributes'][name]['queries'] == queries
        total_queries += queries
        weighted += queries * tested['mAP'][name]
    assert weighted / total_queries == pytest.approx(tested['MeanAP'], abs=1e-9)


def average_precision(relevant_in_rank_order):
    hits = np.flatnonzero(relevant_in_rank_order)
    return float(np.mean((np.arange(len(hits)) + 1) / (hits + 1))) if len(hits) else 0.0


def test_retrieval_examples_are_the_top_of_the_ranking_test_scores(spied_report):
    run_dir, seen = spied_report
    evaluation_set, (query_emb, cand_emb) = seen['evaluation_set'], seen['embeddings']
    queries, candidates = evaluation_set.queries.entries, evaluation_set.candidates.entries
    shown = 0
    for attr, name in enumerate(ATTRIBUTES):
        pool = np.flatnonzero(candidates[:, 1] == attr)
        for example in read_record(run_dir)['attributes'][name]['examples']:
            query = example['query']
            assert queries[query, 1] == attr and example['value'] == queries[query, 2]
            scores = (cand_emb[pool] @ query_emb[query]).numpy()
            order = pool[np.argsort(-scores, kind='stable')]
            listed = [r[0] for r in example['results']]
            assert listed == order[:len(listed)].tolist() and len(listed) == min(report.RETRIEVAL_TOPK, len(pool))
            assert [r[3] for r in example['results']] == [bool(candidates[i, 2] == example['value']) for i in listed]
            assert example['ap'] == pytest.approx(average_precision(candidates[order, 2] == example['value']))
            shown += 1
    assert shown >= len(ATTRIBUTES)


def test_tsne_input_is_the_test_embeddings_of_that_attribute(spied_report):
    _, seen = spied_report
    evaluation_set, embeddings = seen['evaluation_set'], seen['embeddings']
    assert seen['tsne_parts'] and len(seen['tsne_maps']) >= 1
    mapped = iter(seen['tsne_maps'])
    for attr, points in seen['tsne_parts']:
        own = np.concatenate([emb[dataset.entries[:, 1] == attr].numpy()
                              for dataset, emb in zip(evaluation_set.datasets, embeddings)])
        assert np.array_equal(points, own)
        if len(points) >= report.TSNE_MIN_POINTS:
            assert np.array_equal(next(mapped), points)
    assert next(mapped, None) is None


def test_tsne_input_is_a_seeded_bounded_sample():
    """Over the limit: a sample of the attribute's rows, the same for the same seed."""
    class Part:
        def __init__(self, entries):
            self.entries = np.asarray(entries)

    class Evaluation:
        datasets = (Part([[i, i % 2, i % 3] for i in range(40)]), Part([[i, i % 2, i % 4] for i in range(30)]))
    embeddings = (torch.arange(40.0)[:, None].repeat(1, 4), 100 + torch.arange(30.0)[:, None].repeat(1, 4))
    points, values, rows = report.tsne_input(Evaluation, embeddings, 1, limit=10, seed=5)
    again = report.tsne_input(Evaluation, embeddings, 1, limit=10, seed=5)
    assert len(rows) == 10 and rows == again[2] and np.array_equal(points, again[0])
    for (position, index), point, value in zip(rows, points, values):
        assert Evaluation.datasets[position].entries[index, 1] == 1
        assert point[0] == embeddings[position][index, 0] and value == Evaluation.datasets[position].entries[index, 2]


# ----------------------------------------------------------------------------- what the page holds

def test_the_report_holds_its_seven_parts(reported_run):
    _, run_dir = reported_run
    page = (run_dir / 'report' / 'index.html').read_text()
    for section in ('id="run"', 'id="results"', 'id="curves"', 'id="attributes"'):
        assert section in page
    assert 'python asen.py --dataset SynthFashion' in page and 'Random' in page
    for attr, name in enumerate(ATTRIBUTES):
        assert f'id="attr-{attr}"' in page and f'<h3>{name}' in page
    for part in ('<h4>Attention</h4>', '<h4>Retrieval examples</h4>', '<h4>t-SNE map</h4>', '<h4>AP of each value</h4>'):
        assert page.count(part) == len(ATTRIBUTES)
    assert '<script' not in page and 'http' not in page                  # offline, no JavaScript
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (run_dir / 'report' / src).is_file()


@pytest.mark.slow                   # a fresh interpreter and a test
def test_training_and_test_never_import_the_report_libraries(trained_copy):
    """matplotlib and scikit-learn are loaded by --report only: not by the modules training runs
    (asen.py and everything it imports), nor by a --test."""
    root, _ = trained_copy
    code = ("import sys, asen\n"
            "assert asen.main(['--test', '--resume', 'runs/shared/model_best.pth.tar', '--no-cuda']) == 0\n"
            "print('loaded:', sorted(m for m in ('matplotlib', 'sklearn') if m in sys.modules))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(asen.__file__))]))
    proc = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'loaded: []' in proc.stdout


@pytest.mark.slow                   # four reports
def test_a_report_replaces_only_a_report_of_the_same_run(trained_copy, capsys):
    root, run_dir = trained_copy
    assert run_main(REPORT, capsys)[0] == 0
    first = read_record(run_dir)
    assert first['checkpoint'] == BEST
    # the run's other snapshot: the same run, replaced whole, nothing set aside or left over
    assert run_main(['--report', '--resume', 'runs/shared/checkpoint.pth.tar', '--no-cuda'], capsys)[0] == 0
    assert read_record(run_dir)['checkpoint'] == 'runs/shared/checkpoint.pth.tar'
    assert sorted(p.name for p in run_dir.iterdir() if 'report' in p.name) == ['report']
    # a copy of the run elsewhere, reported into runs/shared: refused, then --overwrite sets the earlier aside
    private_copy(run_dir, root / 'elsewhere')
    (root / 'elsewhere' / 'report' / 'index.html').unlink()
    before = tree_hashes(root / 'runs', logs=True)
    other = ['--report', '--resume', 'elsewhere/model_best.pth.tar', '--name', 'shared', '--no-cuda']
    code, _, err = run_main(other, capsys)
    assert_one_line_error(code, err, 'runs/shared/report', 'runs/shared/checkpoint.pth.tar', '--overwrite')
    assert tree_hashes(root / 'runs', logs=True).keys() == before.keys()
    assert run_main(other + ['--overwrite'], capsys)[0] == 0
    assert read_record(run_dir)['checkpoint'] == 'elsewhere/model_best.pth.tar'
    aside = [p for p in run_dir.iterdir() if p.name.startswith('report.replaced-')]
    assert len(aside) == 1 and json.loads((aside[0] / report.RECORD).read_text())['checkpoint'] == \
        'runs/shared/checkpoint.pth.tar'


# ----------------------------------------------------------------------------- bad input

def no_metrics(root):
    (root / 'runs' / 'shared' / 'metrics.jsonl').unlink()


def another_dataset(root):
    """data/DeepFashion: the tiny SynthFashion files under DeepFashion's name (5 attributes too)."""
    private_copy(root / 'data' / 'SynthFashion', root / 'data' / 'DeepFashion')
    meta = root / 'data' / 'DeepFashion' / 'meta.json'
    entry = json.loads(meta.read_text())['SynthFashion']
    meta.unlink()
    meta.write_text(json.dumps({'DeepFashion': entry}))


@pytest.mark.parametrize('setup, argv, needles', [
    (no_metrics, REPORT, ['runs/shared/metrics.jsonl', 'not found']),
    (another_dataset, REPORT + ['--dataset', 'DeepFashion'], ['SynthFashion', '--dataset DeepFashion']),
    (read_only_run_dir, REPORT + ['--name', 'new'], ['runs/new', 'cannot write']),
], ids=['run-without-metrics', 'checkpoint-of-another-dataset', 'unwritable-run-folder'])
def test_bad_input_is_one_line_and_changes_nothing(trained_copy, capsys, setup, argv, needles):
    root, _ = trained_copy
    setup(root)
    before = tree_hashes(root, logs=True)
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err, *needles)
    after = tree_hashes(root, logs=True)
    assert {k: v for k, v in after.items() if not k.endswith('.log')} == \
        {k: v for k, v in before.items() if not k.endswith('.log')}


# ----------------------------------------------------------------------------- other models and data

@pytest.mark.slow
def test_an_authors_checkpoint_gets_a_report(workdir, tiny_data, capsys):
    private_copy(tiny_data, workdir / 'data')
    orig.save(orig.build('ASENet', 5, seed=1), workdir / 'theirs.pth.tar', legacy=True)
    argv = ['--report', '--resume', 'theirs.pth.tar', '--name', 'orig', '--dataset', 'SynthFashion',
            '--synth-images', '48', '--img-size', '64', '--amp', 'off']
    assert run_main(argv, capsys)[0] == 0
    page = (workdir / 'runs' / 'orig' / 'report' / 'index.html').read_text()
    assert "An authors' checkpoint" in page and 'no asen.py command line' in page
    assert 'no metrics.jsonl' in page and page.count('<h4>Attention</h4>') == 5
    assert not (workdir / 'runs' / 'orig' / 'test_results.json').exists()      # --report alone: no test file


@pytest.mark.slow
def test_zappos_report_gives_accuracy_and_says_why_no_retrieval(workdir, capsys):
    from helpers import build_zappos
    build_zappos(workdir)
    train = ['--dataset', 'Zappos50k', '--backbone', 'resnet18', '--no-pretrained', '--img-size', '32',
             '--num_triplets', '16', '--batch-size', '8', '--dim_embed', '16', '--epochs', '1', '--name', 'z',
             '--no-cuda']
    assert run_main(train, capsys)[0] == 0
    assert run_main(['--report', '--resume', 'runs/z/model_best.pth.tar', '--no-cuda'], capsys)[0] == 0
    page = (workdir / 'runs' / 'z' / 'report' / 'index.html').read_text()
    assert 'triplet accuracy per condition' in page and 'Random' in page
    assert 'no retrieval grid' in page and 'retrieval_' not in page
    assert 'no AP per value' in page


# ----------------------------------------------------------------------------- in a real browser

def require_browser():
    """Skip without Chromium and its driver, saying why; in CI (CI=true) fail instead: it must run."""
    why = browser.missing()
    if why:
        if os.environ.get('CI') == 'true':
            pytest.fail(f'CI must run the browser test: {why}')
        pytest.skip(why)


def test_the_report_in_headless_chromium(reported_run, tmp_path):
    """Every image loaded, no console error, each attribute's section shown; a screenshot taken."""
    require_browser()
    _, run_dir = reported_run
    shot = tmp_path / 'report.png'
    page = browser.open_page(run_dir / 'report' / 'index.html', str(shot))
    assert len(page['images']) >= 1 + 2 * len(ATTRIBUTES)               # curves, attention, retrieval
    assert [src for src, loaded in page['images'] if not loaded] == []
    assert page['severe'] == []
    assert [f'attr-{k}' for k in range(len(ATTRIBUTES))] == [i for i in page['ids'] if i.startswith('attr-')]
    for name in ATTRIBUTES:
        assert name in page['text']
    assert shot.stat().st_size > 10_000


def test_a_broken_image_is_seen_by_the_browser_check(reported_run, tmp_path):
    """The check can fail: a page naming a missing picture is caught."""
    require_browser()
    _, run_dir = reported_run
    page = tmp_path / 'broken.html'
    text = (run_dir / 'report' / 'index.html').read_text().replace('img/curves.png', 'img/nowhere.png')
    page.write_text(text.replace('src="img/', f'src="{run_dir / "report" / "img"}/'))
    result = browser.open_page(page)
    broken = [src for src, loaded in result['images'] if not loaded]
    assert len(broken) == 1 and broken[0].endswith('img/nowhere.png')
