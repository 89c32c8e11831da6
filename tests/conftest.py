import os
import sys

# Under pytest-xdist (pytest.ini) each worker is a process of its own: each gets an equal share of
# the cores for torch's threads, set before torch is imported so that the processes the tests
# start inherit it too; workers that each used every core would oversubscribe them.
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
if 'PYTEST_XDIST_WORKER_COUNT' in os.environ and 'OMP_NUM_THREADS' not in os.environ:
    os.environ['OMP_NUM_THREADS'] = str(max(1, CPUS // int(os.environ['PYTEST_XDIST_WORKER_COUNT'])))

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from helpers import TINY, World, build_zappos, private_copy, tree_hashes  # noqa: E402,F401  (TINY: re-exported)


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A fresh working directory (runs/ and data/ land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """The data folder of TINY (data/SynthFashion, as `asen.py TINY` generates it), made once a
    session. Read-only: a test that writes into it takes `helpers.private_copy` of it first."""
    import synthfashion
    from lib import config, inputs
    data = tmp_path_factory.mktemp('tiny_data') / 'data'
    inputs.prepare_dataset(config.from_flags(TINY + ['--data_path', str(data)]))
    assert (data / 'SynthFashion' / synthfashion.MARKER).is_file()
    return data


@pytest.fixture(scope='session')
def small_synth(tmp_path_factory):
    """A smaller SynthFashion folder (16 train, 12 valid, 12 test images) made once a session, for
    the input-pipeline tests. Read-only: copy it (helpers.private_copy) before writing."""
    import synthfashion
    folder = tmp_path_factory.mktemp('small_synth') / 'SynthFashion'
    synthfashion.ensure(str(folder), n_train=16, n_valid=12, n_test=12)
    return folder


@pytest.fixture(scope='session')
def _trained_once(tmp_path_factory, tiny_data):
    import asen
    root = tmp_path_factory.mktemp('trained')
    private_copy(tiny_data, root / 'data')
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert asen.main(TINY + ['--epochs', '1', '--name', 'shared', '--heatmap-every', '1']) == 0
    finally:
        os.chdir(cwd)
    return root, root / 'runs' / 'shared', tree_hashes(root)


@pytest.fixture()
def trained_run(_trained_once):
    """(working dir, run dir) of a tiny run trained for one epoch, shared by read-only tests: a test
    that adds, removes or changes a file under it fails here (take `trained_copy` to write)."""
    root, run, expected = _trained_once
    yield root, run
    found = tree_hashes(root)
    changed = sorted(rel for rel in set(expected) | set(found) if expected.get(rel) != found.get(rel))
    assert not changed, f'this test changed the shared trained run (read-only; use trained_copy): {changed}'


@pytest.fixture()
def trained_copy(trained_run, tmp_path, monkeypatch):
    """(working dir, run dir): a private copy of the trained run (data/ and runs/shared/; large files
    hard-linked, so replace them rather than write into them), the working directory."""
    root, _ = trained_run
    private_copy(root / 'data', tmp_path / 'data')
    private_copy(root / 'runs' / 'shared', tmp_path / 'runs' / 'shared')
    monkeypatch.chdir(tmp_path)
    return tmp_path, tmp_path / 'runs' / 'shared'


@pytest.fixture()
def world(trained_copy, monkeypatch):
    """A bad-input case's world (helpers.World): a private copy of the tiny data and trained run,
    the working directory; the files a case holds open are closed after it."""
    w = World(trained_copy[0], monkeypatch)
    yield w
    for handle in w.handles:
        handle.close()


@pytest.fixture()
def zappos_dir(workdir):
    """A tiny Zappos50k folder (helpers.build_zappos) under the working directory."""
    return build_zappos(workdir)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: a long end-to-end test (deselect with -m "not slow")')


MAX_WORKERS = 4          # more: each worker makes the session's data and trained run again


@pytest.hookimpl(optionalhook=True)             # a hook of pytest-xdist: none without it
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker a core, at most MAX_WORKERS."""
    return min(CPUS, MAX_WORKERS)


# The files that take longest (real processes, the bad-input tables), run first so that the
# workers end together rather than one waiting on a long file started last.
LONGEST_FIRST = ['test_preemption.py', 'test_reproduce_signals.py', 'test_distributed.py', 'test_loader_workers.py',
                 'test_bad_input_data.py', 'test_bad_input.py', 'test_reproduce.py', 'test_robustness.py',
                 'test_report.py', 'test_run_rule.py', 'test_test_folders.py', 'test_datacheck.py']


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)                          # stable: the order within a file is kept


@pytest.fixture(scope='session')
def _reported_once(tmp_path_factory, _trained_once):
    """A private copy of the shared trained run with its report (asen.py --report), made once a
    session: the browser test and the tests of the report's numbers read it."""
    import asen
    source, _, _ = _trained_once
    root = tmp_path_factory.mktemp('reported')
    private_copy(source / 'data', root / 'data')
    private_copy(source / 'runs' / 'shared', root / 'runs' / 'shared')
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert asen.main(['--report', '--resume', 'runs/shared/model_best.pth.tar', '--no-cuda']) == 0
    finally:
        os.chdir(cwd)
    return root, root / 'runs' / 'shared'


@pytest.fixture()
def reported_run(_reported_once):
    """(working dir, run dir) of the tiny trained run with its report/ written; read-only."""
    return _reported_once
