"""ASEN++ (--model ASENpp): sampling, stage defaults, losses, bad input, both stages end to end,
and the authors' checkpoints."""
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision

import asen
from lib.images import load_image
import datasets
import losses
import model as models
import original_asenpp as theirs
from conftest import TINY
from helpers import run_main, tiny_asenpp
from lib import checkpoints, config, evaluation, flags
from utils import UserError

# TINY at 32 px with one batch of triplets, small trunks for both branches and no bf16 (slow on
# CPUs without bf16 kernels; test_bf16_channels_last_step covers it)
PP = TINY + ['--model', 'ASENpp', '--local-backbone', 'resnet18', '--amp', 'off', '--epochs', '1',
             '--img-size', '32', '--num_triplets', '8']


# ----------------------------------------------------------------------------- stages and flags

def test_stage_defaults_and_explicit_flags(tmp_path):
    args = config.from_flags(['--model', 'ASENpp'])
    assert (args.epochs, args.step_size, args.decay_rate, args.lr, args.batch_size) == (50, 3, 0.9, 1e-4, 16)
    stage1 = tmp_path / 'stage1.pth.tar'          # the settings of a stage-1 run, as its snapshot holds them
    torch.save({'epoch': 50, 'state_dict': {}, 'args': config.from_flags(['--model', 'ASENpp']).as_dict()}, stage1)
    resolved = asen.resolve_configuration(['--stage', '2', '--epochs', '7', '--resume', str(stage1)])
    args = resolved.args
    assert resolved.starts_stage2 and (args.model, args.stage, args.name) == ('ASENpp', 2, 'ASEN_s2')
    assert (args.epochs, args.step_size, args.decay_rate, args.lr_global, args.start_epoch) == (7, 1, 0.9, 1e-5, 1)
    args = config.from_flags(['--model', 'ASENpp', '--dataset', 'SynthFashion'])
    assert (args.epochs, args.step_size) == (flags.SYNTH_PRESET['epochs'], 3)     # the CPU preset wins
    assert config.from_flags([]).epochs == 200                                     # other models untouched


@pytest.mark.parametrize('argv, message', [
    (['--model', 'ASENpp', '--stage', '2'], '--stage 2 starts from a stage-1 checkpoint: add --resume'),
    (['--model', 'ASENet', '--stage', '1'], '--stage applies only to --model ASENpp'),
    (['--threshold', '0.5'], '--threshold applies only to --model ASENpp'),
    (['--model', 'ASENpp', '--threshold', '1.5'], 'argument --threshold: 1.5: must be a finite number strictly between 0 and 1'),
    (['--model', 'ASENpp', '--threshold', '0'], 'argument --threshold: 0.0: must be a finite number strictly between 0 and 1'),
    (['--model', 'ASENpp', '--beta', '2'], 'argument --beta: 2.0: must be a finite number from 0 to 1'),
])
def test_bad_flags_are_one_line(argv, message, workdir, capsys):
    code, _, err = run_main(TINY + argv, capsys)          # a range is argparse's: it exits from parse_args
    assert code == 2 and err.strip().count('\n') == 0 and message in err


