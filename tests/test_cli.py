"""The command line tells the truth: --help states each default once, each flag's range and role
are its own (lib/flags.py), the SynthFashion preset yields to every explicit flag and picks its precision for the device used, a too-old torch is one
line, the original's --visdom is accepted, and --heatmap-every decides which epochs draw."""
import ast
import glob
import os
import re

import pytest
import torch

import asen
import pretrain
import utils
from lib import runtime
from conftest import TINY
from helpers import ROOT, private_copy
from lib import commands, config, engine, flags


# ----------------------------------------------------------------------------- --help

def help_entries(parser):
    """{first option string: its help text, whitespace collapsed}, read from --help's output."""
    entries, current = {}, None
    for line in parser.format_help().splitlines():
        option = re.match(r'\s{2}(-[-\w]+)', line)
        if option:
            current = option.group(1)
            entries[current] = line
        elif current and line.startswith('    '):
            entries[current] += ' ' + line
        else:
            current = None                                  # a blank line or a group title
    return {option: ' '.join(text.split()) for option, text in entries.items()}


def usage_options(parser):
    """The first spelling of each optional option (those in brackets), read from the usage line."""
    return set(re.findall(r'\[(--?[\w-]+)', parser.format_usage()))


@pytest.mark.parametrize('parser', [asen.get_args_parser(), pretrain.build_parser()], ids=['asen', 'pretrain'])
def test_help_states_each_default_at_most_once(parser):
    entries = help_entries(parser)
    assert usage_options(parser) <= set(entries) and '--epochs' in entries
    for option, text in entries.items():
        if re.match(r'\S+ \{default,', text):             # --compile-mode: a mode named 'default'
            assert text.count('(default') <= 1, text
            continue
        assert text.lower().count('default') <= 1, text
        assert '(default: True)' not in text and '(default: False)' not in text, text   # switches say on/off


def test_every_flag_has_its_help_entry():
    parser = asen.get_args_parser()
    entries = help_entries(parser)
    assert set(entries) == {'-h'} | {rule.option for rule in parser.rules.values()}
    assert all(len(text.split()) > 3 for text in entries.values())


def test_help_says_what_the_defaults_are():
    entries = help_entries(asen.get_args_parser())
    assert entries['--epochs'].endswith('(default: 200)')
    assert entries['--channels-last'].endswith('(default: off)')
    assert '--no-pretrained' in entries['--pretrained'] and entries['--pretrained'].count('default') == 1
    assert not any('visdom_port' in option for option in entries)
    assert entries['--heatmap-every'].endswith('(default: 0)')
    assert '--name' in entries['--resume'] and '--data_path' in entries['--resume']


# ----------------------------------------------------------------------------- the SynthFashion preset

def another_value(parser, dest, value):
    """(argv, value): command-line words that set `dest` to a value other than `value`."""
    rule = parser.rules.get(dest)
    assert rule, f'the preset sets {dest}, which no flag gives'
    if rule.negatable:
        return ['--no-' + rule.option[2:] if value else rule.option], not value
    if rule.choices:
        other = next(choice for choice in rule.choices if choice != value)
        return [rule.option, str(other)], other
    if rule.kind in ('int', 'float'):
        return [rule.option, str(value + 1)], value + 1
    raise AssertionError(f'no way to give --{dest} another value than {value!r}')


def test_every_preset_value_yields_to_an_explicit_flag():
    parser = asen.get_args_parser()
    preset = flags.synth_preset(runtime.resolve_device())
    plain = config.from_flags(['--dataset', 'SynthFashion'])
    assert {key: getattr(plain, key) for key in preset} == preset
    for key, value in preset.items():
        argv, other = another_value(parser, key, value)
        args = config.from_flags(['--dataset', 'SynthFashion', *argv])
        assert other != value and getattr(args, key) == other, (key, argv)
        assert all(getattr(args, k) == v for k, v in preset.items() if k != key), key   # only that one


