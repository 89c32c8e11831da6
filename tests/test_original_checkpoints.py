"""Checkpoints saved by the authors' code load through --resume and give their embeddings."""
import json

import pytest
import torch

import asen
import datasets
import model as models
import original_networks as orig
import utils
from utils import UserError
from lib import checkpoints, commands, evaluation
from helpers import private_copy, tiny_net, tiny_tnet

KINDS = ['ASENet', 'ASENet_V2', 'ConditionalSimNet']
# the tiny SynthFashion of tests/conftest.py's TINY, without the training flags
DATA = ['--dataset', 'SynthFashion', '--synth-images', '48', '--img-size', '64', '--amp', 'off']


def load_like_asen(path, argv):
    """Our network from `path`, through the steps asen.py takes for --resume."""
    resolved = asen.resolve_configuration(argv + ['--test', '--resume', str(path)])
    args, checkpoint, info = resolved.args, resolved.checkpoint, resolved.original
    tnet = commands.build_network(args, info['n_attributes'], torch.device('cpu'), imagenet=False)
    checkpoints.load_weights(tnet, checkpoint, args.resume)
    return tnet.eval(), args, info


@pytest.mark.parametrize('kind', KINDS)
def test_original_state_dict_converts(kind):
    state = orig.build(kind, 4).state_dict()
    info, converted = checkpoints.convert_original_state_dict(state)
    assert info['model'] == kind and info['backbone'] == 'resnet18' and info['n_attributes'] == 4
    assert info['dim_embed'] == (None if kind == 'ASENet_V2' else 16)
    assert not any(k.startswith(('embeddingnet.backbonenet.', 'embeddingnet.embeddingnet.')) for k in converted)
    assert not any('.fc.' in k or 'layer4' in k for k in converted if k.startswith('embeddingnet.backbone.'))
    assert any('layer4' in k for k in state) == (kind == 'ConditionalSimNet')
    ours = tiny_net(kind, 4, seed=None)
    assert set(converted) == {'embeddingnet.' + k for k in ours.state_dict()}
    # our own checkpoints are not in the original layout
    assert checkpoints.convert_original_state_dict(models.TripletWrapper(ours).state_dict()) is None


def test_conversion_handles_dataparallel_and_depth():
    state = {'module.' + k: v for k, v in orig.build('ASENet', 3, depth=50).state_dict().items()}
    info, converted = checkpoints.convert_original_state_dict(state)
    assert info['backbone'] == 'resnet50' and info['model'] == 'ASENet'
    assert 'embeddingnet.asa.attr_proj.weight' in converted
    info, _ = checkpoints.convert_original_state_dict(orig.build('ASENet_V2', 3, depth=34).state_dict())
    assert info['backbone'] == 'resnet34'


@pytest.mark.parametrize('kind', KINDS)
def test_our_embeddings_equal_the_originals(kind, tmp_path):
    original = orig.build(kind, 5, seed=3)
    path = tmp_path / 'original.pth.tar'
    orig.save(original, path)
    ours, args, info = load_like_asen(path, ['--dataset', 'SynthFashion'])
    assert (args.model, args.backbone, args.pretrained) == (kind, 'resnet18', False)
    images = torch.randn(6, 3, 64, 64)
    for attribute in range(5):
        attr = torch.full((6,), attribute)
        with torch.no_grad():
            theirs, mine = original.embeddingnet(images, attr), ours.embeddingnet(images, attr)
        assert torch.allclose(theirs, mine, atol=1e-5), (kind, attribute, (theirs - mine).abs().max())
    with torch.no_grad():   # and the embeddings do depend on the attribute, so the check has teeth
        a, b = (original.embeddingnet(images, torch.full((6,), i)) for i in (0, 1))
    assert not torch.allclose(a, b, atol=1e-3)


def test_resume_never_downloads_imagenet_weights(tmp_path, monkeypatch):
    orig.save(orig.build('ASENet_V2', 5), tmp_path / 'v2.pth.tar')

    def no_download(*args, **kwargs):
        raise AssertionError('ImageNet weights were requested')
    monkeypatch.setattr(models, '_load_imagenet_state', no_download)
    # --backbone resnet18 given and no --no-pretrained: pretrained stays True in args
    tnet, args, _ = load_like_asen(tmp_path / 'v2.pth.tar', ['--dataset', 'FashionAI', '--backbone', 'resnet18'])
    assert args.pretrained and args.model == 'ASENet_V2'


@pytest.mark.parametrize('kind', ['ASENet_V2', 'ConditionalSimNet'])
def test_cli_test_of_an_original_checkpoint_reports_its_map(kind, workdir, tiny_data):
    private_copy(tiny_data, workdir / 'data')                 # --test never generates the data
    original = orig.build(kind, 5, seed=1)
    orig.save(original, workdir / 'theirs.pth.tar', legacy=True)
    assert asen.main(['--test', '--resume', str(workdir / 'theirs.pth.tar'), '--name', 'orig'] + DATA) == 0
    result = json.loads((workdir / 'runs' / 'orig' / 'test_results.json').read_text())
    assert result['model'] == kind

    # the same mAP from the original network's embeddings of the same test split
    split = datasets.SplitFiles('data', 'SynthFashion')
    transform = datasets.build_transform(64, train=False)
    embedded = []
    for role in ('query', 'candidate'):
        dataset = datasets.RetrievalDataset(split, 'test', role, transform)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        attrs = torch.from_numpy(dataset.entries[:, 1]).long()
        with torch.no_grad():
            embedded.append((original.embeddingnet(images, attrs), dataset.entries))
    (q_emb, q_entries), (c_emb, c_entries) = embedded
    _, mean = evaluation.retrieval_map(q_emb, q_entries, c_emb, c_entries, len(split.attributes))
    assert result['MeanAP'] == pytest.approx(100 * mean, abs=1e-6)
    assert 0 < result['MeanAP'] < 100


