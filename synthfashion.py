"""SynthFashion: a small, deterministic, synthetic FashionAI-like dataset.

Every image shows one person-like figure (skin-toned head, neck, arms, legs)
wearing one garment (a top or dress: torso, two sleeves, a neckline, a hem)
on a cluttered background. Five attributes are drawn independently and
uniformly at random for every image, in this order:

====================  ==========================================  ========
attribute             values                                      region
====================  ==========================================  ========
``sleeve_length``     sleeveless, short, elbow, long              local
``neckline_design``   round, v_neck, square, turtle               local
``coat_length``       crop, hip, knee, ankle (height of the hem)  local
``colour``            red, blue, green, black, white              global
``pattern``           plain, stripes, dots, checks (on the torso) global
====================  ==========================================  ========

The three local attributes live in different, small parts of the image (the
arms, the neck, the hem), the two global ones cover the whole garment, so a
model needs attribute-specific spatial attention to serve all of them with
one backbone. Nuisance variation: garment position, scale and rotation,
body width, arm angle, skin tone, hair colour, colour jitter, pattern
frequency and phase, background colour, gradient and clutter, lighting
(brightness, contrast, directional gain) and pixel noise.

On-disk layout (all paths relative to the dataset folder, FashionAI style):

* ``meta.json``: ``{"SynthFashion": {"ATTRIBUTES", "ATTRIBUTES_NUM",
  "VALUES", "REGION_KIND"}}``.
* ``images/<split>/<id>.jpg``: RGB JPEG images (quality 92).
* ``filenames_<split>.txt``: one image path a line; line number = image id.
* ``label_train.txt``: ``id attr value [attr value ...]`` with all attributes.
* ``query_<split>.txt`` / ``candidate_<split>.txt`` (valid, test):
  ``id attr value``; every image appears once, under one attribute, as a
  query (about 1 in 5) or as a candidate.
* ``regions_<split>.txt``: line = image id; ``x0 y0 x1 y1`` for every
  attribute in order (pixel coordinates of the saved image, x1/y1
  exclusive): where the attribute is visible (the global ones get the
  garment's bounding box).
* ``settings.json``: the generator settings, written last (a folder without
  it is incomplete).

Everything is derived from ``numpy.random.default_rng`` seeded with
``(seed, split, index)``, so the same settings give identical files.
Command line: ``python synthfashion.py OUT_DIR [--n-train N ...]``.
"""

import argparse
import colorsys
import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageChops, ImageDraw

DATASET_NAME = "SynthFashion"
DEFAULT_SETTINGS = dict(seed=0, image_size=128, n_train=2000, n_valid=500, n_test=500, version=1)

VALUES = {
    "sleeve_length": ["sleeveless", "short", "elbow", "long"],
    "neckline_design": ["round", "v_neck", "square", "turtle"],
    "coat_length": ["crop", "hip", "knee", "ankle"],
    "colour": ["red", "blue", "green", "black", "white"],
    "pattern": ["plain", "stripes", "dots", "checks"],
}
ATTRIBUTES = list(VALUES)
REGION_KIND = {"sleeve_length": "local", "neckline_design": "local", "coat_length": "local",
               "colour": "global", "pattern": "global"}
SPLITS = ("train", "valid", "test")
QUERY_FRACTION = 0.2
JPEG_QUALITY = 92
SUPERSAMPLE = 2

# Figure geometry, in units of the figure height ``u`` (neckline top to ankle).
SLEEVE_LENGTHS = (0.0, 0.13, 0.25, 0.44)
VIRTUAL_SLEEVE_LENGTH = 0.13  # region of a sleeveless garment: where a short sleeve would be
HEM_HEIGHTS = (0.34, 0.55, 0.77, 0.97)
PROFILE_Y = (0.05, 0.17, 0.40, 0.55, 0.78, 1.00)  # garment side profile: height ...
PROFILE_HALF_WIDTH = (0.21, 0.19, 0.165, 0.19, 0.23, 0.27)  # ... and half width
NECK_HALF_WIDTH = 0.07
SHOULDER_Y = 0.05
ARM_LENGTH = 0.46
BASE_COLOURS = ((200, 35, 45), (35, 70, 175), (35, 140, 65), (38, 38, 42), (236, 236, 230))
SKIN_TONES = ((236, 200, 172), (212, 162, 126), (172, 120, 86), (122, 82, 60))
HAIR_COLOURS = ((30, 22, 18), (90, 60, 35), (170, 130, 70), (60, 60, 60))
SHOE_COLOUR = (30, 28, 30)


