"""ASEN: Attribute-Specific Embedding Network.

Ma et al., "Fine-Grained Fashion Similarity Learning by Attribute-Specific Embedding Network",
AAAI 2020 (arXiv 2002.02814). An image is mapped to one embedding per attribute: a ResNet trunk
(cut after layer3) gives a C x H x W map; attribute-aware spatial attention (ASA, Sec. 3.2) pools
it where the attribute lives; attribute-aware channel attention (ACA, Sec. 3.3) reweights the
pooled channels; a linear layer and L2 normalisation give the embedding. Sizes (C, H, W, number
of attributes) all come from the input and the constructor; nothing assumes 224 px or 14 x 14.
"""
import os
import urllib.error

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from utils import UserError

BACKBONES = ('resnet18', 'resnet34', 'resnet50')
_WEIGHTS = {
    'resnet18': torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    'resnet34': torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    'resnet50': torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
}


def l2norm(x):
    """Normalise each row of `x` (N, D) to unit L2 norm."""
    return F.normalize(x, p=2, dim=1)


def one_hot(attribute, n_attributes, dtype):
    """(N,) attribute indices -> (N, n_attributes) one-hot rows, on the indices' device."""
    return F.one_hot(attribute, n_attributes).to(dtype)


class ResNetTrunk(nn.Module):
    """A torchvision ResNet up to and including layer3 (stride 16).

    Submodule names equal torchvision's, so ResNet state-dict keys load unchanged.
    """

    def __init__(self, resnet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        last_block = resnet.layer3[-1]
        self.out_channels = (last_block.conv3 if hasattr(last_block, 'conv3') else last_block.conv2).out_channels

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))  # (N, C, H/16, W/16)


def _load_imagenet_state(name):
    """ImageNet weights for `name` from the torch hub cache, downloading if possible."""
    weights = _WEIGHTS[name]
    cache_dir = os.path.join(torch.hub.get_dir(), 'checkpoints')
    cached = os.path.join(cache_dir, os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise UserError(f"ImageNet weights for {name} are not in {cached} and cannot be downloaded "
                        f"({type(err).__name__}); copy {os.path.basename(weights.url)} there "
                        f"(from {weights.url}) or pass --no-pretrained") from err


def build_backbone(name='resnet50', pretrained=True):
    """ResNet trunk cut after layer3, with ImageNet weights unless `pretrained` is False."""
    if name not in BACKBONES:
        raise UserError(f"--backbone {name}: unknown; choose one of {', '.join(BACKBONES)}")
    resnet = getattr(torchvision.models, name)(weights=None)
    if pretrained:
        resnet.load_state_dict(_load_imagenet_state(name))
    return ResNetTrunk(resnet)


class AttributeSpatialAttention(nn.Module):
    """ASA (Eq. 1-3): attribute-guided softmax attention over the positions of a feature map.

    p_a = tanh(W1 a), p_I = tanh(conv1x1(I)), s = tanh(conv1x1(p_a * p_I)),
    alpha = softmax of s over all H*W positions, output sum_positions alpha * I.
    """

    def __init__(self, in_channels, n_attributes, hidden=512):
        super().__init__()
        self.attr_proj = nn.Linear(n_attributes, hidden, bias=False)      # original: mask_fc1
        self.img_proj = nn.Conv2d(in_channels, hidden, kernel_size=1)     # original: conv1
        self.score = nn.Conv2d(hidden, 1, kernel_size=1)                  # original: conv2

    def attention(self, feature_map, attr_onehot):
        """(N, C, H, W), (N, n_attr) -> attention weights (N, 1, H, W) summing to 1 over H*W."""
        n, _, h, w = feature_map.shape
        p_attr = torch.tanh(self.attr_proj(attr_onehot))[:, :, None, None]  # (N, hidden, 1, 1)
        p_img = torch.tanh(self.img_proj(feature_map))                       # (N, hidden, H, W)
        scores = torch.tanh(self.score(p_attr * p_img))                      # (N, 1, H, W)
        alpha = F.softmax(scores.reshape(n, 1, h * w), dim=2)                # (N, 1, H*W)
        return alpha.reshape(n, 1, h, w)                                     # (N, 1, H, W)

    def forward(self, feature_map, attr_onehot):
        alpha = self.attention(feature_map, attr_onehot)
        return (feature_map * alpha).sum(dim=(2, 3)), alpha                  # (N, C), (N, 1, H, W)


class AttributeChannelAttention(nn.Module):
    """ACA (Eq. 4-5): an attribute-conditioned sigmoid mask over the pooled channels.

    q = ReLU(W2 a), m = sigmoid(fc2(ReLU(fc1([x; q])))), output x * m.
    """

    def __init__(self, channels, n_attributes, hidden=512):
        super().__init__()
        self.attr_proj = nn.Linear(n_attributes, channels, bias=False)    # original: mask_fc2
        self.fc1 = nn.Linear(2 * channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, pooled, attr_onehot):
        q = F.relu(self.attr_proj(attr_onehot))                              # (N, C)
        mask = torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat([pooled, q], dim=1)))))
        return pooled * mask                                                 # (N, C)


