"""Pictures of what ASEN attends to and retrieves, with Pillow and numpy only.

The network sees each image through Resize(S) + CenterCrop(S) (datasets.build_transform); its
spatial attention (ASENet.attention_maps) is an h x w grid over that S x S view. Everything here
works in that view: `network_view` reproduces it on the PIL image, `box_to_view` maps a box given
in original pixel coordinates into it, and the attention cells are taken to tile the view evenly
(cell size S / h by S / w), as the bilinear overlay also assumes.
"""

import itertools
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torchvision import transforms

from datasets import load_image

CAPTION_HEIGHT = 22   # pixels under each grid tile for its caption
GAP = 4               # pixels between grid tiles and around the grid


# ----------------------------------------------------------------------------- colours and overlays

def colormap(values):
    """Jet-like colours of `values` in [0, 1] (clipped; NaN counts as 0): (H, W) -> uint8 (H, W, 3)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0).clip(0.0, 1.0)
    rgb = np.stack([1.5 - np.abs(4.0 * v - c) for c in (3.0, 2.0, 1.0)], axis=-1)
    return (rgb.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _to_numpy(array):
    """A float64 numpy copy of a numpy array or (any-device) torch tensor."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def overlay_heatmap(image, attention, alpha=0.5):
    """`image` blended with the (h, w) `attention`, upsampled bilinearly to the image size.

    The map is divided by its maximum, so its peak is red whatever the grid size; `alpha` is the
    weight of the heat map in the blend.
    """
    image = image.convert('RGB')
    attention = _to_numpy(attention).astype(np.float32)
    upsampled = np.asarray(Image.fromarray(attention, mode='F').resize(image.size, Image.BILINEAR))
    peak = upsampled.max()
    heat = Image.fromarray(colormap(upsampled / peak if peak > 0 else upsampled))
    return Image.blend(image, heat, alpha)


def draw_box(image, box, colour=(255, 255, 255), width=None):
    """A copy of `image` with the box (x0, y0, x1, y1), in its pixel coordinates, outlined."""
    image = image.convert('RGB')  # a copy
    width = width or max(2, round(min(image.size) / 100))
    x0, y0, x1, y1 = (float(c) for c in box)
    ImageDraw.Draw(image).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
    return image


# ----------------------------------------------------------------------------- grids

def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def _fit(image, tile_size):
    """`image` scaled to fit a tile_size square, padded with light grey (aspect ratio kept)."""
    return ImageOps.pad(image.convert('RGB'), (tile_size, tile_size), color=(235, 235, 235))