# --------------------------------------------------------------------- settings

def _merged_settings(overrides):
    """Return DEFAULT_SETTINGS updated with ``overrides`` (unknown keys raise)."""
    unknown = set(overrides) - set(DEFAULT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown SynthFashion settings: {sorted(unknown)}")
    settings = dict(DEFAULT_SETTINGS, **overrides)
    for split in ("valid", "test"):
        if settings[f"n_{split}"] < 2 * len(ATTRIBUTES):
            raise ValueError(f"n_{split} must be at least {2 * len(ATTRIBUTES)}")
    return {key: int(value) for key, value in settings.items()}


def _image_rng(seed, split, index):
    """Random generator of one image, independent of generation order."""
    return np.random.default_rng([seed, SPLITS.index(split), 1, index])


def _split_rng(seed, split):
    """Random generator of split-level choices (query/candidate roles)."""
    return np.random.default_rng([seed, SPLITS.index(split), 2])


# --------------------------------------------------------------------- geometry

class Figure:
    """Pose of the figure in canvas pixels: centre x, top y, height u, shape jitter."""

    def __init__(self, rng, size):
        self.u = size * rng.uniform(0.75, 0.92)
        margin = 0.03 * size
        self.top = rng.uniform(margin, max(margin, size - self.u - margin))
        self.cx = size / 2 + rng.uniform(-0.1, 0.1) * size
        self.width = rng.uniform(0.9, 1.1)
        self.arm_angle = math.radians(rng.uniform(10, 24))
        self.angle = rng.uniform(-8, 8)

    def point(self, dx, dy):
        """Canvas point at (dx, dy) figure units from the neckline centre."""
        return (self.cx + dx * self.u, self.top + dy * self.u)

    def box(self, dx0, dy0, dx1, dy1):
        """Canvas box [x0, y0, x1, y1] from figure units."""
        return [*self.point(dx0, dy0), *self.point(dx1, dy1)]

    def centre(self):
        """Rotation centre: middle of the figure."""
        return self.point(0, 0.5)


def _half_width(figure, y, scale=1.0):
    """Half width (figure units) of the garment side profile at height y."""
    return float(np.interp(y, PROFILE_Y, PROFILE_HALF_WIDTH)) * figure.width * scale


def _torso_polygon(figure, bottom, scale=1.0):
    """Closed outline of a torso from the neckline down to height ``bottom``."""
    left = [(-NECK_HALF_WIDTH * scale, 0.0), (-_half_width(figure, SHOULDER_Y, scale), SHOULDER_Y)]
    left += [(-_half_width(figure, y, scale), y) for y in PROFILE_Y[1:] if y < bottom]
    left.append((-_half_width(figure, bottom, scale), bottom))
    right = [(-x, y) for x, y in reversed(left)]
    return [figure.point(x, y) for x, y in left + right]


def _arm_axis(figure, side):
    """Shoulder joint and unit direction (figure units) of the arm on ``side`` (-1/+1)."""
    shoulder = (side * (_half_width(figure, SHOULDER_Y) - 0.02), SHOULDER_Y + 0.01)
    return shoulder, (side * math.sin(figure.arm_angle), math.cos(figure.arm_angle))


def _arm_point(figure, side, distance, across=0.0):
    """Canvas point ``distance`` along the arm axis and ``across`` it (figure units)."""
    (x, y), (dx, dy) = _arm_axis(figure, side)
    return figure.point(x + dx * distance + dy * across, y + dy * distance - dx * across)


def _limb_polygon(figure, side, start, end, width0, width1):
    """Quadrilateral along the arm axis of ``side`` from ``start`` to ``end``."""
    return [_arm_point(figure, side, start, width0 / 2),
            _arm_point(figure, side, end, width1 / 2),
            _arm_point(figure, side, end, -width1 / 2),
            _arm_point(figure, side, start, -width0 / 2)]


def _sleeve_polygons(figure, length):
    """The two sleeve polygons of the given length (figure units)."""
    return [_limb_polygon(figure, side, -0.02, length, 0.11, 0.09) for side in (-1, 1)]


def _neck_region(figure):
    """Corners of the neckline box."""
    return _corners(figure.box(-0.14, -0.09, 0.14, 0.24))


def _hem_region(figure, hem):
    """Corners of the band around the hem."""
    half = _half_width(figure, hem) + 0.03
    return _corners(figure.box(-half, hem - 0.07, half, hem + 0.05))


def _corners(box):
    """Four corners of a box [x0, y0, x1, y1]."""
    x0, y0, x1, y1 = box
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _rotated_bbox(points, centre, angle, size):
    """Integer box (x1/y1 exclusive) of points after PIL's rotate(angle, center=centre)."""
    pts = np.asarray(points, dtype=float) - centre
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    xs = centre[0] + pts[:, 0] * cos + pts[:, 1] * sin
    ys = centre[1] - pts[:, 0] * sin + pts[:, 1] * cos
    x0 = min(max(int(math.floor(xs.min())), 0), size - 1)
    y0 = min(max(int(math.floor(ys.min())), 0), size - 1)
    x1 = max(min(int(math.ceil(xs.max())), size), x0 + 1)
    y1 = max(min(int(math.ceil(ys.max())), size), y0 + 1)
    return [x0, y0, x1, y1]


# --------------------------------------------------------------------- colours

def _jittered(colour, rng, amount):
    """Colour with per-channel jitter and a brightness factor."""
    gain = rng.uniform(0.9, 1.1)
    return tuple(int(np.clip(c * gain + rng.uniform(-amount, amount), 0, 255)) for c in colour)


def _shade(colour, factor):
    """Darker (factor < 1) version of a colour."""
    return tuple(int(c * factor) for c in colour)


def _trim_colour(colour):
    """Seam/trim colour: darker shade, or a lighter one for near-black garments."""
    return _shade(colour, 0.7) if sum(colour) > 120 else _contrast_shade(colour)


def _contrast_shade(colour):
    """Pattern colour: lighter shade of dark colours, darker shade of light ones."""
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    target, mix = (255, 0.5) if luminance < 150 else (0, 0.4)
    return tuple(int(c * (1 - mix) + target * mix) for c in colour)


# --------------------------------------------------------------------- drawing

def _supersampled(box):
    """Box in supersampled layer pixels."""
    return [c * SUPERSAMPLE for c in box]


class Canvas:
    """Supersampled RGBA layer with drawing helpers in canvas coordinates."""

    def __init__(self, size):
        self.size = size
        self.image = Image.new("RGBA", (size * SUPERSAMPLE, size * SUPERSAMPLE), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)

    @staticmethod
    def scaled(points):
        """Flat list of supersampled coordinates."""
        return [c * SUPERSAMPLE for p in points for c in p]

    def polygon(self, points, fill, outline=None):
        """Filled polygon, optionally outlined."""
        self.draw.polygon(self.scaled(points), fill=fill, outline=outline,
                          width=SUPERSAMPLE if outline else 0)

    def ellipse(self, box, fill):
        """Filled ellipse in a canvas box."""
        self.draw.ellipse(_supersampled(box), fill=fill)

    def line(self, points, fill, width):
        """Polyline of canvas width ``width``."""
        self.draw.line(self.scaled(points), fill=fill, width=max(1, round(width * SUPERSAMPLE)))

    def mask(self, points):
        """L-mode mask of a polygon."""
        mask = Image.new("L", self.image.size, 0)
        ImageDraw.Draw(mask).polygon(self.scaled(points), fill=255)
        return mask

    def rotated(self, centre, angle):
        """The layer rotated about ``centre`` and reduced to canvas size (premultiplied)."""
        centre = (centre[0] * SUPERSAMPLE, centre[1] * SUPERSAMPLE)
        layer = self.image.convert("RGBa").rotate(angle, Image.BILINEAR, center=centre)
        return layer.reduce(SUPERSAMPLE).convert("RGBA")


def _draw_body(canvas, figure, skin, hair):
    """Head, neck, hips, legs and shoes of the figure (under the garment)."""
    canvas.ellipse(figure.box(-0.065, -0.28, 0.065, -0.11), skin)
    canvas.ellipse(figure.box(-0.07, -0.30, 0.07, -0.20), hair)
    canvas.polygon(_corners(figure.box(-0.035, -0.14, 0.035, 0.06)), skin)
    canvas.polygon(_torso_polygon(figure, 0.58, scale=0.9), skin)
    for side in (-1, 1):
        x = side * 0.075 * figure.width
        leg = [(x - 0.06, 0.52), (x + 0.06, 0.52), (x + 0.035, 0.99), (x - 0.035, 0.99)]
        canvas.polygon([figure.point(*p) for p in leg], skin)
        canvas.ellipse(figure.box(x - 0.045, 0.97, x + 0.045, 1.02), SHOE_COLOUR)


def _draw_arms(canvas, figure, skin):
    """Bare arms and hands (sleeves are drawn over them)."""
    for side in (-1, 1):
        canvas.polygon(_limb_polygon(figure, side, 0.0, ARM_LENGTH, 0.075, 0.055), skin)
        hand = _arm_point(figure, side, ARM_LENGTH + 0.03)
        r = 0.035 * figure.u
        canvas.ellipse([hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r], skin)


PATTERN_X = (-0.4, 0.4)  # figure-unit extent covered by the torso pattern
PATTERN_Y = (-0.1, 1.05)


def _pattern_grid(rng):
    """Random period and phased x, y grid lines (figure units) of a pattern."""
    period = rng.uniform(0.10, 0.13)
    phase_x, phase_y = rng.uniform(0, period, size=2)
    xs = np.arange(PATTERN_X[0] - period, PATTERN_X[1], period) + phase_x
    ys = np.arange(PATTERN_Y[0] - period, PATTERN_Y[1], period) + phase_y
    return period, xs, ys


def _band_mask(size, figure, boxes, value):
    """L-mode mask with the given figure-unit boxes filled with ``value``."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        draw.rectangle(_supersampled(figure.box(*box)), fill=value)
    return mask


def _pattern_mask(size, figure, pattern, rng):
    """L-mode mask of a pattern (plain, stripes, dots, checks) around the torso."""
    period, xs, ys = _pattern_grid(rng)
    rows = [(PATTERN_X[0], y, PATTERN_X[1], y + 0.45 * period) for y in ys]
    if pattern == 0:
        return Image.new("L", size, 0)
    if pattern == 1:
        return _band_mask(size, figure, rows, 255)
    if pattern == 3:  # gingham: half-strength bands, full strength at crossings
        columns = [(x, PATTERN_Y[0], x + 0.5 * period, PATTERN_Y[1]) for x in xs]
        return ImageChops.add(_band_mask(size, figure, rows, 150),
                              _band_mask(size, figure, columns, 150))
    mask = Image.new("L", size, 0)
    draw, r = ImageDraw.Draw(mask), 0.032
    for row, y in enumerate(ys):
        for x in xs + (period / 2) * (row % 2):
            draw.ellipse(_supersampled(figure.box(x - r, y - r, x + r, y + r)), fill=255)
    return mask


def _paint_pattern(canvas, figure, torso, pattern, colour, rng):
    """Paint the pattern in ``colour`` over the torso polygon only."""
    mask = _pattern_mask(canvas.image.size, figure, pattern, rng)
    canvas.image.paste(colour + (255,), mask=ImageChops.multiply(mask, canvas.mask(torso)))


def _draw_neckline(canvas, figure, neckline, base, skin, trim):
    """Neckline cut-out in skin (round, v, square) or a turtle collar; returns collar points."""
    w = 0.1
    if neckline == 0:
        canvas.ellipse(figure.box(-w, -0.1, w, 0.1), skin)
        canvas.draw.arc(_supersampled(figure.box(-w, -0.1, w, 0.1)), 0, 180,
                        fill=trim, width=SUPERSAMPLE)
    elif neckline == 1:
        v = [figure.point(-w, -0.001), figure.point(0, 0.22), figure.point(w, -0.001)]
        canvas.polygon(v, skin)
        canvas.line(v, trim, 1)
    elif neckline == 2:
        square = [figure.point(-w, -0.001), figure.point(-w, 0.11),
                  figure.point(w, 0.11), figure.point(w, -0.001)]
        canvas.polygon(square, skin)
        canvas.line(square, trim, 1)
    else:
        collar = _corners(figure.box(-0.06, -0.08, 0.06, 0.03))
        canvas.polygon(collar, base, outline=trim)
        canvas.line([figure.point(-0.06, -0.03), figure.point(0.06, -0.03)], trim, 1)
        return collar
    return []


def _draw_figure(canvas, figure, labels, rng):
    """Draw body and garment; return the unrotated region points of every attribute."""
    sleeve, neckline, hem_index, colour, pattern = labels
    skin = _jittered(SKIN_TONES[rng.integers(len(SKIN_TONES))], rng, 6)
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]
    base = _jittered(BASE_COLOURS[colour], rng, 12)
    trim = _trim_colour(base)
    hem = HEM_HEIGHTS[hem_index]
    _draw_body(canvas, figure, skin, hair)
    _draw_arms(canvas, figure, skin)
    torso = _torso_polygon(figure, hem)
    canvas.polygon(torso, base, outline=trim)
    _paint_pattern(canvas, figure, torso, pattern, _contrast_shade(base), rng)
    sleeves = _sleeve_polygons(figure, SLEEVE_LENGTHS[sleeve]) if sleeve else []
    for polygon in sleeves:
        canvas.polygon(polygon, base, outline=trim)
    collar = _draw_neckline(canvas, figure, neckline, base, skin, trim)
    sleeve_points = sum(sleeves or _sleeve_polygons(figure, VIRTUAL_SLEEVE_LENGTH), [])
    garment_points = torso + sum(sleeves, []) + collar
    return [sleeve_points, _neck_region(figure), _hem_region(figure, hem), garment_points,
            garment_points]


def _background(rng, size):
    """Desaturated random colour with a vertical gradient and faint clutter shapes."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.4), rng.uniform(0.45, 0.92))
    ramp = np.linspace(1 - rng.uniform(0, 0.15), 1 + rng.uniform(0, 0.15), size)[:, None, None]
    pixels = np.clip(ramp * np.array(rgb) * 255 * np.ones((size, size, 3)), 0, 255)
    background = Image.fromarray(pixels.astype(np.uint8)).convert("RGBA")
    return Image.alpha_composite(background, _clutter(rng, size))


def _clutter(rng, size):
    """Transparent layer with 3-6 faint random rectangles, ellipses and lines."""
    clutter = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(clutter)
    for _ in range(rng.integers(3, 7)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(30, 80)),)
        x0, y0, x1, y1 = rng.uniform(-0.2, 1.2, 4) * size
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 4)))
    return clutter


