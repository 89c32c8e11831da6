"""The command line tells the truth: --help states each default once, the defaults are the paper's,
each flag's range, kind and role are its own (lib/flags.py), the SynthFashion preset yields to every
explicit flag and picks its precision for the device used, the resolution (lib/config.py) restores
what a checkpoint may, derives the first epoch and the results folder, and refuses settings that
cannot work together, a too-old torch is one line, the original's --visdom is accepted, and
--heatmap-every decides which epochs draw."""
import argparse
import ast
import glob
import math
import os
import re
import types

import numpy as np
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


def test_the_first_difference_named_is_the_plainest():
    """Of several settings that differ, the dataset, the model, the stage, the backbone come first,
    in that order, then the rest by name."""
    args = config.from_flags([])
    saved = {**args.as_dict(), 'lr': 0.5, 'batch_size': 8, 'backbone': 'resnet18', 'stage': 2, 'model': 'ASENpp',
             'dataset': 'DARN', 'workers': 3}
    for expected in ('dataset', 'model', 'stage', 'backbone', 'batch_size', 'lr'):
        assert flags.first_difference(args, saved) == (expected, saved[expected], getattr(args, expected))
        saved[expected] = getattr(args, expected)
    assert flags.first_difference(args, saved) is None                  # --workers does not shape the weights


# The defaults: the paper's training (Adam at 1e-4, margin 0.2, 1024-d embeddings, batches of 16
# triplets of 224 px, 100000 triplets an epoch, 200 epochs, StepLR every epoch by 0.985), ASEN++'s
# (threshold 0.1, beta 0.6, 1e-5 for the global branch, local and alignment weights 0.1), CSN's
# regularisers' weights, and the rest off or unset.
DEFAULTS = {
    'dataset': 'FashionAI', 'data_path': 'data', 'img_size': 224, 'num_triplets': 100000, 'synth_images': 2000,
    'skip_bad_images': False, 'check_data': False, 'workers': None, 'allow_large_images': False,
    'cache_images': False, 'model': 'ASENet', 'backbone': 'resnet50', 'pretrained': True, 'backbone_weights': None,
    'dim_embed': 1024, 'csn_fixed_masks': False, 'csn_reg': False, 'csn_embed_weight': 5e-3,
    'csn_mask_weight': 5e-4, 'stage': None, 'local_backbone': 'resnet34', 'local_size': None, 'threshold': 0.1,
    'beta': 0.6, 'local_crop': 'original', 'epochs': 200, 'start_epoch': 1, 'batch_size': 16,
    'eval_batch_size': 64, 'lr': 1e-4, 'step_size': 1, 'decay_rate': 0.985, 'margin': 0.2, 'lr_global': 1e-5,
    'local_weight': 0.1, 'align_weight': 0.1, 'seed': 1, 'amp': 'off', 'tf32': None, 'channels_last': False,
    'compile': False, 'compile_mode': 'default', 'concat_forward': False, 'sync_bn': False, 'name': 'ASEN',
    'resume': None, 'checkpoint_every': '5m', 'overwrite': False, 'test': False, 'no_cuda': False,
    'log_interval': 400, 'heatmap_every': 0, 'visdom': False, 'visualize': False, 'report': False,
    'retrieve': None, 'attribute': None, 'topk': 10, 'gallery': None, 'collect': None, 'collect_out': None,
    'collect_by': 'model'}


def test_the_defaults_are_the_papers():
    parsed = vars(asen.get_args_parser().parse_args([]))
    assert parsed == DEFAULTS
    assert all(type(parsed[k]) is type(v) for k, v in DEFAULTS.items())          # 1e-4, not 1; None, not 0
    assert all(rule.default == DEFAULTS[dest] for dest, rule in flags.RULES.items() if rule.default is not None)
    assert config.from_flags([]).as_dict() == DEFAULTS                           # no step changes a default
    assert flags.RULES['stage'].choices == (1, 2) and asen.get_args_parser().parse_args(['--stage', '1']).stage == 1