def test_resume_of_another_model_is_one_line(trained_run, workdir, capsys):
    best = str(trained_run[1] / 'model_best.pth.tar')                           # an ASENet run
    assert asen.main(TINY + ['--model', 'ASENpp', '--stage', '2', '--resume', best]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'a ASENet checkpoint, not ASENpp' in err
    assert asen.main(['--stage', '2', '--resume', best]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'a ASENet checkpoint; --stage needs an ASENpp one' in err


# ----------------------------------------------------------------------------- the network

def scaled_(module, scale=3.0):
    """Every parameter re-drawn from N(0, scale^2 / fan-in): each tanh, softmax and sigmoid then works
    outside its linear range, so one dropped or a wrong scale changes the result a lot."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * scale / fan_in ** 0.5)
    return module


def attention_embedding_reference(m, fmap, attr_emb):
    """AttentionEmbedding's equations one image and one position at a time, with its weights:
    s = tanh(conv(I)) . tanh(W1 e) / sqrt(common), alpha = softmax over H*W, x = sum alpha I,
    m = sigmoid(fc2(ReLU(fc1([x; ReLU(W2 e)])))), out = feature_fc(x * m)."""
    n, c, h, w = fmap.shape
    asa, aca = m.asa, m.aca
    common = asa.img_proj.weight.shape[0]
    outs, alphas = [], torch.zeros(n, h, w)
    for i in range(n):
        attr = torch.tanh(asa.attr_proj.weight @ attr_emb[i] + asa.attr_proj.bias)
        scores = torch.zeros(h, w)
        for y in range(h):
            for x in range(w):
                img = torch.tanh(asa.img_proj.weight[:, :, 0, 0] @ fmap[i, :, y, x] + asa.img_proj.bias)
                scores[y, x] = (img * attr).sum() / common ** 0.5
        e = torch.exp(scores - scores.max())
        alphas[i] = e / e.sum()
        pooled = (fmap[i] * alphas[i]).sum(dim=(1, 2))
        q = torch.relu(aca.attr_proj.weight @ attr_emb[i] + aca.attr_proj.bias)
        hidden = torch.relu(aca.fc1.weight @ torch.cat([pooled, q]) + aca.fc1.bias)
        mask = 1 / (1 + torch.exp(-(aca.fc2.weight @ hidden + aca.fc2.bias)))
        outs.append(m.feature_fc.weight @ (pooled * mask) + m.feature_fc.bias)
    return torch.stack(outs), alphas


def test_attention_embedding_follows_its_equations():
    torch.manual_seed(0)
    m = scaled_(models.AttentionEmbedding(6, attr_dim=4, common=16, reduction=2, dim_embed=3))
    fmap, attr_emb = torch.randn(2, 6, 3, 4), torch.randn(2, 4)
    with torch.no_grad():
        got, alpha = m(fmap, attr_emb)
        assert torch.allclose(m.asa.attention(fmap, attr_emb)[:, 0], alpha)
    want, want_alpha = attention_embedding_reference(m, fmap, attr_emb)
    assert alpha.shape == (2, 3, 4) and got.shape == (2, 3)
    assert torch.allclose(alpha, want_alpha, atol=1e-6)
    assert torch.allclose(alpha.sum(dim=(1, 2)), torch.ones(2)) and alpha.max() < 0.9
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():                                                   # the attribute matters
        assert not torch.allclose(m(fmap, attr_emb.flip(0))[0], got, atol=1e-3)


def test_attention_embedding_is_the_authors_attn_embedding():
    """The same weights give Maryeon/asenpp's AttnEmbedding's output and attention map; their layer
    names (also our snapshots' before ASA and ACA were shared) load into ours (LEGACY_NAMES)."""
    torch.manual_seed(1)
    m = scaled_(models.AttentionEmbedding(8, attr_dim=6, common=5, reduction=4, dim_embed=3))
    ref = theirs.AttnEmbedding(6, 8, 5, 4, 3)
    to_theirs = {f'{ours}.': f'{old}.' for old, ours in models.AttentionEmbedding.LEGACY_NAMES.items()}
    rename = lambda key: next((theirs_ + key[len(ours):] for ours, theirs_ in to_theirs.items()
                               if key.startswith(ours)), key)
    ref.load_state_dict({rename(k): v for k, v in m.state_dict().items()})
    again = models.AttentionEmbedding(8, attr_dim=6, common=5, reduction=4, dim_embed=3)
    again.load_state_dict(ref.state_dict())                                 # strict: every key renamed
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))
    fmap, attr_emb = torch.randn(3, 8, 2, 5), torch.randn(3, 6)
    with torch.no_grad():
        (got, alpha), (want, want_alpha) = m(fmap, attr_emb), ref(fmap, attr_emb)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(alpha, want_alpha, atol=1e-6)


def test_asenpp_default_sizes_are_the_authors():
    """Attribute embedding 512, common size 512 (global) and 256 (local), fc1 to C / 2, a 1024-d
    embedding, crop 224 -> 112 at threshold 0.1, beta 0.6: the authors' config (their checkpoints
    load only with these sizes)."""
    alone = models.AttentionEmbedding(64)
    assert alone.asa.attr_proj.weight.shape == (512, 512) and alone.asa.img_proj.weight.shape[:2] == (512, 64)
    assert alone.aca.attr_proj.weight.shape == (512, 512) and alone.aca.fc1.weight.shape == (32, 64 + 512)
    assert alone.aca.fc2.weight.shape == (64, 32) and alone.feature_fc.weight.shape == (1024, 64)
    assert alone.asa.hidden == 512 and alone.asa.score is None and alone.asa.bn is None   # scaled dot, no BN
    trunk = models.build_backbone('resnet18', pretrained=False)
    local = models.build_backbone('resnet18', pretrained=False)
    net = models.ASENpp(trunk, 4, local_backbone=local)
    assert net.attr_embedding.weight.shape == (4, 512)
    assert net.global_attn.asa.img_proj.weight.shape[0] == 512 and net.global_attn.asa.hidden == 512
    assert net.local_attn.asa.img_proj.weight.shape[0] == 256 and net.local_attn.asa.hidden == 256
    assert net.global_attn.aca.fc1.weight.shape[0] == trunk.out_channels // 2
    assert net.local_attn.aca.fc1.weight.shape[0] == local.out_channels // 2
    assert net.global_attn.feature_fc.weight.shape[0] == 1024 == net.local_attn.feature_fc.weight.shape[0]
    assert (net.view_size, net.local_size, net.threshold, net.beta) == (224, 112, 0.1, 0.6)
    assert models.ASENpp(trunk, 4).local_attn is None and models.ASENpp(trunk, 4).stage == 1 and net.stage == 2
    assert net.has_spatial_attention                                        # --visualize draws its attention
    built = models.build_asenpp(trunk, 4)                                   # what --model ASENpp builds
    assert built.stage == 1 and built.global_attn.feature_fc.out_features == 1024


def test_stage2_losses_are_the_authors():
    net = tiny_asenpp()
    tnet = models.TripletWrapper(net).train()
    images = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    attr = torch.tensor([0, 3, 1])
    out = tnet(*images, attr)
    (g_a, l_a), (g_n, l_n), (g_p, l_p) = ((p['global'], p['local']) for p in out.extras)
    total, terms = losses.objective(out, losses.LossWeights(0.2, local_triplet=0.1, align=0.1))
    triplet = terms['triplet']
    assert torch.allclose(terms['local_triplet'], torch.clamp(F.cosine_similarity(l_a, l_n)
                          - F.cosine_similarity(l_a, l_p) + 0.2, min=0).mean(), atol=1e-6)
    local = torch.clamp(F.cosine_similarity(l_a, l_n) - F.cosine_similarity(l_a, l_p) + 0.2, min=0).mean()
    align = sum(torch.clamp(1 - F.cosine_similarity(g, loc), min=0).mean()
                for g, loc in ((g_a, l_a), (g_n, l_n), (g_p, l_p)))
    global_triplet = torch.clamp(F.cosine_similarity(g_a, g_n) - F.cosine_similarity(g_a, g_p) + 0.2, min=0).mean()
    assert torch.allclose(triplet, global_triplet, atol=1e-6)                  # the global triplet
    assert torch.allclose(total, global_triplet + 0.1 * local + 0.1 * align, atol=1e-6)
    assert torch.allclose(out.sim_an, F.cosine_similarity(g_a, g_n), atol=1e-6)
    net.eval()
    with torch.no_grad():
        emb = net(images[0], attr)
        g, att = net.global_branch(images[0], net.attr_embedding(attr))
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=1), torch.ones(3))
    assert torch.allclose(emb[:, :16], 0.6 ** 0.5 * F.normalize(g), atol=1e-6)


