"""Result tables: the test results of several runs as one markdown table (and JSON).

    python asen.py --collect runs/ASEN_seed1 runs/ASEN_seed2 runs/noASA [--collect-out table.json]

Each run is a `runs/<name>` folder holding `test_results.json` (written by `--test`) or that file
itself. Rows are models (mean ± sample std over their runs, with the run count) or, with
`--collect-by run`, runs; columns are the attributes and MeanAP (Zappos50k: the conditions and
Accuracy); a last `Random` row averages the runs' random-embedding baselines.
"""

import json
import math
import os

import numpy as np

from lib import checks, runfolder
import utils
from utils import UserError

RESULTS = 'test_results.json'


def score_keys(result):
    """(per-attribute key, overall key) of a result: ('mAP', 'MeanAP') or ('accuracy', 'Accuracy')."""
    return ('accuracy', 'Accuracy') if 'Accuracy' in result else ('mAP', 'MeanAP')


def results_path(path):
    """`path` itself if it is a file, else `path/test_results.json`; a one-line error if absent."""
    if os.path.isfile(path):
        return path
    candidate = os.path.join(path, RESULTS)
    if os.path.isdir(path) and os.path.isfile(candidate):
        return candidate
    if os.path.isdir(path):
        raise UserError(f"{path}: no {RESULTS} in this run folder; test the run first with "
                        f"python asen.py --test --resume {os.path.join(path, 'model_best.pth.tar')}")
    raise UserError(f"{path}: no such run folder or {RESULTS} file")


def load_result(path):
    """(run name, result dict) of one run, checked to hold what a table needs."""
    file = results_path(path)
    try:
        result = json.loads(checks.decode_utf8(file, checks.read_bytes(file, RESULTS)))
    except ValueError as err:
        raise UserError(f"{file}: not valid JSON ({err}); rerun --test to rewrite it") from err
    per, total = score_keys(result) if isinstance(result, dict) else (None, None)
    if not isinstance(result, dict) or not isinstance(result.get(per), dict) or total not in result:
        raise UserError(f"{file}: not a test result of asen.py --test (no 'mAP' and 'MeanAP', nor "
                        f"'accuracy' and 'Accuracy')")
    check_result(file, result)
    name = os.path.basename(os.path.dirname(os.path.abspath(file)))
    return name, result


