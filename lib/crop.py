"""ASEN++'s attention-guided crop, on tensors: batched, on the device of the attention maps.

Dong et al., "Fine-Grained Fashion Similarity Prediction by Attribute-Specific Embedding Learning",
IEEE TIP 30, 2021 (arXiv 2104.02429), Sec. III-C: the local branch sees a square region of the
image around where the global branch's spatial attention lies. The steps are those of the authors'
LocalTransform (Maryeon/asenpp, modules/data/transforms/transforms.py), which does them per image
with OpenCV and PIL:

1. the (h, w) attention map is resized to the G x G global view (bilinear, half-pixel centres);
2. min-max normalised, cast to uint8 (x 255, truncated) and thresholded (a pixel is in the mask
   when its uint8 level exceeds floor(255 * threshold), OpenCV's THRESH_BINARY on 8-bit images);
3. the mask's bounding box is squared on its longer side around its centre and shifted back
   inside the view;
4. the square is mapped back through Resize(G) + CenterCrop(G) to the original image's pixels,
   cropped there and resized to the local size with PIL's bilinear filter.

`crop_original` reproduces step 4 bit for bit on uint8 pixels (PIL's fixed-point two-pass
resampling, done as two batched matrix products); `crop_view` is the shortcut that crops from the
G x G view itself (the only source when the original is not at hand).
"""

import math

import torch
import torch.nn.functional as F

from datasets import IMAGENET_MEAN, IMAGENET_STD

PIL_PRECISION_BITS = 22          # Pillow's Resample.c: 32 - 8 - 2


class SourceImages:
    """A batch of original images of different sizes: uint8 pixels (N, 3, H, W), zero-padded at
    the right and bottom to the largest, and each image's (height, width) as (N, 2) int64."""

    def __init__(self, pixels, sizes):
        self.pixels, self.sizes = pixels, sizes

    @classmethod
    def stack(cls, images):
        """From a list of (3, H_i, W_i) uint8 tensors."""
        height = max(img.shape[1] for img in images)
        width = max(img.shape[2] for img in images)
        pixels = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
        for i, img in enumerate(images):
            pixels[i, :, :img.shape[1], :img.shape[2]] = img
        sizes = torch.tensor([img.shape[1:] for img in images], dtype=torch.int64).reshape(-1, 2)
        return cls(pixels, sizes)

    @classmethod
    def cat(cls, parts):
        """One batch of several (anchor, negative, positive for one forward pass)."""
        height = max(p.pixels.shape[2] for p in parts)
        width = max(p.pixels.shape[3] for p in parts)
        pixels = torch.cat([F.pad(p.pixels, (0, width - p.pixels.shape[3], 0, height - p.pixels.shape[2]))
                            for p in parts])
        return cls(pixels, torch.cat([p.sizes for p in parts]))

    def to(self, device):
        return SourceImages(self.pixels.to(device, non_blocking=True), self.sizes.to(device, non_blocking=True))

    def pin_memory(self):
        return SourceImages(self.pixels.pin_memory(), self.sizes.pin_memory())

    def __len__(self):
        return len(self.sizes)


# ----------------------------------------------------------------------------- the box

