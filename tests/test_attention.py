"""ASEN's two attention modules against the paper's equations (Ma et al., AAAI 2020, Sec. 3.2-3.3),
written out by hand with the modules' own weights, and what the ablations ASENet_noASA and
ASENet_noACA take away (Table 5)."""
import pytest
import torch

import model as models

N_ATTR = 3


def scaled_(module, scale=3.0):
    """Re-draw every parameter of `module` from N(0, scale^2 / fan-in) so every tanh and sigmoid
    works outside its linear range (a removed tanh then changes the result a lot)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * scale / fan_in ** 0.5)
    return module


def paper_asa(channels, hidden):
    """ASA as ASENet has it (the paper's Eq. 1-3): one-hot input, no bias on W1, a conv score."""
    return models.SpatialAttention(channels, N_ATTR, hidden, attr_bias=False, score='conv')


def paper_aca(channels, hidden):
    """ACA as ASENet has it (Eq. 4-5): the one-hot to C channels, no bias on W2."""
    return models.ChannelAttention(channels, N_ATTR, channels, hidden, attr_bias=False)


def onehot(attr):
    return torch.nn.functional.one_hot(torch.tensor(attr), N_ATTR).float()


def asa_reference(asa, fmap, attr_onehot):
    """Eq. 1-3, one image and one position at a time."""
    n, c, h, w = fmap.shape
    alphas, pooled = torch.zeros(n, h, w), torch.zeros(n, c)
    for i in range(n):
        p_a = torch.tanh(asa.attr_proj.weight @ attr_onehot[i])                         # (hidden,)
        scores = torch.zeros(h, w)
        for y in range(h):
            for x in range(w):
                p_i = torch.tanh(asa.img_proj.weight[:, :, 0, 0] @ fmap[i, :, y, x] + asa.img_proj.bias)
                scores[y, x] = torch.tanh(asa.score.weight[0, :, 0, 0] @ (p_a * p_i) + asa.score.bias[0])
        e = torch.exp(scores)
        alphas[i] = e / e.sum()                                       # softmax over all H*W positions
        pooled[i] = (fmap[i] * alphas[i]).sum(dim=(1, 2))
    return alphas, pooled


def aca_reference(aca, pooled, attr_onehot):
    """Eq. 4-5: q = ReLU(W2 a), m = sigmoid(fc2(ReLU(fc1([x; q])))), x * m."""
    out = torch.zeros_like(pooled)
    for i in range(len(pooled)):
        q = torch.relu(aca.attr_proj.weight @ attr_onehot[i])
        z = torch.cat([pooled[i], q])                                  # the pooled features first
        hidden = torch.relu(aca.fc1.weight @ z + aca.fc1.bias)
        mask = 1 / (1 + torch.exp(-(aca.fc2.weight @ hidden + aca.fc2.bias)))
        out[i] = pooled[i] * mask
    return out


# ----------------------------------------------------------------------------- ASA

def test_asa_follows_eq_1_to_3():
    torch.manual_seed(0)
    asa = scaled_(paper_asa(6, 5))
    fmap, attr = torch.randn(2, 6, 3, 4), onehot([2, 0])
    alphas, pooled = asa_reference(asa, fmap, attr)
    with torch.no_grad():
        got_pooled, got_alpha = asa(fmap, attr)
        assert torch.allclose(asa.attention(fmap, attr)[:, 0], alphas, atol=1e-6)
    assert got_alpha.shape == (2, 1, 3, 4)
    assert torch.allclose(got_alpha[:, 0], alphas, atol=1e-6)
    assert torch.allclose(got_pooled, pooled, atol=1e-5)


def test_asa_softmax_is_over_positions_not_channels():
    torch.manual_seed(1)
    asa = scaled_(paper_asa(4, 8))
    fmap = torch.randn(3, 4, 5, 2)
    with torch.no_grad():
        alpha = asa.attention(fmap, onehot([0, 1, 2]))
    assert torch.allclose(alpha.sum(dim=(2, 3)), torch.ones(3, 1), atol=1e-6)
    assert (alpha > 0).all() and alpha.max() < 0.5                     # a distribution, not all ones


def test_asa_attends_where_the_attribute_points():
    """Channel k of the map lights position k; attribute k projects onto hidden unit k only; the
    score sums the hidden units: attribute k's attention peaks at position k."""
    h = w = 3
    positions = [(0, 2), (2, 1), (1, 0)]                                # one per attribute
    asa = paper_asa(N_ATTR, N_ATTR)
    fmap = torch.zeros(1, N_ATTR, h, w)
    for k, (y, x) in enumerate(positions):
        fmap[0, k, y, x] = 3.0
    with torch.no_grad():
        asa.attr_proj.weight.copy_(3 * torch.eye(N_ATTR))
        asa.img_proj.weight.copy_(torch.eye(N_ATTR)[:, :, None, None])
        asa.img_proj.bias.zero_()
        asa.score.weight.fill_(2.0)
        asa.score.bias.zero_()
        for k, (y, x) in enumerate(positions):
            alpha, pooled = asa(fmap, onehot([k]))[1][0, 0], asa(fmap, onehot([k]))[0][0]
            assert divmod(int(alpha.argmax()), w) == (y, x)
            assert alpha[y, x] > 2 * alpha.flatten().sort().values[-2]  # clearly, not by a hair
            assert int(pooled.argmax()) == k                            # pooled from there


def test_asa_moves_with_the_attribute_only_through_the_attribute_projection():
    torch.manual_seed(2)
    asa = scaled_(paper_asa(4, 6))
    fmap = torch.randn(1, 4, 3, 3).repeat(2, 1, 1, 1)
    with torch.no_grad():
        alpha = asa.attention(fmap, onehot([0, 1]))
        assert (alpha[0] - alpha[1]).abs().sum() > 1e-2
        asa.attr_proj.weight.copy_(asa.attr_proj.weight[:, :1].expand_as(asa.attr_proj.weight))
        alpha = asa.attention(fmap, onehot([0, 1]))
    assert torch.allclose(alpha[0], alpha[1])


# ----------------------------------------------------------------------------- ACA

def test_aca_follows_eq_4_and_5():
    torch.manual_seed(3)
    aca = scaled_(paper_aca(5, 7))
    pooled, attr = torch.randn(4, 5), onehot([0, 1, 2, 1])
    with torch.no_grad():
        got = aca(pooled, attr)
    assert torch.allclose(got, aca_reference(aca, pooled, attr), atol=1e-6)


def test_aca_is_a_mask_in_zero_one_on_the_pooled_channels():
    torch.manual_seed(4)
    aca = scaled_(paper_aca(6, 4))
    pooled = torch.rand(8, 6) + 0.5                                     # positive: the ratio is the mask
    with torch.no_grad():
        mask = aca(pooled, onehot([0, 1, 2, 0, 1, 2, 0, 1])) / pooled
    assert (mask > 0).all() and (mask < 1).all()
    assert mask.std() > 0.05                                            # not a constant 0.5 or 1
    with torch.no_grad():                                               # the attribute changes the mask
        assert not torch.allclose(aca(pooled[:1], onehot([0])), aca(pooled[:1], onehot([1])))


# ----------------------------------------------------------------------------- the whole network and its ablations

def small_net(name):
    torch.manual_seed(5)
    net = models.build_model(name, N_ATTR, 'resnet18', pretrained=False, dim_embed=8).eval()
    for part in (net.asa, net.aca):
        if part is not None:
            scaled_(part)
    return net


@pytest.mark.parametrize('name', ['ASENet', 'ASENet_noASA', 'ASENet_noACA'])
def test_network_is_trunk_asa_aca_fc_l2norm(name):
    """ASENet: l2norm(fc(ACA(ASA(trunk)))); noASA pools by the plain mean over positions (uniform
    attention), noACA skips the channel mask."""
    net = small_net(name)
    images, attr = torch.randn(2, 3, 48, 48), torch.tensor([2, 0])
    a = onehot([2, 0])
    with torch.no_grad():
        fmap = net.backbone(images)
        if name == 'ASENet_noASA':
            pooled = fmap.sum(dim=(2, 3)) / (fmap.shape[2] * fmap.shape[3])
        else:
            pooled = asa_reference(net.asa, fmap, a)[1]
        if name != 'ASENet_noACA':
            pooled = aca_reference(net.aca, pooled, a)
        raw = net.feature_fc(pooled)
        expected = raw / raw.norm(dim=1, keepdim=True)
        assert torch.allclose(net(images, attr, norm=False), raw, atol=1e-4)
        assert torch.allclose(net(images, attr), expected, atol=1e-5)
        maps = net.attention_maps(images, attr)
    if name == 'ASENet_noASA':
        assert net.asa is None and not net.has_spatial_attention
        assert torch.allclose(maps, torch.full_like(maps, 1 / (fmap.shape[2] * fmap.shape[3])))
    else:
        assert net.has_spatial_attention
        assert torch.allclose(maps, asa_reference(net.asa, fmap, a)[0], atol=1e-6)
    assert (net.aca is None) == (name == 'ASENet_noACA')


def test_ablations_remove_what_they_name():
    """Same weights, one part dropped: noACA's embedding is ASENet's with the mask taken out, and
    noASA's is ASENet's with ASA replaced by the mean, not anything else."""
    full = small_net('ASENet')
    images, attr = torch.randn(2, 3, 48, 48), torch.tensor([1, 2])
    no_aca, no_asa = small_net('ASENet_noACA'), small_net('ASENet_noASA')
    no_aca.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith('aca.')})
    no_asa.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith('asa.')})
    with torch.no_grad():
        fmap = full.backbone(images)
        asa_pooled, _ = full.asa(fmap, onehot([1, 2]))
        mean_pooled = fmap.mean(dim=(2, 3))
        assert torch.allclose(no_aca(images, attr, norm=False), full.feature_fc(asa_pooled), atol=1e-5)
        assert torch.allclose(no_asa(images, attr, norm=False),
                              full.feature_fc(full.aca(mean_pooled, onehot([1, 2]))), atol=1e-5)
        assert not torch.allclose(full(images, attr), no_aca(images, attr), atol=1e-3)
        assert not torch.allclose(full(images, attr), no_asa(images, attr), atol=1e-3)


def test_default_sizes_are_the_authors():
    """Hidden width 512 in both attentions and a 1024-d embedding, as the authors' ASENet (their
    checkpoints load only with these)."""
    net = models.ASENet(models.build_backbone('resnet18', pretrained=False), N_ATTR)
    assert net.asa.attr_proj.weight.shape == (512, N_ATTR) and net.asa.score.weight.shape == (1, 512, 1, 1)
    assert net.aca.fc1.weight.shape == (512, 2 * 256) and net.aca.attr_proj.weight.shape == (256, N_ATTR)
    assert net.feature_fc.weight.shape == (1024, 256)
