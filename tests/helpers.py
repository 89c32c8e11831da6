"""What several test files share: loading a snapshot, running asen.py (as a real process or in this
one), the one-line error check, the faithful flags, tiny networks and in-memory loaders, private
copies of shared folders, the bad-input tables' world and checks, the input-pipeline passes, a tiny
Zappos50k folder and reproduce.py's fake results. Fixtures live in conftest.py; plain functions and
constants here (no test module imports another)."""
import errno
import hashlib
import json
import os
import stat
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import model as models
import utils
from lib import engine, gpuinput, imagecache, zappos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny SynthFashion run: small images, few triplets, 16-d embeddings.
TINY = ['--dataset', 'SynthFashion', '--synth-images', '48', '--img-size', '64', '--num_triplets', '24',
        '--batch-size', '8', '--dim_embed', '16', '--log-interval', '1', '--seed', '3']

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

def meter_rows(count=0, acc_sum=0.0, acc_last=0.0):
    """One process's meter row of a step snapshot, (1, width) float64: the triplets counted and
    the accuracies given, every other field 0."""
    meters = torch.zeros(1, engine.meter_width(), dtype=torch.float64)
    for field, value in (('count', count), ('acc_sum', acc_sum), ('acc_last', acc_last)):
        meters[0, engine.METER_FIELDS.index(field)] = value
    return meters


def step_position(epoch, batch, meters=None, **entries):
    """A step snapshot's 'step' entry: `batch` steps of `epoch` done by one process with one loader
    stream (`meters` its meter rows, zeros unless given), then `entries` over it."""
    return {'epoch': epoch, 'batch': batch, 'meters': meter_rows() if meters is None else meters,
            'streams': 1, 'world': 1, **entries}


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


# ----------------------------------------------------------------------------- the bad-input world

NEW = TINY + ['--epochs', '1', '--no-cuda', '--name', 'new']     # a new run on the tiny data
SHARED = 'runs/shared/checkpoint.pth.tar'
BEST = 'runs/shared/model_best.pth.tar'
TEST = ['--test', '--resume', BEST, '--no-cuda']
RETRIEVE = ['--resume', BEST, '--no-cuda', '--retrieve', 'data/SynthFashion/images/test/000000.jpg',
            '--attribute', 'colour']
SYNTH = 'data/SynthFashion'


class World:
    """A working directory with data/ and runs/shared/ of the tiny trained run; `replace` and
    `edit_line` break the hard link before writing, so the shared files are never changed."""

    def __init__(self, root, monkeypatch):
        self.root, self.mp, self.handles = root, monkeypatch, []

    def path(self, rel):
        return self.root / rel

    def replace(self, rel, content):
        path = self.path(rel)
        if path.exists():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    def lines(self, rel):
        return self.path(rel).read_text().splitlines()

    def edit_line(self, rel, number, text):
        lines = self.lines(rel)
        lines[number - 1] = text
        self.replace(rel, '\n'.join(lines) + '\n')

    def image(self, split, index):
        return f"{SYNTH}/{self.lines(f'{SYNTH}/filenames_{split}.txt')[index]}"


def temporary_files(root):
    return [os.path.join(folder, name) for folder, dirs, files in os.walk(root) for name in files + dirs
            if '.tmp' in name]


def assert_kept(before, after, allow=()):
    for rel, digest in before.items():
        if os.path.basename(rel) in allow:
            continue
        if rel.endswith('.log'):
            assert rel in after and after[rel].startswith(digest), f'{rel} was rewritten or removed'
            continue
        assert after.get(rel) == digest, f'{rel} was changed or removed'


def check_case(world, capsys, command, argv, setup, needles, code, allow=(), absent=()):
    """One case of a bad-input table: `command(argv)` in the world `setup` made gives exit `code`,
    one `error:` line holding the `needles` (and none of `absent`), every file there before
    unchanged (logs may grow; files named in `allow` may change) and no temporary file."""
    setup(world)
    before = tree_hashes(world.root, logs=True)
    try:
        result = command(argv)
    except SystemExit as exit_:             # argparse errors exit from parse_args
        result = exit_.code
    err = capsys.readouterr().err
    assert result == code, err
    assert_one_line_error(result, err, *needles)
    assert err.startswith('error: ')
    assert not [word for word in absent if word in err], err
    assert_kept(before, tree_hashes(world.root, logs=True), allow)
    assert not temporary_files(world.root)


def no_training(w):
    """The epoch's steps are skipped (cases about what happens around them stay fast)."""
    w.mp.setattr(engine, 'train_one_epoch', lambda *args, **kwargs: {'train_loss': 0.5, 'train_acc': 0.5})


def disk_full_on(target, error):
    """torch.save (the checkpoint) or the copy to model_best (where hard links fail) fails as a full
    disk does."""
    def setup(w):
        def fail(*args, **kwargs):
            raise error
        no_training(w)
        if target == 'save':
            w.mp.setattr(torch, 'save', fail)
        else:                       # a file system without hard links, so model_best is a copy
            w.mp.setattr(os, 'link', lambda *args: (_ for _ in ()).throw(OSError(errno.EPERM, 'no links')))
            w.mp.setattr(utils.shutil, 'copyfileobj', fail)
    return setup


