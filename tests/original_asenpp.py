"""ASEN++ as the authors' code does it, re-written here to test ours against it.

Independent of model.py and crop.py: written from the facts of Maryeon/asenpp
(modules/model/model.py: ASEN, AttrEmbedding, AttnEmbedding; resnet.py: a ResNet that stops after
layer3 and has no fc; modules/data/transforms/transforms.py: GlobalTransform, LocalTransform;
modules/engine/evaluation.py: process_batch), one image at a time, in numpy and PIL. OpenCV is not
installed here, so its three calls are written out: cv2.resize (INTER_LINEAR), the 8-bit
cv2.threshold (THRESH_BINARY: level > floor(thresh)) and cv2.boundingRect of a mask.
"""
import math

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

from original_networks import FeatureResNet, randomise_batchnorm

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------- the network

class AttrEmbedding(nn.Module):
    def __init__(self, n_attrs, embed_size):
        super().__init__()
        self.attr_embedding = nn.Embedding(n_attrs, embed_size)

    def forward(self, x):
        return self.attr_embedding(x)


class AttnEmbedding(nn.Module):
    def __init__(self, attr_embed_size, img_embed_size, common_embed_size, reduction_rate, embed_size):
        super().__init__()
        self.attr_transform1 = nn.Linear(attr_embed_size, common_embed_size)
        self.conv = nn.Conv2d(img_embed_size, common_embed_size, kernel_size=1, stride=1)
        self.attr_transform2 = nn.Linear(attr_embed_size, attr_embed_size)
        self.fc1 = nn.Linear(img_embed_size + attr_embed_size, img_embed_size // reduction_rate)
        self.fc2 = nn.Linear(img_embed_size // reduction_rate, img_embed_size)
        self.feature_fc = nn.Linear(img_embed_size, embed_size)

    def forward(self, x, a):
        img = torch.tanh(self.conv(x))
        attr = torch.tanh(self.attr_transform1(a)).view(a.size(0), -1, 1, 1).expand_as(img)
        attmap = torch.sum(attr * img, dim=1, keepdim=True) / img.size(1) ** 0.5
        attmap = torch.softmax(attmap.view(attmap.size(0), 1, -1), dim=2).view(attmap.size(0), 1, x.size(2), x.size(3))
        x = (x * attmap).view(x.size(0), x.size(1), -1).sum(dim=2)
        m = torch.relu(self.attr_transform2(a))
        m = torch.sigmoid(self.fc2(torch.relu(self.fc1(torch.cat((x, m), dim=1)))))
        return self.feature_fc(x * m), attmap.squeeze(1)


def trunk(depth):
    net = FeatureResNet(depth)
    del net.fc                      # their resnet.py builds no fc (with_fc=False)
    return net


class ASEN(nn.Module):
    """Their model: choices.global.{attrnet, basenet, attnnet} and, with a local branch,
    choices.local.{attrnet (the same module), basenet, attnnet}."""

    def __init__(self, n_attributes, dim_embed=16, depth=18, local_depth=18, local=True):
        super().__init__()
        g = trunk(depth)
        self.choices = nn.ModuleDict({'global': nn.ModuleDict({
            'attrnet': AttrEmbedding(n_attributes, 512), 'basenet': g,
            'attnnet': AttnEmbedding(512, g.channels, 512, 2, dim_embed)})})
        if local:
            lt = trunk(local_depth)
            self.choices.update({'local': nn.ModuleDict({
                'attrnet': self.choices['global']['attrnet'], 'basenet': lt,
                'attnnet': AttnEmbedding(512, lt.channels, 256, 2, dim_embed)})})

    def forward(self, x, a, level='global'):
        a = self.choices[level]['attrnet'](a)
        return self.choices[level]['attnnet'](self.choices[level]['basenet'](x), a)


def build(n_attributes, local=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    net = ASEN(n_attributes, local=local, **kwargs)
    with torch.no_grad():
        randomise_batchnorm(net, seed)
    return net.eval()


def save(net, path, epoch=20, m_ap=0.5):
    """Their main.py's checkpoint: {'epoch', 'model': state_dict, 'mAP'}."""
    torch.save({'epoch': epoch, 'model': net.state_dict(), 'mAP': m_ap}, path)


# ----------------------------------------------------------------------------- their transforms

def global_transform(size):
    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(MEAN, STD)])


def cv2_resize_linear(src, size):
    """cv2.resize(src, (size, size), interpolation=cv2.INTER_LINEAR) of a float32 map, per pixel."""
    h, w = src.shape
    out = np.empty((size, size), dtype=np.float32)

    def tap(d, n_in):
        f = (d + 0.5) * (n_in / size) - 0.5
        s = math.floor(f)
        f -= s
        if s < 0:
            f, s = 0.0, 0
        if s >= n_in - 1:
            f, s = 0.0, n_in - 1
        return s, min(s + 1, n_in - 1), np.float32(f)
    for dy in range(size):
        y0, y1, fy = tap(dy, h)
        for dx in range(size):
            x0, x1, fx = tap(dx, w)
            top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
            bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
            out[dy, dx] = top * (1 - fy) + bottom * fy
    return out


def bounding_rect(mask):
    """cv2.boundingRect of a binary mask: (x, y, w, h), (0, 0, 0, 0) when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0, 0, 0, 0
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def local_box(img, mask, global_size, threshold):
    """Their LocalTransform up to the crop: (x, y, x + d, y + d) in the original image's pixels.
    A constant map raises ZeroDivisionError-like NaNs there; the caller handles that case."""
    mask = cv2_resize_linear(mask.astype(np.float32), global_size)
    mask = (mask - np.min(mask)) / (np.max(mask) - np.min(mask))
    mask = np.uint8(mask * 255)
    mask = np.where(mask > math.floor(255 * threshold), 255, 0).astype(np.uint8)
    x, y, w, h = bounding_rect(mask)
    xc, yc = x + w // 2, y + h // 2
    d = max(w, h)
    x = global_size - d if xc + d // 2 > global_size else max(0, xc - d // 2)
    y = global_size - d if yc + d // 2 > global_size else max(0, yc - d // 2)
    return view_box_to_original(img, x, y, d, global_size)


def view_box_to_original(img, x, y, d, global_size):
    short_edge = 0 if img.size[0] < img.size[1] else 1
    x = int(x / global_size * img.size[short_edge])
    y = int(y / global_size * img.size[short_edge])
    d = int(d / global_size * img.size[short_edge])
    if short_edge == 0:
        y += (img.size[1] - img.size[0]) // 2
    else:
        x += (img.size[0] - img.size[1]) // 2
    return x, y, x + d, y + d


def crop_resize(img, box, local_size):
    """img.crop(box) then Resize(local_size), ToTensor, Normalize."""
    t = transforms.Compose([transforms.Resize(local_size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    return t(img.crop(box))


def local_transform(img, mask, global_size, local_size, threshold):
    return crop_resize(img, local_box(img, mask, global_size, threshold), local_size)


# ----------------------------------------------------------------------------- their evaluation

def embed(net, images, attrs, global_size, local_size, threshold, beta=0.6):
    """evaluation.process_batch on a list of PIL images: l2norm(global), or with a local branch
    [sqrt(beta) l2norm(global); sqrt(1 - beta) l2norm(local)]."""
    gt = global_transform(global_size)
    with torch.no_grad():
        g, attmap = net(torch.stack([gt(i) for i in images]), attrs, level='global')
        if 'local' not in net.choices:
            return nn.functional.normalize(g, p=2, dim=1)
        lx = torch.stack([local_transform(i, m, global_size, local_size, threshold)
                          for i, m in zip(images, attmap.numpy())])
        loc, _ = net(lx, attrs, level='local')
    return torch.cat((math.sqrt(beta) * nn.functional.normalize(g, p=2, dim=1),
                      math.sqrt(1 - beta) * nn.functional.normalize(loc, p=2, dim=1)), dim=1)


def random_image(rng, width, height):
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
