"""reproduce.py: the paper's tables as recipes, run, skipped, collected beside the paper's figures, costed."""
import json
import os
import signal
import subprocess
import sys

import pytest

import reproduce
from helpers import SYNTH_ATTRS, TINY_EXTRA, build_zappos, fake_result, file_hash
from lib import costs


@pytest.fixture()
def in_process(monkeypatch):
    """reproduce.py's asen.py commands run by asen.main in this process (no interpreter start per
    row), their output into the row's log as a subprocess's would go."""
    import contextlib
    import asen

    def run_asen(command, log, signals):
        assert command[:2] == [sys.executable, reproduce.asen_command([])[1]]
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return asen.main(command[2:])
    monkeypatch.setattr(reproduce, 'run_asen', run_asen)


def asen_line(*flags):
    return ' '.join([sys.executable, reproduce.ASEN] + list(flags))


def commands(out):
    return [line for line in out.splitlines() if line.startswith(sys.executable)]


def test_dry_run_prints_the_exact_commands(workdir, capsys):
    assert reproduce.main(['deepfashion', 'asenpp-fashionai', '--dry-run', '--seeds', '1', '2',
                           '--data-path', 'D', '--extra', '--workers 2']) == 0
    lines = commands(capsys.readouterr().out)
    expected = []
    for key, model in (('triplet', 'TripletNet'), ('csn', 'ConditionalSimNet'), ('asen', 'ASENet')):
        for seed in (1, 2):
            run = f'deepfashion-{key}-s{seed}'
            expected += [asen_line('--dataset', 'DeepFashion', '--data_path', 'D', '--model', model, '--resume',
                                   'auto', '--seed', str(seed), '--name', run, '--workers', '2'),
                         asen_line('--test', '--report', '--resume', f'runs/{run}/model_best.pth.tar', '--data_path', 'D')]
    for seed in (1, 2):
        run = f'fashionai-asenpp1-s{seed}'
        expected += [asen_line('--dataset', 'FashionAI', '--data_path', 'D', '--model', 'ASENpp', '--stage', '1',
                               '--resume', 'auto', '--seed', str(seed), '--name', run, '--workers', '2'),
                     asen_line('--test', '--report', '--resume', f'runs/{run}/model_best.pth.tar', '--data_path', 'D')]
    for seed in (1, 2):
        run = f'fashionai-asenpp2-s{seed}'
        expected += [asen_line('--dataset', 'FashionAI', '--data_path', 'D', '--model', 'ASENpp', '--stage', '2',
                               '--resume', f'runs/fashionai-asenpp1-s{seed}/model_best.pth.tar', '--seed', str(seed),
                               '--name', run, '--workers', '2'),
                     asen_line('--test', '--report', '--resume', f'runs/{run}/model_best.pth.tar', '--data_path', 'D')]
    assert lines == expected
    assert not (workdir / 'runs').exists()                  # a dry run runs and writes nothing


def test_a_run_shared_by_two_tables_is_listed_once(workdir, capsys):
    assert reproduce.main(['fashionai', 'ablation-fashionai', '--dry-run']) == 0
    trains = [line for line in commands(capsys.readouterr().out) if '--name fashionai-asen-s1' in line]
    assert len(trains) == 1


