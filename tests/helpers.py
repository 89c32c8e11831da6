"""What several test files share: loading a snapshot, running asen.py (as a real process or in this
one), the one-line error check, the faithful flags, tiny networks and in-memory loaders, and
private copies of shared folders. Fixtures live in conftest.py; plain functions here."""
import hashlib
import os
import stat
import shutil
import subprocess
import sys
import time

import torch

import model as models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's arithmetic: no mixed precision, NCHW, one forward per triplet branch.
FAITHFUL = ['--amp', 'off', '--no-channels-last', '--no-concat-forward']

LINK_ABOVE = 1 << 20       # files larger than this are hard-linked into a private copy, the rest copied


def load(path):
    """A snapshot as asen.py loads it: on the CPU, weights only."""
    return torch.load(path, map_location='cpu', weights_only=True)


# ----------------------------------------------------------------------------- running asen.py

def cli(args, cwd, **kwargs):
    """asen.py as a real process (for what only a process boundary shows: stderr, exit, signals)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'asen.py')] + args, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run_cli(args, cwd):
    proc = cli(args, cwd)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def run_main(argv, capsys, main=None):
    """asen.main(argv) (or another command's main) in this process: (exit code, stdout, stderr);
    argparse's SystemExit counts as the exit code."""
    if main is None:
        import asen
        main = asen.main
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code not in (0, None)
    assert 'Traceback' not in err
    assert err.strip().count('\n') == 0, err
    for needle in needles:
        assert needle in err, (needle, err)


def torchrun(args, cwd, ok=True, timeout=300):
    """`python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS` with one thread a
    process; `ok`: it must succeed."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_run(straight, resumed):
    """The run folder `resumed` (interrupted, then continued) ends as `straight`, run without a
    stop, ended: same final weights, model_best and metrics.jsonl, bit for bit, and no step
    snapshot left (it is stale once the last epoch is saved)."""
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar'):
        want, got = load(straight / name), load(resumed / name)
        assert want['epoch'] == got['epoch'] and want['best_prec'] == got['best_prec']
        for key, value in want['state_dict'].items():
            assert torch.equal(value, got['state_dict'][key]), (name, key)
    assert (straight / 'metrics.jsonl').read_text() == (resumed / 'metrics.jsonl').read_text()
    assert not (resumed / 'step.pth.tar').exists()


# ----------------------------------------------------------------------------- private copies

def link_or_copy(src, dst):
    if os.path.getsize(src) > LINK_ABOVE:
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def private_copy(src, dst):
    """A copy of a shared folder a test may change: large files hard-linked (replace them, never
    write into them), small ones copied."""
    shutil.copytree(src, dst, copy_function=link_or_copy)
    return dst


# ----------------------------------------------------------------------------- tiny networks, loaders

class StandInNet(models.EmbeddingNetwork):
    """A test double of an embedding network (a subclass gives `forward`): no spatial attention,
    uniform maps over the input's grid."""
    has_spatial_attention = False

    def __init__(self, n_attributes=5):
        super().__init__(n_attributes)

    def attention_maps(self, images, attribute):
        n, _, h, w = images.shape
        return images.new_full((n, h, w), 1.0 / (h * w))


def tiny_net(kind='ASENet', n_attributes=5, dim_embed=16, seed=0, **options):
    """A resnet18 network without pretrained weights, seeded (seed=None: not seeded)."""
    import model as models
    if seed is not None:
        torch.manual_seed(seed)
    return models.build_model(kind, n_attributes, 'resnet18', pretrained=False, dim_embed=dim_embed, **options)


def tiny_tnet(kind='ASENet', concat_forward=False, seed=0, **options):
    """tiny_net in a TripletWrapper, seeded."""
    import model as models
    return models.TripletWrapper(tiny_net(kind, seed=seed, **options), concat_forward=concat_forward)


def tiny_asenpp(stage=2, **options):
    return tiny_net('ASENpp', stage=stage, local_backbone='resnet18', local_pretrained=False, view_size=32,
                    local_size=32, **options)


def random_batches(sizes=(4, 4, 4, 2), size=64, device=None):
    """Random (anchor, positive, negative, attribute) batches; seeded, one per size."""
    gen = torch.Generator().manual_seed(1)
    made = [(*[torch.randn(n, 3, size, size, generator=gen) for _ in range(3)],
             torch.randint(0, 5, (n,), generator=gen)) for n in sizes]
    return [tuple(t.to(device) for t in batch) for batch in made] if device is not None else made


class InMemoryLoader:
    """A list of batches that looks like a DataLoader to train_one_epoch."""

    def __init__(self, batches):
        self.batches = batches
        self.dataset = range(sum(len(b[3]) for b in batches))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def device_batches(sizes, size=64, device='cuda'):
    """random_batches already on the device, as an InMemoryLoader."""
    return InMemoryLoader(random_batches(sizes, size, device))


# ----------------------------------------------------------------------------- file hashes

_HASHES = {}
SETTLED_S = 2.0       # a file last written this long ago: a write now would give it a later mtime


def file_hash(path):
    """Content hash, memoised by inode, size and modification time, so that the hard-linked
    checkpoints of every private copy are hashed once (not by change time: each new hard link
    changes it). Any write sets a new mtime, but only to the coarse clock's tick, so a file written
    within the last SETTLED_S seconds is hashed every time and never memoised."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    digest = hashlib.blake2b()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    value = digest.hexdigest()
    if time.time() - st.st_mtime > SETTLED_S:
        _HASHES[key] = value
    return value


def tree_hashes(root, logs=False):
    """{relative path: what it is} of everything under root, links not followed: 'link:<target>',
    'folder', 'fifo' (a named pipe is never opened: that would block), with `logs` a log's bytes (a
    log may grow, never change: compare with startswith), else the file's content hash."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                found[rel] = 'link:' + os.readlink(path)
            elif name in dirs:
                found[rel] = 'folder'
            elif stat.S_ISFIFO(os.stat(path).st_mode):
                found[rel] = 'fifo'
            elif logs and name.endswith('.log'):
                with open(path, 'rb') as f:
                    found[rel] = f.read()
            else:
                found[rel] = file_hash(path)
    return found
