"""ASEN: Attribute-Specific Embedding Network.

Ma et al., "Fine-Grained Fashion Similarity Learning by Attribute-Specific Embedding Network",
AAAI 2020 (arXiv 2002.02814). An image is mapped to one embedding per attribute: a ResNet trunk
(cut after layer3) gives a C x H x W map; attribute-aware spatial attention (ASA, Sec. 3.2) pools
it where the attribute lives; attribute-aware channel attention (ACA, Sec. 3.3) reweights the
pooled channels; a linear layer and L2 normalisation give the embedding. Sizes (C, H, W, number
of attributes) all come from the input and the constructor; nothing assumes 224 px or 14 x 14.

Also here: the authors' ASENet_V2, the CSN and triplet-network baselines, and ASEN++ (ASENpp: Dong
et al., IEEE TIP 2021, a global and a local branch; its crop is crop.py, its CLI side asenpp.py).

Reading order: EmbeddingNetwork, what every network provides; SpatialAttention and ChannelAttention,
ASA and ACA once, each difference between the authors' three codes an argument; the networks;
TripletWrapper, which feeds the loss (losses.py); MODELS, the registry build_model reads.
"""

if __name__ == '__main__':                       # run as a script: say what to run instead
    print('error: model.py is a module, not a command; run python asen.py to train or test the networks defined here', file=__import__('sys').stderr)
    raise SystemExit(2)
import abc
import os
import urllib.error
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import Bottleneck

from lib import crop
import utils
from utils import UserError