def test_rows_with_results_are_skipped_and_interrupted_ones_continue(workdir, capsys):
    """Each state a row can be in: tested (skipped), trained (tested only), stopped with a step or
    an epoch snapshot or before any (the same training command, which --resume auto continues or
    starts), an ASEN++ stage 2 with a snapshot (its own, not stage 1's)."""
    fake_result(workdir, 'darn-triplet-s1', 'TripletNet', [1, 2, 3, 4, 5])
    runs, logs = workdir / 'runs', workdir / 'runs' / 'reproduce'
    logs.mkdir()
    (logs / 'darn-csn-s1.trained').touch()                                    # trained, not tested
    (runs / 'darn-csn-s1').mkdir()
    (runs / 'darn-csn-s1' / 'model_best.pth.tar').touch()
    (runs / 'darn-asen-s1').mkdir()
    (runs / 'darn-asen-s1' / 'step.pth.tar').touch()                          # stopped in epoch 1
    (runs / 'fashionai-asenpp2-s1').mkdir()
    (runs / 'fashionai-asenpp2-s1' / 'checkpoint.pth.tar').touch()            # stage 2, stopped
    assert reproduce.main(['darn', 'asenpp-fashionai', '--dry-run', '--data-path', 'D']) == 0
    out = capsys.readouterr().out
    assert '# skip darn-triplet-s1: runs/darn-triplet-s1/test_results.json exists' in out

    def test(run):
        return asen_line('--test', '--report', '--resume', f'runs/{run}/model_best.pth.tar', '--data_path', 'D')
    assert commands(out) == [
        test('darn-csn-s1'),
        asen_line('--dataset', 'DARN', '--data_path', 'D', '--model', 'ASENet', '--resume', 'auto', '--seed', '1',
                  '--name', 'darn-asen-s1'),
        test('darn-asen-s1'),
        asen_line('--dataset', 'FashionAI', '--data_path', 'D', '--model', 'ASENpp', '--stage', '1', '--resume',
                  'auto', '--seed', '1', '--name', 'fashionai-asenpp1-s1'),
        test('fashionai-asenpp1-s1'),
        asen_line('--dataset', 'FashionAI', '--data_path', 'D', '--model', 'ASENpp', '--stage', '2', '--resume',
                  'auto', '--seed', '1', '--name', 'fashionai-asenpp2-s1'),
        test('fashionai-asenpp2-s1')]
    # a .trained mark whose run folder has lost its model_best: trained again (--resume auto)
    (runs / 'darn-csn-s1' / 'model_best.pth.tar').unlink()
    assert reproduce.main(['darn', '--dry-run', '--data-path', 'D']) == 0
    assert '--name darn-csn-s1' in commands(capsys.readouterr().out)[0]


@pytest.mark.slow
def test_one_row_end_to_end_beside_finished_rows(workdir, capsys, in_process):
    """Triplet and CSN have results (skipped, not retrained); ASEN trains and tests on tiny
    SynthFashion; the table puts the CRL figures and the differences beside ours."""
    fake_result(workdir, 'synthfashion-triplet-s1', 'TripletNet', [10, 20, 30, 40, 50], random=21.0)
    fake_result(workdir, 'synthfashion-csn-s1', 'ConditionalSimNet', [11, 21, 31, 41, 51], random=19.0)
    assert reproduce.main(['deepfashion', '--dataset', 'SynthFashion', '--extra', TINY_EXTRA]) == 0
    out = capsys.readouterr().out
    assert not (workdir / 'runs' / 'synthfashion-triplet-s1' / 'model_best.pth.tar').exists()
    assert (workdir / 'runs' / 'synthfashion-asen-s1' / 'test_results.json').exists()
    ours = json.loads((workdir / 'runs' / 'synthfashion-asen-s1' / 'test_results.json').read_text())
    table = json.loads((workdir / 'runs' / 'reproduce' / 'deepfashion.json').read_text())
    rows = {r['row']: r for r in table['rows']}
    assert list(rows) == ['Triplet', 'CSN', 'ASEN', 'Random']
    assert rows['Triplet']['paper'] == {'MeanAP': 7.36} and rows['Triplet']['difference']['MeanAP'] == \
        pytest.approx(30 - 7.36)
    assert rows['ASEN']['difference']['MeanAP'] == pytest.approx(ours['MeanAP'] - 8.74)
    assert rows['ASEN']['source'] == reproduce.CRL
    # Random: the runs' own baselines from --test, mean of three
    assert rows['Random']['ours']['MeanAP'] == pytest.approx((21 + 19 + ours['Random MeanAP']) / 3)
    assert rows['Random']['difference']['MeanAP'] == pytest.approx(rows['Random']['ours']['MeanAP'] - 3.38)
    text = (workdir / 'runs' / 'reproduce' / 'deepfashion.md').read_text()
    assert text in out
    assert '| Triplet | paper | |  |  |  |  |  | 7.36 |' in text
    assert '| Triplet | ours - paper | |  |  |  |  |  | +22.64 |' in text
    assert f"Paper figures of Triplet, CSN, ASEN, Random: {reproduce.CRL}." in text
    assert 'Ours ran on SynthFashion, not DeepFashion' in text
    # the index: every row, ours beside the paper's figure, a link to each run's report (none for the fakes)
    index = (workdir / 'runs' / 'reproduce' / 'index.html').read_text()
    assert '<a href="../synthfashion-asen-s1/report/index.html">synthfashion-asen-s1</a>' in index
    assert (workdir / 'runs' / 'synthfashion-asen-s1' / 'report' / 'index.html').is_file()
    assert 'synthfashion-triplet-s1 (no report: python asen.py --report --resume' in index
    assert index.count('<td>paper</td>') == 4 and reproduce.CRL in index
    # run again: everything is skipped, the table is the same
    assert reproduce.main(['deepfashion', '--dataset', 'SynthFashion', '--extra', TINY_EXTRA]) == 0
    assert '# skip synthfashion-asen-s1' in capsys.readouterr().out
    # a finished row whose test result and .trained mark are lost (reproduce.py killed as its
    # training ended): the same command's --resume auto returns at once, the row is tested again
    run = workdir / 'runs' / 'synthfashion-asen-s1'
    weights = {name: file_hash(run / name) for name in ('checkpoint.pth.tar', 'model_best.pth.tar')}
    (run / 'test_results.json').unlink()
    (workdir / 'runs' / 'reproduce' / 'synthfashion-asen-s1.trained').unlink()
    assert reproduce.main(['deepfashion', '--dataset', 'SynthFashion', '--extra', TINY_EXTRA]) == 0
    assert 'already finished' in (workdir / 'runs' / 'reproduce' / 'synthfashion-asen-s1.train.log').read_text()
    assert json.loads((run / 'test_results.json').read_text()) == ours
    assert weights == {name: file_hash(run / name) for name in weights}