def attention_boxes(maps, view_size, threshold):
    """(N, h, w) attention maps -> (N, 3) int64 squares (x, y, side) in the G x G view's pixels.

    A constant map (min = max) is where the authors' code divides 0 by 0 and then fails on an
    empty box; here its box is the whole view.
    """
    g = view_size
    with torch.autocast(maps.device.type, enabled=False):
        up = F.interpolate(maps[:, None].float(), size=(g, g), mode='bilinear', align_corners=False)[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    high = up.amax(dim=(1, 2), keepdim=True)
    level = torch.floor((up - low) / (high - low) * 255)                 # (N, G, G); NaN when constant
    mask = level > math.floor(255 * threshold)                            # NaN compares False
    x, w = _extent(mask.any(dim=1))                                       # columns holding the mask
    y, h = _extent(mask.any(dim=2))                                       # rows
    side = torch.maximum(w, h)
    x, y = _square_start(x, w, side, g), _square_start(y, h, side, g)
    empty = ~mask.flatten(1).any(dim=1)
    boxes = torch.stack([x, y, side], dim=1)
    return torch.where(empty[:, None], boxes.new_tensor([0, 0, g]), boxes)


def _extent(occupied):
    """(N, G) bool -> (first True index, count from first to last True) per row (0, 0 if none)."""
    g = occupied.shape[1]
    index = torch.arange(g, device=occupied.device)
    first = torch.where(occupied, index, g).amin(dim=1)
    last = torch.where(occupied, index, -1).amax(dim=1)
    return first.clamp(max=g - 1), (last - first + 1).clamp(min=0)


def _square_start(start, length, side, g):
    """The authors' placement of the square of `side` around the box centre start + length // 2:
    flush with the far edge when it would pass it, else centred and clamped at 0."""
    centre = start + length // 2
    return torch.where(centre + side // 2 > g, g - side, (centre - side // 2).clamp(min=0))


def view_to_source(boxes, sizes, view_size):
    """(N, 3) squares in the view -> (N, 3) squares (x, y, side) in the original images' pixels,
    as the authors map them: scaled by short side / G (truncated), then shifted by the centre crop
    offset (long - short) // 2 along the long side. A side that truncates to 0 becomes 1."""
    height, width = sizes[:, 0], sizes[:, 1]
    portrait = width < height
    short = torch.where(portrait, width, height).double()
    x, y, side = ((boxes[:, i].double() / view_size * short).floor().long() for i in range(3))
    x = x + torch.where(portrait, 0, (width - height) // 2)
    y = y + torch.where(portrait, (height - width) // 2, 0)
    return torch.stack([x, y, side.clamp(min=1)], dim=1)


# ----------------------------------------------------------------------------- PIL's bilinear resize

def pil_bilinear_weights(start, length, out_size, in_size):
    """(N, out_size, in_size) float64 weights of PIL's bilinear resize of the pixels
    [start, start + length) of an axis of `in_size` pixels to `out_size` (Pillow, Resample.c,
    precompute_coeffs): each output pixel averages its source window with a triangle filter
    widened by the downscale factor, normalised to sum 1."""
    device = start.device
    scale = length.double() / out_size                                      # (N,)
    filterscale = scale.clamp(min=1.0)
    support = filterscale                                                   # bilinear support 1, widened
    centre = (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5)[None] * scale[:, None]
    first = torch.trunc(centre - support[:, None] + 0.5).clamp(min=0)      # (N, out): C's (int) cast
    stop = torch.minimum(torch.trunc(centre + support[:, None] + 0.5), length[:, None].double())
    pos = (torch.arange(in_size, device=device)[None, None] - start[:, None, None]).double()  # crop coordinate
    window = (pos >= first[..., None]) & (pos < stop[..., None])
    distance = ((pos - centre[..., None] + 0.5) * (1.0 / filterscale)[:, None, None]).abs()
    weights = torch.where(window, (1 - distance).clamp(min=0), 0.0)
    total = weights.sum(dim=2, keepdim=True)
    return torch.where(total != 0, weights / total, weights)


def _fixed_point(weights):
    """PIL's normalize_coeffs_8bpc: weights as integers in units of 2^-22 (non-negative here)."""
    return torch.trunc(0.5 + weights * (1 << PIL_PRECISION_BITS))


def _clip8(accumulated):
    """PIL's clip8 of a fixed-point sum that started at 2^21 (rounding): the uint8 value."""
    return torch.floor(accumulated / (1 << PIL_PRECISION_BITS)).clamp(0, 255)


def crop_original(sources, boxes, out_size):
    """Crop each square (x, y, side) of `boxes` (N, 3) out of `sources` (SourceImages) and resize it
    to out_size x out_size exactly as PIL does on uint8 RGB (two fixed-point passes, horizontal
    then vertical, each rounded to uint8); pixels outside an image are 0, as PIL's crop gives.
    Returns (N, 3, out, out) float32 normalised as ToTensor + Normalize do."""
    pixels = sources.pixels
    need_h = int((boxes[:, 1] + boxes[:, 2]).max())
    need_w = int((boxes[:, 0] + boxes[:, 2]).max())
    # a square may end past the padded canvas (the authors' box can leave the view by a pixel)
    pixels = F.pad(pixels, (0, max(0, need_w - pixels.shape[3]), 0, max(0, need_h - pixels.shape[2])))
    # float64 holds the fixed-point sums exactly (uint8 x 2^22 x window < 2^53)
    kx = _fixed_point(pil_bilinear_weights(boxes[:, 0], boxes[:, 2], out_size, pixels.shape[3]))
    ky = _fixed_point(pil_bilinear_weights(boxes[:, 1], boxes[:, 2], out_size, pixels.shape[2]))
    half = float(1 << (PIL_PRECISION_BITS - 1))
    rows = _clip8(half + pixels.double() @ kx.transpose(1, 2)[:, None])     # (N, 3, H, out)
    crops = _clip8(half + ky[:, None] @ rows)                                 # (N, 3, out, out)
    return normalise(crops.float())


def crop_view(views, boxes, out_size):
    """The shortcut: crop each square of `boxes` (N, 3) out of the normalised G x G views
    (N, 3, G, G) and resize it with PIL's bilinear weights in floating point."""
    wx = pil_bilinear_weights(boxes[:, 0], boxes[:, 2], out_size, views.shape[3]).float()
    wy = pil_bilinear_weights(boxes[:, 1], boxes[:, 2], out_size, views.shape[2]).float()
    return wy[:, None] @ views.float() @ wx.transpose(1, 2)[:, None]          # (N, 3, out, out)


def normalise(pixels):
    """(N, 3, S, S) float pixel values 0..255 -> ToTensor + Normalize's arithmetic, in float32."""
    mean = pixels.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels / 255).sub(mean).div(std)


def attention_crops(maps, view_size, threshold, out_size, views=None, sources=None):
    """The local branch's input: (N, 3, out, out) crops around the attention `maps` (N, h, w),
    from the original images `sources` when given, else from the `views` (N, 3, G, G)."""
    with torch.no_grad(), torch.autocast(maps.device.type, enabled=False):
        boxes = attention_boxes(maps.detach(), view_size, threshold)
        if sources is None:
            return crop_view(views, boxes, out_size)
        return crop_original(sources, view_to_source(boxes, sources.sizes, view_size), out_size)