def is_score(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_result(file, result):
    """A one-line error naming `file` for a result whose scores are not numbers, or whose attribute
    list does not match its scores (an edited or damaged file would otherwise fail mid-table)."""
    per, total = score_keys(result)
    rerun = 'rerun python asen.py --test to rewrite it'
    scores = {f'{per}[{name!r}]': value for name, value in result[per].items()}
    scores[total] = result[total]
    if f'Random {total}' in result:
        scores[f'Random {total}'] = result[f'Random {total}']
    for key, value in scores.items():
        if not is_score(value):
            raise UserError(f"{file}: {key} is {value!r}, not a finite number; {rerun}")
    attributes = result.get('attributes')
    listed = attributes is None or isinstance(attributes, list) and sorted(map(str, attributes)) == sorted(result[per])
    if not listed:
        raise UserError(f"{file}: 'attributes' {attributes!r} does not list the attributes of {per!r}; {rerun}")
    for key in ('model', 'dataset'):
        if key in result and not isinstance(result[key], str):
            raise UserError(f"{file}: {key!r} is {result[key]!r}, not a name; {rerun}")
    scored = result.get('scored')
    if scored is not None and not (isinstance(scored, dict) and is_score(scored.get('share'))
                                   and 0 <= scored['share'] <= 1):
        raise UserError(f"{file}: 'scored' is {scored!r}, not the share of the split scored; {rerun}")


def columns_of(result):
    """Attribute columns in the dataset's order (older results: the order stored in the file)."""
    per, _ = score_keys(result)
    return list(result.get('attributes') or result[per])


def check_compatible(loaded, paths):
    """One dataset and one set of columns across all results, else a one-line error."""
    first_name, first = loaded[0]
    for (name, result), path in zip(loaded[1:], paths[1:]):
        if result.get('dataset') != first.get('dataset'):
            raise UserError(f"{path}: dataset {result.get('dataset')}, but {paths[0]} is "
                            f"{first.get('dataset')}; collect one dataset at a time")
        if sorted(columns_of(result)) != sorted(columns_of(first)):
            raise UserError(f"{path}: attributes {columns_of(result)} differ from those of {paths[0]}")


def summarise(values):
    """(mean, sample std or None for one value) of a list of numbers."""
    mean = float(np.mean(values))
    return mean, float(np.std(values, ddof=1)) if len(values) > 1 else None


def group_rows(loaded, by):
    """[(row label, [results])] in first-seen order, grouped by model or one per run."""
    groups = {}
    for name, result in loaded:
        key = result.get('model', name) if by == 'model' else name
        groups.setdefault(key, []).append(result)
    return list(groups.items())


def build_table(paths, by='model'):
    """The table of the runs at `paths` as a JSON-ready dict."""
    loaded = [load_result(p) for p in paths]
    check_compatible(loaded, paths)
    return dict(table_of(loaded, by), sources=[results_path(p) for p in paths])


def table_of(loaded, by='model'):
    """The table of [(run name, result)] as a JSON-ready dict."""
    first = loaded[0][1]
    per, total = score_keys(first)
    columns = columns_of(first)
    rows = []
    for label, results in group_rows(loaded, by):
        cells = {c: summarise([r[per][c] for r in results]) for c in columns}
        cells[total] = summarise([r[total] for r in results])
        row = {'row': label, 'runs': len(results), 'mean': {k: v[0] for k, v in cells.items()},
               'std': {k: v[1] for k, v in cells.items()}}
        shares = [r['scored']['share'] for r in results if r.get('scored')]
        if shares:                      # --skip-bad-images left part of the split out of some run
            row['scored_share'] = min(shares)
        rows.append(row)
    randoms = [r[f'Random {total}'] for _, r in loaded if f'Random {total}' in r]
    if randoms:
        mean, std = summarise(randoms)
        rows.append({'row': 'Random', 'runs': len(randoms), 'mean': {total: mean}, 'std': {total: std}})
    return {'dataset': first.get('dataset'), 'score': total, 'by': by, 'columns': columns + [total], 'rows': rows}


def cell(row, column):
    """'64.43' or '64.43 ± 0.12'; empty where the row has no such column."""
    if column not in row['mean']:
        return ''
    std = row['std'][column]
    return f"{row['mean'][column]:.2f}" + (f" ± {std:.2f}" if std is not None else '')


def markdown(table, runs_column=True):
    """The table in markdown: a row label, the run count (unless not `runs_column`), then the columns."""
    runs = ['runs'] if runs_column else []
    lines = ['| ' + ' | '.join([table.get('by', 'model'), *runs, *table['columns']]) + ' |',
             '|' + ' --- |' * (len(table['columns']) + 1 + len(runs))]
    partial = []
    for row in table['rows']:
        count = [str(row['runs'])] if runs_column else []
        label = row['row'] + (' *' if 'scored_share' in row else '')
        lines.append('| ' + ' | '.join([label, *count, *(cell(row, c) for c in table['columns'])]) + ' |')
        if 'scored_share' in row:
            partial.append(f"{row['row']} {100 * row['scored_share']:.1f}%")
    if partial:
        lines.append(f"\n\\* scored on part of the split (--skip-bad-images left out queries whose images "
                     f"are missing or unreadable): {', '.join(partial)} of its queries")
    return '\n'.join(lines)


def markdown_of_result(result):
    """The row of one test result in the paper's layout (attributes, then MeanAP or Accuracy), as
    --test prints it (its Random figure is a log line of its own)."""
    table = table_of([(result.get('model', ''), result)])
    return markdown(dict(table, rows=table['rows'][:1]), runs_column=False)


def is_collected_table(path):
    """Whether `path` holds a table --collect-out wrote (a JSON object with 'columns' and 'rows')."""
    try:
        with open(path, encoding='utf-8') as handle:
            table = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(table, dict) and {'columns', 'rows'} <= set(table)


def collect(paths, out=None, by='model'):
    """Print the markdown table of the runs at `paths`; write it as JSON to `out` when given, a new
    file or one an earlier --collect-out wrote (never a result, a checkpoint or a folder)."""
    if out:
        runfolder.check_new_output(out, '--collect-out', is_collected_table)
    table = build_table(paths, by)
    print(markdown(table))
    if out:
        try:
            utils.write_json(table, out)
        except OSError as err:
            raise UserError(f"--collect-out {out}: cannot write ({err.strerror or err}); check the folder") from err
    return table

