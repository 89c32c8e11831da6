"""Shapes, normalisation and attention of the ASEN network, for several backbones and sizes."""
import pytest
import torch

import losses
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


def attention_shift(net):
    """Attention mass (total variation, in [0, 1]) that moves between the spatial maps of one image
    under attributes 0 and 1; float noise gives about 1e-7."""
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    with torch.no_grad():
        maps = net.attention_maps(images, torch.tensor([0, 1]))             # (2, H, W)
    return 0.5 * (maps[0] - maps[1]).abs().sum().item()


@pytest.mark.parametrize('name', ['ASENet', 'ASENet_V2'])
def test_spatial_attention_depends_on_attribute(name):
    """ASA (Eq. 1-3) looks at different places for different attributes, even untrained: at least
    0.1% of the attention mass moves (random init moves about 3%)."""
    torch.manual_seed(0)
    net = models.build_model(name, 4, 'resnet18', pretrained=False, dim_embed=16).eval()
    assert attention_shift(net) > 1e-3


def test_attribute_blind_spatial_attention_fails_the_check():
    """The control: ASA made blind to the attribute (every attribute projects to the same vector)
    keeps a non-uniform map and attribute-dependent embeddings (through ACA), but no mass moves."""
    torch.manual_seed(0)
    net = models.build_model('ASENet', 4, 'resnet18', pretrained=False, dim_embed=16).eval()
    with torch.no_grad():
        weight = net.asa.attr_proj.weight                                   # (hidden, n_attributes)
        weight.copy_(weight[:, :1].expand_as(weight))
        images = torch.randn(1, 3, 64, 64).repeat(2, 1, 1, 1)
        emb = net(images, torch.tensor([0, 1]))
        maps = net.attention_maps(images, torch.tensor([0, 1]))
    assert not torch.allclose(emb[0], emb[1])                               # what the old check looked at
    assert maps[0].max() - maps[0].min() > 1e-3                             # not the uniform map
    assert attention_shift(net) < 1e-6


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


# ----------------------------------------------------------------------------- the other models

NEW_MODELS = ['ASENet_V2', 'ASENet_V2_fc', 'ConditionalSimNet', 'TripletNet']


def embed(net, images, attr):
    with torch.no_grad():
        return net(images, attr)


@pytest.mark.parametrize('name', NEW_MODELS)
def test_new_models_shape_norm_and_attention(name):
    torch.manual_seed(0)
    net = models.build_model(name, 3, 'resnet18', pretrained=False, dim_embed=16).eval()
    images, attr = torch.randn(2, 3, 48, 48), torch.tensor([0, 2])
    emb = embed(net, images, attr)
    expected = 256 if name == 'ASENet_V2' else 16       # V2: trunk channels, dim_embed ignored
    assert emb.shape == (2, expected)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        maps = net.attention_maps(images, attr)
    side = net.backbone(images).shape[-1]
    assert maps.shape == (2, side, side)
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
    uniform = torch.allclose(maps, torch.full_like(maps, 1.0 / side ** 2))
    assert net.has_spatial_attention == (not uniform)
    assert net.has_spatial_attention == name.startswith('ASENet')


@pytest.mark.parametrize('name', NEW_MODELS)
def test_attribute_dependence(name):
    torch.manual_seed(0)
    net = models.build_model(name, 4, 'resnet18', pretrained=False, dim_embed=16).eval()
    images = torch.randn(1, 3, 48, 48).repeat(2, 1, 1, 1)
    emb = embed(net, images, torch.tensor([0, 1]))
    if name == 'TripletNet':
        assert torch.equal(emb[0], emb[1])
    else:
        assert not torch.allclose(emb[0], emb[1])