@pytest.mark.slow                   # real asen.py processes
def test_a_failing_row_is_one_error_line_naming_row_and_log(workdir, capsys):
    """A failure only the run meets (the flags pass the up-front check): --data-path is a file."""
    (workdir / 'notafolder').touch()
    assert reproduce.main(['darn', '--dataset', 'SynthFashion', '--data-path', 'notafolder']) == 1
    err = capsys.readouterr().err
    log = os.path.join('runs', 'reproduce', 'synthfashion-triplet-s1.train.log')
    assert err.count('\n') == 1 and err.startswith('error: table darn, row Triplet (seed 1')
    assert f'see {log}' in err and '--data_path notafolder is a file' in err      # asen.py's own error line
    assert (workdir / log).read_text().startswith(sys.executable)      # the log starts with its command


def test_bad_flags_are_one_line(workdir, capsys):
    with pytest.raises(SystemExit) as exc:
        reproduce.main(['--seeds', 'x'])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: argument --seeds')
    assert reproduce.main(['nonsense', '--dry-run']) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "no table 'nonsense'" in err
    assert reproduce.main(['darn', '--dry-run', '--extra', '"unclosed']) == 2
    assert capsys.readouterr().err.count('\n') == 1
    assert reproduce.main(['darn', '--cost', '--rates', 'nowhere']) == 1
    assert 'nowhere' in capsys.readouterr().err


@pytest.mark.parametrize('flags, needles', [
    (['--seeds', '1', '-1'], ['error: --seeds -1: must be a whole number from 0']),
    (['--extra', '--batch-size 0'], ['train command of table darn, row Triplet (seed 1)',
                                     '--batch-size/--batch_size: 0: must be a whole number from 1', '(check --extra)']),
    (['--extra=--no-such-flag'], ['train command', 'unrecognized arguments: --no-such-flag', '(check --extra)']),
    (['--test-extra', '--topk 0'], ['test command', '--topk: 0: must be', '(check --test-extra)']),
], ids=['seeds', 'extra-range', 'extra-unknown', 'test-extra'])
def test_flags_asen_would_refuse_are_refused_before_anything_runs(workdir, capsys, flags, needles):
    """A dry run prints no command asen.py would refuse; a real run starts none: one line."""
    for mode in (['--dry-run'], []):
        assert reproduce.main(['darn'] + mode + flags) == 1
        out, err = capsys.readouterr()
        assert err.count('\n') == 1 and all(n in err for n in needles), err
        assert commands(out) == [] and not (workdir / 'runs').exists()


def fake_fashionai(root, queries=10, candidates=30, train=100):
    folder = root / 'D' / 'FashionAI'
    folder.mkdir(parents=True)
    for split in ('valid', 'test'):
        (folder / f'query_{split}.txt').write_text('0 0 0\n' * queries)
        (folder / f'candidate_{split}.txt').write_text('0 0 0\n' * candidates)
        (folder / f'filenames_{split}.txt').write_text('a.jpg\n' * (queries + candidates))
    (folder / 'filenames_train.txt').write_text('a.jpg\n' * train)


