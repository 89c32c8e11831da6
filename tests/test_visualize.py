import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from lib import visualize
from helpers import tiny_net


def brute_force_share(attention, view_boxes, img_size):
    """Attention mass inside the union of integer-pixel view boxes, from a per-pixel copy of the map."""
    h, w = attention.shape
    cell_y, cell_x = img_size // h, img_size // w
    pixels = np.kron(attention, np.ones((cell_y, cell_x))) / (cell_y * cell_x)  # nearest cells
    inside = np.zeros_like(pixels, dtype=bool)
    for x0, y0, x1, y1 in np.reshape(view_boxes, (-1, 4)):
        inside[y0:y1, x0:x1] = True
    return pixels[inside].sum() / pixels.sum(), inside.mean()


def test_colormap_range_and_shape():
    values = np.linspace(-0.5, 1.5, 24).reshape(4, 6)
    colours = visualize.colormap(values)
    assert colours.shape == (4, 6, 3) and colours.dtype == np.uint8
    assert tuple(visualize.colormap(np.zeros((1, 1)))[0, 0]) == (0, 0, 128)  # dark blue
    assert tuple(visualize.colormap(np.ones((1, 1)))[0, 0]) == (128, 0, 0)   # dark red
    assert np.array_equal(visualize.colormap(np.array([[np.nan]])), visualize.colormap(np.zeros((1, 1))))


def test_overlay_keeps_image_size():
    image = Image.new('RGB', (37, 23), (10, 20, 30))
    out = visualize.overlay_heatmap(image, np.random.rand(3, 5), alpha=0.4)
    assert out.size == (37, 23) and out.mode == 'RGB'
    assert visualize.overlay_heatmap(image, torch.zeros(2, 2)).size == (37, 23)


