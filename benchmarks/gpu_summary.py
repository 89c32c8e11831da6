"""The goals of "one GPU at full speed", measured: one table from the JSON files gpu_check.sh writes.

    python benchmarks/gpu_summary.py OUT        # OUT holding bench_train_step.json, bench_epoch.json, ...

Rows (each from the file named; a missing file leaves its rows out):
- steps alone at 16 triplets, the fastest config of bench_train_step(.json, _graphs.json), in
  img/s and against fp32 eager (goals: at least 3500 img/s and 4x);
- the training pass of the fast and cached epochs against the steps alone of the same
  bench_epoch.json run (goal: at least 90%);
- train plus validate (engine.train_one_epoch + commands.evaluate seconds) of the defaults against the
  fast and cached runs (goal: at least 5x);
- the projected wall time of the paper's recipe (project_recipe.json), per variant.
"""
import argparse
import json
import os

from _common import markdown_table, print_json


def load(folder, name):
    path = os.path.join(folder, f'{name}.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def step_rows(runs):
    """Fastest steps alone against fp32 eager, over the bench_train_step runs given."""
    results = [r for run in runs if run for r in run['results'] if r.get('images_per_s')]
    fp32 = next((r for r in results if r['name'] == 'fp32 3-forward (original)'), None)
    if not results or fp32 is None:
        return []
    best = max(results, key=lambda r: r['images_per_s'])
    ratio = best['images_per_s'] / fp32['images_per_s']
    return [dict(goal=f"steps alone, fastest ({best['name']})", measured=f"{best['images_per_s']:.0f} img/s",
                 target='>= 3500 img/s', met=best['images_per_s'] >= 3500),
            dict(goal='steps alone, fastest against fp32 eager', measured=f'{ratio:.2f}x', target='>= 4x',
                 met=ratio >= 4)]


def epoch_rows(epoch):
    """Training pass against steps alone; train + validate against the defaults."""
    if not epoch:
        return []
    runs = {r['name']: r for r in epoch['results'] if r.get('rc') == 0 and r.get('train_s')}
    rows = []
    for name in ('fast', 'cached'):
        share = runs.get(name, {}).get('train_vs_steps_alone')
        if share is not None:
            rows.append(dict(goal=f'training pass of the {name} epoch against the steps alone',
                             measured=f'{100 * share:.0f}%', target='>= 90%', met=share >= 0.9))
    default = runs.get('default')
    for name in ('fast', 'cached'):
        run = runs.get(name)
        if default and run and default.get('valid_s') and run.get('valid_s'):
            before, after = default['train_s'] + default['valid_s'], run['train_s'] + run['valid_s']
            rows.append(dict(goal=f'train + validate, defaults against {name}',
                             measured=f'{before:.1f} s / {after:.1f} s = {before / after:.2f}x', target='>= 5x',
                             met=before / after >= 5))
    return rows


def recipe_rows(recipe):
    if not recipe:
        return []
    return [dict(goal=f"paper's recipe projected, {r['name']}", measured=f"{r['total_s'] / 3600:.1f} h",
                 target='', met=None) for r in recipe['results']]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder', help="gpu_check.sh's output folder ($OUT)")
    args = parser.parse_args(argv)
    rows = (step_rows([load(args.folder, 'bench_train_step'), load(args.folder, 'bench_train_step_graphs')]) +
            epoch_rows(load(args.folder, 'bench_epoch')) + recipe_rows(load(args.folder, 'project_recipe')))
    print(markdown_table(['goal', 'measured', 'target', 'met'],
                         [[r['goal'], r['measured'], r['target'], {True: 'yes', False: 'no', None: ''}[r['met']]]
                          for r in rows]))
    print_json({'benchmark': 'gpu_summary', 'rows': rows})
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