def test_v2_follows_the_formula():
    """ASENet_V2 against its equations, written out with the module's own weights."""
    torch.manual_seed(1)
    net = models.build_model('ASENet_V2', 3, 'resnet18', pretrained=False).eval()
    torch.nn.init.normal_(net.asa.bn.running_mean)
    images, attr = torch.randn(2, 3, 40, 40), torch.tensor([2, 0])
    with torch.no_grad():
        fmap = net.backbone(images)
        n, c, h, w = fmap.shape
        e = net.attr_embedding.weight[attr]
        img = torch.tanh(net.asa.bn(torch.nn.functional.conv2d(fmap, net.asa.img_proj.weight, net.asa.img_proj.bias)))
        a = torch.tanh(e @ net.asa.attr_proj.weight.T + net.asa.attr_proj.bias)
        s = torch.einsum('nchw,nc->nhw', img, a) / 512 ** 0.5
        alpha = torch.softmax(s.reshape(n, -1), dim=1).reshape(n, h, w)
        x = torch.einsum('nchw,nhw->nc', fmap, alpha)
        q = torch.relu(e @ net.aca.attr_proj.weight.T + net.aca.attr_proj.bias)
        m = torch.sigmoid(net.aca.fc2(torch.relu(net.aca.fc1(torch.cat([x, q], 1)))))
        expected = (x * m) / (x * m).norm(dim=1, keepdim=True)
        assert torch.allclose(net(images, attr), expected, atol=1e-5)
        assert torch.allclose(net.attention_maps(images, attr), alpha, atol=1e-6)
    assert net.aca.fc1.in_features == c + 512 and net.aca.fc2.out_features == c and net.feature_fc is None
    assert net.asa.score is None and net.asa.hidden == 512       # the scaled dot-product score


def test_csn_learned_masks_init_and_formula():
    torch.manual_seed(0)
    net = models.build_model('ConditionalSimNet', 5, 'resnet18', pretrained=False, dim_embed=400).eval()
    weight = net.masks.weight
    assert weight.requires_grad
    assert abs(weight.mean().item() - 0.9) < 0.05 and abs(weight.std().item() - 0.7) < 0.05
    images, attr = torch.randn(2, 3, 32, 32), torch.tensor([4, 1])
    with torch.no_grad():
        raw = net.embed_fc(net.backbone(images).mean(dim=(2, 3))) * torch.relu(weight[attr])
        assert torch.allclose(net(images, attr), raw / raw.norm(dim=1, keepdim=True), atol=1e-5)
        trained, parts = net.train_outputs(images, attr)                  # trains on the normalised embedding
        assert torch.allclose(trained, raw / raw.norm(dim=1, keepdim=True), atol=1e-5)
        assert torch.allclose(parts['unmasked'] * parts['mask'], raw, atol=1e-5)


def test_csn_fixed_masks_are_disjoint_and_not_trained():
    torch.manual_seed(0)
    net = models.build_model('ConditionalSimNet', 3, 'resnet18', pretrained=False, dim_embed=10,
                             fixed_masks=True)
    masks = net.masks.weight.detach().clone()
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert (masks.sum(dim=0) <= 1).all()                          # disjoint
    assert masks.sum(dim=1).tolist() == [3.0, 3.0, 3.0]           # 10 // 3 dims each
    assert not net.masks.weight.requires_grad
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    out = models.TripletWrapper(net)(*(torch.randn(4, 3, 32, 32) for _ in range(3)), torch.tensor([0, 1, 2, 0]))
    losses.triplet_loss(out.sim_an, out.sim_ap, 0.2).backward()
    optimizer.step()
    assert torch.equal(net.masks.weight, masks)
    with pytest.raises(UserError, match='--dim_embed'):
        models.build_model('ConditionalSimNet', 5, 'resnet18', pretrained=False, dim_embed=4, fixed_masks=True)


def test_csn_regularisation_matches_the_plain_formula():
    """Veit et al.'s terms: mean over the three passes of ||E||_2 / sqrt(N) (E: embeddings before
    the mask and the normalisation) and of ||relu(M)||_1 / N, weighted 5e-3 and 5e-4."""
    torch.manual_seed(0)
    net = models.build_model('ConditionalSimNet', 3, 'resnet18', pretrained=False, dim_embed=8)
    tnet = models.TripletWrapper(net).train()
    batches, attr = [torch.randn(4, 3, 32, 32) for _ in range(3)], torch.tensor([0, 1, 2, 1])
    out = tnet(*batches, attr)
    total, terms = losses.objective(out, losses.LossWeights(0.2, csn_embed=5e-3, csn_mask=5e-4))
    reg = total - terms['triplet']
    embed_terms, mask_terms = [], []
    for x in batches:   # recompute in train mode on the same inputs: BatchNorm batch statistics
        raw = net.embed_fc(net.backbone(x).mean(dim=(2, 3)))
        embed_terms.append(torch.sqrt((raw ** 2).sum()) / 2.0)
        mask_terms.append(torch.relu(net.masks.weight[attr]).abs().sum() / 4)
    expected = 5e-3 * torch.stack(embed_terms).mean() + 5e-4 * torch.stack(mask_terms).mean()
    assert torch.allclose(reg, expected, rtol=1e-4)
    assert torch.allclose(terms['csn_embed'], torch.stack(embed_terms).mean(), rtol=1e-4)
    assert torch.allclose(terms['csn_mask'], torch.stack(mask_terms).mean(), rtol=1e-4)
    total, terms = losses.objective(out, losses.LossWeights(0.2))           # without --csn-reg: none
    assert torch.equal(total, terms['triplet']) and list(terms) == ['triplet']