def test_stage2_starts_a_fresh_imagenet_resnet34_local_trunk(monkeypatch):
    """The authors' stage 2: the local branch a ResNet-34 with ImageNet weights (not downloaded here)."""
    built = []
    monkeypatch.setattr(models, 'build_backbone',
                        lambda name, pretrained: built.append((name, pretrained)) or models.ResNetTrunk(
                            torchvision.models.resnet18()))
    net = models.build_asenpp(models.ResNetTrunk(torchvision.models.resnet18()), 4, stage=2)
    assert built == [('resnet34', True)] and net.stage == 2


def test_stage1_embedding_is_the_normalised_global_branch_and_its_attention():
    net = tiny_asenpp(stage=1).eval()
    images, attr = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([4, 0])
    with torch.no_grad():
        emb, raw = net(images, attr), net(images, attr, norm=False)
        glob, attention = net.global_branch(images, net.attr_embedding(attr))
        maps = net.attention_maps(images, attr)                         # what --visualize draws
    assert maps.shape == (2, 2, 2) and torch.equal(maps, attention)
    assert torch.allclose(raw, glob) and not torch.allclose(raw.norm(dim=1), torch.ones(2), atol=1e-2)
    assert torch.allclose(emb, F.normalize(glob), atol=1e-6)
    trained, extras = net.train_outputs(images, attr)                   # stage 1 trains on l2norm(global)
    assert extras == {} and torch.allclose(trained, F.normalize(glob), atol=1e-6)


