"""A small run from start to exit: asen.py with its defaults against the authors' recipe
(original_recipe.py), the fixed cost of a run that the per-step benchmarks do not see.

Both train one epoch of --num_triplets (64) triplets on authors'-format data (authors_data.py:
--train 48 training images, --eval 40 valid and test images each, 512 px JPEGs), ResNet-50 at
224 px, fp32, random init, batch 16, then validate and write their checkpoints. Each run is a
fresh `python` process in its own empty working directory, timed from launch to exit (imports,
data checks, training, validation, snapshots, logging), and the variants alternate in the order
A B B A ... so that a slow drift of the machine falls on both. `imports` times `python -c "import
torch, torchvision"`, the floor that both pay. The training scripts' runs are also split by their
log lines into start-up (launch to "Begin training"), train+validate (to the learning-rate line
written after the checkpoint) and exit: the middle phase is the same ResNet-50 work in both and
carries most of the run-to-run noise, the other two are each script's own fixed cost.

    python benchmarks/bench_small_run.py [--repeats 4] [--data_path DIR] [--asen-extra "--heatmap-every 1"]
"""
import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from _common import REPO, machine_info, markdown_table, print_json, print_machine

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import authors_data  # noqa: E402

PHASES = ('start-up', 'train+validate', 'exit')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--data_path', default=os.path.join(tempfile.gettempdir(), 'asen-small-run'),
                        help="authors'-format data folder, written if missing")
    parser.add_argument('--train', type=int, default=48, help='training images')
    parser.add_argument('--eval', type=int, default=40, help='valid and test images each')
    parser.add_argument('--jpeg-size', type=int, default=512, help='side of the JPEGs, px')
    parser.add_argument('--num_triplets', type=int, default=64, help='triplets of the one epoch')
    parser.add_argument('--repeats', type=int, default=4, help='runs of each variant')
    parser.add_argument('--asen-extra', default='', help='more asen.py flags, one string')
    parser.add_argument('--variants', nargs='+', default=['asen', 'original', 'imports'],
                        choices=['asen', 'original', 'imports'])
    return parser.parse_args(argv)


def commands(args):
    data = os.path.abspath(args.data_path)
    common = ['--data_path', data, '--dataset', 'FashionAI', '--epochs', '1',
              '--num_triplets', str(args.num_triplets), '--name', 'small']
    return {
        'asen': [sys.executable, os.path.join(REPO, 'asen.py'), *common, '--no-pretrained',
                 *shlex.split(args.asen_extra)],
        'original': [sys.executable, os.path.join(REPO, 'benchmarks', 'original_recipe.py'), *common],
        'imports': [sys.executable, '-c', 'import torch, torchvision'],
    }


def log_time(output, marker):
    """Wall-clock time (s since the epoch) of the first log line holding `marker`; both scripts
    start their log lines with logging's 'YYYY-mm-dd HH:MM:SS,mmm'."""
    for line in output.splitlines():
        if marker in line:
            stamp = datetime.datetime.strptime(line[:23], '%Y-%m-%d %H:%M:%S,%f')
            return stamp.timestamp()
    return None


def timed_run(command):
    """{'total': seconds from launch to exit of `command` in a fresh empty working directory, and
    for the training scripts its phases from their log lines: 'start-up' (launch to "Begin
    training", imports and data checks included), 'train+validate' (to the learning-rate line
    after the checkpoint) and 'exit' (from there to the end of the process)}."""
    with tempfile.TemporaryDirectory() as workdir:
        launch, start = time.time(), time.perf_counter()
        done = subprocess.run(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds, end = time.perf_counter() - start, time.time()
    if done.returncode != 0:
        sys.exit(f'error: {shlex.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}')
    phases = {'total': seconds}
    begin, after = log_time(done.stdout, 'Begin training'), log_time(done.stdout, 'lr:')
    if begin is not None and after is not None:
        phases.update({'start-up': begin - launch, 'train+validate': after - begin, 'exit': end - after})
    return phases


def run_order(variants, repeats):
    """A B B A A B ...: each repeat reverses the previous order."""
    order = []
    for r in range(repeats):
        order += variants if r % 2 == 0 else variants[::-1]
    return order


def main(argv=None):
    args = parse_args(argv)
    print_machine(machine_info('cpu'))
    written = authors_data.write(args.data_path, args.train, args.eval, args.jpeg_size, workers=os.cpu_count() or 1)
    print(f"data: {args.data_path} ({'written' if written else 'kept'}: {args.train} training, "
          f"{args.eval} valid and {args.eval} test JPEGs of {args.jpeg_size} px)")
    cmds = commands(args)
    for name in args.variants:
        print(f'{name}: {shlex.join(cmds[name])}')
    runs = {name: [] for name in args.variants}
    for name in run_order(args.variants, args.repeats):
        runs[name].append(timed_run(cmds[name]))
        print(f'  {name}: ' + ', '.join(f'{k} {v:.2f} s' for k, v in runs[name][-1].items()), flush=True)
    times = {name: [r['total'] for r in rs] for name, rs in runs.items()}
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = [[name, f'{medians[name]:.2f}', f'{min(t):.2f}', f'{max(t):.2f}', ' '.join(f'{s:.1f}' for s in t)]
            for name, t in times.items()]
    print()
    print(markdown_table(['variant', 'median s', 'min s', 'max s', 'runs'], rows))
    phases = {name: {phase: statistics.median(r[phase] for r in rs) for phase in PHASES}
              for name, rs in runs.items() if all(phase in r for r in rs for phase in PHASES)}
    if phases:
        print('\nmedian seconds by phase (from the log lines):\n')
        print(markdown_table(['variant', *PHASES], [[n, *(f'{p[ph]:.2f}' for ph in PHASES)] for n, p in phases.items()]))
    result = {'runs': runs, 'times': times, 'phase_medians': phases, 'medians': medians}
    if 'asen' in times and 'original' in times:
        gap = medians['asen'] - medians['original']
        result['asen_minus_original_s'] = gap
        print(f"\nasen minus original (medians): {gap:+.2f} s")
    print_json(result)


if __name__ == '__main__':
    main()