def test_cost_derives_from_the_rate_file_it_names(workdir, capsys):
    fake_fashionai(workdir)
    rates = workdir / 'gpu_out'
    rates.mkdir()
    (rates / 'project_recipe.json').write_text(json.dumps({
        'benchmark': 'project_recipe', 'device': 'cuda', 'results': [
            {'name': 'default', 'train_rate': 1000.0, 'embed_rate': 40.0, 'rank_s': 1.0, 'snapshot_s': 0.5},
            {'name': 'fast', 'train_rate': 9999.0, 'embed_rate': 9999.0, 'rank_s': 1.0, 'snapshot_s': 0.5}]}))
    assert reproduce.main(['fashionai', 'asenpp-fashionai', '--cost', '--rates', str(rates), '--data-path', 'D']) == 0
    out = capsys.readouterr().out
    assert f"rates from {rates / 'project_recipe.json'} (benchmarks/gpu_check.sh, variant default, device cuda)" in out
    # an epoch: 100000 / 1000 + 40 valid embeddings / 40 + rank 1 + snapshot 0.5 = 102.5 s; the test 1 + 1 s
    per_row = (200 * 102.5 + 2) / 3600
    assert f'| fashionai | ASEN | 1 | 200 | {per_row:.1f} |' in out
    assert f'| fashionai | **table** | | | **{4 * per_row:.1f}** |' in out
    assert f'| asenpp-fashionai | ASEN++ stage 1 (global branch) | 1 | 50 | {(50 * 102.5 + 2) / 3600:.1f} |' in out
    assert f'| asenpp-fashionai | ASEN++ | 1 | 20 | {(20 * 102.5 + 2) / 3600:.1f} |' in out
    # the cache: N x 224 x 224 x 3 bytes
    assert f"| FashionAI | train | 100 | {100 * 224 * 224 * 3 / 2 ** 30:.2f} |" in out
    assert 'CPU rates' not in out
    (rates / 'project_recipe.json').write_text((rates / 'project_recipe.json').read_text().replace('cuda', 'cpu'))
    assert reproduce.main(['fashionai', '--cost', '--rates', str(rates), '--data-path', 'D']) == 0
    assert 'these are CPU rates; the hours below are not a GPU projection' in capsys.readouterr().out


def test_cost_from_an_asen_log_and_no_rate_file(workdir, capsys):
    log = workdir / 'epoch.log'
    log.write_text('2026-01-01 10:00:00,000 - asen - INFO - Begin training on FashionAI dataset.\n'
                   '2026-01-01 10:00:01,000 - asen - INFO - Train Epoch: 1 [0/5000]\tLoss: 0.2\n'
                   '2026-01-01 10:00:25,000 - asen - INFO - MeanAP: 40.0\n')
    assert reproduce.main(['darn', '--dry-run', '--rates', str(log)]) == 0
    out = capsys.readouterr().out
    assert f'rates from {log}: 5000 triplets in 25.0 s' in out and 'train 200.0 triplets/s' in out
    assert f'| darn | ASEN | 1 | 200 | {200 * 100000 / 200 / 3600:.1f} |' in out


@pytest.mark.skipif(not os.path.isfile(costs.BASELINE_LOG), reason='../shared/gpu-baseline is absent')
def test_default_rates_are_the_gpu_baseline_marked_as_such(workdir, capsys):
    assert reproduce.main(['fashionai', '--cost']) == 0
    out = capsys.readouterr().out
    assert 'proj_default.log: 6000 triplets in 32.1 s' in out and 'before the GPU rework' in out


def test_every_row_names_a_model_of_asen():
    import model
    models = list(model.MODELS)
    for table in reproduce.TABLES.values():
        for row in table['rows']:
            assert row['flags'][row['flags'].index('--model') + 1] in models


def test_every_figure_has_a_row_and_a_source():
    for name, figures in reproduce.FIGURES.items():
        labels = [r['label'] for r in reproduce.TABLES[name]['rows']] + ['Random']
        for label, (source, values) in figures.items():
            assert label in labels and source and values


@pytest.mark.skipif(not os.path.isdir(costs.REFERENCE_SPLITS), reason='../shared/reference-splits is absent')
def test_deepfashion_columns_are_the_authors_attributes():
    with open(os.path.join(costs.REFERENCE_SPLITS, 'meta.json')) as f:
        meta = json.load(f)
    assert list(reproduce.DEEPFASHION_COLUMNS[:-1]) == meta['DeepFashion']['ATTRIBUTES']


