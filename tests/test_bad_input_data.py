"""The bad-input table, continued: data that looks fine but is not, and every other entry point.

Same world and the same assertions as tests/test_bad_input.py (conftest `world`, helpers.check_case): the exit
code, exactly one 'error:' line on stderr and no traceback, the words that name the culprit, every
file there before byte-identical after, no temporary file left. Each case names the command it
runs in-process (asen.py, synthfashion.py, pretrain.py, build_fashionai.py); what only a real
process shows (a module run as a script, a named pipe that would block for ever) runs as one,
with a timeout.
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import asen
import build_fashionai
import pretrain
import synthfashion
from lib import images
from conftest import ROOT
from helpers import (BEST, NEW, RETRIEVE, SHARED, SYNTH, TEST, TINY_ZAPPOS, assert_kept, assert_one_line_error,
                     build_zappos, check_case, disk_full_on, link_or_copy, run_main, tree_hashes)

pytestmark = pytest.mark.filterwarnings('ignore:Detected call of:UserWarning')

META = f'{SYNTH}/meta.json'
PRETRAIN = ['--dataset', 'SynthFashion', '--synth-images', '48', '--img-size', '32', '--epochs', '1',
            '--no-cuda', '--out', 'trunk.pth']
ZAPPOS = TINY_ZAPPOS + ['--no-cuda']
RESULTS = 'runs/done/test_results.json'
GOOD_RESULT = {'dataset': 'SynthFashion', 'model': 'ASENet', 'attributes': ['colour', 'pattern'],
               'mAP': {'colour': 0.5, 'pattern': 0.25}, 'MeanAP': 0.4}



# ----------------------------------------------------------------------------- case set-ups

def nothing(w):
    pass


def with_bom(rel):
    def setup(w):
        w.replace(rel, b'\xef\xbb\xbf' + w.path(rel).read_bytes())
    return setup


def blank_line(rel, number):
    def setup(w):
        lines = w.lines(rel)
        lines.insert(number - 1, '')
        w.replace(rel, '\n'.join(lines) + '\n')
    return setup


def first_id(rel, digit):
    """The first field of line 1 written with `digit`, a character str.isdigit() takes."""
    def setup(w):
        fields = w.lines(rel)[0].split()
        w.edit_line(rel, 1, ' '.join([digit] + fields[1:]))
    return setup


def edit_meta(change):
    def setup(w):
        meta = json.loads(w.path(META).read_text())
        w.replace(META, json.dumps(change(meta)))
    return setup


def repeat_attribute(meta):
    names = meta['SynthFashion']['ATTRIBUTES']
    names[1] = names[0]                 # two attributes under one name
    return meta


def drop_counts(meta):
    del meta['SynthFashion']['ATTRIBUTES_NUM']
    return meta


def count_as_text(meta):
    entry = meta['SynthFashion']
    first = entry['ATTRIBUTES'][0]
    entry['ATTRIBUTES_NUM'][first] = str(entry['ATTRIBUTES_NUM'][first])
    return meta


def fifo_at(rel):
    def setup(w):
        w.path(rel).unlink()
        os.mkfifo(w.path(rel))
    return setup


def listed_image_fifo(w):
    fifo_at(w.image('train', 3))(w)


def jpeg_bomb(w):
    """A listed JPEG whose frame header claims 60000 x 60000 pixels (3.6e9: 40 times PIL's limit)."""
    rel = w.image('train', 3)
    data = bytearray(w.path(rel).read_bytes())
    at = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    data[at + 5:at + 9] = (60000).to_bytes(2, 'big') * 2
    w.replace(rel, bytes(data))


def png_bomb(w):
    """A listed image that is a 10000 x 10000 PNG of one colour (1e8 pixels, over PIL's limit of
    8.9e7): 30 kB on disk, 300 MB decoded as RGB. Refused from its header."""
    rel = w.image('valid', 0)
    w.path(rel).unlink()
    Image.new('1', (10000, 10000)).save(w.path(rel), format='PNG')


def gallery_with(make):
    def setup(w):
        w.path('gallery').mkdir()
        w.replace('gallery/a.jpg', w.path(w.image('test', 0)).read_bytes())
        make(w.path('gallery'))
    return setup


def non_utf8_name(folder):
    with open(os.path.join(os.fsencode(folder), b'caf\xe9.jpg'), 'wb') as f:
        f.write(b'x')


def fifo_named_b(folder):
    os.mkfifo(folder / 'b.jpg')


def zappos(change=nothing):
    def setup(w):
        build_zappos(w.root)
        change(w)
    return setup


def results(content):
    def setup(w):
        w.replace(RESULTS, content if isinstance(content, (str, bytes)) else json.dumps(content))
    return setup


def label_csv(content):
    def setup(w):
        w.replace('data/FashionAI/fashionAI_attributes_train1/Annotations/label.csv', content)
    return setup


# a --resume file that the code would read wrongly: old/c.pth.tar, the shared snapshot changed

OLD = 'old/c.pth.tar'
TEST_OLD = ['--test', '--resume', OLD, '--no-cuda']
RESUME_OLD = ['--resume', OLD, '--epochs', '3', '--no-cuda']


def saved(change):
    """old/c.pth.tar: the shared snapshot after `change(state)` (a value it returns replaces it)."""
    def setup(w):
        state = torch.load(w.path(SHARED), weights_only=True)
        changed = change(state)
        state = state if changed is None else changed
        w.path('old').mkdir(exist_ok=True)
        torch.save(state, w.path(OLD))
    return setup


def saved_arg(key, value):
    def change(state):
        state['args'][key] = value
    return saved(change)


def saved_field(key, value):
    def change(state):
        state[key] = value
    return saved(change)


def nan_weight(state):
    name = next(k for k, v in state['state_dict'].items() if v.is_floating_point())
    state['state_dict'][name] = state['state_dict'][name].clone().fill_(float('nan'))


def entry_not_a_tensor(state):
    state['state_dict']['embeddingnet.extra'] = 'weights'


def optimizer_lr_nan(state):
    state['optimizer']['param_groups'][0]['lr'] = float('nan')


# the run folder: what an earlier run left, and what another command would replace

def run_records(*names):
    """runs/new holds an earlier run's records (it stopped before its first snapshot)."""
    def setup(w):
        for name in names:
            w.replace(f'runs/new/{name}', w.path(f'runs/shared/{name}').read_bytes())
    return setup


def another_runs_args_json(w):
    """runs/new/args.json of a run with another --lr, stopped before its first snapshot."""
    saved = json.loads(w.path('runs/shared/args.json').read_text())
    w.replace('runs/new/args.json', json.dumps(dict(saved, lr=0.5)))


def checkpoint_further_on(w):
    """runs/long: model_best of epoch 1, checkpoint.pth.tar and metrics.jsonl at epoch 2."""
    shutil.copytree(w.path('runs/shared'), w.path('runs/long'), copy_function=link_or_copy)
    state = torch.load(w.path(SHARED), weights_only=True)
    state['epoch'] = 2
    w.path('runs/long/checkpoint.pth.tar').unlink()
    torch.save(state, w.path('runs/long/checkpoint.pth.tar'))
    first = w.lines('runs/long/metrics.jsonl')[0]
    w.replace('runs/long/metrics.jsonl', first + '\n' + first.replace('"epoch": 1', '"epoch": 2') + '\n')


def damaged_synth_settings(w):
    w.replace(f'{SYNTH}/settings.json', '{not json')


def results_of_another_model(w):
    w.replace('runs/other/test_results.json', json.dumps(dict(GOOD_RESULT, checkpoint='elsewhere/model.pth.tar')))


def chained_disk_full(message):
    """torch.save's error on a real full disk: a RuntimeError raised from the ENOSPC."""
    error = RuntimeError(message)
    error.__cause__ = OSError(errno.ENOSPC, 'No space left on device')
    return disk_full_on('save', error)


def stage1_with_attributes(n_attributes):
    """old/s1.pth.tar: a stage-1 ASENpp snapshot of the tiny settings with `n_attributes` attributes."""
    def setup(w):
        from conftest import TINY
        from lib import commands, config
        args = config.from_flags(TINY + ['--model', 'ASENpp', '--stage', '1', '--no-cuda'])
        tnet = commands.build_network(args, n_attributes, torch.device('cpu'), imagenet=False)
        w.path('old').mkdir(exist_ok=True)
        torch.save({'epoch': 1, 'state_dict': tnet.state_dict(), 'args': args.as_dict()}, w.path('old/s1.pth.tar'))
    return setup


def run_from(folder):
    """The command runs from `folder` (made), a relative data_path then points elsewhere."""
    def setup(w):
        w.path(folder).mkdir()
        w.mp.chdir(w.path(folder))
    return setup


def no_attributes(meta):
    meta['SynthFashion']['ATTRIBUTES'], meta['SynthFashion']['ATTRIBUTES_NUM'] = [], {}
    return meta


def file_at_cache_folder(w):
    w.replace(f'{SYNTH}/cache', 'not a folder')


# ----------------------------------------------------------------------------- the table

def case(name, argv, needles, setup=nothing, code=2, command=asen.main, allow=(), absent=()):
    """`allow`: log files that may grow (the command logs before it stops), as in test_bad_input;
    `absent`: words the line must not hold (the misleading ones it held before)."""
    return pytest.param(command, argv, setup, needles, code, allow, absent, id=name)


ZLIST = 'data/Zappos50k/tripletlists/heel_tripletlist_train.txt'
ZNAMES = 'data/Zappos50k/filenames.json'
LABEL_CSV_ROW = 'Images/skirt_length_labels/a.jpg,skirt_length_labels,nynnnn\n'
CASES = [
    # a UTF-8 byte-order mark: an invisible character glued to the first path or id
    case('bom-filenames', NEW, ['filenames_train.txt:1', 'BOM', 'without a BOM'],
         with_bom(f'{SYNTH}/filenames_train.txt')),
    case('bom-label-file', NEW, ['label_train.txt:1', 'BOM'], with_bom(f'{SYNTH}/label_train.txt')),
    case('bom-query-file', NEW, ['query_valid.txt:1', 'BOM'], with_bom(f'{SYNTH}/query_valid.txt')),
    case('bom-candidate-test', TEST, ['candidate_test.txt:1', 'BOM'], with_bom(f'{SYNTH}/candidate_test.txt')),
    case('bom-meta-json', NEW, ['meta.json:1', 'BOM'], with_bom(META)),
    case('bom-zappos-triplet-list', ZAPPOS, ['heel_tripletlist_train.txt:1', 'BOM'], zappos(with_bom(ZLIST))),
    case('bom-zappos-filenames', ZAPPOS, ['filenames.json:1', 'BOM'], zappos(with_bom(ZNAMES))),
    # blank lines: named by file and line (in a filenames file one would shift every later id)
    case('blank-line-in-label-file', NEW, ['label_train.txt:3', 'blank line'],
         blank_line(f'{SYNTH}/label_train.txt', 3)),
    case('blank-line-in-query-file', NEW, ['query_valid.txt:2', 'blank line'],
         blank_line(f'{SYNTH}/query_valid.txt', 2)),
    case('blank-line-in-candidate-test', TEST, ['candidate_test.txt:4', 'blank line'],
         blank_line(f'{SYNTH}/candidate_test.txt', 4)),
    case('blank-line-in-zappos-filenames', ZAPPOS + ['--skip-bad-images'], ['filenames.json:3', 'blank line'],
         zappos(blank_line(ZNAMES, 3))),
    case('blank-line-in-zappos-triplet-list', ZAPPOS, ['heel_tripletlist_train.txt:2', 'blank line'],
         zappos(blank_line(ZLIST, 2))),
    # meta.json: the shape, and one name per attribute (scores are reported by name)
    case('meta-json-repeated-attribute', NEW, ['meta.json', 'twice', 'own name'], edit_meta(repeat_attribute)),
    case('meta-json-a-list', NEW, ['meta.json', 'JSON list'], edit_meta(lambda meta: [meta])),
    case('meta-json-a-string', NEW, ['meta.json', 'JSON str'], edit_meta(lambda meta: 'SynthFashion')),
    case('meta-json-no-counts', NEW, ['meta.json', 'ATTRIBUTES_NUM'], edit_meta(drop_counts)),
    case('meta-json-count-as-text', NEW, ['meta.json', 'not a positive integer'], edit_meta(count_as_text)),
    case('meta-json-entry-a-list', NEW, ['meta.json', "entry 'SynthFashion' needs"],
         edit_meta(lambda meta: {'SynthFashion': [1, 2]})),
    # ids in digits other than ASCII 0-9 (str.isdigit() takes them; int() takes some)
    case('superscript-digit-id', NEW, ['query_valid.txt:1', 'ASCII digits'],
         first_id(f'{SYNTH}/query_valid.txt', '\u00b2')),
    case('arabic-indic-digit-id', NEW, ['label_train.txt:1', 'ASCII digits'],
         first_id(f'{SYNTH}/label_train.txt', '\u0663')),
    case('fullwidth-digit-id', TEST, ['candidate_test.txt:1', 'ASCII digits'],
         first_id(f'{SYNTH}/candidate_test.txt', '\uff11')),
    case('arabic-indic-digit-zappos', ZAPPOS, ['heel_tripletlist_train.txt:1', 'ASCII digits'],
         zappos(first_id(ZLIST, '\u0661'))),
    # decompression bombs: named, with the way out
    case('jpeg-decompression-bomb', NEW, ['000003.jpg', 'decompression bomb', '--allow-large-images'], jpeg_bomb),
    case('png-decompression-bomb', NEW, ['decompression bomb', '--allow-large-images'], png_bomb),
    # names that are not UTF-8, named pipes where a file should be
    case('gallery-name-not-utf8', RETRIEVE + ['--gallery', 'gallery'], ['--gallery', 'caf\\xe9.jpg', 'not UTF-8'],
         gallery_with(non_utf8_name)),
    case('filenames-file-is-a-fifo', NEW, ['filenames_valid.txt', 'named pipe'],
         fifo_at(f'{SYNTH}/filenames_valid.txt')),
    case('meta-json-is-a-fifo', NEW, ['meta.json', 'named pipe'], fifo_at(META)),
    case('listed-image-is-a-fifo', NEW, ['000003.jpg', 'named pipe'], listed_image_fifo),
    # --collect of a damaged test_results.json
    case('collect-results-not-json', ['--collect', 'runs/done'], ['test_results.json', 'not valid JSON'],
         results('{"mAP": ')),
    case('collect-results-a-list', ['--collect', 'runs/done'], ['test_results.json', 'not a test result'],
         results([GOOD_RESULT])),
    case('collect-score-not-a-number', ['--collect', 'runs/done'], ['test_results.json', "mAP['colour']"],
         results(dict(GOOD_RESULT, mAP={'colour': 'high', 'pattern': 0.25}))),
    case('collect-meanap-null', ['--collect', 'runs/done'], ['test_results.json', 'MeanAP is None'],
         results(dict(GOOD_RESULT, MeanAP=None))),
    case('collect-attributes-mismatch', ['--collect', 'runs/done'], ['test_results.json', "'attributes'"],
         results(dict(GOOD_RESULT, attributes=['colour']))),
    case('collect-scored-not-a-share', ['--collect', 'runs/done'], ['test_results.json', "'scored'", 'share'],
         results(dict(GOOD_RESULT, scored={'share': 'most'}))),
    case('collect-results-bom', ['--collect', 'runs/done'], ['test_results.json:1', 'BOM'],
         results(b'\xef\xbb\xbf' + json.dumps(GOOD_RESULT).encode())),
    # synthfashion.py
    case('synth-seed-negative', ['out', '--seed', '-1'], ['--seed -1', 'from 0'], command=synthfashion.main),
    case('synth-image-size-8', ['out', '--image-size', '8'], ['--image-size 8', 'from 32 to 4096'],
         command=synthfashion.main),
    case('synth-n-valid-3', ['out', '--n-valid', '3'], ['--n-valid 3', '>= 10'], command=synthfashion.main),
    case('synth-n-train-zero', ['out', '--n-train', '0'], ['--n-train 0', '>= 10'], command=synthfashion.main),
    case('synth-not-a-number', ['out', '--n-test', 'many'], ['--n-test', 'invalid int'], command=synthfashion.main),
    case('synth-no-out-dir', [], ['out_dir', 'required'], command=synthfashion.main),
    case('synth-out-dir-empty', [''], ['OUT_DIR is empty'], command=synthfashion.main),
    case('synth-unknown-flag', ['out', '--size', '64'], ['--size'], command=synthfashion.main),
    case('synth-over-a-folder-not-ours', ['runs/shared'], ['runs/shared', 'not replaced'], command=synthfashion.main),
    # pretrain.py: --out never replaces a file unasked; ranges before anything is read
    case('pretrain-out-over-model-best', PRETRAIN[:-1] + [BEST], ['--out', 'model_best.pth.tar', 'already exists',
                                                                 '--overwrite'], command=pretrain.main),
    case('pretrain-out-a-folder', PRETRAIN[:-1] + ['runs/shared'], ['--out runs/shared', 'is a folder'],
         command=pretrain.main),
    case('pretrain-out-empty', PRETRAIN[:-1] + [''], ['--out is empty'], command=pretrain.main),
    case('pretrain-lr-nan', PRETRAIN + ['--lr', 'nan'], ['--lr nan', 'finite'], command=pretrain.main),
    case('pretrain-img-size-8', PRETRAIN + ['--img-size', '8'], ['--img-size 8', '>= 32'], command=pretrain.main),
    case('pretrain-seed-negative', PRETRAIN + ['--seed', '-3'], ['--seed -3', 'from 0'], command=pretrain.main),
    case('pretrain-workers-negative', PRETRAIN + ['--workers', '-1'], ['--workers -1', '>= 0'], command=pretrain.main),
    case('pretrain-synth-images-small', PRETRAIN + ['--synth-images', '12'], ['--synth-images 12', '>= 40'],
         command=pretrain.main),
    case('pretrain-unknown-flag', PRETRAIN + ['--learning-rate', '1'], ['--learning-rate', 'pretrain.py --help'],
         command=pretrain.main),
    case('pretrain-no-out', PRETRAIN[:-2], ['--out', 'required'], command=pretrain.main),
    case('pretrain-bad-backbone', PRETRAIN + ['--backbone', 'vgg'], ['--backbone', 'vgg'], command=pretrain.main),
    # build_fashionai.py
    case('build-seed-negative', ['--root', 'data/FashionAI', '--seed', '-1'], ['--seed -1', 'from 0'],
         label_csv(LABEL_CSV_ROW), command=build_fashionai.main),
    case('build-root-missing', ['--root', 'nowhere'], ['nowhere', 'folder not found'], command=build_fashionai.main),
    case('build-root-empty', ['--root', ''], ['--root is empty'], command=build_fashionai.main),
    case('build-label-csv-bom', ['--root', 'data/FashionAI'], ['label.csv:1', 'BOM'],
         label_csv(b'\xef\xbb\xbf' + LABEL_CSV_ROW.encode()), command=build_fashionai.main),
    case('build-old-subcommand', ['build-fashionai', '--root', 'data/FashionAI'], ['build-fashionai'],
         command=build_fashionai.main),
    # checkpoints: every field the code reads is checked when loaded, and named with the file
    case('checkpoint-a-list', TEST_OLD, [OLD, 'holds a list', 'not an ASEN checkpoint'], saved(lambda s: [1, 2])),
    case('checkpoint-a-tensor', TEST_OLD, [OLD, 'holds a Tensor'], saved(lambda s: torch.zeros(3))),
    case('checkpoint-args-a-string', TEST_OLD, [OLD, "'args'", 'not a dict'], saved_field('args', 'lr=1e-4')),
    case('checkpoint-img-size-text', TEST_OLD, ["--img-size 'abc'", f'from --resume {OLD}', 'whole number'],
         saved_arg('img_size', 'abc')),
    case('checkpoint-epoch-text', RESUME_OLD, [OLD, "'epoch'", "'one'"], saved_field('epoch', 'one')),
    case('checkpoint-epoch-negative', RESUME_OLD, [OLD, "'epoch'", '>= 0'], saved_field('epoch', -4)),
    case('checkpoint-rng-malformed', RESUME_OLD, [OLD, "'rng'", 'malformed'], saved_field('rng', {'python': 3})),
    case('checkpoint-amp-fp8', TEST_OLD, ["--amp 'fp8'", f'from --resume {OLD}', 'off, bf16, fp16'],
         saved_arg('amp', 'fp8')),
    case('checkpoint-model-unknown', TEST_OLD, ["--model 'ASENet_V9'", 'from --resume', 'ASENet'],
         saved_arg('model', 'ASENet_V9')),
    case('checkpoint-dataset-unknown', TEST_OLD, ["--dataset 'ImageNet'", 'from --resume', 'SynthFashion'],
         saved_arg('dataset', 'ImageNet')),
    case('checkpoint-pretrained-text', TEST_OLD, ["--pretrained 'yes'", 'true or false'],
         saved_arg('pretrained', 'yes')),
    case('checkpoint-nan-weights-test', TEST_OLD, [OLD, 'non-finite weights', 'earlier snapshot'], saved(nan_weight)),
    case('checkpoint-nan-weights-resume', RESUME_OLD, [OLD, 'non-finite weights'], saved(nan_weight)),
    case('checkpoint-entry-not-a-tensor', TEST_OLD, [OLD, "'embeddingnet.extra'", 'not a tensor'],
         saved(entry_not_a_tensor)),
    case('checkpoint-optimizer-lr-nan', RESUME_OLD, [OLD, "optimiser's lr", 'nan'], saved(optimizer_lr_nan)),
    case('checkpoint-best-prec-text', RESUME_OLD, [OLD, "'best_prec'", "'high'"], saved_field('best_prec', 'high')),
    case('checkpoint-lr-global-inf', RESUME_OLD, ['--lr-global inf', f'from --resume {OLD}', 'finite'],
         saved_arg('lr_global', float('inf'))),
    case('checkpoint-local-weight-negative', RESUME_OLD, ['--local-weight -1', f'from --resume {OLD}', '>= 0'],
         saved_arg('local_weight', -1.0)),
    case('checkpoint-align-weight-nan', RESUME_OLD, ['--align-weight nan', f'from --resume {OLD}', 'finite'],
         saved_arg('align_weight', float('nan'))),
    # the run folder: a command only adds, or replaces with a newer version of the same run
    case('new-run-over-metrics-and-args', NEW, ['runs/new', 'metrics.jsonl', 'args.json', '--overwrite'],
         run_records('metrics.jsonl', 'args.json')),
    # args.json of the same run alone (an attempt stopped before its first snapshot) starts the run
    # again (the rule of lib/runfolder.py; tests/test_run_rule.py); another run's is refused
    case('new-run-over-another-runs-args-json', NEW, ['runs/new/args.json', 'another run', '--lr', '0.5'],
         another_runs_args_json),
    case('resume-older-model-best', ['--resume', 'runs/long/model_best.pth.tar', '--epochs', '3', '--no-cuda', '--name', 'long'],
         ['already recorded epoch 2', 'runs/long/checkpoint.pth.tar', '--name'], checkpoint_further_on),
    case('test-over-another-models-results', TEST + ['--name', 'other'],
         ['runs/other/test_results.json', 'elsewhere/model.pth.tar', '--name'], results_of_another_model),
    case('test-never-regenerates-data', TEST + ['--synth-images', '400'],
         ['--synth-images 400', 'generated with other settings', 'never (re)generates'], allow=('test.log',)),
    case('test-never-regenerates-damaged-data', TEST, ['does not hold a generated SynthFashion', 'settings.json',
                                                       'never (re)generates'], damaged_synth_settings, allow=('test.log',)),
    case('visualize-never-generates-data', ['--visualize', '--resume', BEST, '--no-cuda', '--data_path', 'fresh'],
         ['fresh/SynthFashion', 'never (re)generates'], allow=('test.log',)),
    case('retrieve-never-generates-data', RETRIEVE + ['--data_path', 'fresh'],
         ['fresh/SynthFashion', 'never (re)generates'], allow=('test.log',)),
    case('collect-out-over-a-checkpoint', ['--collect', 'runs/done', '--collect-out', BEST],
         ['--collect-out', 'model_best.pth.tar', 'already exists'], results(GOOD_RESULT)),
    case('collect-out-over-test-results', ['--collect', 'runs/done', '--collect-out', RESULTS],
         ['--collect-out', 'test_results.json', 'already exists'], results(GOOD_RESULT)),
    case('collect-out-a-folder', ['--collect', 'runs/done', '--collect-out', 'runs/shared'],
         ['--collect-out runs/shared', 'is a folder'], results(GOOD_RESULT)),
    case('pretrain-overwrite-a-snapshot', PRETRAIN[:-1] + [BEST, '--overwrite'],
         ['--out', 'model_best.pth.tar', 'does not replace'], command=pretrain.main),
    # issue 26: the remaining tracebacks and misleading lines
    case('name-not-utf8', NEW[:-1] + ['caf\udce9'], ["--name 'caf\\xe9'", 'not UTF-8', 'another --name']),
    case('stage2-from-stage1-of-other-attribute-count',
         ['--stage', '2', '--resume', 'old/s1.pth.tar', '--no-cuda', '--name', 's2', '--epochs', '1'],
         ['old/s1.pth.tar', 'attribute count 3', 'SynthFashion has 5'], stage1_with_attributes(3)),
    case('checkpoint-data-path-missing', TEST_OLD, ['gone/SynthFashion', 'not found', 'as saved in --resume',
                                                   '--data_path'], saved_arg('data_path', 'gone'),
         absent=('--synth-images',)),
    case('given-data-path-missing', TEST_OLD + ['--data_path', 'gone'], ['gone/SynthFashion', 'not found', '--data_path'],
         saved_arg('data_path', 'data'), absent=('as saved in --resume', '--synth-images')),
    case('checkpoint-relative-data-path-elsewhere', ['--test', '--resume', f'../{BEST}', '--no-cuda'],
         ['data/SynthFashion', 'not found', 'working directory', 'elsewhere', '--data_path'], run_from('elsewhere'),
         absent=('--synth-images',)),
    case('file-where-the-image-cache-folder-goes', NEW + ['--cache-images'],
         ['SynthFashion/cache', "image cache's folder", '--cache-images'], file_at_cache_folder,
         absent=('space',)),
    case('meta-json-no-attributes', NEW, ['meta.json', 'no ATTRIBUTES', 'ATTRIBUTES_NUM'], edit_meta(no_attributes),
         absent=('out of range',)),
    case('dataset-folder-not-found', ['--dataset', 'DARN', '--no-cuda', '--name', 'darn', '--epochs', '1'],
         ['data/DARN', 'not found', 'docs/datasets.md', '--data_path'], absent=('README',)),
    case('build-one-usable-row', ['--root', 'data/FashionAI'], ['label.csv', 'only 1 usable image', 'would be empty'],
         label_csv(LABEL_CSV_ROW), command=build_fashionai.main),
    # a real full disk: torch.save's RuntimeError chained on ENOSPC
    case('disk-full-unexpected-pos', ['--resume', SHARED, '--epochs', '2', '--no-cuda'],
         ['checkpoint.pth.tar', 'No space left'], chained_disk_full('[enforce fail at inline_container.cc:603] . '
                                                                    'unexpected pos 64 vs 0'),
         allow=('train.log', 'args.json')),
    case('disk-full-chained-only', ['--resume', SHARED, '--epochs', '2', '--no-cuda'],
         ['checkpoint.pth.tar', 'No space left'], chained_disk_full('[enforce fail] write error'),
         allow=('train.log', 'args.json')),
]


@pytest.mark.slow                   # the table as a whole: about a minute of in-process cases
@pytest.mark.parametrize('command, argv, setup, needles, code, allow, absent', CASES)
def test_bad_input(world, capsys, command, argv, setup, needles, code, allow, absent):
    check_case(world, capsys, command, argv, setup, needles, code, allow, absent)


def test_a_missing_dataset_makes_no_run_folder(workdir, capsys):
    """The dataset folder is looked for before runs/<name>/ is made: a mistyped --dataset or
    --data_path leaves nothing behind."""
    code, _, err = run_main(['--dataset', 'DeepFashion', '--no-cuda', '--data_path', 'nowhere'], capsys)
    assert_one_line_error(code, err, 'nowhere/DeepFashion', 'not found')
    assert not list(workdir.iterdir())


def test_the_pixel_limit_is_the_same_in_help_and_refusal(capsys):
    """--help and the refusal name the limit the code applies (PIL's MAX_IMAGE_PIXELS, refused
    above it, not PIL's error threshold of twice it)."""
    limit = Image.MAX_IMAGE_PIXELS
    help_text = ' '.join(asen.get_args_parser().format_help().split())
    assert f'{limit:,}' in help_text and f'{2 * limit:,}' not in help_text
    assert str(limit) in images.pixel_limit_problem(limit + 1, 1)
    assert images.pixel_limit_problem(limit, 1) is None


# ----------------------------------------------------------------------------- as real processes

def run_script(script, args, cwd, timeout=120):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script)] + args, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize('script, needles', [
    ('datasets.py', ['build_fashionai.py']),
    ('model.py', ['asen.py']),
    ('utils.py', ['asen.py']),
])
def test_a_module_run_as_a_script_says_so(tmp_path, script, needles):
    code, err = run_script(script, [], tmp_path)
    assert code == 2
    assert_one_line_error(code, err, f'{script} is a module, not a command', *needles)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('command, args, needles', [
    (synthfashion, ['out', '--seed', 'x'], ['--seed', 'invalid int']),
    (pretrain, ['--out', 'x', '--epochs', '0'], ['--epochs 0']),
    (build_fashionai, ['--seed', '-1'], ['--seed -1']),
], ids=['synthfashion', 'pretrain', 'build_fashionai'])
def test_commands_print_no_usage_block(workdir, capsys, command, args, needles):
    code, _, err = run_main(args, capsys, command.main)
    assert code == 2
    assert_one_line_error(code, err, *needles)
    assert not list(workdir.iterdir())


