"""Shapes, normalisation and attention of the ASEN network, for several backbones and sizes."""
import pytest
import torch

import model as models
from utils import UserError


@pytest.mark.parametrize('backbone,img_size', [('resnet18', 64), ('resnet18', 97), ('resnet34', 80),
                                               ('resnet50', 64)])
def test_embedding_shape_and_unit_norm(backbone, img_size):
    torch.manual_seed(0)
    net = models.build_model('ASENet', n_attributes=3, backbone=backbone, pretrained=False, dim_embed=32)
    net.eval()
    images, attr = torch.randn(2, 3, img_size, img_size), torch.tensor([0, 2])
    with torch.no_grad():
        emb = net(images, attr)
        maps = net.attention_maps(images, attr)
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    side = net.backbone(images).shape[-1]
    assert maps.shape == (2, side, side)
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)


def test_channels_follow_backbone():
    assert models.build_backbone('resnet18', pretrained=False).out_channels == 256
    assert models.build_backbone('resnet50', pretrained=False).out_channels == 1024


def test_attention_depends_on_attribute():
    torch.manual_seed(0)
    net = models.build_model('ASENet', 4, 'resnet18', pretrained=False, dim_embed=16).eval()
    images = torch.randn(1, 3, 64, 64).repeat(2, 1, 1, 1)
    with torch.no_grad():
        emb = net(images, torch.tensor([0, 1]))
    assert not torch.allclose(emb[0], emb[1])


@pytest.mark.parametrize('name', ['ASENet_noASA', 'ASENet_noACA'])
def test_ablations_build_and_embed(name):
    net = models.build_model(name, 3, 'resnet18', pretrained=False, dim_embed=8).eval()
    with torch.no_grad():
        emb = net(torch.randn(2, 3, 64, 64), torch.tensor([1, 2]))
    assert emb.shape == (2, 8)


def test_triplet_loss_is_the_margin_ranking_loss():
    sim_an, sim_ap = torch.tensor([0.5, 0.1, 0.9]), torch.tensor([0.2, 0.8, 0.95])
    expected = torch.clamp(sim_an - sim_ap + 0.2, min=0).mean()
    assert torch.allclose(models.triplet_loss(sim_an, sim_ap, 0.2), expected)
    ref = torch.nn.MarginRankingLoss(margin=0.2)(sim_an, sim_ap, -torch.ones(3))
    assert torch.allclose(models.triplet_loss(sim_an, sim_ap, 0.2), ref)


def test_concat_forward_equals_separate_in_eval_mode():
    torch.manual_seed(0)
    net = models.build_model('ASENet', 3, 'resnet18', pretrained=False, dim_embed=8).eval()
    x = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    attr = torch.tensor([0, 2])
    with torch.no_grad():
        separate = models.TripletNet(net)(*x, attr)
        joint = models.TripletNet(net, concat_forward=True)(*x, attr)
    for a, b in zip(separate, joint):
        assert torch.allclose(a, b, atol=1e-5)


def test_unknown_backbone_and_model_are_user_errors():
    with pytest.raises(UserError, match='--backbone'):
        models.build_backbone('vgg16')
    with pytest.raises(UserError, match='--model'):
        models.build_model('Nope', 3)


def test_missing_imagenet_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(UserError, match='--no-pretrained') as err:
        models.build_backbone('resnet18', pretrained=True)
    assert str(tmp_path) in str(err.value)
