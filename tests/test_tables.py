"""python asen.py --collect: the test results of several runs as one table."""
import json

import pytest

import asen
from lib import tables
from utils import UserError

ATTRS = ['skirt_length', 'sleeve_length', 'coat_length']


def write_run(root, name, model, maps, mean, random=None, dataset='FashionAI', attributes=ATTRS):
    """runs/<name>/test_results.json as run_test writes it (keys sorted, attribute order kept)."""
    run = root / 'runs' / name
    run.mkdir(parents=True)
    result = {'mAP': dict(zip(attributes, maps)), 'MeanAP': mean, 'model': model, 'dataset': dataset,
              'split': 'test', 'attributes': attributes}
    if random is not None:
        result['Random MeanAP'] = random
    (run / 'test_results.json').write_text(json.dumps(result, sort_keys=True))
    return run


def test_collect_groups_models_with_mean_std_and_count(workdir, capsys):
    a = write_run(workdir, 'asen_s1', 'ASENet', [60, 70, 80], 70, random=10)
    b = write_run(workdir, 'asen_s2', 'ASENet', [62, 74, 86], 74, random=12)
    c = write_run(workdir, 'noasa', 'ASENet_noASA', [50, 51, 52], 51)
    out = workdir / 'table.json'
    assert asen.main(['--collect', str(a), str(b / 'test_results.json'), str(c), '--collect-out', str(out)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == '| model | runs | skirt_length | sleeve_length | coat_length | MeanAP |'   # authors' order
    # sample std (n - 1) of two runs a, b is |a - b| / sqrt(2): 2 -> 1.41, 4 -> 2.83, 6 -> 4.24
    assert text[2] == '| ASENet | 2 | 61.00 ± 1.41 | 72.00 ± 2.83 | 83.00 ± 4.24 | 72.00 ± 2.83 |'
    assert text[3] == '| ASENet_noASA | 1 | 50.00 | 51.00 | 52.00 | 51.00 |'
    assert text[4] == '| Random | 2 |  |  |  | 11.00 ± 1.41 |'
    table = json.loads(out.read_text())
    assert table['dataset'] == 'FashionAI' and table['columns'][-1] == 'MeanAP'
    assert table['rows'][0]['mean']['coat_length'] == 83 and table['rows'][1]['std']['MeanAP'] is None


def test_collect_by_run_and_zappos_columns(workdir):
    conds = ['class', 'closure', 'gender', 'heel']
    for i, name in enumerate(['z1', 'z2']):
        run = workdir / 'runs' / name
        run.mkdir(parents=True)
        result = {'accuracy': dict(zip(conds, [80 + i] * 4)), 'Accuracy': 80 + i, 'Random Accuracy': 50,
                  'model': 'ASENet', 'dataset': 'Zappos50k', 'attributes': conds}
        (run / 'test_results.json').write_text(json.dumps(result))
    table = tables.build_table([str(workdir / 'runs' / 'z1'), str(workdir / 'runs' / 'z2')], by='run')
    assert [r['row'] for r in table['rows']] == ['z1', 'z2', 'Random']
    assert table['columns'] == conds + ['Accuracy'] and table['rows'][1]['mean']['heel'] == 81
    assert tables.markdown(table).splitlines()[0].startswith('| run | runs | class |')


def test_old_results_without_attribute_order_still_collect(workdir):
    run = write_run(workdir, 'old', 'ASENet', [1, 2, 3], 2)
    result = json.loads((run / 'test_results.json').read_text())
    del result['attributes']
    (run / 'test_results.json').write_text(json.dumps(result))
    assert tables.build_table([str(run)])['rows'][0]['mean']['MeanAP'] == 2


def test_collect_errors_are_one_line(workdir, capsys):
    a = write_run(workdir, 'a', 'ASENet', [1, 2, 3], 2)
    (workdir / 'runs' / 'untested').mkdir()
    assert asen.main(['--collect', str(a), str(workdir / 'runs' / 'untested')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'untested: no test_results.json' in err and '--test --resume' in err
    d = write_run(workdir, 'd', 'ASENet', [1, 2, 3], 2, dataset='DARN')
    assert asen.main(['--collect', str(a), str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'dataset DARN' in err and 'one dataset at a time' in err
    (workdir / 'bad.json').write_text('{"mAP": 3}')
    with pytest.raises(UserError, match='bad.json: not a test result'):
        tables.build_table([str(workdir / 'bad.json')])
    with pytest.raises(UserError, match='nowhere: no such run folder'):
        tables.build_table([str(workdir / 'nowhere')])
