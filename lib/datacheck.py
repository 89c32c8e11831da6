"""The dataset check (`python asen.py --check-data --dataset DARN`): which images the splits name
that are missing or cannot be read, counted per split and per attribute, before a long run.

DARN's images are downloaded from URLs of which a part no longer resolve, so its folders are rarely
whole; training without --skip-bad-images stops at the first such image, and with it drops them.
The check reads every listed image's header, as the datasets do before training
(images.image_problem: missing, not a regular file, undecodable header, refused mode, over the
pixel limit), in a process pool of --workers processes, with a progress bar on a terminal. It
writes nothing; the report goes to stdout (or to the run's log when training runs it, see
`log_before_training`), and the exit status is 0 whatever it finds.
"""

import multiprocessing
import os
import sys

import numpy as np
from tqdm import tqdm

import datasets
from lib import images
from lib.config import TRIPLET_DATASETS
from utils import UserError

# (split, role, file): what each split file lists; the train labels are (id, attr, value) pairs too
LISTS = (('train', 'labels', 'label_train.txt'), ('valid', 'query', 'query_valid.txt'),
         ('valid', 'candidate', 'candidate_valid.txt'), ('test', 'query', 'query_test.txt'),
         ('test', 'candidate', 'candidate_test.txt'))
CHUNK = 64                                       # images a pool task checks


def listed_entries(split_files):
    """{(split, role): (id, attr, value) array} of every split file."""
    entries = {}
    for split, role, _ in LISTS:
        entries[split, role] = split_files.train_labels() if role == 'labels' else \
            split_files.retrieval_entries(split, role)
    return entries


def _problems_of(paths):
    return [images.image_problem(path) for path in paths]


def image_problems(paths, workers, what='checking images'):
    """images.image_problem of each of `paths` (None where it can be used), in a pool of `workers`
    processes (0: here), with a progress bar when stderr is a terminal."""
    chunks = [paths[start:start + CHUNK] for start in range(0, len(paths), CHUNK)]
    bar = tqdm(total=len(paths), desc=what, unit='img', disable=not sys.stderr.isatty(), leave=False)
    found = []
    try:
        if workers <= 0 or len(chunks) <= 1:
            results = map(_problems_of, chunks)
            for chunk in results:
                found += chunk
                bar.update(len(chunk))
            return found
        with multiprocessing.get_context('fork').Pool(min(workers, len(chunks)),
                                                       initializer=_worker_setup) as pool:
            for chunk in pool.imap(_problems_of, chunks):      # in order: found[i] is paths[i]'s
                found += chunk
                bar.update(len(chunk))
        return found
    finally:
        bar.close()


def _worker_setup():
    """Pool processes leave Ctrl-C to the main process, which ends the pool."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check(split_files, workers):
    """The report of one dataset: {'root', 'splits': {split: {'images', 'missing', 'unreadable'}},
    'entries': {(split, role): {attribute: [bad, listed]}}, 'examples': [(path, problem)]}."""
    entries = listed_entries(split_files)
    wanted = {}                                  # split: sorted unique ids its files name
    for (split, _), rows in entries.items():
        wanted[split] = np.union1d(wanted.get(split, np.zeros(0, dtype=np.int64)), rows[:, 0])
    problems = {}
    for split in ('train', 'valid', 'test'):
        filenames = split_files.filenames(split)
        paths = [os.path.join(split_files.root, filenames[i]) for i in wanted[split]]
        found = image_problems(paths, workers, f'{split} images')
        images.remember_problems(paths, found)
        problems[split] = dict(zip(wanted[split].tolist(), found))
    report = {'root': split_files.root, 'splits': {}, 'entries': {}, 'examples': []}
    for split, found in problems.items():
        bad = {i: p for i, p in found.items() if p is not None}
        missing = sum(p == 'missing' for p in bad.values())
        report['splits'][split] = {'images': len(found), 'missing': missing, 'unreadable': len(bad) - missing}
        filenames = split_files.filenames(split)
        report['examples'] += [(filenames[i], p) for i, p in list(bad.items())[:3]]
    for (split, role), rows in entries.items():
        bad_ids = np.asarray([i for i, p in problems[split].items() if p is not None], dtype=np.int64)
        is_bad = np.isin(rows[:, 0], bad_ids)
        report['entries'][split, role] = {
            name: [int(is_bad[rows[:, 1] == a].sum()), int((rows[:, 1] == a).sum())]
            for a, name in enumerate(split_files.attributes)}
    return report


def report_lines(report):
    """The report as text lines: images per split, then entries per attribute, then examples."""
    lines = [f"dataset check of {report['root']}: images the split files name that are missing or cannot be read"]
    lines.append(f"{'split':<8}{'images':>10}{'missing':>10}{'unreadable':>12}")
    for split, counts in report['splits'].items():
        lines.append(f"{split:<8}{counts['images']:>10}{counts['missing']:>10}{counts['unreadable']:>12}")
    columns = [f'{split} {role}' for split, role, _ in LISTS]
    lines.append('entries whose image is missing or unreadable, of those listed, per attribute:')
    lines.append(f"{'attribute':<24}" + ''.join(f'{c:>18}' for c in columns))
    attributes = list(next(iter(report['entries'].values())))
    for name in attributes:
        cells = [f'{bad}/{listed}' for bad, listed in (report['entries'][split, role][name] for split, role, _ in LISTS)]
        lines.append(f'{name:<24}' + ''.join(f'{c:>18}' for c in cells))
    bad_images = sum(c['missing'] + c['unreadable'] for c in report['splits'].values())
    for path, problem in report['examples']:
        lines.append(f'  e.g. {path}: {problem}')
    if bad_images:
        lines.append(f'{bad_images} image(s) cannot be used: restore or download them, or train with '
                     f'--skip-bad-images to leave out the entries that name them')
    else:
        lines.append('every listed image can be read')
    return lines


def split_files_of(args):
    """The split files --check-data reads (never generated here)."""
    if args.dataset in TRIPLET_DATASETS:
        raise UserError(f"--check-data reads the authors' split files; {args.dataset} has triplet lists "
                        f"(its images are checked when a run starts)")
    if os.path.exists(args.data_path) and not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path} is a file, not a folder; pass the folder holding the datasets")
    return datasets.SplitFiles(args.data_path, args.dataset)


def workers_of(args):
    """--workers, else one process a core (up to 8): the check reads files, it trains nothing."""
    return args.workers if args.workers is not None else min(8, os.cpu_count() or 1)


def run(args):
    """`asen.py --check-data`: print the report; returns it."""
    report = check(split_files_of(args), workers_of(args))
    print('\n'.join(report_lines(report)))
    return report


def log_before_training(split_files, args, log):
    """With --skip-bad-images, the report in the run's log before training, so the user sees what
    will be left out (without the flag a bad image stops the run at once, naming it)."""
    if args.dataset in TRIPLET_DATASETS:
        return None
    report = check(split_files, workers_of(args))
    for line in report_lines(report):
        log(line)
    return report