# --backbone name -> (torchvision constructor, its ImageNet weights)
_RESNETS = {
    'resnet18': (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    'resnet34': (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    'resnet50': (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
}
BACKBONES = tuple(_RESNETS)


def l2norm(x):
    """Normalise each row of `x` (N, D) to unit L2 norm."""
    return F.normalize(x, p=2, dim=1)


def one_hot(attribute, n_attributes, dtype):
    """(N,) attribute indices -> (N, n_attributes) one-hot rows, on the indices' device."""
    return F.one_hot(attribute, n_attributes).to(dtype)


def uniform_attention(feature_map):
    """(N, C, H, W) -> (N, H, W) maps of 1 / (H*W): the attention of a model that pools everything."""
    n, _, h, w = feature_map.shape
    return feature_map.new_full((n, h, w), 1.0 / (h * w))


class ResNetTrunk(nn.Module):
    """A torchvision ResNet up to and including layer3 (stride 16).

    Submodule names equal torchvision's, so ResNet state-dict keys load unchanged.
    """

    def __init__(self, resnet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        last_block = resnet.layer3[-1]           # resnet50's Bottleneck ends in conv3, BasicBlock in conv2
        self.out_channels = (last_block.conv3 if isinstance(last_block, Bottleneck) else last_block.conv2).out_channels

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))  # (N, C, H/16, W/16)


def _load_imagenet_state(name):
    """ImageNet weights for `name` from the torch hub cache, downloading if possible."""
    weights = _RESNETS[name][1]
    cache_dir = os.path.join(torch.hub.get_dir(), 'checkpoints')
    cached = os.path.join(cache_dir, os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise UserError(f"ImageNet weights for {name} are not in {cached} and cannot be downloaded "
                        f"({type(err).__name__}); copy {os.path.basename(weights.url)} there "
                        f"(from {weights.url}) or pass --no-pretrained") from err


def build_backbone(name='resnet50', pretrained=True, weights_file=None):
    """ResNet trunk cut after layer3: ImageNet weights if `pretrained`, else random init; the trunk
    keys of the state dict in `weights_file` (--backbone-weights), when given, replace either."""
    if name not in BACKBONES:
        raise UserError(f"--backbone {name}: unknown; choose one of {', '.join(BACKBONES)}")
    resnet = _RESNETS[name][0](weights=None)
    if pretrained:
        resnet.load_state_dict(_load_imagenet_state(name))
    trunk = ResNetTrunk(resnet)
    if weights_file is not None:
        load_trunk_weights(trunk, weights_file, name)
    return trunk


def load_trunk_weights(trunk, path, backbone):
    """Copy the trunk entries of a ResNet state dict file (torchvision key names; layer4 and fc are
    ignored) into `trunk`; a file that does not fit gives a one-line error."""
    state = utils.load_checkpoint(path, flag='--backbone-weights',
                                  expected='a file written by pretrain.py, or a torchvision ResNet weight file')
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']                                   # a pretrain.py file
    if not isinstance(state, dict):
        raise UserError(f"--backbone-weights {path}: not a state dict")
    trunk_modules = dict(trunk.named_children())                       # conv1 ... layer3
    state = {k: v for k, v in state.items() if k.split('.')[0] in trunk_modules}
    mismatch = utils.state_dict_mismatch(trunk.state_dict(), state)
    if mismatch:
        raise UserError(f"--backbone-weights {path}: does not fit a {backbone} trunk ({mismatch}); "
                        f"pass the --backbone it was made for")
    trunk.load_state_dict(state)


# ----------------------------------------------------------------------------- the network interface

class EmbeddingNetwork(nn.Module, abc.ABC):
    """What every network here provides, and all that the rest of the project asks of one.

    A network maps (N, 3, S, S) images and (N,) attribute indices to (N, D) embeddings (`forward`);
    says whether it learns where to look (`has_spatial_attention`) and shows it (`attention_maps`,
    uniform maps for a network that pools everything); gives training what its loss needs
    (`train_outputs`, and `loss_terms`: the extra terms of losses.objective those outputs feed);
    and splits its parameters into the optimiser's groups (`param_groups`, derived from the
    modules: every trainable parameter is in exactly one group, at the base rate unless its module
    is named in `slow_modules`). `model_name` is its --model name (set by build_model).

    A new network is one subclass and one entry in MODELS; forgetting an abstract method fails at
    construction, and tests/test_interface.py checks every registered network against this contract.
    """

    loss_terms = ()       # LossWeights fields (losses.py) beside the triplet loss that train_outputs feeds
    slow_modules = ()     # names of child modules trained at --lr-global instead of --lr

    def __init__(self, n_attributes):
        super().__init__()
        self.n_attributes = n_attributes
        self.model_name = type(self).__name__

    @property
    @abc.abstractmethod
    def has_spatial_attention(self):
        """True when attention_maps are learned; False when they are uniform (a declared 'none')."""

    @abc.abstractmethod
    def forward(self, images, attribute, norm=True):
        """(N, 3, S, S) images and (N,) attribute indices -> (N, D) embeddings (unit rows if `norm`)."""

    @abc.abstractmethod
    def attention_maps(self, images, attribute):
        """(N, 3, S, S), (N,) -> (N, h, w) spatial attention over the trunk's grid, summing to 1."""

    def train_outputs(self, images, attribute):
        """Training: ((N, D) unit embeddings for the triplet loss, {extras for `loss_terms`})."""
        return self(images, attribute), {}

    def param_groups(self, lr_global):
        """The optimiser's parameter groups: the trainable parameters of `slow_modules` at
        `lr_global` (in that order), every other trainable parameter at the base rate (module order)."""
        slow = [p for name in self.slow_modules for p in self.get_submodule(name).parameters() if p.requires_grad]
        slow_ids = {id(p) for p in slow}
        base = [p for p in self.parameters() if p.requires_grad and id(p) not in slow_ids]
        return [{'params': base}, {'params': slow, 'lr': lr_global}] if slow else [{'params': base}]


def rename_on_load(module, renames):
    """Rename, when a state dict is loaded into `module`, the keys of its earlier layer names
    (`renames`: old child name -> new child path), so that snapshots written before a rename load."""
    def hook(module, state_dict, prefix, *_):
        for old, new in renames.items():
            for key in [k for k in state_dict if k.startswith(f'{prefix}{old}.')]:
                state_dict[f'{prefix}{new}.{key[len(prefix) + len(old) + 1:]}'] = state_dict.pop(key)
    module.register_load_state_dict_pre_hook(hook)


# ----------------------------------------------------------------------------- attention, once

class SpatialAttention(nn.Module):
    """ASA, attribute-aware spatial attention (Ma et al., AAAI 2020, Sec. 3.2, Eq. 1-3).

    p_a = tanh(attr_proj(a)) (N, hidden), p_I = tanh([bn](img_proj(I))) (N, hidden, H, W),
    s = score(p_a * p_I) over the H x W positions, alpha = softmax of s over all H*W positions,
    output: the pooled x = sum_positions alpha * I (N, C) and alpha (N, 1, H, W).

    The real differences between the authors' three codes are arguments:
      attr_dim     the attribute input: n_attributes (a one-hot, ASENet) or the size of a learned
                   attribute embedding (ASENet_V2's 512, ASEN++'s 512);
      hidden       the common size of p_a and p_I (512 in all three; ASEN++'s local branch 256,
                   Dong et al., TIP 2021, Sec. IV-A);
      attr_bias    attr_proj's bias: none in the paper's Eq. 1 and ASENet's mask_fc1, present in
                   ASENet_V2's and ASEN++'s attr_transform1;
      score        'conv': s = tanh(conv1x1(p_a * p_I)) to one channel (Eq. 2, ASENet's conv2);
                   'scaled_dot': s = sum_channels(p_a * p_I) / sqrt(hidden) (ASENet_V2, ASEN++);
      batchnorm    BatchNorm on img_proj's output before the tanh (ASENet_V2's img_bn1 only).
    Layer names: attr_proj, img_proj, bn, score (the authors' names are in each network's
    ORIGINAL_NAMES and LEGACY_NAMES).
    """

    def __init__(self, channels, attr_dim, hidden=512, *, attr_bias, score, batchnorm=False):
        super().__init__()
        if score not in ('conv', 'scaled_dot'):
            raise ValueError(f"score must be 'conv' or 'scaled_dot', not {score!r}")
        self.hidden = hidden
        self.attr_proj = nn.Linear(attr_dim, hidden, bias=attr_bias)
        self.img_proj = nn.Conv2d(channels, hidden, kernel_size=1)
        self.bn = nn.BatchNorm2d(hidden) if batchnorm else None
        self.score = nn.Conv2d(hidden, 1, kernel_size=1) if score == 'conv' else None

    def attention(self, feature_map, attr):
        """(N, C, H, W), (N, attr_dim) -> attention weights (N, 1, H, W) summing to 1 over H*W."""
        n, _, h, w = feature_map.shape
        p_attr = torch.tanh(self.attr_proj(attr))[:, :, None, None]             # (N, hidden, 1, 1)
        p_img = self.img_proj(feature_map)                                       # (N, hidden, H, W)
        if self.bn is not None:
            p_img = self.bn(p_img)
        p_img = torch.tanh(p_img)
        if self.score is not None:
            scores = torch.tanh(self.score(p_attr * p_img))                      # (N, 1, H, W)
        else:
            scores = (p_img * p_attr).sum(dim=1, keepdim=True) / self.hidden ** 0.5  # (N, 1, H, W)
        alpha = F.softmax(scores.reshape(n, 1, h * w), dim=2)                    # (N, 1, H*W)
        return alpha.reshape(n, 1, h, w)                                         # (N, 1, H, W)

    def forward(self, feature_map, attr):
        alpha = self.attention(feature_map, attr)
        return (feature_map * alpha).sum(dim=(2, 3)), alpha                      # (N, C), (N, 1, H, W)


class ChannelAttention(nn.Module):
    """ACA, attribute-aware channel attention (Ma et al., AAAI 2020, Sec. 3.3, Eq. 4-5).

    q = ReLU(attr_proj(a)) (N, query_dim), m = sigmoid(fc2(ReLU(fc1([x; q])))) (N, C), output x * m.

    The real differences are arguments:
      attr_dim, query_dim  ASENet: the one-hot (n_attributes) to C, as the paper's Eq. 4 (mask_fc2);
                           ASENet_V2 and ASEN++: the learned embedding to its own size (512 -> 512);
      hidden               fc1's width: 512 (ASENet, ASENet_V2), C / 2 (ASEN++, its reduction rate 2);
      attr_bias            attr_proj's bias: none in ASENet's mask_fc2, present in attr_transform2.
    """

    def __init__(self, channels, attr_dim, query_dim, hidden=512, *, attr_bias):
        super().__init__()
        self.attr_proj = nn.Linear(attr_dim, query_dim, bias=attr_bias)
        self.fc1 = nn.Linear(channels + query_dim, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, pooled, attr):
        """(N, C) pooled features, (N, attr_dim) -> (N, C) reweighted features."""
        q = F.relu(self.attr_proj(attr))                                         # (N, query_dim)
        mask = torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat([pooled, q], dim=1)))))  # (N, C)
        return pooled * mask                                                     # (N, C)


