"""pretrain.py (supervised attribute pretraining of the trunk) and --backbone-weights."""
import numpy as np
import pytest
import torch
import torchvision

import asen
import model as models
import pretrain
import utils
from conftest import TINY

TINY_DATA = ['--dataset', 'SynthFashion', '--synth-images', '48', '--img-size', '32', '--batch-size', '8',
             '--workers', '0', '--seed', '3']


def test_label_matrix_marks_unlabelled():
    rows = np.array([[0, 1, 2], [2, 0, 1], [2, 1, 0]])
    labels = pretrain.label_matrix(rows, 4, 2)
    assert labels.tolist() == [[-1, 2], [-1, -1], [1, 0], [-1, -1]]


def test_attribute_losses_ignore_unlabelled_against_loop():
    torch.manual_seed(0)
    logits = [torch.randn(6, 3), torch.randn(6, 4)]
    labels = torch.tensor([[0, -1], [2, 3], [-1, -1], [1, 0], [1, 2], [-1, 1]])
    loss, correct, counted = pretrain.attribute_losses(logits, labels)
    expected, right = 0.0, [0, 0]
    for attr, out in enumerate(logits):
        terms = []
        for i in range(6):
            if labels[i, attr] >= 0:
                terms.append(-torch.log_softmax(out[i], 0)[labels[i, attr]])
                right[attr] += int(out[i].argmax() == labels[i, attr])
        expected += torch.stack(terms).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert counted.tolist() == [4, 4] and correct.tolist() == right


@pytest.mark.slow
def test_pretrain_learns_and_its_trunk_loads(workdir, capsys):
    out = workdir / 'trunk.pth'
    assert pretrain.main(TINY_DATA + ['--epochs', '8', '--lr', '3e-3', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    losses = [float(line.split('loss ')[1].split(',')[0]) for line in printed.splitlines() if line.startswith('epoch')]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]      # it fits the training labels
    saved = utils.load_checkpoint(str(out), flag='--backbone-weights')
    assert saved['backbone'] == 'resnet18' and len(saved['train_accuracy']) == 5
    trunk = models.build_backbone('resnet18', pretrained=False, weights_file=str(out))
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, saved['state_dict'][key])


def test_backbone_weights_take_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    path = tmp_path / 'resnet18.pth'
    torch.save(resnet.state_dict(), path)                          # layer4 and fc are ignored
    net = models.build_model('ASENet', 5, 'resnet18', pretrained=False, dim_embed=8, backbone_weights=str(path))
    assert torch.equal(net.backbone.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)
    assert torch.equal(net.backbone.bn1.running_var, resnet.bn1.running_var)


def test_backbone_weights_errors(tmp_path):
    with pytest.raises(utils.UserError, match=r'^--backbone-weights .*missing\.pth: no such file'):
        models.build_backbone('resnet18', pretrained=False, weights_file=str(tmp_path / 'missing.pth'))
    path = tmp_path / 'r34.pth'
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(utils.UserError, match=r'does not fit a resnet18 trunk \(unexpected keys: layer1\.2\.'):
        models.build_backbone('resnet18', pretrained=False, weights_file=str(path))


def test_asen_cli_backbone_weights(workdir, capsys):
    path = workdir / 'other.pth'
    torch.save(torchvision.models.resnet50().state_dict(), path)
    assert asen.main(TINY + ['--epochs', '1', '--backbone-weights', str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: --backbone-weights {path}: does not fit a resnet18 trunk')


@pytest.mark.parametrize('argv, message', [
    (['--dataset', 'Zappos50k'], '--dataset Zappos50k: has no attribute labels'),
    (['--epochs', '0'], '--epochs 0: must be a whole number >= 1'),
    (['--dataset', 'Nope'], 'dataset folder data/Nope not found'),
])
def test_pretrain_bad_input_is_one_line(workdir, capsys, argv, message):
    assert pretrain.main(argv + ['--out', 'trunk.pth']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and message in err[0]
    assert not (workdir / 'trunk.pth').exists()
