"""Reproduce the paper's tables: train every row with the paper's recipe, test it, collect the table.

    python reproduce.py --data-path data                       # every table, seed 1
    python reproduce.py fashionai ablation-darn --seeds 1 2 3  # some tables, three seeds a row
    python reproduce.py --dry-run                              # the commands, and what they cost
    python reproduce.py deepfashion --dataset SynthFashion \\
        --extra "--synth-images 48 --img-size 64 --num_triplets 24 --batch-size 8 --dim_embed 16 --epochs 1"

A row is a list of asen.py flags: asen.py's defaults are the paper's recipe, so a row passes only
what differs (--model, ASEN++'s --stage). Each row is trained once per seed as
runs/<dataset>-<row>-s<seed>, then tested (`--test --report`: test_results.json with the
Random baseline, and the run's report runs/<run>/report/index.html); a run whose test_results.json
exists is skipped. Rows train with `--resume auto`,
so the same command continues a table whatever state each row is in (not started, stopped before
or after a snapshot, trained, tested). A stop signal to reproduce.py (SIGINT, SIGTERM, SIGUSR1) is
passed to the running asen.py, which saves a snapshot; reproduce.py waits for it and exits with its
status (75: requeue), and the same command continues the table. The collected
table (runs/reproduce/<table>.md and .json) puts the paper's figures beside ours, with the
difference, where a source for them was read; every figure names its source. runs/reproduce/index.html
holds every collected table, each row linking to its runs' reports.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
from datetime import datetime

import utils
from lib import config, costs, flags, report, tables
from utils import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
ASEN = os.path.join(HERE, 'asen.py')
LOGS = os.path.join('runs', 'reproduce')        # command logs and collected tables, beside the runs
# asen.py's exit status for a run stopped by a signal after saving its snapshot (runtime.REQUEUE_EXIT,
# not imported: that would load torch for a dry run); reproduce.py exits with it when stopped.
REQUEUE_EXIT = 75
STOP_SIGNALS = ('SIGINT', 'SIGTERM', 'SIGUSR1')
# The snapshots `--resume auto` continues from (lib/runfolder.py's names).
SNAPSHOTS = ('checkpoint.pth.tar', 'step.pth.tar')

# ----------------------------------------------------------------------------- the recipes
# A row: label (as in the paper), key (in the run name), flags (beyond asen.py's defaults, which
# are the paper's recipe), and for ASEN++'s stage 2 the row whose model_best it resumes from.
TRIPLET = dict(label='Triplet', key='triplet', flags=['--model', 'TripletNet'])
CSN = dict(label='CSN', key='csn', flags=['--model', 'ConditionalSimNet'])
ASEN_ROW = dict(label='ASEN', key='asen', flags=['--model', 'ASENet'])
ASEN_V2 = dict(label='ASENet_V2', key='asenv2', flags=['--model', 'ASENet_V2'])
NO_ASA = dict(label='ASEN w/o ASA', key='noasa', flags=['--model', 'ASENet_noASA'])
NO_ACA = dict(label='ASEN w/o ACA', key='noaca', flags=['--model', 'ASENet_noACA'])
ASENPP_1 = dict(label='ASEN++ stage 1 (global branch)', key='asenpp1', flags=['--model', 'ASENpp', '--stage', '1'])
ASENPP_2 = dict(label='ASEN++', key='asenpp2', flags=['--model', 'ASENpp', '--stage', '2'], resume='asenpp1')

PAPER = 'Ma et al., AAAI 2020 (arXiv 2002.02814)'
JOURNAL = 'Dong et al., IEEE TIP 2021 (arXiv 2104.02429)'
# The ablation's datasets: the paper's ablation table could not be read here (see docs/reproduce.md);
# these are the three mAP datasets; drop one if the paper's table has fewer.
ABLATION_DATASETS = ('FashionAI', 'DARN', 'DeepFashion')

TABLES = {
    'fashionai': dict(dataset='FashionAI', rows=[TRIPLET, CSN, ASEN_ROW, ASEN_V2],
                      compare=f"the FashionAI table of {PAPER}"),
    'darn': dict(dataset='DARN', rows=[TRIPLET, CSN, ASEN_ROW], compare=f"the DARN table of {PAPER}"),
    'deepfashion': dict(dataset='DeepFashion', rows=[TRIPLET, CSN, ASEN_ROW],
                        compare=f"the DeepFashion table of {PAPER}"),
    'zappos': dict(dataset='Zappos50k', rows=[TRIPLET, CSN, ASEN_ROW],
                   compare=f"the Zappos50k table (triplet accuracy) of {PAPER}"),
    **{f'ablation-{d.lower()}': dict(dataset=d, rows=[NO_ASA, NO_ACA, ASEN_ROW],
                                     compare=f"the ablation table (ASA, ACA) of {PAPER}")
       for d in ABLATION_DATASETS},
    **{f'asenpp-{d.lower()}': dict(dataset=d, rows=[ASENPP_1, ASENPP_2], compare=f"the {d} table of {JOURNAL}")
       for d in ('FashionAI', 'DARN', 'DeepFashion')},
}

# ----------------------------------------------------------------------------- the paper's figures
# Only figures read in a named source. Columns are our attribute names: the CRL table's texture /
# fabric / shape / part / style are DeepFashion's texture-related ... style-related, in the order
# of the authors' meta.json (checked against ../shared/reference-splits/meta.json); its "mean" is
# the unweighted mean of the five (ours, MeanAP, weights the attributes by their query counts, as
# the authors' code).
CRL = 'CRL, Conditional Representation Learning (NeurIPS 2025, arXiv 2510.04564), Table 4'
DEEPFASHION_COLUMNS = ('texture-related', 'fabric-related', 'shape-related', 'part-related', 'style-related',
                       'MeanAP')


def _deepfashion(*values):
    return dict(zip(DEEPFASHION_COLUMNS, values))


FIGURES = {
    'deepfashion': {
        'Random': (CRL, _deepfashion(6.69, 2.69, 3.23, 2.55, 1.97, 3.38)),
        'Triplet': (CRL, _deepfashion(13.26, 6.28, 9.49, 4.43, 3.33, 7.36)),
        'CSN': (CRL, _deepfashion(14.09, 6.39, 11.07, 5.13, 3.49, 8.01)),
        'ASEN': (CRL, _deepfashion(15.13, 7.11, 12.39, 5.51, 3.56, 8.74)),
    },
    'ablation-deepfashion': {
        'ASEN': (CRL, _deepfashion(15.13, 7.11, 12.39, 5.51, 3.56, 8.74)),
    },
    'asenpp-deepfashion': {
        'ASEN++': (CRL, _deepfashion(15.60, 7.67, 14.31, 6.60, 4.07, 9.64)),
    },
    'fashionai': {
        'ASENet_V2': ("the authors' README.md in Maryeon/asen at commit 3c4fc87 (overall mAP)", {'MeanAP': 60.3}),
    },
}

# ----------------------------------------------------------------------------- runs and commands

def slug(dataset):
    return dataset.lower()


def run_name(dataset, row, seed):
    return f"{slug(dataset)}-{row['key']}-s{seed}"


def asen_command(args):
    """The command line as the user would type it: this Python, asen.py, the flags."""
    path = os.path.relpath(ASEN)
    return [sys.executable, path if not path.startswith('..') else ASEN] + args


def row_by_key(table, key):
    return next(r for r in table['rows'] if r['key'] == key)


def plan(names, opts):
    """[(table name, row, seed, run name, train argv, test argv)] in order, stage 1 before stage 2."""
    steps = []
    extra, test_extra = shlex.split(opts.extra or ''), shlex.split(opts.test_extra or '')
    for name in names:
        table = TABLES[name]
        dataset = opts.dataset or table['dataset']
        for row in table['rows']:
            for seed in opts.seeds:
                run = run_name(dataset, row, seed)
                train = ['--dataset', dataset, '--data_path', opts.data_path] + row['flags']
                if row.get('resume'):       # started from stage 1's weights; continued by commands_for
                    first = run_name(dataset, row_by_key(table, row['resume']), seed)
                    train += ['--resume', os.path.join('runs', first, 'model_best.pth.tar')]
                else:
                    train += ['--resume', 'auto']
                train += ['--seed', str(seed), '--name', run] + extra
                test = ['--test', '--report', '--resume', os.path.join('runs', run, 'model_best.pth.tar'),
                        '--data_path', opts.data_path] + test_extra
                steps.append((name, row, seed, run, train, test))
    return steps


def state(run):
    """'done' (test_results.json), 'trained' (trained by this script, untested), 'snapshot' (a
    snapshot of a training to continue) or 'new' (nothing to continue: started, or started anew)."""
    folder = os.path.join('runs', run)
    if os.path.isfile(os.path.join(folder, tables.RESULTS)):
        return 'done'
    if os.path.isfile(os.path.join(LOGS, f'{run}.trained')) and \
            os.path.isfile(os.path.join(folder, 'model_best.pth.tar')):
        return 'trained'
    if any(os.path.isfile(os.path.join(folder, name)) for name in SNAPSHOTS):
        return 'snapshot'
    return 'new'


def continued(train):
    """The training argv with `--resume auto` in place of the file it started from (ASEN++ stage 2
    starts from stage 1's model_best, then continues from its own snapshots)."""
    at = train.index('--resume')
    return train[:at + 1] + ['auto'] + train[at + 2:]


def commands_for(step):
    """The asen.py argv lists still to run for a step, by the run's state. `--resume auto` starts a
    run with no snapshot, continues one from its newest snapshot, and returns at once for one that
    has finished (its .trained mark lost, say, when reproduce.py was killed as it finished)."""
    _, row, _, run, train, test = step
    now = state(run)
    if now == 'done':
        return []
    if now == 'trained':
        return [('test', test)]
    if now == 'snapshot' and row.get('resume'):
        train = continued(train)
    return [('train', train), ('test', test)]


def last_error(log):
    """asen.py's own `error:` line in a log, else its last line."""
    try:
        with open(log, errors='replace') as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ''
    errors = [line for line in lines if line.startswith('error:')]
    return (errors or lines or [''])[-1]


class Stopped(Exception):
    """reproduce.py was asked to stop; .status is its exit status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


class PassOnSignals:
    """While inside: a stop signal to reproduce.py (SIGINT, SIGTERM, SIGUSR1) is noted and passed
    once to the running asen.py child, which finishes its step, saves a snapshot and exits 75;
    reproduce.py waits for it, then stops. The child runs in a process group of its own (see
    `child_setup`), so a Ctrl-C to the terminal's group reaches it once, through here, not twice
    (a second signal would stop it at once, without the snapshot)."""

    def __init__(self):
        self.signal_name, self.child, self.previous = None, None, {}

    def __enter__(self):
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        self.signal_name = self.signal_name or signal.Signals(number).name
        self.pass_on(number)

    def pass_on(self, number):
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(number)
            say(f"[{datetime.now():%H:%M:%S}] {signal.Signals(number).name} passed on to asen.py (pid "
                f"{self.child.pid}); waiting for it to save its snapshot")

    def started(self, child):
        """Note the running child; a signal that came while it started is passed on now."""
        self.child = child
        if self.signal_name is not None:
            self.pass_on(getattr(signal, self.signal_name))


def say(line):
    """A line on stdout from a signal handler: os.write, as the handler may run while the main thread
    is inside print; a stdout that is gone (or not a file, under a test's capture) is let be."""
    try:
        os.write(sys.stdout.fileno(), (line + '\n').encode())
    except (OSError, ValueError):
        pass


def child_setup(parent):
    """What the child does before asen.py starts: a process group of its own (the terminal's Ctrl-C
    goes to reproduce.py, which passes it on once) and, on Linux, a SIGTERM when reproduce.py dies
    (SIGKILL, say): asen.py then saves its snapshot and exits rather than train on as an orphan."""
    def setup():
        os.setpgid(0, 0)
        if sys.platform.startswith('linux'):
            import ctypes
            pr_set_pdeathsig = 1
            ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent:                   # reproduce.py died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)
    return setup


def run_asen(command, log, signals):
    """Run one asen.py command line, its output into the open file `log`, a stop signal passed on
    to it (`signals`, a PassOnSignals); its exit status once it has ended."""
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_setup(os.getpid()))
    signals.started(child)
    try:
        return child.wait()
    finally:
        signals.child = None


def exit_status(rc):
    """A child's exit status as a shell reports it: 128 + N for a child ended by signal N."""
    return 128 - rc if rc < 0 else rc


def stopped_for_the_signal(rc):
    """Whether a child's status says it stopped for a stop signal: 75 once its snapshot is saved, or,
    for a signal that came before asen.py handles them, 130 (Ctrl-C) or killed by the signal."""
    return rc in (REQUEUE_EXIT, 130) or -rc in {int(getattr(signal, n)) for n in STOP_SIGNALS if hasattr(signal, n)}


def execute(steps, dry_run):
    """Run (or print) every command still to run; a failure raises a one-line UserError, a stop
    signal a Stopped once the running command has ended."""
    with (PassOnSignals() if not dry_run else _no_signals()) as signals:
        done_seen = set()
        for step in steps:
            table, row, seed, run, _, _ = step
            if run in done_seen:
                continue
            done_seen.add(run)
            todo = commands_for(step)
            if not todo:
                print(f"# skip {run}: runs/{run}/{tables.RESULTS} exists")
                continue
            for kind, argv in todo:
                command = asen_command(argv)
                if dry_run:
                    print(shlex.join(command))
                    continue
                check_not_stopped(signals, f"before {run}'s {kind}")
                run_one(step, kind, command, signals)


def run_one(step, kind, command, signals):
    """One asen.py command of a step, its output in runs/reproduce/<run>.<kind>.log."""
    table, row, seed, run, _, _ = step
    os.makedirs(LOGS, exist_ok=True)
    log = os.path.join(LOGS, f'{run}.{kind}.log')
    print(f"[{datetime.now():%H:%M:%S}] {run}: {kind} (log {log})", flush=True)
    with open(log, 'w') as f:
        f.write(shlex.join(command) + '\n')
        f.flush()
        rc = run_asen(command, f, signals)
    if rc == 0 and kind == 'train':
        open(os.path.join(LOGS, f'{run}.trained'), 'w').close()
    where = f"table {table}, row {row['label']} (seed {seed}, run {run})"
    # asen.py's 75 is a stop to requeue, whoever signalled it (a scheduler may signal it alone)
    if rc == REQUEUE_EXIT or (signals.signal_name is not None and (rc == 0 or stopped_for_the_signal(rc))):
        by = f" by {signals.signal_name}" if signals.signal_name else ''
        raise Stopped(f"stopped{by} in {where}: asen.py {kind} "
                      f"{'ended' if rc == 0 else f'exited {exit_status(rc)}'}; see {log}; rerun the same "
                      f"command to continue (exit status {REQUEUE_EXIT}: requeue)", REQUEUE_EXIT)
    if rc != 0:
        why = last_error(log)
        raise UserError(f"{where}: {kind} failed (exit {exit_status(rc)}{'; ' + why if why else ''}); see {log}")


def check_not_stopped(signals, where):
    if signals.signal_name is not None:
        raise Stopped(f"stopped by {signals.signal_name} {where}; rerun the same command to continue (exit "
                      f"status {REQUEUE_EXIT}: requeue)", REQUEUE_EXIT)


class _no_signals:
    """A dry run's stand-in for PassOnSignals: nothing is started, nothing to pass on."""
    signal_name = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


# ----------------------------------------------------------------------------- the collected table

def fmt(value):
    return '' if value is None else f'{value:.2f}'


def comparison(name, runs_by_row):
    """The table `name` from its runs (tables.build_table) with the paper's figures beside ours:
    (JSON-ready dict, markdown text)."""
    spec = TABLES[name]
    figures = FIGURES.get(name, {})
    all_runs = [r for runs in runs_by_row.values() for r in runs]
    whole = tables.build_table(all_runs)                       # columns, score and the Random row
    columns, score = whole['columns'], whole['score']
    dataset = whole['dataset']
    rows = []
    for row in spec['rows']:
        ours = tables.build_table(runs_by_row[row['label']])['rows'][0]
        rows.append((row['label'], ours))
    random = next((r for r in whole['rows'] if r['row'] == 'Random'), None)
    if random is not None:
        rows.append(('Random', random))
    out = {'table': name, 'dataset': dataset, 'paper_dataset': spec['dataset'], 'score': score,
           'columns': columns, 'rows': [], 'compare': spec['compare']}
    title = f"## {name}: {spec['dataset']}" + (f" (ours on {dataset})" if dataset != spec['dataset'] else '')
    lines = [title, '', '| row | figures | runs | ' + ' | '.join(columns) + ' |',
             '|' + ' --- |' * (len(columns) + 3)]
    sources, missing = {}, []
    for label, ours in rows:
        mean = ours['mean']
        lines.append(f"| {label} | ours | {ours['runs']} | " + ' | '.join(tables.cell(ours, c) for c in columns) + ' |')
        entry = {'row': label, 'runs': ours['runs'], 'ours': mean, 'std': ours['std']}
        if label in figures:
            source, paper = figures[label]
            paper = {c: v for c, v in paper.items() if c in columns}
            diff = {c: mean[c] - paper[c] for c in paper if c in mean}
            lines.append(f"| {label} | paper | | " + ' | '.join(fmt(paper.get(c)) for c in columns) + ' |')
            lines.append(f"| {label} | ours - paper | | " + ' | '.join(
                (f'{diff[c]:+.2f}' if c in diff else '') for c in columns) + ' |')
            entry.update(paper=paper, difference=diff, source=source)
            sources.setdefault(source, []).append(label)
        else:
            missing.append(label)
        out['rows'].append(entry)
    lines.append('')
    for source, labels in sources.items():
        lines.append(f"Paper figures of {', '.join(labels)}: {source}.")
    if missing:
        lines.append(f"No figure read for {', '.join(missing)}: compare with {spec['compare']}.")
    if dataset != spec['dataset']:
        lines.append(f"Ours ran on {dataset}, not {spec['dataset']} (--dataset): the differences are not a "
                     f"reproduction.")
    out['sources'] = whole['sources']
    return out, '\n'.join(lines)


def collect(names, steps):
    """Print each table and write runs/reproduce/<table>.md and .json, and index.html: every table,
    each row linking to its runs' reports (lib/report.py)."""
    os.makedirs(LOGS, exist_ok=True)
    collected = []
    for name in names:
        runs_by_row = {}
        for table, row, _, run, _, _ in steps:
            if table == name:
                runs_by_row.setdefault(row['label'], []).append(os.path.join('runs', run))
        data, text = comparison(name, runs_by_row)
        print(text + '\n')
        with open(os.path.join(LOGS, f'{name}.md'), 'w') as f:
            f.write(text + '\n')
        with open(os.path.join(LOGS, f'{name}.json'), 'w') as f:
            json.dump(data, f, indent=1, sort_keys=True)
        collected.append((data, runs_by_row))
    print(f"index: {report.write_index(LOGS, collected)}")


# ----------------------------------------------------------------------------- checking the flags first

def check_flags(opts, steps):
    """What asen.py would refuse, refused here in one line before any command runs or is printed:
    each --seeds value, then each command's flags (--extra's and --test-extra's among them) by
    asen.py's own parser and checks, those that need no file."""
    seeds = flags.RULES['seed'].range
    for seed in opts.seeds:
        utils.check_range('--seeds', seed, seeds.allowed, seeds.accepts(seed))
    parser = flags.get_args_parser()
    checked = set()
    for table, row, seed, run, train, test in steps:
        for kind, argv, origin in (('train', train, '--extra'), ('test', test, '--test-extra')):
            if tuple(argv) in checked:
                continue
            checked.add(tuple(argv))
            where = f"asen.py would refuse the {kind} command of table {table}, row {row['label']} (seed {seed})"

            def refuse(message, where=where, origin=origin):
                raise UserError(f"{where}: {message} (check {origin})")
            parser.error = refuse
            try:
                config.check_values(vars(parser.parse_args(argv)), flags.given_flags(argv))
            except UserError as err:
                raise UserError(str(err) if str(err).startswith(where) else f"{where}: {err} (check {origin})")


# ----------------------------------------------------------------------------- what a table costs

def cost(names, opts):
    """Print, per row and per table, the projected hours on one GPU and the image cache's size."""
    rates = costs.read_rates(opts.rates)
    numbers = costs.recipe_numbers(opts.extra)
    if rates is None:
        print("cost: no rate file found (benchmarks/gpu_check.sh's gpu_check_out/project_recipe.json, or "
              f"{costs.BASELINE_LOG}); no time projected. Run benchmarks/gpu_check.sh on a GPU, then --rates DIR.")
    else:
        print(f"cost: rates from {rates['source']}")
        if not rates['gpu']:
            print("cost: these are CPU rates; the hours below are not a GPU projection")
        print(f"cost: train {rates['train_rate']:.1f} triplets/s"
              + (f", embed {rates['embed_rate']:.1f} img/s" if rates['embed_rate'] else '')
              + f", rank {rates['rank_s']:.2f} s, snapshot {rates['snapshot_s']:.2f} s an epoch; "
              f"{numbers.num_triplets} triplets an epoch. Measured with ASENet: the other models are "
              "projected at its rate (ASEN++ stage 2 runs two branches and is slower)")
    lines = ['| table | row | runs | epochs | hours on one GPU |', '| --- | --- | --- | --- | --- |']
    total = 0.0
    seen = set()
    for name in names:
        dataset = opts.dataset or TABLES[name]['dataset']
        _, embeds = costs.split_sizes(dataset, opts.data_path)
        table_h = 0.0
        for row in TABLES[name]['rows']:
            n = len(opts.seeds)
            if rates is None:
                lines.append(f"| {name} | {row['label']} | {n} | | no rate |")
                continue
            hours, epochs = costs.row_hours(row, rates, embeds, numbers)
            new = [s for s in opts.seeds if run_name(dataset, row, s) not in seen]
            seen.update(run_name(dataset, row, s) for s in opts.seeds)
            shared = '' if len(new) == n else f" ({n - len(new)} shared with a table above)"
            lines.append(f"| {name} | {row['label']} | {n} | {epochs} | {hours * n:.1f}{shared} |")
            table_h += hours * len(new)
        if rates is not None:
            lines.append(f"| {name} | **table** | | | **{table_h:.1f}** |")
            total += table_h
    if rates is not None:
        lines.append(f"| **all** | | | | **{total:.1f}** ({total / 24:.1f} days) |")
    print('\n'.join(lines))
    print()
    cache_lines = ['| dataset | split | images | cache (GiB) | counted in |', '| --- | --- | --- | --- | --- |']
    for dataset in dict.fromkeys(opts.dataset or TABLES[n]['dataset'] for n in names):
        sizes, _ = costs.split_sizes(dataset, opts.data_path)
        for split in ('train', 'valid', 'test'):
            if split in sizes:
                count, where = sizes[split]
                gib = count * numbers.img_size ** 2 * 3 / 2 ** 30
                cache_lines.append(f"| {dataset} | {split} | {count} | {gib:.2f} | {where} |")
            else:
                cache_lines.append(f"| {dataset} | {split} | ? | ? | no filenames_{split}.txt found |")
    print(f"--cache-images: N x S x S x 3 bytes per split at S = {numbers.img_size}")
    print('\n'.join(cache_lines))


# ----------------------------------------------------------------------------- command line

def get_parser():
    parser = utils.OneLineArgumentParser(command='reproduce.py', description=__doc__.splitlines()[0],
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         epilog='tables: ' + ', '.join(TABLES))
    parser.add_argument('tables', nargs='*', metavar='TABLE', help='tables to build (default: all)')
    parser.add_argument('--data-path', '--data_path', default='data', help='folder holding the datasets')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1], help='train each row once per seed')
    parser.add_argument('--dry-run', action='store_true', help='print every command and the cost; run nothing')
    parser.add_argument('--cost', action='store_true', help='print the projected time and cache size; run nothing')
    parser.add_argument('--rates', metavar='PATH', help="gpu_check.sh's output folder (or its project_recipe.json), "
                        "or an asen.py log of one epoch (default: ./gpu_check_out, else "
                        "../shared/gpu-baseline/proj_default.log)")
    parser.add_argument('--dataset', help='run every recipe on this dataset instead (CI: SynthFashion)')
    parser.add_argument('--extra', default='', help='flags added to every training command')
    parser.add_argument('--test-extra', default='', help='flags added to every test command')
    return parser


def main(argv=None):
    opts = get_parser().parse_args(argv)
    try:
        names = opts.tables or list(TABLES)
        unknown = [n for n in names if n not in TABLES]
        if unknown:
            raise UserError(f"no table {unknown[0]!r}; the tables are {', '.join(TABLES)}")
        shlex.split(opts.extra)
        shlex.split(opts.test_extra)
        steps = plan(names, opts)
        check_flags(opts, steps)
        if opts.cost or opts.dry_run:
            if opts.dry_run:
                execute(steps, dry_run=True)
                print()
            cost(names, opts)
            return 0
        execute(steps, dry_run=False)
        collect(names, steps)
    except ValueError as err:          # shlex: an unclosed quote in --extra
        print(f"error: --extra/--test-extra: {err}", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Stopped as stop:
        print(f"error: {stop}", file=sys.stderr)
        return stop.status
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); rerun the same command to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:             # the reader of our output (e.g. `| head`) has gone: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == '__main__':
    sys.exit(main())
