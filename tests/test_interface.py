"""The network interface (model.EmbeddingNetwork): every network of the registry (model.MODELS)
provides the whole contract, a network that forgets a part cannot be built, the optimiser's groups
are derived from the modules (a new module is trained, never silently left out), and snapshots
written before ASA and ACA became shared modules still load."""
import pytest
import torch
import torch.nn as nn

import losses
import model as models
from helpers import tiny_asenpp, tiny_net
from lib import engine

N_ATTR = 5


def registered():
    """(name, network) of every --model, ASENpp in both stages."""
    for name in models.MODELS:
        if name == 'ASENpp':
            yield 'ASENpp', tiny_asenpp(stage=1)
            yield 'ASENpp', tiny_asenpp(stage=2)
        else:
            yield name, tiny_net(name, n_attributes=N_ATTR, dim_embed=8)


@pytest.mark.parametrize('name, net', list(registered()), ids=lambda v: v if isinstance(v, str) else '')
def test_every_registered_network_keeps_the_contract(name, net):
    assert isinstance(net, models.EmbeddingNetwork) and net.model_name == name
    assert net.n_attributes == N_ATTR and isinstance(net.has_spatial_attention, bool)
    images, attr = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    net.eval()
    with torch.no_grad():
        emb = net(images, attr)
        maps = net.attention_maps(images, attr)
        trained, extras = net.train_outputs(images, attr)
    assert emb.dim() == 2 and emb.shape[0] == 2
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert maps.dim() == 3 and maps.shape[0] == 2 and torch.allclose(maps.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
    if not net.has_spatial_attention:                                   # a declared none: uniform maps
        assert torch.allclose(maps, torch.full_like(maps, 1 / maps[0].numel()))
    assert trained.shape[0] == 2 and torch.allclose(trained.norm(dim=1), torch.ones(2), atol=1e-5)
    assert isinstance(extras, dict)
    assert set(net.loss_terms) <= set(losses.TERMS)
    # the terms it declares can be computed from what it hands to training
    weights = losses.LossWeights(0.2, **{term: 1.0 for term in net.loss_terms})
    out = models.TripletWrapper(net)(images, images.flip(3), images.flip(2), attr)
    total, terms = losses.objective(out, weights)
    assert torch.isfinite(total) and list(terms) == ['triplet', *net.loss_terms]
    # every trainable parameter in exactly one group, the frozen ones in none
    groups = net.param_groups(1e-5)
    grouped = [id(p) for g in groups for p in g['params']]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters() if p.requires_grad)
    assert len(grouped) == len(set(grouped))
    assert len(groups) == (2 if net.slow_modules else 1)


def test_a_network_that_forgets_a_part_cannot_be_built():
    class NoAttention(models.EmbeddingNetwork):
        has_spatial_attention = False

        def forward(self, images, attribute, norm=True):
            return images.flatten(1)

    class Undeclared(models.EmbeddingNetwork):
        def forward(self, images, attribute, norm=True):
            return images.flatten(1)

        def attention_maps(self, images, attribute):
            return models.uniform_attention(images)

    for forgetful in (NoAttention, Undeclared):
        with pytest.raises(TypeError, match='abstract'):
            forgetful(N_ATTR)


def test_a_new_module_gets_updates():
    """Groups are derived from the modules: a module added to a network lands in the base group
    (ASEN++'s stage-2 groups once listed submodules by hand, so a new one would get none)."""
    net = tiny_asenpp(stage=2)
    net.extra_head = nn.Linear(3, 3)
    base, slow = net.param_groups(1e-5)
    assert {id(net.extra_head.weight), id(net.extra_head.bias)} <= {id(p) for p in base['params']}
    plain = tiny_net('ASENet', n_attributes=N_ATTR)
    plain.extra_head = nn.Linear(3, 3)
    (only,) = plain.param_groups(1e-5)
    assert id(plain.extra_head.weight) in {id(p) for p in only['params']}


def test_v2_snapshots_with_the_earlier_flat_names_load():
    """ASENet_V2's layers were flat (the authors' names: conv1, img_bn1, attr_transform1, ...); such
    a state dict loads strictly into the shared ASA and ACA and gives the same embeddings."""
    torch.manual_seed(0)
    net = tiny_net('ASENet_V2', n_attributes=N_ATTR).eval()
    to_old = {new: old for old, new in models.ASENetV2.LEGACY_NAMES.items()}
    old_state = {}
    for key, value in net.state_dict().items():
        head = next((new for new in to_old if key.startswith(new + '.')), None)
        old_state[to_old[head] + key[len(head):] if head else key] = value
    assert 'img_bn1.running_mean' in old_state and 'conv1.weight' in old_state
    fresh = tiny_net('ASENet_V2', n_attributes=N_ATTR, seed=1).eval()
    fresh.load_state_dict(old_state)
    images, attr = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(fresh(images, attr), net(images, attr))
    tnet = models.TripletWrapper(tiny_net('ASENet_V2', n_attributes=N_ATTR, seed=2))   # under a prefix too
    tnet.load_state_dict({'embeddingnet.' + k: v for k, v in old_state.items()})
    assert torch.equal(tnet.embeddingnet.asa.bn.running_mean, net.asa.bn.running_mean)


def test_asa_and_aca_are_defined_once():
    """Every network's spatial and channel attention are the one SpatialAttention and
    ChannelAttention, parameterised."""
    kinds = set()
    for _, net in registered():
        for module in net.modules():
            if 'Attention' in type(module).__name__ and type(module) is not models.AttentionEmbedding:
                kinds.add(type(module))
    assert kinds == {models.SpatialAttention, models.ChannelAttention}


# ----------------------------------------------------------------------------- the training meters

def filled_meters(terms):
    meters = engine.TrainMeters(torch.device('cpu'))
    gen = torch.Generator().manual_seed(0)
    for n in (4, 4, 2):
        values = {name: torch.rand((), generator=gen) for name in ('triplet', *terms)}
        meters.update(values, sum(values.values()), torch.rand((), generator=gen), n)
    return meters


def test_meter_rows_round_trip_every_meter():
    meters = filled_meters(('csn_embed', 'csn_mask'))
    row = engine.meter_row(meters, torch.device('cpu'))
    assert row.shape == (engine.METER_ROW_WIDTH,) and row.dtype == torch.float64
    back = engine.meters_from_row(row, torch.device('cpu'))
    pairs = [(meters.loss, back.loss), (meters.acc, back.acc), (meters.total, back.total)] + \
        [(meters.terms[k], back.terms[k]) for k in losses.TERMS]
    for want, got in pairs:
        assert got.read() == want.read() and got.count == want.count
    assert back.terms['csn_embed'].count == 10 and back.terms['align'].count == 0


def test_a_legacy_meter_row_restores_loss_accuracy_and_the_total():
    """A step snapshot written before the terms were kept has 5 values: loss and accuracy exactly,
    the total as the loss (equal when no term weighs)."""
    meters = filled_meters(())
    row = engine.meter_row(meters, torch.device('cpu'))[:engine.LEGACY_METER_ROW_WIDTH]
    back = engine.meters_from_row(row, torch.device('cpu'))
    assert back.loss.read() == meters.loss.read() and back.acc.read() == meters.acc.read()
    assert back.total.read() == meters.loss.read() and back.total.count == meters.loss.count