@pytest.fixture(scope='module')
def synth_data(tmp_path_factory, tiny_data):
    """The session's tiny SynthFashion (conftest `tiny_data`), copied for the runs of this module."""
    from helpers import private_copy
    return str(private_copy(tiny_data, tmp_path_factory.mktemp('synth_data') / 'data'))


def test_csn_fixed_masks_survive_a_training_run(synth_data, workdir):
    """One tiny training and test of ConditionalSimNet with --csn-fixed-masks --csn-reg through
    main: the masks in the checkpoint are still the disjoint ones, and a model without spatial
    attention gets no attention-localisation figure."""
    import json
    import asen
    from conftest import TINY
    argv = TINY + ['--data_path', synth_data, '--epochs', '1', '--num_triplets', '16', '--model', 'ConditionalSimNet',
                   '--name', 'csn', '--csn-fixed-masks', '--csn-reg']
    assert asen.main(argv) == 0
    run = workdir / 'runs' / 'csn'
    state = torch.load(run / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)
    assert torch.equal(state['state_dict']['embeddingnet.masks.weight'], models.disjoint_masks(5, 16))
    # metrics.jsonl: the triplet loss as train_loss, then the total minimised and each term
    record = json.loads((run / 'metrics.jsonl').read_text().splitlines()[0])
    assert {'train_loss', 'train_acc', 'train_total', 'train_csn_embed', 'train_csn_mask'} <= set(record)
    assert 'train_local_triplet' not in record
    weighed = record['train_loss'] + 5e-3 * record['train_csn_embed'] + 5e-4 * record['train_csn_mask']
    assert record['train_total'] == pytest.approx(weighed, rel=1e-6)
    assert record['train_total'] > record['train_loss'] + 1e-3
    assert 'total: ' in (run / 'train.log').read_text() and 'csn_mask: ' in (run / 'train.log').read_text()
    assert asen.main(['--test', '--resume', str(run / 'checkpoint.pth.tar'), '--data_path', synth_data]) == 0
    assert 'attention_localisation' not in json.loads((run / 'test_results.json').read_text())


def test_csn_flags_need_the_csn_model(workdir, capsys):
    import asen
    from conftest import TINY
    from helpers import run_main
    assert asen.main(TINY + ['--model', 'ASENet', '--csn-reg']) == 2
    assert '--csn-reg applies only to --model ConditionalSimNet' in capsys.readouterr().err
    assert asen.main(TINY + ['--model', 'ConditionalSimNet', '--csn-embed-weight', '0.1']) == 2
    assert '--csn-embed-weight applies only with --csn-reg' in capsys.readouterr().err
    code, _, err = run_main(TINY + ['--model', 'ConditionalSimNet', '--csn-reg', '--csn-mask-weight', '-1'], capsys)
    assert code == 2 and 'argument --csn-mask-weight: -1.0: must be a finite number >= 0' in err


def test_v2_fc_default_embedding_is_1024():
    net = models.ASENetV2(models.build_backbone('resnet18', pretrained=False), 3, feature_fc=True)
    assert net.feature_fc.weight.shape == (1024, 256)


def test_csn_and_global_default_embedding_is_1024():
    trunk = models.build_backbone('resnet18', pretrained=False)
    net = models.ConditionalSimNet(trunk, 3)
    assert net.embed_fc.weight.shape == (1024, 256) and net.masks.weight.shape == (3, 1024)
    assert models.GlobalEmbeddingNet(trunk, 3).embed_fc.weight.shape == (1024, 256)