@pytest.mark.slow
def test_every_mapped_recipe_end_to_end_on_tiny_synthfashion(workdir, capsys, in_process):
    names = [n for n in reproduce.TABLES if n != 'zappos']
    assert reproduce.main(names + ['--dataset', 'SynthFashion', '--extra', TINY_EXTRA]) == 0
    for name in names:
        assert (workdir / 'runs' / 'reproduce' / f'{name}.md').exists()
    table = json.loads((workdir / 'runs' / 'reproduce' / 'asenpp-deepfashion.json').read_text())
    rows = {r['row']: r for r in table['rows']}
    assert rows['ASEN++']['paper'] == {'MeanAP': 9.64}
    stage2 = json.loads((workdir / 'runs' / 'synthfashion-asenpp2-s1' / 'test_results.json').read_text())
    assert stage2['model'] == 'ASENpp' and rows['ASEN++']['ours']['MeanAP'] == pytest.approx(stage2['MeanAP'])
    assert 'ASENet_V2' in (workdir / 'runs' / 'reproduce' / 'fashionai.md').read_text()
    # every model's run has its report, and the index links every one of them
    index = (workdir / 'runs' / 'reproduce' / 'index.html').read_text()
    runs = [p for p in (workdir / 'runs').iterdir() if p.name.startswith('synthfashion-')]
    assert len(runs) == 8
    for run in runs:
        assert (run / 'report' / 'index.html').is_file()
        assert f'<a href="../{run.name}/report/index.html">' in index


@pytest.mark.slow
def test_zappos_recipe_end_to_end_on_tiny_zappos(workdir, capsys, in_process):
    build_zappos(workdir)
    extra = '--backbone resnet18 --no-pretrained --img-size 32 --num_triplets 16 --batch-size 8 --dim_embed 16 --epochs 1'
    assert reproduce.main(['zappos', '--extra', extra]) == 0
    table = json.loads((workdir / 'runs' / 'reproduce' / 'zappos.json').read_text())
    assert table['score'] == 'Accuracy' and [r['row'] for r in table['rows']] == ['Triplet', 'CSN', 'ASEN', 'Random']
    text = (workdir / 'runs' / 'reproduce' / 'zappos.md').read_text()
    assert 'compare with the Zappos50k table (triplet accuracy) of Ma et al., AAAI 2020' in text
    assert '| paper |' not in text                                  # no figure read: none shown
    index = (workdir / 'runs' / 'reproduce' / 'index.html').read_text()
    for key in ('triplet', 'csn', 'asen'):
        assert f'<a href="../zappos50k-{key}-s1/report/index.html">' in index


@pytest.mark.parametrize('signalled, rc, status, needle', [
    ('SIGTERM', 75, 75, 'stopped by SIGTERM in table darn, row Triplet (seed 1, run darn-triplet-s1): '
                        'asen.py train exited 75'),
    ('SIGTERM', -signal.SIGTERM, 75, 'asen.py train exited 143'),      # before asen.py handled it
    ('SIGINT', -signal.SIGINT, 75, 'stopped by SIGINT'),
    ('SIGINT', 0, 75, 'asen.py train ended'),                          # it had finished: stop after it
    (None, 75, 75, 'stopped in table darn'),                           # signalled alone, by another
    ('SIGTERM', 2, 1, 'train failed (exit 2'),                         # a failure stays a failure
    (None, 1, 1, 'train failed (exit 1'),
], ids=['75', 'killed-by-SIGTERM', 'killed-by-SIGINT', 'ended', 'child-alone', 'failed', 'failed-1'])
def test_the_exit_status_of_a_stopped_table(workdir, capsys, monkeypatch, signalled, rc, status, needle):
    """reproduce.py's status once its asen.py child ended while a stop signal was noted (the
    signals themselves: test_a_stopped_table_continues_to_the_uninterrupted_one)."""
    started = []

    def run_asen(command, log, signals):
        started.append(command)
        signals.signal_name = signalled
        return rc
    monkeypatch.setattr(reproduce, 'run_asen', run_asen)
    assert reproduce.main(['darn', '--data-path', 'D']) == status
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and needle in err, err
    assert len(started) == 1                                  # nothing more was started
    trained = workdir / 'runs' / 'reproduce' / 'darn-triplet-s1.trained'
    assert trained.exists() == (rc == 0)
    if status == 75:
        assert 'rerun the same command to continue (exit status 75: requeue)' in err


# ----------------------------------------------------------------------------- passing a stop signal on (in this process)

class FakeChild:
    """A stand-in for the asen.py Popen: running until `ended`, the signals it was sent."""

    def __init__(self, ended=False):
        self.pid, self.ended, self.sent = 4242, ended, []

    def poll(self):
        return 0 if self.ended else None

    def send_signal(self, number):
        self.sent.append(number)