def image_grid(tiles, captions, columns, tile_size):
    """The tiles, fitted into tile_size squares, in rows of `columns`, each captioned below.

    The grid is columns * (tile_size + GAP) + GAP wide and rows * (tile_size + CAPTION_HEIGHT +
    GAP) + GAP high, white.
    """
    if len(tiles) != len(captions):
        raise ValueError(f"{len(tiles)} tiles but {len(captions)} captions")
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    cell_w, cell_h = tile_size + GAP, tile_size + CAPTION_HEIGHT + GAP
    grid = Image.new('RGB', (columns * cell_w + GAP, rows * cell_h + GAP), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font(13)
    for k, (tile, caption) in enumerate(zip(tiles, captions)):
        x, y = GAP + (k % columns) * cell_w, GAP + (k // columns) * cell_h
        grid.paste(_fit(tile, tile_size), (x, y))
        while len(caption) > 3 and draw.textlength(caption, font=font) > tile_size - 4:
            caption = caption[:-4] + '...'
        draw.text((x + tile_size / 2, y + tile_size + CAPTION_HEIGHT / 2), caption, fill=(0, 0, 0),
                  font=font, anchor='mm')
    return grid


def _save(image, path):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    image.save(path)
    return path


# ----------------------------------------------------------------------------- the network's view

def view_geometry(width, height, img_size):
    """How Resize(S) + CenterCrop(S) maps a width x height image: (scale_x, scale_y, left, top).

    A point (x, y) of the original lands at (x * scale_x - left, y * scale_y - top) in the S x S
    view. The sizes and offsets follow torchvision exactly (the short side goes to S, the long
    side to int(S * long / short), the crop offset is round((size - S) / 2)).
    """
    short, long = min(width, height), max(width, height)
    new_long = int(img_size * long / short)
    new_w, new_h = (img_size, new_long) if width <= height else (new_long, img_size)
    left = int(round((new_w - img_size) / 2.0))
    top = int(round((new_h - img_size) / 2.0))
    return new_w / width, new_h / height, left, top


def box_to_view(box, image_size, img_size):
    """A box (x0, y0, x1, y1) of an original image of (width, height) in the S x S view, clipped."""
    scale_x, scale_y, left, top = view_geometry(image_size[0], image_size[1], img_size)
    x0, y0, x1, y1 = (float(c) for c in box)
    mapped = (x0 * scale_x - left, y0 * scale_y - top, x1 * scale_x - left, y1 * scale_y - top)
    return tuple(min(max(c, 0.0), float(img_size)) for c in mapped)


def network_view(image, img_size):
    """The S x S PIL image the network sees (before ToTensor and Normalize)."""
    return transforms.CenterCrop(img_size)(transforms.Resize(img_size)(image.convert('RGB')))


def transform_size(transform):
    """S of a Resize(S) + CenterCrop(S) transform (a Compose holding a CenterCrop)."""
    steps = getattr(transform, 'transforms', [transform])
    for step in steps:
        if isinstance(step, transforms.CenterCrop):
            height, width = step.size
            if height != width:
                raise ValueError(f"CenterCrop{step.size} is not square")
            return height
    raise ValueError("the transform has no CenterCrop; pass img_size")


# ----------------------------------------------------------------------------- attention

def localisation_share(attention, boxes, image_sizes, img_size):
    """How much attention falls in each region, and how much uniform attention would.

    attention: (N, h, w) maps over the S x S views (torch or numpy); boxes: (N, 4) or (N, K, 4) as
    (x0, y0, x1, y1) in original pixel coordinates, a region being the union of its K boxes (empty
    boxes such as (0, 0, 0, 0) add nothing); image_sizes: (N, 2) original (width, height). Each box
    is mapped into its view and then into cell units; a cell partly covered counts with the covered
    fraction of its area, overlaps once (inclusion-exclusion over the boxes' intersections).
    Returns numpy (mass, area_share), both (N,): the fraction of the attention mass inside the
    region, and the region's share of the view area.
    """
    attention = _to_numpy(attention)
    n, h, w = attention.shape
    boxes, image_sizes = _to_numpy(boxes).reshape(n, -1, 4), _to_numpy(image_sizes).reshape(n, 2)
    view = np.array([[box_to_view(b, size, img_size) for b in image_boxes]
                     for image_boxes, size in zip(boxes, image_sizes)]).reshape(boxes.shape)  # (N, K, 4)
    inside, area = np.zeros(n), np.zeros(n)
    for r in range(1, view.shape[1] + 1):
        for subset in itertools.combinations(range(view.shape[1]), r):
            x0, y0 = view[:, subset, 0].max(axis=1), view[:, subset, 1].max(axis=1)  # intersection
            x1, y1 = view[:, subset, 2].min(axis=1), view[:, subset, 3].min(axis=1)
            sign = (-1) ** (r - 1)
            area += sign * (x1 - x0).clip(0) * (y1 - y0).clip(0) / img_size ** 2
            cover_x = _interval_cover(x0 * w / img_size, x1 * w / img_size, w)  # (N, w)
            cover_y = _interval_cover(y0 * h / img_size, y1 * h / img_size, h)  # (N, h)
            inside += sign * np.einsum('nij,ni,nj->n', attention, cover_y, cover_x)
    total = attention.sum(axis=(1, 2))
    mass = np.divide(inside, total, out=np.zeros(n), where=total > 0)
    return mass, area


def _interval_cover(start, end, cells):
    """Fraction of each unit cell [k, k+1), k < cells, covered by [start, end): (N,) -> (N, cells)."""
    k = np.arange(cells)[None, :]
    return (np.minimum(end[:, None], k + 1) - np.maximum(start[:, None], k)).clip(0.0, 1.0)


def save_attention_grid(model, samples, attributes, transform, device, path, regions=None,
                        img_size=None, columns=4, batch_size=32):
    """Overlay each sample's spatial attention on the view the network saw; write a PNG grid.

    samples: list of (image_path, attribute_index); attributes: attribute names, for captions;
    transform: the evaluation transform (Resize(S) + CenterCrop(S) + ToTensor + Normalize); S is
    read from its CenterCrop unless img_size is given. regions: optional list, per sample None or
    boxes (x0, y0, x1, y1) in original pixel coordinates (one box or a (K, 4) array; empty boxes
    are skipped), outlined on its tile. The model runs
    in eval mode under inference_mode (its training flag is restored). Returns `path`.
    """
    img_size = img_size or transform_size(transform)
    regions = list(regions) if regions is not None else [None] * len(samples)
    if len(regions) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(regions)} regions")
    images = [load_image(image_path) for image_path, _ in samples]
    maps = _attention_maps(model, images, [a for _, a in samples], transform, device, batch_size)
    tiles, captions = [], []
    for image, (_, attribute), attention, box in zip(images, samples, maps, regions):
        tile = overlay_heatmap(network_view(image, img_size), attention)
        for box in ([] if box is None else np.reshape(box, (-1, 4))):
            if box[2] > box[0] and box[3] > box[1]:
                tile = draw_box(tile, box_to_view(box, image.size, img_size), (255, 255, 255))
        tiles.append(tile)
        captions.append(str(attributes[attribute]))
    return _save(image_grid(tiles, captions, columns, img_size), path)


def _attention_maps(model, images, attribute_indices, transform, device, batch_size):
    """(N, h, w) numpy attention of PIL `images` under their attributes, in batches."""
    was_training = model.training
    model.eval()
    maps = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.stack([transform(im) for im in images[start:start + batch_size]]).to(device)
                attrs = torch.as_tensor(attribute_indices[start:start + batch_size], device=device)
                maps.append(model.attention_maps(batch, attrs).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(maps) if maps else np.zeros((0, 1, 1))


# ----------------------------------------------------------------------------- retrieval

def save_retrieval_grid(query_path, result_paths, scores, path, tile_size=128):
    """One row: the query, then the results captioned 'rank k  score'; writes a PNG, returns `path`."""
    tiles = [load_image(query_path)] + [load_image(p) for p in result_paths]
    captions = ['query'] + [f'rank {k}  {float(s):.3f}' for k, s in enumerate(scores, start=1)]
    return _save(image_grid(tiles, captions, len(tiles), tile_size), path)