# ----------------------------------------------------------------------------- the networks

class ASENet(EmbeddingNetwork):
    """The attribute-specific embedding network (Ma et al., AAAI 2020, Sec. 3, Fig. 2):
    trunk -> ASA -> ACA -> Linear -> L2 norm, the attribute given as a one-hot vector.

    `use_asa=False` replaces ASA by global average pooling and `use_aca=False` drops the channel
    mask: the paper's ablations (Table 5).
    """

    # state-dict names of the authors' ASENet (inside their `embeddingnet.`) -> ours
    ORIGINAL_NAMES = {
        'backbonenet': 'backbone', 'mask_fc1': 'asa.attr_proj', 'conv1': 'asa.img_proj',
        'conv2': 'asa.score', 'mask_fc2': 'aca.attr_proj', 'fc1': 'aca.fc1', 'fc2': 'aca.fc2',
        'feature_fc': 'feature_fc',
    }

    def __init__(self, backbone, n_attributes, dim_embed=1024, use_asa=True, use_aca=True):
        super().__init__(n_attributes)
        channels = backbone.out_channels
        self.backbone = backbone
        self.asa = SpatialAttention(channels, n_attributes, attr_bias=False, score='conv') if use_asa else None
        self.aca = ChannelAttention(channels, n_attributes, channels, attr_bias=False) if use_aca else None
        self.feature_fc = nn.Linear(channels, dim_embed)

    @property
    def has_spatial_attention(self):
        return self.asa is not None

    def attention_maps(self, images, attribute):
        """Spatial attention (N, H, W) of each image under its attribute (uniform without ASA)."""
        feature_map = self.backbone(images)
        if self.asa is None:
            return uniform_attention(feature_map)
        attr = one_hot(attribute, self.n_attributes, feature_map.dtype)
        return self.asa.attention(feature_map, attr)[:, 0]                  # (N, H, W)

    def forward(self, images, attribute, norm=True):
        """(N, 3, S, S) images and (N,) attribute indices -> (N, dim_embed) embeddings."""
        feature_map = self.backbone(images)                                  # (N, C, H, W)
        attr = one_hot(attribute, self.n_attributes, feature_map.dtype)      # (N, n_attr)
        if self.asa is not None:
            pooled, _ = self.asa(feature_map, attr)                          # (N, C)
        else:
            pooled = feature_map.mean(dim=(2, 3))                            # (N, C)
        if self.aca is not None:
            pooled = self.aca(pooled, attr)                                  # (N, C)
        embedding = self.feature_fc(pooled)                                  # (N, dim_embed)
        return l2norm(embedding) if norm else embedding