def test_stop_signals_are_noted_and_passed_on_once_to_the_running_child(monkeypatch, tmp_path):
    """Inside PassOnSignals each stop signal goes to its handler, the first one's name is kept, each is
    passed on to the running child (a signal that came before the child started, when it starts),
    none to a child that has ended; outside, the earlier handlers are back."""
    monkeypatch.setattr(sys, 'stdout', open(tmp_path / 'out', 'w'))
    before = {name: signal.getsignal(getattr(signal, name)) for name in reproduce.STOP_SIGNALS}
    with reproduce.PassOnSignals() as signals:
        for name in reproduce.STOP_SIGNALS:
            assert signal.getsignal(getattr(signal, name)) == signals._handle
        os.kill(os.getpid(), signal.SIGUSR1)                      # before the child started: noted
        assert signals.signal_name == 'SIGUSR1'
        child = FakeChild()
        signals.started(child)
        assert child.sent == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGTERM)                      # a second one: passed on, the first named
        assert signals.signal_name == 'SIGUSR1' and child.sent == [signal.SIGUSR1, signal.SIGTERM]
        child.ended = True
        os.kill(os.getpid(), signal.SIGINT)                       # the child has ended: nothing to pass on
        assert child.sent == [signal.SIGUSR1, signal.SIGTERM]
        signals.child = None
        os.kill(os.getpid(), signal.SIGINT)                       # no child: noted only
    assert {name: signal.getsignal(getattr(signal, name)) for name in reproduce.STOP_SIGNALS} == before
    sys.stdout.close()
    said = (tmp_path / 'out').read_text().splitlines()
    assert len(said) == 2 and said[0].endswith('SIGUSR1 passed on to asen.py (pid 4242); waiting for it to save '
                                               'its snapshot') and 'SIGTERM passed on' in said[1]


def test_a_child_started_with_no_signal_noted_is_sent_none():
    signals, child = reproduce.PassOnSignals(), FakeChild()
    signals.started(child)
    assert signals.child is child and child.sent == []


def test_say_writes_one_line_to_stdout_and_lets_a_closed_stdout_be(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, 'stdout', open(tmp_path / 'out', 'w'))
    reproduce.say('a line')
    sys.stdout.close()
    assert (tmp_path / 'out').read_text() == 'a line\n'
    reproduce.say('to a closed stdout')                     # ValueError: let be


@pytest.mark.slow                                           # a real process: its stdout is the subject
def test_a_reader_gone_mid_table_ends_the_command_quietly_with_status_0(tmp_path):
    """`reproduce.py --dry-run | head -1`: the reader closes the pipe; the next write fails inside
    main, which stops there with status 0 and no traceback (as `head` users expect), not 1."""
    read_end, write_end = os.pipe()
    os.close(read_end)                                      # the reader is gone before the first line
    try:
        done = subprocess.run([sys.executable, reproduce.__file__, '--dry-run'], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=120,
                              env={**os.environ, 'PYTHONUNBUFFERED': '1'})    # the first print writes
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, '')