# Each ranged flag: (values accepted, values refused), its bounds and one past each.
RANGES = {
    'img_size': ([32, 4096], [31, 4097]), 'num_triplets': ([1, 100_000_000], [0, 100_000_001]),
    'synth_images': ([40, 10_000_000], [39, 10_000_001]), 'workers': ([0, 256], [-1, 257]),
    'dim_embed': ([1, 65536], [0, 65537]), 'local_size': ([1, 4096], [0, 4097]),
    'epochs': ([1, 100_000], [0, 100_001]), 'start_epoch': ([1, 10**9], [0]),
    'batch_size': ([1, 65536], [0, 65537]), 'eval_batch_size': ([1, 65536], [0, 65537]),
    'step_size': ([1], [0]), 'seed': ([0, 2**63 - 1], [-1, 2**63]), 'log_interval': ([1], [0]),
    'heatmap_every': ([0], [-1]), 'topk': ([1], [0]),
    'csn_embed_weight': ([0.0, 1e-9], [-1e-9, math.inf]), 'csn_mask_weight': ([0.0, 1e-9], [-1e-9, math.nan]),
    'threshold': ([1e-9, 0.5, 1 - 1e-9], [0.0, 1.0]), 'beta': ([0.0, 1.0], [-1e-9, 1 + 1e-9]),
    'lr': ([1e-9, 0.5, 1.5], [0.0, -1e-9]), 'lr_global': ([1e-9, 0.5, 1.5], [0.0]),
    'margin': ([1e-9, 0.5, 1.5], [0.0]), 'decay_rate': ([1e-9, 1.0], [0.0, 1 + 1e-9]),
    'local_weight': ([0.0, 1e-9, 2.0], [-1e-9]), 'align_weight': ([0.0, 1e-9, 2.0], [-1e-9]),
    'name': (['ASEN', 'a.b', '...'], ['', '.', '..', 'a/b', '/abs', 'a\0b']),
    **{dest: (['x', '.'], ['']) for dest in ('data_path', 'backbone_weights', 'resume', 'retrieve', 'attribute',
                                              'gallery', 'collect_out')},
}


def test_each_flags_range_has_its_bounds():
    """Each bound is in, one past it is out: on the command line (argparse's type=) and for a
    value restored from a checkpoint (`accepts`)."""
    ranged = {dest: rule.range for dest, rule in flags.RULES.items() if rule.range is not None}
    assert set(ranged) == set(RANGES)
    for dest, (good, bad) in RANGES.items():
        rng = ranged[dest]
        for value in good:
            assert rng.accepts(value) and rng(str(value)) == value, (dest, value)
        for value in bad:
            assert not rng.accepts(value), (dest, value)
            with pytest.raises(argparse.ArgumentTypeError):
                rng(str(value))
    assert flags.RULES['seed'].range.allowed == 'a whole number from 0 to 2**63-1'


def test_a_restored_value_of_another_kind_is_refused():
    """A checkpoint's 'img_size': 64.0, 'lr': 'fast' or 'pretrained': 'yes' is damage, not a setting:
    refused by name, also where the value would pass the range's comparison (True for a whole number)."""
    for dest, value, words in (('img_size', 64.0, 'a whole number'), ('img_size', '64', 'a whole number'),
                               ('epochs', True, 'a whole number'), ('lr', 'fast', 'a number'),
                               ('lr', False, 'a number'), ('pretrained', 'yes', 'true or false'),
                               ('name', 7, 'a string'), ('collect', ['a', 1], 'a list of strings'),
                               ('amp', 'fp8', 'one of off, bf16, fp16'), ('stage', 3, 'one of 1, 2'),
                               ('img_size', None, 'a whole number')):
        draft = config.Draft(vars(asen.get_args_parser().parse_args([])), ())
        draft.set(dest, value, '--resume old.pth.tar')
        with pytest.raises(utils.UserError, match=rf'^{flag_re(dest)} .* \(from --resume old.pth.tar\): must be {words}'):
            draft.freeze({dest}, 'old.pth.tar')
    draft = config.Draft({**DEFAULTS, 'pretrained': 'yes'}, ())
    with pytest.raises(utils.UserError, match='--pretrained'):           # past a restored flag left unset
        draft.freeze({'attribute', 'pretrained'}, 'old.pth.tar')
    restored = config.Draft({**DEFAULTS, 'amp': 'bf16', 'stage': 2, 'collect_by': 'run'}, ())
    assert restored.freeze(set(DEFAULTS), 'old.pth.tar').amp == 'bf16'       # each of its kind and choices
    for whole_value in (0, 7, 2**63):
        assert flags.KIND_TESTS['int'](whole_value) and flags.KIND_TESTS['float'](whole_value)
    for other in (True, False, 2.0, '2', None):
        assert not flags.KIND_TESTS['int'](other), other
    for other in (True, '2.0', None):
        assert not flags.KIND_TESTS['float'](other), other


def flag_re(dest):
    return re.escape(flags.flag_name(dest))