def test_pretrained_and_no_pretrained_share_one_setting():
    assert config.from_flags([]).pretrained is True
    assert config.from_flags(['--no-pretrained']).pretrained is False
    assert config.from_flags(['--dataset', 'SynthFashion']).pretrained is False
    assert config.from_flags(['--dataset', 'SynthFashion', '--pretrained']).pretrained is True
    assert config.from_flags(['--dataset', 'SynthFashion', '--pretrained']).explicit == {'dataset', 'pretrained'}


# ----------------------------------------------------------------------------- each flag's rules

def test_the_given_flags_are_those_on_the_command_line():
    argv = ['--img-size', '64', '--no-pretrained', '--name', 'ASEN', '--no-tf32', '--collect', 'a', 'b']
    assert flags.given_flags(argv) == {'img_size', 'pretrained', 'name', 'tf32', 'collect'}   # a default given counts
    assert flags.given_flags([]) == set()


@pytest.mark.parametrize('argv, needles', [
    (['--img-size', '31'], ['--img-size', '31: must be a whole number from 32 to 4096', '2x2']),
    (['--epochs', 'two'], ['--epochs', "invalid int value: 'two'", 'from 1 to 100000']),
    (['--decay_rate', 'inf'], ['--decay-rate', 'inf: must be a finite number in (0, 1]']),
    (['--gallery', ''], ['--gallery', "'': must be a path or name, not empty"]),
])
def test_a_value_out_of_its_flags_range_is_argparses_one_line(argv, needles, capsys):
    with pytest.raises(SystemExit) as stop:
        asen.get_args_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count('\n') == 1 and err.startswith('error: argument ')
    assert all(needle in err for needle in needles), err


def test_a_restored_value_is_checked_by_its_flags_own_range():
    draft = config.Draft(vars(asen.get_args_parser().parse_args([])), ())
    draft.set('dim_embed', 0, '--resume old.pth.tar')
    with pytest.raises(utils.UserError, match=r"--dim-embed 0 \(from --resume old.pth.tar\): must be a whole "
                                               r"number from 1 to 65536"):
        draft.freeze({'dim_embed'}, 'old.pth.tar')
    assert flags.RULES['dim_embed'].range.allowed == 'a whole number from 1 to 65536'


def test_only_the_flags_that_shape_the_weights_tell_runs_apart():
    args = config.from_flags([])
    for dest, rule in flags.RULES.items():
        other = {**args.as_dict(), dest: 'another value'}
        differs = flags.first_difference(args, other)
        assert (differs is not None) == (rule.role == flags.RUN), dest
    assert flags.RULES['lr'].role == flags.RUN and flags.RULES['epochs'].role == flags.KEPT
    assert flags.RULES['workers'].role == flags.INVOCATION and 'workers' in flags.INVOCATION_FLAGS


def test_no_module_imports_the_entry_point():
    """asen.py is the command: the library, reproduce.py and the benchmarks take the flags from
    lib/flags.py and the resolution from lib/config.py (bench_epoch.py runs asen.main as a command)."""
    sources = glob.glob(os.path.join(ROOT, 'lib', '*.py')) + glob.glob(os.path.join(ROOT, 'benchmarks', '*.py')) \
        + [os.path.join(ROOT, name) for name in ('reproduce.py', 'pretrain.py', 'model.py', 'utils.py')]
    importers = []
    for path in sources:
        if path.endswith('bench_epoch.py'):
            continue
        for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if 'asen' in names:
                importers.append(os.path.relpath(path, ROOT))
    assert len(sources) > 20 and importers == []


def preset_amp(*extra):
    return config.from_flags(['--dataset', 'SynthFashion', *extra]).amp


def test_preset_precision_on_the_cpu_follows_its_bf16_kernels(monkeypatch):
    cpu_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert preset_amp('--no-cuda') == ('bf16' if cpu_bf16 else 'off')
    for has_bf16, amp in ((True, 'bf16'), (False, 'off')):
        monkeypatch.setattr(runtime, 'cpu_has_bf16', lambda: has_bf16)
        assert preset_amp('--no-cuda') == amp