def test_the_child_has_its_own_process_group_and_dies_with_reproduce(tmp_path):
    """child_setup in a real child: its own process group, SIGTERM as its parent-death signal
    (prctl PR_GET_PDEATHSIG), and it runs (the parent it was given is its parent)."""
    probe = ("import ctypes, os; sig = ctypes.c_int(-1); ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0); "
             "print(os.getpgid(0) == os.getpid(), os.getpgid(0) != {parent_group}, sig.value)")
    if not sys.platform.startswith('linux'):
        pytest.skip('prctl is Linux only')
    done = subprocess.run([sys.executable, '-c', probe.format(parent_group=os.getpgid(0))], capture_output=True,
                          text=True, preexec_fn=reproduce.child_setup(os.getpid()), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['True', 'True', str(int(signal.SIGTERM))]


def test_run_asen_runs_the_command_into_the_log_and_returns_its_status(tmp_path):
    signals = reproduce.PassOnSignals()
    started = []
    signals.started = lambda child: started.append(child.pid)
    with open(tmp_path / 'log', 'w') as log:
        rc = reproduce.run_asen([sys.executable, '-c', 'import sys; print("out"); print("err", file=sys.stderr); '
                                                       'sys.exit(3)'], log, signals)
    assert rc == 3 and len(started) == 1 and signals.child is None
    assert sorted((tmp_path / 'log').read_text().split()) == ['err', 'out']


@pytest.mark.parametrize('rc, shown', [(0, 0), (2, 2), (75, 75), (-signal.SIGTERM, 143), (-signal.SIGKILL, 137)])
def test_exit_status_as_a_shell_reports_it(rc, shown):
    assert reproduce.exit_status(rc) == shown


@pytest.mark.parametrize('rc, stopped', [(75, True), (130, True), (-signal.SIGINT, True), (-signal.SIGTERM, True),
                                         (-signal.SIGUSR1, True), (0, False), (1, False), (2, False), (131, False),
                                         (-signal.SIGKILL, False), (signal.SIGTERM, False)])
def test_stopped_for_the_signal(rc, stopped):
    assert reproduce.stopped_for_the_signal(rc) == stopped


# ----------------------------------------------------------------------------- a table run and collected (in this process)

DEEPFASHION_ATTRS = list(reproduce.DEEPFASHION_COLUMNS[:-1])


def stand_in_asen(workdir, started):
    """reproduce.run_asen's stand-in: notes each command and the handler SIGTERM has while it runs;
    a test command writes its run's result (the maps 10..50 plus the row's place), as --test would."""
    maps = {'triplet': 0, 'csn': 1, 'asen': 2, 'noasa': 3, 'noaca': 4}

    def run_asen(command, log, signals):
        started.append((command[2:], signal.getsignal(signal.SIGTERM), signals))
        log.write('asen.py ran\n')
        argv = command[2:]
        if '--test' in argv:
            run = argv[argv.index('--resume') + 1].split('/')[1]
            dataset, key, _ = run.split('-')
            attributes = DEEPFASHION_ATTRS if dataset == 'deepfashion' else SYNTH_ATTRS
            fake_result(workdir, run, key, [v + maps[key] for v in (10, 20, 30, 40, 50)],
                        dataset={'deepfashion': 'DeepFashion', 'darn': 'DARN'}[dataset], attributes=attributes)
        return 0
    return run_asen


def test_a_table_is_run_and_collected_beside_the_papers_figures(workdir, capsys, monkeypatch):
    """Every row trained (a .trained mark, a log starting with its command) then tested, with the stop
    signals passed on while asen.py runs; each table collected from its own runs, the paper's figures
    and the differences beside ours where a source was read, 'no figure' where none."""
    started = []
    monkeypatch.setattr(reproduce, 'run_asen', stand_in_asen(workdir, started))
    before = signal.getsignal(signal.SIGTERM)
    assert reproduce.main(['deepfashion', 'darn', '--data-path', 'D']) == 0
    out = capsys.readouterr().out
    assert [argv[argv.index('--name') + 1] if '--name' in argv else 'test' for argv, _, _ in started] == \
        ['deepfashion-triplet-s1', 'test', 'deepfashion-csn-s1', 'test', 'deepfashion-asen-s1', 'test',
         'darn-triplet-s1', 'test', 'darn-csn-s1', 'test', 'darn-asen-s1', 'test']
    for _, handler, signals in started:
        assert isinstance(signals, reproduce.PassOnSignals) and handler == signals._handle
    assert signal.getsignal(signal.SIGTERM) == before
    logs = workdir / 'runs' / 'reproduce'
    for run in ('deepfashion-triplet-s1', 'darn-asen-s1'):
        assert (logs / f'{run}.trained').is_file()
        assert (logs / f'{run}.train.log').read_text().splitlines() == [
            reproduce.shlex.join(reproduce.asen_command(started[0][0] if run.startswith('deepfashion') else
                                                        started[-2][0])), 'asen.py ran']
        assert f'{run}: train (log {os.path.join("runs", "reproduce", run + ".train.log")})' in out
    text = (logs / 'deepfashion.md').read_text()
    assert text.endswith('\n') and text[:-1] + '\n\n' in out
    lines = text.splitlines()
    assert lines[:4] == ['## deepfashion: DeepFashion', '',
                         '| row | figures | runs | ' + ' | '.join(DEEPFASHION_ATTRS) + ' | MeanAP |',
                         '|' + ' --- |' * 9]
    assert lines[4:7] == ['| Triplet | ours | 1 | 10.00 | 20.00 | 30.00 | 40.00 | 50.00 | 30.00 |',
                          '| Triplet | paper | | 13.26 | 6.28 | 9.49 | 4.43 | 3.33 | 7.36 |',
                          '| Triplet | ours - paper | | -3.26 | +13.72 | +20.51 | +35.57 | +46.67 | +22.64 |']
    assert lines[10] == '| ASEN | ours | 1 | 12.00 | 22.00 | 32.00 | 42.00 | 52.00 | 32.00 |'
    assert lines[13:] == ['| Random | ours | 3 |  |  |  |  |  | 20.00 ± 0.00 |',
                          '| Random | paper | | 6.69 | 2.69 | 3.23 | 2.55 | 1.97 | 3.38 |',
                          '| Random | ours - paper | |  |  |  |  |  | +16.62 |', '',
                          f'Paper figures of Triplet, CSN, ASEN, Random: {reproduce.CRL}.']
    data = json.loads((logs / 'deepfashion.json').read_text())
    assert [r['row'] for r in data['rows']] == ['Triplet', 'CSN', 'ASEN', 'Random']
    assert data['rows'][1]['ours']['MeanAP'] == 31.0 and data['rows'][1]['difference']['MeanAP'] == \
        pytest.approx(31.0 - 8.01) and data['rows'][1]['paper'] == dict(zip(reproduce.DEEPFASHION_COLUMNS,
                                                                            (14.09, 6.39, 11.07, 5.13, 3.49, 8.01)))
    assert data['dataset'] == data['paper_dataset'] == 'DeepFashion' and data['sources'] == [
        os.path.join('runs', f'deepfashion-{key}-s1', 'test_results.json') for key in ('triplet', 'csn', 'asen')]
    darn = (logs / 'darn.md').read_text().splitlines()
    assert darn[0] == '## darn: DARN' and len(darn) == 10 and '| paper |' not in '\n'.join(darn)
    assert darn[-1] == f'No figure read for Triplet, CSN, ASEN, Random: compare with {reproduce.TABLES["darn"]["compare"]}.'
    assert (logs / 'index.html').is_file()
    # the same command again: every row has its result, nothing runs, the tables are the same
    started.clear()
    assert reproduce.main(['deepfashion', 'darn', '--data-path', 'D']) == 0
    assert started == [] and (logs / 'deepfashion.md').read_text() == text


def test_a_run_shared_by_two_tables_is_run_once_and_the_rows_after_it_still_run(workdir, capsys):
    assert reproduce.main(['ablation-fashionai', 'fashionai', '--dry-run']) == 0
    names = [line.split('--name ')[1].split()[0] for line in commands(capsys.readouterr().out) if '--name' in line]
    assert names == ['fashionai-noasa-s1', 'fashionai-noaca-s1', 'fashionai-asen-s1', 'fashionai-triplet-s1',
                     'fashionai-csn-s1', 'fashionai-asenv2-s1']


def test_cost_sums_every_table_and_sizes_the_cache_in_gib(workdir, capsys):
    """Each table's hours and their sum in hours and days; the cache N x S x S x 3 bytes in GiB."""
    fake_fashionai(workdir, train=100000)
    log = workdir / 'epoch.log'
    log.write_text('2026-01-01 10:00:00,000 - asen - INFO - Begin training on FashionAI dataset.\n'
                   '2026-01-01 10:00:01,000 - asen - INFO - Train Epoch: 1 [0/5000]\tLoss: 0.2\n'
                   '2026-01-01 10:00:25,000 - asen - INFO - MeanAP: 40.0\n')
    assert reproduce.main(['darn', 'deepfashion', '--cost', '--rates', str(log), '--data-path', 'D']) == 0
    out = capsys.readouterr().out
    row = 200 * 100000 / 200 / 3600                     # 200 epochs of 100000 triplets at 200 a second
    assert f'| darn | **table** | | | **{3 * row:.1f}** |' in out
    assert f'| **all** | | | | **{6 * row:.1f}** ({6 * row / 24:.1f} days) |' in out
    assert reproduce.main(['fashionai', '--cost', '--rates', str(log), '--data-path', 'D']) == 0
    assert f"| FashionAI | train | 100000 | {100000 * 224 * 224 * 3 / 2 ** 30:.2f} |" in capsys.readouterr().out


def test_help_and_an_interrupt(monkeypatch, capsys):
    assert reproduce.get_parser().description == reproduce.__doc__.splitlines()[0]

    def interrupted(names, opts):
        raise KeyboardInterrupt
    monkeypatch.setattr(reproduce, 'plan', interrupted)
    assert reproduce.main(['darn', '--dry-run']) == 130
    assert capsys.readouterr().err.startswith('error: interrupted (Ctrl-C)')


def test_cost_without_rates_lists_every_row_with_no_time(workdir, capsys, monkeypatch):
    monkeypatch.setattr(costs, 'read_rates', lambda path: None)
    assert reproduce.main(['darn', '--cost']) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith('| darn |')] == [
        '| darn | Triplet | 1 | | no rate |', '| darn | CSN | 1 | | no rate |', '| darn | ASEN | 1 | | no rate |']
    assert 'no time projected' in out and '**all**' not in out