def test_stage2_embedding_is_normalised_in_float32_under_bf16_autocast():
    """The branches give bf16 under autocast; each half is normalised in float32, so its norm is
    sqrt(beta) (global) and sqrt(1 - beta) (local) to float32's precision, not bf16's (~4e-3)."""
    net = tiny_asenpp().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        emb = net(images, torch.tensor([1, 3]))
    assert emb.dtype == torch.float32
    half = emb.shape[1] // 2
    for part, norm in ((emb[:, :half], net.beta ** 0.5), (emb[:, half:], (1 - net.beta) ** 0.5)):
        assert torch.allclose(part.norm(dim=1), torch.full((2,), norm), rtol=0, atol=1e-6)


def test_param_groups_split_the_branches():
    net = tiny_asenpp()
    local, slow = net.param_groups(1e-5)
    assert slow['lr'] == 1e-5 and 'lr' not in local
    ids = [id(p) for g in (local, slow) for p in g['params']]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    assert {id(net.attr_embedding.weight), id(net.backbone.conv1.weight)} <= {id(p) for p in slow['params']}
    # derived from the modules, in a fixed order (a saved optimiser state is by position)
    in_order = lambda *modules: [id(p) for m in modules for p in m.parameters()]
    assert [id(p) for p in local['params']] == in_order(net.local_backbone, net.local_attn)
    assert [id(p) for p in slow['params']] == in_order(net.backbone, net.global_attn, net.attr_embedding)
    assert net.loss_terms == ('local_triplet', 'align')
    stage1 = tiny_asenpp(stage=1)
    assert len(stage1.param_groups(1e-5)) == 1 and stage1.loss_terms == ()


def test_bf16_channels_last_step():
    net = tiny_asenpp().to(memory_format=torch.channels_last)
    tnet = models.TripletWrapper(net, concat_forward=True).train()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = tnet(x, x.flip(3), x.flip(2), torch.tensor([0, 1]))
        loss, _ = losses.objective(out, losses.LossWeights(0.2, local_triplet=0.1, align=0.1))
    loss.backward()
    assert torch.isfinite(loss) and net.local_attn.aca.fc1.weight.grad is not None


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_both_stages_train_and_test(tiny_data, workdir):
    data = ['--data_path', str(tiny_data)]           # the shared tiny SynthFashion
    assert asen.main(PP + data + ['--name', 'pp']) == 0
    s1 = torch.load(workdir / 'runs/pp/model_best.pth.tar', weights_only=True)
    assert s1['args']['stage'] == 1 and s1['args']['step_size'] == 3
    assert not any('local' in k for k in s1['state_dict'])
    assert asen.main(['--stage', '2', '--resume', 'runs/pp/model_best.pth.tar', '--epochs', '1']) == 0
    s2 = torch.load(workdir / 'runs/pp_s2/checkpoint.pth.tar', weights_only=True)
    assert s2['epoch'] == 1 and s2['args']['stage'] == 2 and s2['args']['step_size'] == 1
    assert any(k.startswith('embeddingnet.local_attn.') for k in s2['state_dict'])
    lrs = [g['lr'] for g in s2['optimizer']['param_groups']]
    assert lrs == pytest.approx([1e-4 * 0.9, 1e-5 * 0.9])                        # one StepLR step
    assert asen.main(['--test', '--resume', 'runs/pp_s2/model_best.pth.tar']) == 0
    result = json.loads((workdir / 'runs/pp_s2/test_results.json').read_text())
    assert result['model'] == 'ASENpp' and len(result['mAP']) == 5 and 0 < result['MeanAP'] <= 100
    assert asen.main(['--test', '--resume', 'runs/pp/model_best.pth.tar']) == 0
    assert json.loads((workdir / 'runs/pp/test_results.json').read_text())['model'] == 'ASENpp-global'