@pytest.mark.parametrize('size', [(40, 40), (50, 30), (30, 50), (33, 71), (101, 20)])
def test_view_geometry_matches_torchvision(size):
    """A white box drawn on the original lands where box_to_view says, in torchvision's view."""
    img_size, box = 16, (0.3 * size[0], 0.4 * size[1], 0.8 * size[0], 0.9 * size[1])
    image = Image.new('L', size, 0)
    image.paste(255, tuple(int(round(c)) for c in box))
    view = np.asarray(visualize.network_view(image.convert('RGB'), img_size))[:, :, 0]
    assert view.shape == (img_size, img_size)
    x0, y0, x1, y1 = visualize.box_to_view(box, size, img_size)
    ys, xs = np.nonzero(view > 127)
    assert abs(xs.min() - x0) <= 1.5 and abs(xs.max() + 1 - x1) <= 1.5
    assert abs(ys.min() - y0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5


def test_transform_size():
    assert visualize.transform_size(datasets.build_transform(40, train=False)) == 40
    with pytest.raises(ValueError):
        visualize.transform_size(datasets.build_transform(40, train=False).transforms[2])


def test_localisation_share_uniform_equals_area():
    img_size = 12
    attention = np.full((3, 4, 4), 1 / 16)
    # (width, height) originals; the first two are scaled / cropped on the way to the view
    sizes = np.array([[24, 12], [12, 36], [12, 12]])
    boxes = np.array([[6, 0, 18, 12], [1, 13, 7, 20], [2.5, 1, 7, 11.5]])
    mass, share = visualize.localisation_share(attention, boxes, sizes, img_size)
    assert np.allclose(mass, share)
    assert np.allclose(share, [1.0, 6 * 7 / 144, 4.5 * 10.5 / 144])


def test_localisation_share_matches_brute_force():
    rng = np.random.default_rng(0)
    img_size, n = 12, 40
    attention = rng.random((n, 4, 3)) ** 4                     # cells of 3 x 4 pixels
    attention /= attention.sum(axis=(1, 2), keepdims=True)
    x = np.sort(rng.integers(0, img_size + 1, (n, 2)), axis=1)
    y = np.sort(rng.integers(0, img_size + 1, (n, 2)), axis=1)
    view_boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    # originals 2S wide and S high: the view is the middle half, at scale 1
    sizes = np.tile([2 * img_size, img_size], (n, 1))
    boxes = view_boxes + np.array([img_size // 2, 0, img_size // 2, 0])
    mass, share = visualize.localisation_share(torch.from_numpy(attention), boxes, sizes, img_size)
    for k in range(n):
        expected_mass, expected_share = brute_force_share(attention[k], view_boxes[k], img_size)
        assert mass[k] == pytest.approx(expected_mass, abs=1e-9)
        assert share[k] == pytest.approx(expected_share, abs=1e-9)


def test_localisation_share_union_matches_brute_force():
    """Regions of 3 boxes that overlap, nest or are empty: their union is counted once."""
    rng = np.random.default_rng(1)
    img_size, n, k = 12, 60, 3
    attention = rng.random((n, 3, 4)) ** 4                     # cells of 4 x 3 pixels
    x = np.sort(rng.integers(0, img_size + 1, (n, k, 2)), axis=2)
    y = np.sort(rng.integers(0, img_size + 1, (n, k, 2)), axis=2)
    boxes = np.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=2)  # (n, k, 4)
    boxes[::4, 2] = 0                                          # some regions have an empty box
    boxes[1::4, 1] = boxes[1::4, 0]                            # and some a repeated one
    sizes = np.tile([img_size, img_size], (n, 1))
    mass, share = visualize.localisation_share(attention, boxes, sizes, img_size)
    for i in range(n):
        expected_mass, expected_share = brute_force_share(attention[i], boxes[i], img_size)
        assert mass[i] == pytest.approx(expected_mass, abs=1e-9)
        assert share[i] == pytest.approx(expected_share, abs=1e-9)


def test_localisation_share_single_cell():
    img_size = 8
    attention = np.zeros((3, 4, 4))
    attention[:, 1, 2] = 1.0                                   # cell covering x 4..6, y 2..4
    boxes = np.array([[4, 2, 6, 4],                            # exactly that cell
                      [0, 0, 4, 8],                            # the left half: misses it
                      [5, 3, 8, 8]])                           # a quarter of the cell
    sizes = np.tile([img_size, img_size], (3, 1))
    mass, share = visualize.localisation_share(attention, boxes, sizes, img_size)
    assert np.allclose(mass, [1.0, 0.0, 0.25])
    assert np.allclose(share, [4 / 64, 32 / 64, 15 / 64])


def test_localisation_share_box_outside_view():
    """A box in the part cropped away gets no area and no mass."""
    mass, share = visualize.localisation_share(np.full((1, 2, 2), 0.25), np.array([[0, 0, 5, 10]]),
                                               np.array([[30, 10]]), 10)
    assert mass[0] == 0 and share[0] == 0


def grid_size(n, columns, tile):
    rows = -(-n // columns)
    gap = visualize.GAP
    return columns * (tile + gap) + gap, rows * (tile + visualize.CAPTION_HEIGHT + gap) + gap


def test_image_grid_truncates_long_captions():
    tiles = [Image.new('RGB', (10, 30), (255, 0, 0))] * 5
    grid = visualize.image_grid(tiles, ['a very long caption indeed, far too long'] * 5, 2, 50)
    assert grid.size == grid_size(5, 2, 50)
    with pytest.raises(ValueError):
        visualize.image_grid(tiles, ['x'], 2, 50)


def _write_images(tmp_path, sizes):
    rng = np.random.default_rng(1)
    paths = []
    for k, (w, h) in enumerate(sizes):
        path = tmp_path / f'img{k}.png'
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_save_attention_grid(tmp_path):
    net = tiny_net('ASENet', 3, dim_embed=8)                          # seeded with 0
    net.train()
    paths = _write_images(tmp_path, [(48, 32), (32, 32), (20, 40)])
    samples = [(paths[0], 0), (paths[1], 2), (paths[2], 1)]
    out = visualize.save_attention_grid(net, samples, ['collar', 'sleeve', 'colour'],
                                        datasets.build_transform(32, train=False), 'cpu',
                                        str(tmp_path / 'out' / 'attention.png'),
                                        regions=[(8, 4, 40, 28), None, (0, 0, 20, 20)], columns=2)
    assert out == str(tmp_path / 'out' / 'attention.png')
    with Image.open(out) as grid:
        assert grid.size == grid_size(3, 2, 32)
    assert net.training  # mode restored


def test_save_retrieval_grid(tmp_path):
    paths = _write_images(tmp_path, [(30, 20), (20, 30), (25, 25)])
    out = visualize.save_retrieval_grid(paths[0], paths[1:], [0.91, 0.5], str(tmp_path / 'r' / 'ret.png'),
                                        tile_size=40)
    with Image.open(out) as grid:
        assert grid.size == grid_size(3, 3, 40)