def test_checkpoint_every_takes_fractions_of_a_minute():
    assert flags.parse_interval('0.5m') == (None, 30.0) and flags.parse_interval(' 2m ') == (None, 120.0)
    assert flags.checkpoint_interval('0.5m') == '0.5m'
    for bad in ('-1m', 'infm', 'nanm', '-3', 'm'):
        with pytest.raises(ValueError):
            flags.parse_interval(bad)


# ----------------------------------------------------------------------------- the resolution (lib/config.py)

def settings(**changes):
    return {**DEFAULTS, **changes}


@pytest.mark.parametrize('changes, explicit, needle', [
    (dict(start_epoch=4, epochs=3), (), '--start_epoch 4: must be from 1 to --epochs (3)'),
    (dict(topk=3), ('topk',), '--topk applies only with --retrieve'),
    (dict(attribute='colour'), ('attribute',), '--attribute applies only with --retrieve'),
    (dict(csn_reg=True), (), '--csn-reg applies only to --model ConditionalSimNet'),
    (dict(csn_fixed_masks=True, model='ASENpp'), (), '--csn-fixed-masks applies only to --model ConditionalSimNet'),
    (dict(model='ConditionalSimNet', csn_mask_weight=0.1), ('csn_mask_weight',), '--csn-mask-weight applies only with --csn-reg'),
    (dict(test=True), (), '--test needs --resume'),
    (dict(report=True), (), '--report needs --resume'),
    (dict(retrieve='q.jpg', resume='m.pth'), (), '--retrieve needs --attribute'),
    (dict(cache_images=True, dataset='Zappos50k'), (), '--cache-images is not available for Zappos50k'),
    (dict(visualize=True, resume='m.pth', dataset='Zappos50k'), (), '--visualize is not available for Zappos50k'),
])
def test_settings_that_cannot_work_together_are_refused(changes, explicit, needle):
    with pytest.raises(utils.UserError) as refused:
        config.check_values(settings(**changes), frozenset(explicit))
    assert needle in str(refused.value)


@pytest.mark.parametrize('changes, explicit', [
    (dict(start_epoch=3, epochs=3), ()),
    (dict(retrieve='q.jpg', attribute='colour', topk=3, resume='m.pth'), ('retrieve', 'attribute', 'topk')),
    (dict(model='ConditionalSimNet', csn_reg=True, csn_fixed_masks=True, csn_embed_weight=0.1),
     ('model', 'csn_reg', 'csn_fixed_masks', 'csn_embed_weight')),
    (dict(test=True, report=True, visualize=True, resume='m.pth'), ()),
    (dict(dataset='Zappos50k', test=True, resume='m.pth'), ()),
    (dict(cache_images=True), ()),
])
def test_settings_that_work_together_are_accepted(changes, explicit):
    config.check_values(settings(**changes), frozenset(explicit))


def test_visualize_and_retrieve_are_refused_under_torchrun_only(monkeypatch):
    for changes in (dict(visualize=True), dict(retrieve='q.jpg', attribute='colour')):
        config.check_values(settings(resume='m.pth', **changes), frozenset())
        monkeypatch.setattr(runtime, 'distributed', lambda: True)
        with pytest.raises(utils.UserError, match='without torchrun'):
            config.check_values(settings(resume='m.pth', **changes), frozenset())
        monkeypatch.setattr(runtime, 'distributed', lambda: False)
    monkeypatch.setattr(runtime, 'distributed', lambda: True)
    config.check_values(settings(test=True, resume='m.pth'), frozenset())


def test_collect_takes_only_its_own_flags():
    args = config.from_flags(['--collect', 'a', 'b', '--collect-by', 'run'])
    assert args.collect == ['a', 'b'] and args.collect_by == 'run' and args.explicit == {'collect', 'collect_by'}
    with pytest.raises(utils.UserError, match=r'^--lr does not apply with --collect'):
        config.from_flags(['--collect', 'a', '--lr', '0.5'])


def test_training_is_anything_but_test_report_visualize_retrieve():
    plain = dict(test=False, report=False, visualize=False, retrieve=None)
    assert config.is_training(types.SimpleNamespace(**plain))
    for flag, value in (('test', True), ('report', True), ('visualize', True), ('retrieve', 'q.jpg')):
        assert not config.is_training(types.SimpleNamespace(**{**plain, flag: value})), flag


def draft_of(argv):
    return config.Draft(vars(asen.get_args_parser().parse_args(argv)), flags.given_flags(argv))