def read_only_run_dir(root):
    """root/runs/new is a folder nobody may write in, root included: sysfs refuses new files."""
    target = '/sys/kernel'
    if not os.path.isdir(target) or os.access(target, os.W_OK) and _can_create(target):
        pytest.skip('no folder that refuses writes even to root here')
    os.symlink(target, os.path.join(root, 'runs', 'new'))


def _can_create(folder):
    try:
        with open(os.path.join(folder, '.asen-probe'), 'w'):
            pass
    except OSError:
        return False
    os.remove(os.path.join(folder, '.asen-probe'))
    return True


# ----------------------------------------------------------------------------- input-pipeline passes

LOADER_SIZE, LOADER_BATCH = 32, 4        # image side and batch of the input-pipeline comparisons


def tiny_split(root, small_synth):
    """A copy of the session's small SynthFashion folder (conftest `small_synth`) under `root`."""
    private_copy(small_synth, root / 'SynthFashion')
    return datasets.SplitFiles(str(root), 'SynthFashion')


def with_cache(dataset, split_files, split):
    dataset.attach_cache(imagecache.ensure(split_files, split, dataset.image_ids, LOADER_SIZE, log=lambda *_: None))
    return dataset


def triplet_set(split_files, cached, num_triplets=10):
    ds = datasets.TripletDataset(split_files, num_triplets, datasets.build_transform(LOADER_SIZE, train=True), seed=1)
    return with_cache(ds, split_files, 'train') if cached else ds


def reference_passes(dataset, workers, epochs=(None,), seed=5):
    """The transform path: a fresh-worker DataLoader over the items; (batches per pass, RNG state after)."""
    torch.manual_seed(seed)
    return passes_of(torch.utils.data.DataLoader(dataset, batch_size=LOADER_BATCH, num_workers=workers), dataset,
                     epochs)


def device_passes(dataset, workers, epochs=(None,), seed=5, persistent=True, channels_last=False):
    torch.manual_seed(seed)
    return passes_of(gpuinput.DeviceLoader(dataset, LOADER_BATCH, 'cpu', workers, channels_last, persistent=persistent),
                     dataset, epochs)


def passes_of(loader, dataset, epochs):
    """(batches of each epoch's pass, torch RNG state after them); epoch None keeps the triplets."""
    passes = []
    for epoch in epochs:
        if epoch is not None:
            dataset.set_epoch(epoch)
        passes.append(list(loader))
    return passes, torch.get_rng_state()


def assert_same_passes(got, want):
    assert len(got) == len(want)
    for got_pass, want_pass in zip(got, want):
        assert len(got_pass) == len(want_pass) > 0
        for got_batch, want_batch in zip(got_pass, want_pass):
            assert len(got_batch) == len(want_batch)
            for g, w in zip(got_batch, want_batch):
                assert g.dtype == w.dtype and torch.equal(g, w)


# ----------------------------------------------------------------------------- a tiny Zappos50k

ZAPPOS_IMAGES = 12
TINY_ZAPPOS = ['--dataset', 'Zappos50k', '--backbone', 'resnet18', '--no-pretrained', '--img-size', '32',
               '--num_triplets', '16', '--batch-size', '8', '--dim_embed', '16', '--log-interval', '1',
               '--epochs', '1', '--name', 'zap']


def build_zappos(root, lines_per_list=6, seed=0):
    """A tiny Zappos50k folder in CSN's layout: random JPEGs, filenames.json, 12 triplet lists."""
    rng = np.random.default_rng(seed)
    folder = root / 'data' / 'Zappos50k'
    paths = [f'Shoes/Brand {i % 3}/{i}.{i}.jpg' for i in range(ZAPPOS_IMAGES)]     # spaces and dots, as UT-Zap50K
    for path in paths:
        target = folder / 'ut-zap50k-images' / path
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(target)
    (folder / 'filenames.json').write_text('\n'.join(paths) + '\n')
    (folder / 'tripletlists').mkdir()
    for cond in zappos.CONDITIONS:
        for split in ('train', 'val', 'test'):
            rows = [rng.choice(ZAPPOS_IMAGES, 3, replace=False) for _ in range(lines_per_list)]
            text = ''.join(f'{a} {f} {c}\n' for a, f, c in rows)
            (folder / 'tripletlists' / f'{cond}_tripletlist_{split}.txt').write_text(text)
    return folder


# ----------------------------------------------------------------------------- reproduce.py

TINY_EXTRA = '--synth-images 48 --img-size 64 --num_triplets 24 --batch-size 8 --dim_embed 16 --epochs 1'
SYNTH_ATTRS = ['sleeve_length', 'neckline_design', 'coat_length', 'colour', 'pattern']


def fake_result(root, run, model, maps, dataset='SynthFashion', attributes=SYNTH_ATTRS, random=20.0):
    """runs/<run>/test_results.json as a finished test of `model` would write it, with these mAPs."""
    folder = root / 'runs' / run
    folder.mkdir(parents=True)
    result = {'mAP': dict(zip(attributes, maps)), 'MeanAP': sum(maps) / len(maps), 'Random MeanAP': random,
              'model': model, 'dataset': dataset, 'split': 'test', 'attributes': attributes}
    (folder / 'test_results.json').write_text(json.dumps(result))
    return folder