class ASENetV2(EmbeddingNetwork):
    """ASENet_V2, the authors' later variant of ASEN (Maryeon/asen, model.py, class ASENet_V2).

    Same pipeline as ASENet (Ma et al., AAAI 2020, Sec. 3), with a learned attribute embedding
    e = attr_embedding[a] (n_attr x hidden) in place of the one-hot vector:

    ASA: s = sum_channels(tanh(BN(conv1(I))) * tanh(attr_transform1(e))) / sqrt(hidden),
         alpha = softmax of s over the H*W positions, pooled x = sum_positions alpha * I;
    ACA: q = ReLU(attr_transform2(e)), m = sigmoid(fc2(ReLU(fc1([x; q])))), output x * m;
    embedding: l2norm(x * m). Like the authors' final code there is no feature_fc, so the embedding
    size is the trunk's channel count C (1024 for resnet50) and `dim_embed` is ignored, unless
    `feature_fc=True` (the authors' earlier V2 code: a Linear C -> dim_embed before l2norm).
    """

    # the authors' layer names (inside their `embeddingnet.`) -> ours
    ORIGINAL_NAMES = {'backbonenet': 'backbone', 'attr_embedding': 'attr_embedding',
                      'attr_transform1': 'asa.attr_proj', 'conv1': 'asa.img_proj', 'img_bn1': 'asa.bn',
                      'attr_transform2': 'aca.attr_proj', 'fc1': 'aca.fc1', 'fc2': 'aca.fc2',
                      'feature_fc': 'feature_fc'}
    # our snapshots before ASA and ACA were shared modules used the authors' flat names
    LEGACY_NAMES = {k: v for k, v in ORIGINAL_NAMES.items() if '.' in v}
    has_spatial_attention = True

    def __init__(self, backbone, n_attributes, dim_embed=1024, hidden=512, feature_fc=False):
        super().__init__(n_attributes)
        channels = backbone.out_channels
        self.backbone = backbone
        self.attr_embedding = nn.Embedding(n_attributes, hidden)
        self.asa = SpatialAttention(channels, hidden, hidden, attr_bias=True, score='scaled_dot', batchnorm=True)
        self.aca = ChannelAttention(channels, hidden, hidden, hidden, attr_bias=True)
        self.feature_fc = nn.Linear(channels, dim_embed) if feature_fc else None
        rename_on_load(self, self.LEGACY_NAMES)

    def attention_maps(self, images, attribute):
        """Spatial attention (N, H, W) of each image under its attribute."""
        return self.asa.attention(self.backbone(images), self.attr_embedding(attribute))[:, 0]

    def forward(self, images, attribute, norm=True):
        """(N, 3, S, S) images and (N,) attribute indices -> (N, C) embeddings ((N, dim_embed)
        with feature_fc)."""
        feature_map = self.backbone(images)                                  # (N, C, H, W)
        # the embedding is looked up once per attention, as the authors do: the gradient sums the same
        pooled, _ = self.asa(feature_map, self.attr_embedding(attribute))    # (N, C)
        embedding = self.aca(pooled, self.attr_embedding(attribute))         # (N, C)
        if self.feature_fc is not None:
            embedding = self.feature_fc(embedding)                           # (N, dim_embed)
        return l2norm(embedding) if norm else embedding