def test_preset_precision_on_cuda_asks_the_gpu_and_obeys_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for gpu_bf16, cpu_bf16 in ((True, False), (False, True)):
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: gpu_bf16)
        monkeypatch.setattr(runtime, 'cpu_has_bf16', lambda: cpu_bf16)
        assert preset_amp() == ('bf16' if gpu_bf16 else 'off')                # the GPU's answer
        assert preset_amp('--no-cuda') == ('bf16' if cpu_bf16 else 'off')     # the CPU's, with --no-cuda
    assert preset_amp('--amp', 'fp16') == 'fp16'


# ----------------------------------------------------------------------------- torch version

def test_too_old_torch_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch, '__version__', '2.3.1+cu121')
    assert asen.main(['--dataset', 'SynthFashion']) == 2
    assert pretrain.main(['--out', 'never.pth']) == 2
    for err in capsys.readouterr().err.splitlines():
        assert err.startswith('error: torch 2.3.1+cu121 is too old') and 'torch >= 2.4' in err
    for version in ('2.4.0', '2.4.0a0+git1234', '2.14.1', '3.0'):
        runtime.check_torch_version(version)


# ----------------------------------------------------------------------------- runs: --visdom, run folder, heatmaps

def test_visdom_draws_the_attention_every_epoch_unless_told_otherwise():
    """The original's --visdom plotted each epoch's attention; TensorBoard gets it here."""
    for argv, every in (([], 0), (['--visdom'], 1), (['--visdom', '--heatmap-every', '3'], 3),
                        (['--visdom', '--heatmap-every', '0'], 0)):
        assert config.from_flags(argv).heatmap_every == every, argv


def test_heatmap_due():
    assert [e for e in range(1, 8) if commands.heatmap_due(e, 3, 7)] == [3, 6, 7]
    assert [e for e in range(1, 4) if commands.heatmap_due(e, 1, 3)] == [1, 2, 3]
    assert not any(commands.heatmap_due(e, 0, 5) for e in range(1, 6))


@pytest.fixture()
def synth_copy(tiny_data, workdir):
    """The tiny SynthFashion data in a fresh working directory (nothing to generate)."""
    private_copy(tiny_data, workdir / 'data')
    return workdir


def heatmap_files(run):
    return sorted(p.name for p in (run / 'heatmaps').glob('valid_epoch*.png')) if (run / 'heatmaps').is_dir() else []


@pytest.mark.slow
def test_heatmap_every_decides_which_epochs_draw_and_visdom_is_accepted(synth_copy, monkeypatch, capsys):
    monkeypatch.setattr(engine, 'train_one_epoch', lambda *args, **kwargs: {'train_loss': 0.0, 'train_acc': 0.0})   # evaluation only
    assert asen.main(TINY + ['--epochs', '3', '--heatmap-every', '2', '--name', 'every2', '--visdom']) == 0
    assert heatmap_files(synth_copy / 'runs' / 'every2') == ['valid_epoch002.png', 'valid_epoch003.png']
    out = capsys.readouterr().out
    assert out.count('--visdom: curves and attention go to TensorBoard here: tensorboard --logdir runs') == 1
    assert 'writing to runs/every2/\n' in out
    assert asen.main(TINY + ['--epochs', '1', '--heatmap-every', '0', '--name', 'every0']) == 0
    assert heatmap_files(synth_copy / 'runs' / 'every0') == []                  # not even the last epoch
    assert '--visdom' not in capsys.readouterr().out


def test_the_log_names_the_run_folder_a_resume_writes_to(trained_copy, capsys):
    root, run = trained_copy                          # --test writes into the run folder: a copy
    assert asen.main(['--test', '--resume', str(run / 'checkpoint.pth.tar'), '--visdom']) == 0
    out = capsys.readouterr().out
    assert 'writing to runs/shared/ (--name from the --resume checkpoint)' in out
    assert '--visdom: curves and attention' in out