@pytest.mark.slow
def test_authors_checkpoint_gives_their_map(tiny_data, workdir):
    """Their stage-2 network, saved as their main.py does, tested through asen.py: the same MeanAP
    as their evaluation (global view, per-image PIL crop, [sqrt(.6) g; sqrt(.4) l]) computes."""
    net = theirs.build(5, seed=2)
    theirs.save(net, workdir / 'theirs.pth.tar')
    data_path = str(tiny_data)                       # the shared tiny SynthFashion
    data = ['--dataset', 'SynthFashion', '--synth-images', '48', '--img-size', '64', '--amp', 'off',
            '--data_path', data_path]
    assert asen.main(['--test', '--resume', 'theirs.pth.tar', '--name', 'orig'] + data) == 0
    result = json.loads((workdir / 'runs/orig/test_results.json').read_text())
    assert result['model'] == 'ASENpp'

    split = datasets.SplitFiles(data_path, 'SynthFashion')
    embedded = []
    for role in ('query', 'candidate'):
        dataset = datasets.RetrievalDataset(split, 'test', role, None)
        pictures = [load_image(dataset.image_path(i)) for i in range(len(dataset))]
        attrs = torch.from_numpy(dataset.entries[:, 1]).long()
        embedded.append((theirs.embed(net, pictures, attrs, 64, 32, 0.1), dataset.entries))
    (q_emb, q_entries), (c_emb, c_entries) = embedded
    _, mean = evaluation.retrieval_map(q_emb, q_entries, c_emb, c_entries, len(split.attributes))
    assert result['MeanAP'] == pytest.approx(100 * mean, abs=1e-6)
    # and the stage-1 layout (global branch only) loads as stage 1, and as the start of a stage 2
    info, state = checkpoints.convert_original_state_dict(theirs.build(5, local=False).state_dict())
    assert (info['model'], info['stage'], info['local_backbone'], info['n_attributes']) == ('ASENpp', 1, None, 5)
    tnet = models.TripletWrapper(tiny_asenpp())
    checkpoints.load_stage1_weights(tnet, {'state_dict': state}, 'theirs_s1.pth.tar')
    assert torch.equal(tnet.embeddingnet.attr_embedding.weight, state['embeddingnet.attr_embedding.weight'])


def test_authors_asenpp_state_dicts_convert_and_load():
    info, state = checkpoints.convert_original_state_dict(theirs.build(5).state_dict())
    assert info == dict(model='ASENpp', backbone='resnet18', local_backbone='resnet18', stage=2, n_attributes=5,
                        dim_embed=16)
    models.TripletWrapper(tiny_asenpp()).load_state_dict(state)
    # their main.py's file: {'epoch', 'model', 'mAP'}
    file = {'epoch': 20, 'model': theirs.build(5).state_dict(), 'mAP': 0.5}
    assert checkpoints.adopt_original(file, 'theirs.pth.tar')['stage'] == 2
    assert 'model' not in file and file['prec'] == 0.5 and set(file['state_dict']) == set(state)
    # keys that are not theirs are kept for loading to name them; a trunk's fc and layer4 are dropped
    extra = {'extra.weight': torch.ones(1), 'choices.global.basenet.fc.weight': torch.ones(2, 2),
             'choices.global.basenet.layer4.0.conv1.weight': torch.ones(1), 'choices.global.odd': torch.ones(1)}
    info, state = checkpoints.convert_original_state_dict(dict(extra, **theirs.build(5, local=False).state_dict()))
    assert (info['stage'], info['local_backbone'], info['backbone'], info['dim_embed']) == (1, None, 'resnet18', 16)
    result = models.TripletWrapper(tiny_asenpp(stage=1)).load_state_dict(state, strict=False)
    assert result.missing_keys == [] and set(result.unexpected_keys) == {'extra.weight', 'choices.global.odd'}