@pytest.mark.slow                   # real processes, each with a timeout
@pytest.mark.parametrize('argv, setup, needles', [
    (RETRIEVE + ['--gallery', 'gallery'], gallery_with(fifo_named_b), ['--gallery', 'b.jpg', 'named pipe']),
    (NEW, listed_image_fifo, ['000003.jpg', 'named pipe']),
], ids=['gallery', 'listed-image'])
def test_a_named_pipe_does_not_hang(world, argv, setup, needles):
    """Opening a FIFO waits for a writer for ever: it must be refused before it is opened."""
    setup(world)
    before = tree_hashes(world.root, logs=True)
    code, err = run_script('asen.py', argv, world.root, timeout=240)
    assert code == 2
    assert_one_line_error(code, err, *needles)
    assert_kept(before, tree_hashes(world.root, logs=True))


def test_large_images_load_once_allowed(tmp_path):
    """images.allow_large_images (asen.py's --allow-large-images) lifts the refusal."""
    path = tmp_path / 'big.png'
    Image.new('L', (10, 10)).save(path)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 40                     # 100 pixels: over the limit here
        assert 'decompression bomb' in images.image_problem(str(path))
        with pytest.raises(images.UserError, match='--allow-large-images'):
            images.load_image(str(path))
        images.allow_large_images(True)
        assert images.image_problem(str(path)) is None
        assert images.load_image(str(path)).size == (10, 10)
    finally:
        images.allow_large_images(False)
        Image.MAX_IMAGE_PIXELS = limit
    assert Image.MAX_IMAGE_PIXELS == images.PIL_PIXEL_LIMIT