class ASENet(nn.Module):
    """The attribute-specific embedding network: trunk -> ASA -> ACA -> Linear -> L2 norm.

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
        super().__init__()
        channels = backbone.out_channels
        self.backbone = backbone
        self.n_attributes = n_attributes
        self.asa = AttributeSpatialAttention(channels, n_attributes) if use_asa else None
        self.aca = AttributeChannelAttention(channels, n_attributes) if use_aca else None
        self.feature_fc = nn.Linear(channels, dim_embed)

    def attention_maps(self, images, attribute):
        """Spatial attention (N, H, W) of each image under its attribute (uniform without ASA)."""
        feature_map = self.backbone(images)
        n, _, h, w = feature_map.shape
        if self.asa is None:
            return feature_map.new_full((n, h, w), 1.0 / (h * w))
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
            pooled = self.aca(pooled, attr)
        embedding = self.feature_fc(pooled)
        return l2norm(embedding) if norm else embedding


class TripletNet(nn.Module):
    """Wraps an embedding network; returns the similarities (anchor-negative, anchor-positive).

    `concat_forward=True` embeds the three images in one forward pass. That is faster but
    changes BatchNorm batch statistics in training mode (3N images instead of three batches of N),
    so the original's three separate passes are the default.
    """

    def __init__(self, embeddingnet, concat_forward=False):
        super().__init__()
        self.embeddingnet = embeddingnet
        self.concat_forward = concat_forward

    def forward(self, anchor, negative, positive, attribute):
        if self.concat_forward:
            images = torch.cat([anchor, negative, positive])                 # (3N, 3, S, S)
            emb = self.embeddingnet(images, attribute.repeat(3))             # (3N, D)
            emb_a, emb_n, emb_p = emb.chunk(3)                               # 3 x (N, D)
        else:
            emb_a = self.embeddingnet(anchor, attribute)
            emb_n = self.embeddingnet(negative, attribute)
            emb_p = self.embeddingnet(positive, attribute)
        emb_a, emb_n, emb_p = emb_a.float(), emb_n.float(), emb_p.float()     # fp32 similarities under autocast
        return (emb_a * emb_n).sum(dim=1), (emb_a * emb_p).sum(dim=1)        # (N,), (N,)


def triplet_loss(sim_an, sim_ap, margin):
    """MarginRankingLoss with target -1: mean of max(0, s_an - s_ap + margin)."""
    target = torch.full_like(sim_an, -1.0)
    return F.margin_ranking_loss(sim_an, sim_ap, target, margin=margin)


MODELS = {
    'ASENet': dict(),
    'ASENet_noASA': dict(use_asa=False),
    'ASENet_noACA': dict(use_aca=False),
}


def build_model(name, n_attributes, backbone='resnet50', pretrained=True, dim_embed=1024):
    """The embedding network called `name` (see MODELS) on a fresh backbone."""
    if name not in MODELS:
        raise UserError(f"--model {name}: unknown; choose one of {', '.join(MODELS)}")
    return ASENet(build_backbone(backbone, pretrained), n_attributes, dim_embed, **MODELS[name])