def test_authors_asenpp_state_dicts_that_are_not_theirs():
    state = theirs.build(5).state_dict()
    state['choices.local.attrnet.attr_embedding.weight'] = state['choices.global.attrnet.attr_embedding.weight'] + 1
    with pytest.raises(UserError, match='global and local attribute embeddings differ'):
        checkpoints.convert_original_state_dict(state)
    state = {k: v for k, v in theirs.build(5).state_dict().items() if '.basenet.' not in k}
    with pytest.raises(UserError, match=r'without the global trunk choices\.global\.basenet'):
        checkpoints.convert_original_state_dict(state)


def test_a_stage1_file_loads_into_stage2_only_if_its_global_branch_fits():
    stage1 = models.TripletWrapper(tiny_asenpp(stage=1)).state_dict()
    tnet = models.TripletWrapper(tiny_asenpp())
    local = {k: v.clone() for k, v in tnet.state_dict().items() if k.startswith('embeddingnet.local_')}
    checkpoints.load_stage1_weights(tnet, {'state_dict': stage1}, 's1.pth.tar')
    assert all(torch.equal(tnet.state_dict()[k], v) for k, v in stage1.items())
    assert all(torch.equal(tnet.state_dict()[k], v) for k, v in local.items())
    gone = list(stage1)[-4:]                    # four keys missing: the first three are named
    with pytest.raises(UserError) as raised:
        checkpoints.load_stage1_weights(tnet, {'state_dict': {k: v for k, v in stage1.items() if k not in gone}},
                                        's1.pth.tar')
    assert str(raised.value) == ('--resume s1.pth.tar: does not fit the global branch of this ASENpp (--backbone or '
                                 '--dim_embed differ?): ' + ', '.join(gone[:3]))
    with pytest.raises(UserError, match=r'global branch of this ASENpp .*: embeddingnet\.extra$'):
        checkpoints.load_stage1_weights(tnet, {'state_dict': dict(stage1, **{'embeddingnet.extra': torch.ones(1)})},
                                        's1.pth.tar')
    three = models.TripletWrapper(tiny_asenpp(stage=1, n_attributes=3)).state_dict()
    with pytest.raises(UserError, match='^--resume s1.pth.tar: attribute count 3 in the file but this dataset has 5'):
        checkpoints.load_stage1_weights(tnet, {'state_dict': three}, 's1.pth.tar')


# ----------------------------------------------------------------------------- stage preparation (asenpp.prepare)

def asenpp_snapshot(path, stage, model='ASENpp'):
    """A snapshot holding only what resolving the configuration reads: the epoch and a run's settings."""
    settings = config.from_flags(['--model', model]).as_dict()
    settings['stage'] = stage if model == 'ASENpp' else None
    torch.save({'epoch': 3, 'state_dict': {}, 'args': settings}, path)
    return str(path)