def test_a_checkpoint_restores_the_flags_not_given_except_this_invocations():
    draft = draft_of(['--lr', '0.5', '--resume', 'old.pth'])
    saved = {'lr': 0.1, 'margin': 0.3, 'name': 'old', 'epochs': 9, 'workers': 7, 'test': True, 'resume': 'x',
             'visdom_port': 8097}
    assert config.restore_from_checkpoint(draft, {'args': saved}, 'step') == {'margin', 'name', 'epochs'}
    assert (draft.lr, draft.margin, draft.name, draft.epochs) == (0.5, 0.3, 'old', 9)
    assert (draft.workers, draft.test, draft.resume) == (None, False, 'old.pth') and 'visdom_port' not in vars(draft)
    assert draft.describe() == ['step: --margin 0.3, --name old, --epochs 9']
    for no_settings in ({'state_dict': {}}, {'args': ['lr', 0.1]}, ['args']):
        draft = draft_of([])
        assert config.restore_from_checkpoint(draft, no_settings, 'step') == set() and draft.notes == []


def test_the_authors_layout_sets_only_what_it_tells():
    draft = draft_of(['--dim_embed', '64'])
    config.adopt_original_settings(draft, {'model': 'ASENet_V2', 'backbone': None, 'dim_embed': 512, 'stage': None},
                                   'layout')
    assert (draft.model, draft.backbone, draft.dim_embed, draft.stage) == ('ASENet_V2', 'resnet50', 64, None)


def test_a_resumed_run_starts_after_the_checkpoints_epoch():
    for epoch, start in ((3, 4), (4, 5), (np.int64(3), 4), (0, 1), (None, 1)):
        draft = draft_of(['--epochs', '5'])
        config.derive(draft, {'epoch': epoch}, starts_stage2=False)
        assert draft.start_epoch == start and type(draft.start_epoch) is int, epoch
    draft = draft_of(['--epochs', '5'])
    config.derive(draft, {}, starts_stage2=False)
    assert draft.start_epoch == 1
    draft = draft_of(['--epochs', '5'])
    config.derive(draft, {'epoch': 4}, starts_stage2=True)             # ASEN++ stage 2 starts at epoch 1
    assert draft.start_epoch == 1
    draft = draft_of(['--epochs', '5', '--start_epoch', '2'])
    config.derive(draft, {'epoch': 4}, starts_stage2=False)            # given: it wins
    assert draft.start_epoch == 2
    draft = draft_of(['--epochs', '5', '--test', '--resume', 'm.pth'])
    config.derive(draft, {'epoch': 4}, starts_stage2=False)            # not training: no first epoch
    assert draft.start_epoch == 1
    draft = draft_of(['--epochs', '5', '--resume', 'm.pth'])
    with pytest.raises(utils.UserError, match=r'already finished epoch 5 and --epochs is 5'):
        config.derive(draft, {'epoch': 5}, starts_stage2=False)


def test_a_file_outside_runs_names_the_results_folder_when_used_and_no_name_is_given():
    def name(argv):
        draft = draft_of(argv)
        config.name_after_checkpoint(draft, 'step')
        return draft.name
    assert name(['--test', '--resume', 'downloads/theirs.pth.tar']) == 'theirs'
    assert name(['--visualize', '--resume', 'downloads/fashionai/model_best.pth.tar']) == 'fashionai-model_best'
    assert name(['--test', '--resume', 'downloads/theirs.pth.tar', '--name', 'mine']) == 'mine'
    assert name(['--resume', 'downloads/theirs.pth.tar']) == 'ASEN'                    # training: its run's name
    assert name(['--test', '--resume', 'runs/shared/model_best.pth.tar']) == 'ASEN'     # a run folder's file
    assert name(['--test', '--resume', 'auto']) == 'ASEN'
    assert name(['--test']) == 'ASEN'


def test_resume_auto_continues_training_only(workdir):
    args = config.from_flags(['--resume', 'auto', '--name', 'fresh'])            # runs/fresh/ holds no snapshot
    assert args.resume is None and args.name == 'fresh'
    for use in (['--test'], ['--visualize'], ['--report'], ['--retrieve', 'q.jpg', '--attribute', 'colour']):
        with pytest.raises(utils.UserError, match='^--resume auto continues a training run'):
            config.from_flags(['--resume', 'auto', *use])
    with pytest.raises(utils.UserError, match='^--overwrite with --resume auto'):
        config.from_flags(['--resume', 'auto', '--overwrite'])
    assert not os.path.exists('runs')


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