def _apply_lighting(image, rng):
    """Brightness/contrast jitter, a directional gain and gaussian pixel noise."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    size = pixels.shape[0]
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.85, 1.15)
    direction = rng.uniform(0, 2 * math.pi)
    grid = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    ramp = grid[None, :] * math.cos(direction) + grid[:, None] * math.sin(direction)
    pixels *= (1 + rng.uniform(0, 0.25) * ramp)[:, :, None]
    pixels += rng.normal(0, rng.uniform(1.5, 4.0), pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def draw_labels(rng):
    """One uniformly random value per attribute, in ATTRIBUTES order."""
    return [int(rng.integers(len(VALUES[name]))) for name in ATTRIBUTES]


def render_image(rng, labels, size):
    """Render one image; return (RGB PIL image, int array of regions (n_attributes, 4))."""
    background = _background(rng, size)
    figure = Figure(rng, size)
    canvas = Canvas(size)
    region_points = _draw_figure(canvas, figure, labels, rng)
    centre = figure.centre()
    layer = canvas.rotated(centre, figure.angle)
    image = _apply_lighting(Image.alpha_composite(background, layer), rng)
    regions = [_rotated_bbox(points, centre, figure.angle, size) for points in region_points]
    return image, np.array(regions, dtype=np.int64)


# --------------------------------------------------------------------- writing

def _write_lines(path, lines):
    """Write text lines with '\\n' endings."""
    with open(path, "w", newline="\n") as handle:
        handle.writelines(line + "\n" for line in lines)


def _write_split_images(folder, split, settings):
    """Render and save all images of a split; return (paths, labels, regions)."""
    os.makedirs(os.path.join(folder, "images", split))
    paths, labels, regions = [], [], []
    for index in range(settings[f"n_{split}"]):
        rng = _image_rng(settings["seed"], split, index)
        image_labels = draw_labels(rng)
        image, image_regions = render_image(rng, image_labels, settings["image_size"])
        path = f"images/{split}/{index:06d}.jpg"
        image.save(os.path.join(folder, path), quality=JPEG_QUALITY)
        paths.append(path)
        labels.append(image_labels)
        regions.append(image_regions)
    return paths, labels, regions


def _eval_roles(n_images, seed, split):
    """Per image: (attribute, is_query); attributes even, ~1 query : 4 candidates each."""
    rng = _split_rng(seed, split)
    attributes = np.arange(n_images) % len(ATTRIBUTES)
    rng.shuffle(attributes)
    is_query = np.zeros(n_images, dtype=bool)
    for attribute in range(len(ATTRIBUTES)):
        ids = np.flatnonzero(attributes == attribute)
        n_queries = min(max(1, round(QUERY_FRACTION * len(ids))), len(ids) - 1)
        is_query[rng.choice(ids, n_queries, replace=False)] = True
    return attributes, is_query


def _write_split_files(folder, split, paths, labels, regions, seed):
    """Write filenames, regions and label or query/candidate files of one split."""
    _write_lines(os.path.join(folder, f"filenames_{split}.txt"), paths)
    _write_lines(os.path.join(folder, f"regions_{split}.txt"),
                 [" ".join(str(int(c)) for c in r.ravel()) for r in regions])
    if split == "train":
        _write_lines(os.path.join(folder, "label_train.txt"),
                     [" ".join([str(i)] + [f"{a} {v}" for a, v in enumerate(values)])
                      for i, values in enumerate(labels)])
        return
    attributes, is_query = _eval_roles(len(paths), seed, split)
    lines = [f"{i} {a} {labels[i][a]}" for i, a in enumerate(attributes)]
    _write_lines(os.path.join(folder, f"query_{split}.txt"),
                 [line for line, q in zip(lines, is_query) if q])
    _write_lines(os.path.join(folder, f"candidate_{split}.txt"),
                 [line for line, q in zip(lines, is_query) if not q])


def _write_json(path, data):
    """Write JSON with a trailing newline."""
    with open(path, "w", newline="\n") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def _meta():
    """The meta.json content."""
    return {DATASET_NAME: {
        "ATTRIBUTES": ATTRIBUTES,
        "ATTRIBUTES_NUM": {name: len(values) for name, values in VALUES.items()},
        "VALUES": VALUES,
        "REGION_KIND": REGION_KIND,
    }}


def generate(root, **settings):
    """Write the dataset into folder ``root`` (replacing it) and return the settings.

    Builds in ``root + '.tmp-<pid>'`` and renames it into place when complete;
    ``settings.json`` is written last. ``settings`` override DEFAULT_SETTINGS.
    """
    settings = _merged_settings(settings)
    root = os.path.normpath(os.fspath(root))
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_json(os.path.join(tmp, "meta.json"), _meta())
    for split in SPLITS:
        paths, labels, regions = _write_split_images(tmp, split, settings)
        _write_split_files(tmp, split, paths, labels, regions, settings["seed"])
    _write_json(os.path.join(tmp, "settings.json"), settings)
    if os.path.lexists(root):
        shutil.rmtree(root)
    os.replace(tmp, root)
    return settings


def ensure(root, **overrides):
    """Generate the dataset at ``root`` unless it exists with the same settings.

    Returns False when the existing folder was reused, True when (re)generated.
    """
    settings = _merged_settings(overrides)
    settings_path = os.path.join(os.fspath(root), "settings.json")
    if os.path.isfile(settings_path):
        with open(settings_path) as handle:
            if json.load(handle) == settings:
                return False
    generate(root, **settings)
    return True


def read_regions(path):
    """Read a regions file into an int array of shape (n_images, n_attributes, 4)."""
    rows = np.loadtxt(path, dtype=np.int64, ndmin=2)
    return rows.reshape(len(rows), -1, 4)


def main(argv=None):
    """Command line: ``python synthfashion.py OUT_DIR [--seed S] [--n-train N] ...``."""
    parser = argparse.ArgumentParser(description="Generate the SynthFashion dataset.")
    parser.add_argument("out_dir")
    for key, value in DEFAULT_SETTINGS.items():
        if key != "version":
            parser.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    args = vars(parser.parse_args(argv))
    out_dir = args.pop("out_dir")
    settings = generate(out_dir, **args)
    n_images = sum(settings[f"n_{split}"] for split in SPLITS)
    print(f"wrote {n_images} SynthFashion images to {out_dir}")


if __name__ == "__main__":
    main()