@pytest.mark.parametrize('flags, stage, starts_stage2, name', [
    ([], 1, False, 'ASEN'),                                       # no checkpoint: stage 1
    (['--resume', 'S1'], 1, False, 'ASEN'),                       # a stage-1 run continues as stage 1
    (['--resume', 'S2'], 2, False, 'ASEN'),                       # a stage-2 run continues as stage 2
    (['--resume', 'S1', '--stage', '2'], 2, True, 'ASEN_s2'),     # stage 2 starts from stage 1
    (['--resume', 'S2', '--stage', '2'], 2, False, 'ASEN'),
    (['--resume', 'S1', '--stage', '2', '--name', 'mine'], 2, True, 'mine'),
    # a test of a file outside runs/ writes to a folder named after the file (issue 26)
    (['--resume', 'S1', '--stage', '2', '--test', '--stage', '1'], 1, False, 's1'),
    (['--resume', 'S2', '--test'], 2, False, 's2'),
    (['--resume', 'S1', '--stage', '2', '--local-crop', 'view', '--cache-images'], 2, True, 'ASEN_s2'),
    (['--stage', '1', '--cache-images'], 1, False, 'ASEN'),
])
def test_stage_is_settled_from_the_flags_and_the_checkpoint(flags, stage, starts_stage2, name, tmp_path):
    files = {'S1': asenpp_snapshot(tmp_path / 's1.pth.tar', 1), 'S2': asenpp_snapshot(tmp_path / 's2.pth.tar', 2)}
    resolved = asen.resolve_configuration(['--model', 'ASENpp'] + [files.get(f, f) for f in flags])
    assert (resolved.args.stage, resolved.starts_stage2, resolved.args.name) == (stage, starts_stage2, name)


@pytest.mark.parametrize('flags, message', [
    (['--resume', 'S2', '--stage', '1'], 'a stage-2 checkpoint; drop --stage 1'),
    (['--resume', 'S1', '--stage', '2', '--test'], 'a stage-1 checkpoint has no trained local branch'),
    (['--resume', 'S1', '--stage', '2', '--cache-images'], '--cache-images holds only the --img-size view'),
    (['--resume', 'S2', '--cache-images'], '--cache-images holds only the --img-size view'),
    (['--resume', 'NET', '--stage', '2'], 'a ASENet checkpoint, not ASENpp'),
    (['--dataset', 'Zappos50k'], 'not available for Zappos50k'),
])
def test_stage_preparation_refuses(flags, message, tmp_path):
    files = {'S1': asenpp_snapshot(tmp_path / 's1.pth.tar', 1), 'S2': asenpp_snapshot(tmp_path / 's2.pth.tar', 2),
             'NET': asenpp_snapshot(tmp_path / 'net.pth.tar', 1, model='ASENet')}
    argv = ['--model', 'ASENpp'] + [files.get(f, f) for f in flags]
    with pytest.raises(UserError, match=message):
        asen.resolve_configuration(argv)


def test_stage_flags_of_other_models():
    """--stage, --threshold, ... apply only to ASENpp; other models pass through unchanged."""
    resolved = asen.resolve_configuration(['--model', 'ConditionalSimNet'])
    assert not resolved.starts_stage2 and resolved.args.stage is None
    with pytest.raises(UserError, match='--local-size applies only to --model ASENpp'):
        asen.resolve_configuration(['--model', 'ConditionalSimNet', '--local-size', '64'])


def test_result_label_local_size_and_originals():
    from types import SimpleNamespace
    from lib import asenpp
    flags = dict(model='ASENpp', stage=1, local_crop='original', img_size=224, local_size=None, pretrained=True,
                 local_backbone='resnet34', threshold=0.1, beta=0.6)
    args = lambda **changed: SimpleNamespace(**{**flags, **changed})
    assert asenpp.result_label(args()) == 'ASENpp-global'
    assert asenpp.result_label(args(stage=2)) == 'ASENpp'
    assert asenpp.result_label(args(model='ASENet', stage=None)) == 'ASENet'
    assert asenpp.result_label(args(model='ASENet', stage=1)) == 'ASENet'
    assert [asenpp.local_size(args(img_size=s)) for s in (224, 33, 1)] == [112, 16, 1]
    assert asenpp.local_size(args(local_size=40)) == 40
    assert asenpp.uses_originals(args(stage=2))
    assert not any(asenpp.uses_originals(a) for a in (args(), args(stage=2, local_crop='view'),
                                                      args(model='ASENet', stage=2)))
    assert asenpp.model_options(args(stage=2), True) == dict(
        stage=2, local_backbone='resnet34', local_pretrained=True, view_size=224, local_size=112, threshold=0.1, beta=0.6)
    assert not asenpp.model_options(args(pretrained=False), True)['local_pretrained']
    assert not asenpp.model_options(args(), False)['local_pretrained']