class AttentionEmbedding(nn.Module):
    """One ASEN++ branch after its trunk (Dong et al., TIP 2021, Sec. III-B; the authors'
    AttnEmbedding in Maryeon/asenpp, modules/model/model.py): ASA with the scaled dot-product score
    and no BatchNorm, ACA with fc1 to C / `reduction`, then feature_fc(x * m) (N, dim_embed), not
    normalised (unlike ASENet_V2). `common` is ASA's hidden size (512 global, 256 local).
    """

    # the authors' AttnEmbedding layer names -> ours (also our snapshots' names before ASA and ACA
    # were shared modules)
    LEGACY_NAMES = {'attr_transform1': 'asa.attr_proj', 'conv': 'asa.img_proj',
                    'attr_transform2': 'aca.attr_proj', 'fc1': 'aca.fc1', 'fc2': 'aca.fc2'}

    def __init__(self, channels, attr_dim=512, common=512, reduction=2, dim_embed=1024):
        super().__init__()
        self.asa = SpatialAttention(channels, attr_dim, common, attr_bias=True, score='scaled_dot')
        self.aca = ChannelAttention(channels, attr_dim, attr_dim, channels // reduction, attr_bias=True)
        self.feature_fc = nn.Linear(channels, dim_embed)
        rename_on_load(self, self.LEGACY_NAMES)

    def forward(self, feature_map, attr_emb):
        """(N, C, H, W), (N, attr_dim) -> (N, dim_embed) un-normalised embeddings, (N, H, W) attention."""
        pooled, alpha = self.asa(feature_map, attr_emb)                      # (N, C), (N, 1, H, W)
        return self.feature_fc(self.aca(pooled, attr_emb)), alpha[:, 0]


class ASENpp(EmbeddingNetwork):
    """ASEN++ (Dong et al., TIP 2021): a global and a local attribute-specific branch.

    Global branch: the trunk (ResNet-50 to layer3 at 224 px in the paper) and an AttentionEmbedding
    with common size 512. Local branch (stage 2 only, `local_backbone` given): a second trunk
    (ResNet-34 to layer3) on a square crop of the image around the global attention (crop.py),
    resized to `local_size` (112), and an AttentionEmbedding with common size 256. One attribute
    embedding (nn.Embedding, 512) serves both branches.

    Embedding: stage 1, l2norm(global); stage 2, [sqrt(beta) l2norm(global); sqrt(1 - beta)
    l2norm(local)] (unit norm, beta 0.6; Sec. III-C). Training (`train_outputs`) ranks with
    l2norm(global) and, in stage 2, hands both branches' embeddings to the loss's local triplet and
    alignment terms (losses.asenpp_local_terms, Sec. III-D); stage 2 trains the global branch and
    the attribute embedding at --lr-global (the authors' BASE_LR_SLOW), the local branch at --lr.

    `originals` (crop.SourceImages) are the full-resolution images the authors crop from; without
    them the crop is taken from the input view (the shortcut, e.g. for --visualize).
    """

    has_spatial_attention = True
    ORIGINAL_NAMES = {'attrnet': 'attr_embedding', 'basenet': 'backbone', 'attnnet': 'global_attn'}
    ORIGINAL_LOCAL_NAMES = {'attrnet': 'attr_embedding', 'basenet': 'local_backbone', 'attnnet': 'local_attn'}

    def __init__(self, backbone, n_attributes, dim_embed=1024, local_backbone=None, attr_dim=512,
                 global_common=512, local_common=256, reduction=2, view_size=224, local_size=112,
                 threshold=0.1, beta=0.6):
        super().__init__(n_attributes)
        self.backbone = backbone
        self.attr_embedding = nn.Embedding(n_attributes, attr_dim)
        self.global_attn = AttentionEmbedding(backbone.out_channels, attr_dim, global_common, reduction, dim_embed)
        self.local_backbone = local_backbone
        self.local_attn = None if local_backbone is None else \
            AttentionEmbedding(local_backbone.out_channels, attr_dim, local_common, reduction, dim_embed)
        self.view_size, self.local_size, self.threshold, self.beta = view_size, local_size, threshold, beta

    @property
    def stage(self):
        return 1 if self.local_backbone is None else 2

    @property
    def loss_terms(self):
        return () if self.stage == 1 else ('local_triplet', 'align')

    @property
    def slow_modules(self):
        return () if self.stage == 1 else ('backbone', 'global_attn', 'attr_embedding')

    def global_branch(self, images, attr_emb):
        """-> (N, D) un-normalised global embeddings, (N, h, w) attention."""
        return self.global_attn(self.backbone(images), attr_emb)

    def local_branch(self, images, attention, attr_emb, originals=None):
        """(N, D) un-normalised local embeddings of the crops around `attention`."""
        crops = crop.attention_crops(attention, self.view_size, self.threshold, self.local_size,
                                     views=images, sources=originals).to(images.dtype)
        if images.is_contiguous(memory_format=torch.channels_last):
            crops = crops.contiguous(memory_format=torch.channels_last)
        return self.local_attn(self.local_backbone(crops), attr_emb)[0]

    def attention_maps(self, images, attribute):
        """The global branch's spatial attention (N, h, w)."""
        return self.global_branch(images, self.attr_embedding(attribute))[1]

    def forward(self, images, attribute, norm=True, originals=None):
        """(N, 3, G, G) views and (N,) attributes -> (N, D) embeddings, (N, 2D) in stage 2.
        `norm` applies to the global embedding (the stage-2 embedding is normalised by construction)."""
        attr_emb = self.attr_embedding(attribute)                                  # (N, attr_dim)
        glob, attention = self.global_branch(images, attr_emb)                     # (N, D), (N, h, w)
        if self.local_backbone is None:
            return l2norm(glob) if norm else glob
        local = self.local_branch(images, attention, attr_emb, originals)          # (N, D)
        return torch.cat([self.beta ** 0.5 * l2norm(glob.float()),
                          (1 - self.beta) ** 0.5 * l2norm(local.float())], dim=1)  # (N, 2D)

    def train_outputs(self, images, attribute, originals=None):
        """Training: (l2norm(global) (N, D), the triplet loss's embedding; {'global', 'local'}
        un-normalised (N, D) each, for losses.asenpp_local_terms, in stage 2 only)."""
        attr_emb = self.attr_embedding(attribute)
        glob, attention = self.global_branch(images, attr_emb)
        if self.local_backbone is None:
            return l2norm(glob), {}
        local = self.local_branch(images, attention, attr_emb, originals)
        return l2norm(glob), {'global': glob, 'local': local}


def build_asenpp(backbone, n_attributes, dim_embed=1024, stage=1, local_backbone='resnet34',
                 local_pretrained=True, **options):
    """ASENpp on the global `backbone` trunk; in stage 2 with a fresh `local_backbone` trunk
    (ImageNet weights if `local_pretrained`, as the authors' stage 2 starts it)."""
    local = build_backbone(local_backbone, local_pretrained) if stage == 2 else None
    return ASENpp(backbone, n_attributes, dim_embed, local_backbone=local, **options)


def disjoint_masks(n_attributes, dim_embed):
    """(n_attributes, dim_embed) 0/1 masks: attribute i owns dims [i*L, (i+1)*L), L = dim_embed // n.

    Veit et al.'s fixed masks (csn.py, learnedmask=False); the dim_embed % n leftover dims belong
    to no attribute.
    """
    length = dim_embed // n_attributes
    if length == 0:
        raise UserError(f"--csn-fixed-masks: --dim_embed {dim_embed} is smaller than the "
                        f"{n_attributes} attributes; give each at least one dimension")
    masks = torch.zeros(n_attributes, dim_embed)
    for i in range(n_attributes):
        masks[i, i * length:(i + 1) * length] = 1.0
    return masks


class ConditionalSimNet(EmbeddingNetwork):
    """Conditional Similarity Network (Veit et al., CVPR 2017) on the ASEN trunk, as the ASEN paper's
    CSN baseline (Maryeon/asen, model.py, class ConditionalSimNet).

    trunk -> global average pool -> embed_fc (C -> dim_embed) -> times ReLU(masks[a]) -> l2norm.
    Learned masks start from N(0.9, 0.7); `fixed_masks=True` uses disjoint 0/1 masks that are not
    trained (requires_grad False; the ReLU leaves them unchanged).

    `train_outputs` also returns the un-masked embeddings and the masks of the batch, from which
    the loss takes CSN's regularisers (losses.csn_regularisers) when --csn-reg asks for them.
    No spatial attention: the whole feature map is pooled.
    """

    ORIGINAL_NAMES = {'embeddingnet': 'backbone', 'embed_fc': 'embed_fc', 'masks': 'masks'}
    has_spatial_attention = False
    loss_terms = ('csn_embed', 'csn_mask')

    def __init__(self, backbone, n_attributes, dim_embed=1024, fixed_masks=False, mask_mean=0.9, mask_std=0.7):
        super().__init__(n_attributes)
        self.backbone = backbone
        self.embed_fc = nn.Linear(backbone.out_channels, dim_embed)
        self.masks = nn.Embedding(n_attributes, dim_embed)
        self.fixed_masks = fixed_masks
        if fixed_masks:
            with torch.no_grad():
                self.masks.weight.copy_(disjoint_masks(n_attributes, dim_embed))
            self.masks.weight.requires_grad_(False)
        else:
            nn.init.normal_(self.masks.weight, mean=mask_mean, std=mask_std)

    def attention_maps(self, images, attribute):
        """Uniform (N, H, W) maps: CSN pools the whole feature map."""
        return uniform_attention(self.backbone(images))

    def forward(self, images, attribute, norm=True):
        """(N, 3, S, S) images and (N,) attribute indices -> (N, dim_embed) embeddings."""
        masked, _ = self._masked(images, attribute)
        return l2norm(masked) if norm else masked

    def train_outputs(self, images, attribute):
        """Training: (l2norm(masked) (N, dim_embed); {'unmasked': (N, dim_embed), 'mask':
        (N, dim_embed)}, what the CSN regularisers read)."""
        masked, parts = self._masked(images, attribute)
        return l2norm(masked), parts

    def _masked(self, images, attribute):
        feature_map = self.backbone(images)                                # (N, C, H, W)
        embedded = self.embed_fc(feature_map.mean(dim=(2, 3)))             # (N, dim_embed)
        mask = self.masks(attribute)                                       # (N, dim_embed)
        if not self.fixed_masks:
            mask = F.relu(mask)
        return embedded * mask, {'unmasked': embedded, 'mask': mask}


class GlobalEmbeddingNet(EmbeddingNetwork):
    """The Triplet Network baseline of the ASEN paper (Sec. 4.2): one embedding for all attributes.

    trunk -> global average pool -> embed_fc (C -> dim_embed) -> l2norm; the attribute is ignored,
    though training uses the same attribute-specific triplets.
    """

    has_spatial_attention = False

    def __init__(self, backbone, n_attributes, dim_embed=1024):
        super().__init__(n_attributes)
        self.backbone = backbone
        self.embed_fc = nn.Linear(backbone.out_channels, dim_embed)

    def attention_maps(self, images, attribute):
        """Uniform (N, H, W) maps: the whole feature map is pooled."""
        return uniform_attention(self.backbone(images))

    def forward(self, images, attribute=None, norm=True):
        """(N, 3, S, S) images -> (N, dim_embed) embeddings, whatever the attribute."""
        embedding = self.embed_fc(self.backbone(images).mean(dim=(2, 3)))  # (N, dim_embed)
        return l2norm(embedding) if norm else embedding


class TripletOutput(NamedTuple):
    """What the training loss (losses.objective) reads of a batch of triplets: the embeddings, the
    two similarities the ranking loss compares, and the networks' extra outputs. A loss that needs
    more than the similarities (in-batch negatives, say) reads the embeddings: one function in
    losses.py."""
    anchor: torch.Tensor        # (N, D) anchor embeddings, float32 (unit rows for every network here)
    negative: torch.Tensor      # (N, D) negative embeddings, float32
    positive: torch.Tensor      # (N, D) positive embeddings, float32
    sim_an: torch.Tensor        # (N,) anchor-negative similarities <anchor, negative>, float32
    sim_ap: torch.Tensor        # (N,) anchor-positive similarities <anchor, positive>, float32
    extras: tuple               # the network's extra outputs (dicts), one per forward pass


class TripletWrapper(nn.Module):
    """Wraps an embedding network for training on (anchor, negative, positive) triplets.

    `concat_forward=True` embeds the three images in one forward pass. That is faster but
    changes BatchNorm batch statistics in training mode (3N images instead of three batches of N),
    so the original's three separate passes are the default.
    """

    def __init__(self, embeddingnet: EmbeddingNetwork, concat_forward=False):
        super().__init__()
        self.embeddingnet = embeddingnet
        self.concat_forward = concat_forward

    def _embed(self, images, attribute, originals):
        """(embeddings, extras) of one forward pass (extras: {} for a network without any)."""
        extra = {} if originals is None else {'originals': originals}
        return self.embeddingnet.train_outputs(images, attribute, **extra)

    def forward(self, anchor, negative, positive, attribute, originals=None):
        """Images (N, 3, S, S) x 3 and (N,) attributes -> TripletOutput. `originals`: None, or the
        (anchor, negative, positive) crop.SourceImages that ASENpp's stage 2 crops from."""
        if self.concat_forward:
            images = torch.cat([anchor, negative, positive])                 # (3N, 3, S, S)
            source = None if originals is None else crop.SourceImages.cat(originals)
            emb, extras = self._embed(images, attribute.repeat(3), source)   # (3N, D)
            emb_a, emb_n, emb_p = emb.chunk(3)                               # 3 x (N, D)
            passes = (extras,)
        else:
            source_a, source_n, source_p = originals if originals is not None else (None, None, None)
            emb_a, extras_a = self._embed(anchor, attribute, source_a)
            emb_n, extras_n = self._embed(negative, attribute, source_n)
            emb_p, extras_p = self._embed(positive, attribute, source_p)
            passes = (extras_a, extras_n, extras_p)
        emb_a, emb_n, emb_p = emb_a.float(), emb_n.float(), emb_p.float()     # fp32 similarities under autocast
        return TripletOutput(emb_a, emb_n, emb_p, (emb_a * emb_n).sum(dim=1), (emb_a * emb_p).sum(dim=1), passes)


# --model name -> builder(backbone trunk, n_attributes, dim_embed, **options) -> EmbeddingNetwork
MODELS = {
    'ASENet': ASENet,
    'ASENet_noASA': partial(ASENet, use_asa=False),
    'ASENet_noACA': partial(ASENet, use_aca=False),
    'ASENet_V2': ASENetV2,
    'ASENet_V2_fc': partial(ASENetV2, feature_fc=True),
    'ConditionalSimNet': ConditionalSimNet,
    'TripletNet': GlobalEmbeddingNet,
    'ASENpp': build_asenpp,
}


def build_model(name, n_attributes, backbone='resnet50', pretrained=True, dim_embed=1024,
                backbone_weights=None, **options):
    """The embedding network called `name` (a key of MODELS) on a fresh backbone (trunk weights
    from the file `backbone_weights` if given); `options` go to its constructor (e.g. fixed_masks
    for ConditionalSimNet)."""
    if name not in MODELS:
        raise UserError(f"--model {name}: unknown; choose one of {', '.join(MODELS)}")
    trunk = build_backbone(backbone, pretrained, backbone_weights)
    net = MODELS[name](trunk, n_attributes, dim_embed, **options)
    net.model_name = name
    return net


def param_groups(tnet, lr_global=None):
    """The optimiser's parameter groups of a TripletWrapper's network (EmbeddingNetwork.param_groups)."""
    return tnet.embeddingnet.param_groups(lr_global)
