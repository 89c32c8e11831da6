import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A tiny SynthFashion run: small images, few triplets, 16-d embeddings.
TINY = ['--dataset', 'SynthFashion', '--synth-images', '48', '--img-size', '64', '--num_triplets', '24',
        '--batch-size', '8', '--dim_embed', '16', '--log-interval', '1', '--seed', '3']


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A fresh working directory (runs/ and data/ land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
    """(working dir, run dir) of a tiny run trained for one epoch, shared by read-only tests."""
    import asen
    root = tmp_path_factory.mktemp('trained')
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert asen.main(TINY + ['--epochs', '1', '--name', 'shared', '--heatmap-every', '1']) == 0
    finally:
        os.chdir(cwd)
    return root, root / 'runs' / 'shared'


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: a long end-to-end test (deselect with -m "not slow")')