def test_file_that_fits_no_model_is_one_clear_line(workdir, capsys, tiny_data):
    private_copy(tiny_data, workdir / 'data')                 # --test never generates the data
    # the attribute count of the file (8, like FashionAI) against SynthFashion's 5
    orig.save(orig.build('ASENet_V2', 8), workdir / 'fashionai.pth.tar')
    assert asen.main(['--test', '--resume', 'fashionai.pth.tar'] + DATA) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0
    assert 'attribute count 8 in the file' in err and 'SynthFashion has 5' in err and 'meta.json' in err

    # an original-looking file with layers of no known model
    state = orig.build('ASENet', 5).state_dict()
    state = {k.replace('mask_fc1', 'gate'): v for k, v in state.items()}
    torch.save({'epoch': 1, 'state_dict': state, 'prec': 0.1}, workdir / 'odd.pth.tar')
    assert asen.main(['--test', '--resume', 'odd.pth.tar'] + DATA) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'odd.pth.tar' in err and 'gate' in err

    # a known layout with a layer missing: the missing key is named
    state = {k: v for k, v in orig.build('ConditionalSimNet', 5).state_dict().items() if 'embed_fc.bias' not in k}
    torch.save({'epoch': 1, 'state_dict': state, 'prec': 0.1}, workdir / 'partial.pth.tar')
    assert asen.main(['--test', '--resume', 'partial.pth.tar'] + DATA) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'missing keys: embeddingnet.embed_fc.bias' in err


def test_mismatch_line_names_keys_and_shapes():
    net = tiny_tnet('TripletNet', seed=None, n_attributes=3, dim_embed=8)
    state = dict(net.state_dict())
    state['embeddingnet.embed_fc.weight'] = torch.zeros(4, 256)
    del state['embeddingnet.embed_fc.bias']
    state['embeddingnet.extra'] = torch.zeros(1)
    line = utils.state_dict_mismatch(net.state_dict(), state)
    assert 'missing keys: embeddingnet.embed_fc.bias' in line
    assert 'unexpected keys: embeddingnet.extra' in line
    assert 'embeddingnet.embed_fc.weight (4, 256) in the file vs (8, 256) here' in line
    assert utils.state_dict_mismatch(net.state_dict(), net.state_dict()) == ''
    with pytest.raises(UserError, match='layer3'):
        checkpoints.infer_backbone(['layer3.0.conv1.weight'])


def test_weights_that_do_not_fit_are_one_line_naming_the_cause():
    tnet = tiny_tnet('ASENet', n_attributes=3)
    # no attribute weights in the file: the names, not an attribute count
    with pytest.raises(UserError) as raised:
        checkpoints.load_weights(tnet, {'state_dict': {'embeddingnet.extra': torch.zeros(1)}}, 'w.pth.tar')
    line = str(raised.value)
    assert line.startswith('--resume w.pth.tar: weights do not fit --model ASENet (--backbone')
    assert 'unexpected keys: embeddingnet.extra' in line and 'attribute count' not in line
    five = tiny_tnet('ASENet', n_attributes=5).state_dict()
    with pytest.raises(UserError, match=r'^--resume w.pth.tar: attribute count 5 in the file but this dataset has 3; '
                                        r'pass the --dataset it was trained on$'):
        checkpoints.load_weights(tnet, {'state_dict': five}, 'w.pth.tar')
    with pytest.raises(UserError, match="^--resume w.pth.tar: no 'state_dict' in the file"):
        checkpoints.load_weights(tnet, {'model': five}, 'w.pth.tar')


@pytest.mark.parametrize('kind', ['ASENet', 'ASENet_noASA', 'ASENet_noACA', 'ASENet_V2', 'ConditionalSimNet'])
def test_attribute_count_of_each_network(kind):
    assert checkpoints.attribute_count(models.TripletWrapper(tiny_net(kind, 3)).state_dict()) == 3
    assert checkpoints.attribute_count({'embeddingnet.backbone.conv1.weight': torch.zeros(1)}) is None


def test_only_the_authors_files_are_renamed():
    theirs = orig.build('ASENet', 3).state_dict()
    # a file of ours (its settings saved) is never renamed, whatever its keys
    ours = {'epoch': 1, 'state_dict': dict(theirs), 'args': {'model': 'ASENet'}}
    assert checkpoints.adopt_original(ours, 'o.pth.tar') is None and list(ours['state_dict']) == list(theirs)
    assert checkpoints.adopt_original({'state_dict': tiny_tnet().state_dict()}, 'o.pth.tar') is None
    file = {'epoch': 7, 'state_dict': dict(theirs), 'prec': 0.5}
    info = checkpoints.adopt_original(file, 'o.pth.tar')
    assert (info['model'], info['n_attributes'], info['dim_embed']) == ('ASENet', 3, 16)
    tiny_tnet('ASENet', n_attributes=3).load_state_dict(file['state_dict'])
    with pytest.raises(UserError, match=r'^--resume o.pth.tar: original-code layout .* layers \(none\)'):
        checkpoints.adopt_original({'state_dict': {'embeddingnet.backbonenet.conv1.weight': torch.zeros(1)}},
                                   'o.pth.tar')
