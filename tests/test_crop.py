"""ASEN++'s attention-guided crop (crop.py) against the authors' per-image LocalTransform
(re-written in original_asenpp.py with numpy and PIL)."""
import numpy as np
import pytest
import torch
from PIL import Image

from lib import crop
import original_asenpp as theirs

G, OUT = 32, 16


def batch_of(images):
    return crop.SourceImages.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])


def ours(maps, images, threshold=0.1):
    return crop.attention_crops(torch.as_tensor(maps), G, threshold, OUT, sources=batch_of(images))


@pytest.mark.parametrize('threshold', [0.1, 0.4])
def test_random_maps_on_images_of_many_shapes(threshold):
    rng = np.random.default_rng(0)
    shapes = [(40, 40), (30, 50), (50, 30), (33, 71), (96, 41), (32, 32), (17, 20), (64, 64)]
    images = [theirs.random_image(rng, w, h) for w, h in shapes]
    maps = np.exp(30 * rng.random((len(images), 4, 4))).astype(np.float32)   # peaked: boxes vary
    sides = crop.attention_boxes(torch.from_numpy(maps), G, threshold)[:, 2]
    assert (sides < G).sum() >= 4
    got = ours(maps, images, threshold)
    for i, (img, m) in enumerate(zip(images, maps)):
        expected = theirs.local_transform(img, m, G, OUT, threshold)
        assert torch.equal(got[i], expected), (i, (got[i] - expected).abs().max())


def test_box_at_the_border_and_one_pixel_past_it():
    rng = np.random.default_rng(1)
    images = [theirs.random_image(rng, 48, 40), theirs.random_image(rng, 40, 40), theirs.random_image(rng, 40, 56)]
    maps = np.zeros((3, G, G), dtype=np.float32)       # at the view's size: the mask is exact
    maps[0, :5, :3] = 1                                 # top-left corner
    maps[1, 10:13, G - 1] = 1                           # 1 x 3 box on the right edge: the authors'
    maps[2, G - 1, 4:7] = 1                             # square ends one pixel past the view
    boxes = crop.attention_boxes(torch.from_numpy(maps), G, 0.1)
    assert boxes.tolist() == [[0, 0, 5], [G - 2, 10, 3], [4, G - 2, 3]]
    got = ours(maps, images)
    for i, (img, m) in enumerate(zip(images, maps)):
        expected = theirs.local_transform(img, m, G, OUT, 0.1)
        assert torch.equal(got[i], expected), i


def test_constant_map_crops_the_whole_view():
    rng = np.random.default_rng(2)
    images = [theirs.random_image(rng, 50, 30), theirs.random_image(rng, 30, 30)]
    maps = np.full((2, 4, 4), 1 / 16, dtype=np.float32)
    assert crop.attention_boxes(torch.from_numpy(maps), G, 0.1).tolist() == [[0, 0, G]] * 2
    got = ours(maps, images)
    for i, img in enumerate(images):      # the authors' code fails here (0/0); ours: the centre square
        expected = theirs.crop_resize(img, theirs.view_box_to_original(img, 0, 0, G, G), OUT)
        assert torch.equal(got[i], expected)


def test_boxes_match_a_plain_loop():
    rng = np.random.default_rng(3)
    maps = np.exp(16 * rng.random((20, 5, 3))).astype(np.float32)
    sizes = torch.tensor([[int(rng.integers(10, 90)), int(rng.integers(10, 90))] for _ in range(20)])
    boxes = crop.view_to_source(crop.attention_boxes(torch.from_numpy(maps), G, 0.2), sizes, G)
    for m, (h, w), box in zip(maps, sizes.tolist(), boxes.tolist()):
        x0, y0, x1, y1 = theirs.local_box(Image.new('RGB', (w, h)), m, G, 0.2)
        assert box == [x0, y0, max(x1 - x0, 1)]


def test_resize_weights_are_pils():
    """The float weights resample a crop as PIL's bilinear resize does, up to its uint8 rounding."""
    rng = np.random.default_rng(4)
    img = theirs.random_image(rng, 45, 45)
    # (5, 40, 10): a 4x downscale away from the edge, whose first window would reach before the box
    for start, side, out in ((3, 37, 16), (0, 45, 45), (10, 7, 16), (2, 20, 20), (5, 40, 10)):
        w = crop.pil_bilinear_weights(torch.tensor([start]), torch.tensor([side]), out, 45)[0]
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).double()
        resized = w @ pixels @ w.T
        expected = np.asarray(img.crop((start, start, start + side, start + side)).resize((out, out), Image.BILINEAR))
        assert np.abs(resized.permute(1, 2, 0).numpy() - expected).max() <= 1.0


def test_view_crop_is_the_same_box_from_the_view():
    """The shortcut: a square image of the view's size gives the same pixels either way (up to PIL's
    uint8 rounding)."""
    rng = np.random.default_rng(5)
    images = [theirs.random_image(rng, G, G) for _ in range(3)]
    maps = torch.from_numpy(rng.random((3, 4, 4)).astype(np.float32) ** 4)
    views = torch.stack([theirs.global_transform(G)(i) for i in images])
    from_view = crop.attention_crops(maps, G, 0.1, OUT, views=views)
    from_original = crop.attention_crops(maps, G, 0.1, OUT, sources=batch_of(images))
    assert (from_view - from_original).abs().max() <= 1.01 / 255 / 0.224


def level_of(value):
    """The uint8 level crop.attention_boxes gives `value` in a map whose min is 0 and max 1."""
    return int(torch.floor(torch.tensor(value, dtype=torch.float32) / 1.0 * 255))


def test_threshold_is_strict_a_level_at_the_threshold_is_out():
    """OpenCV's THRESH_BINARY keeps level > floor(255 * threshold): with threshold 0.2 (floor 51) a
    pixel of level 51 is out and one of level 52 in. The map is at the view's size, so the resize
    is the identity."""
    maps = torch.zeros(1, G, G)
    maps[0, 10:12, 10:12] = 1.0                       # level 255: the peak
    maps[0, 20, 25] = 0.2                             # level 51: exactly the threshold's level
    maps[0, 25, 5] = 51.5 / 255                       # 51.5, truncated to 51: out too
    maps[0, 2, 30] = 0.2035                           # 51.89 on the 0..255 scale (52.1 on 0..256): out
    assert level_of(0.2) == 51 == int(255 * 0.2) == level_of(51.5 / 255) == level_of(0.2035)
    assert crop.attention_boxes(maps, G, 0.2).tolist() == [[10, 10, 2]]
    maps[0, 20, 25] = 52.5 / 255                      # level 52: just above
    assert level_of(52.5 / 255) == 52
    # rows 10..20, columns 10..25: 16 wide, 11 high -> a square of 16 around (10 + 8, 10 + 5)
    assert crop.attention_boxes(maps, G, 0.2).tolist() == [[10, 7, 16]]


def test_threshold_zero_drops_only_the_minimum():
    maps = torch.zeros(1, G, G)
    maps[0, 3:9, 20:22] = 0.01                        # level 2 (> 0): in
    maps[0, 5, 21] = 1.0
    # columns 20..21 (w 2), rows 3..8 (h 6): a square of 6 centred on column 21 -> x = 18
    assert crop.attention_boxes(maps, G, 0.0).tolist() == [[18, 3, 6]]


def test_box_is_the_square_on_the_longer_side_around_the_centre():
    maps = torch.zeros(3, G, G)
    maps[0, 4:10, 10:12] = 1                          # 2 wide, 6 high: side 6, centre (11, 7)
    maps[1, 6:9, 2:14] = 1                            # 12 wide, 3 high: side 12, centre (8, 7) -> y 1
    maps[2, 0:2, 0:2] = 1                             # at the corner: clamped at 0
    assert crop.attention_boxes(maps, G, 0.5).tolist() == [[8, 4, 6], [2, 1, 12], [0, 0, 2]]


def test_threshold_half_keeps_level_128():
    """threshold 0.5: floor(127.5) = 127, so level 128 is in (a threshold on the 0..256 scale,
    128, would drop it)."""
    maps = torch.zeros(1, G, G)
    maps[0, 4, 4] = 1.0
    maps[0, 9, 4] = 128.5 / 255
    assert level_of(128.5 / 255) == 128
    assert crop.attention_boxes(maps, G, 0.5).tolist() == [[1, 4, 6]]      # rows 4..9 of column 4


def test_levels_are_min_max_normalised():
    """Adding a constant to a map (exactly, in float32) leaves its boxes unchanged."""
    gen = torch.Generator().manual_seed(4)
    maps = torch.randint(0, 257, (6, G, G), generator=gen).float() / 256
    maps[:, 0, 0] = 0.0
    maps = maps * (torch.rand(6, G, G, generator=gen) < 0.01)          # sparse: boxes smaller than the view
    maps[:, 7, 9] = 1.0
    boxes = crop.attention_boxes(maps, G, 0.7)
    assert (boxes[:, 2] < G).all()
    assert torch.equal(crop.attention_boxes(maps + 4, G, 0.7), boxes)


def test_one_pixel_masks_at_the_first_row_and_column():
    maps = torch.zeros(2, G, G)
    maps[0, 5, 0] = 1.0
    maps[1, 0, 7] = 1.0
    assert crop.attention_boxes(maps, G, 0.5).tolist() == [[0, 5, 1], [7, 0, 1]]


def test_half_precision_maps_are_thresholded_in_float32():
    """ASEN++'s maps under bf16 autocast: the resize runs on their float32 values."""
    gen = torch.Generator().manual_seed(5)
    maps = torch.rand(64, 5, 5, generator=gen).to(torch.bfloat16)
    for threshold in (0.1, 0.3, 0.5, 0.7):
        assert torch.equal(crop.attention_boxes(maps, G, threshold), crop.attention_boxes(maps.float(), G, threshold))


def test_view_to_source_side_is_at_least_one_pixel():
    """A 1-pixel box of a 32-px view on a 10-px image scales to 0.3 px: it becomes 1."""
    boxes = crop.view_to_source(torch.tensor([[3, 31, 1]]), torch.tensor([[10, 10]]), G)
    assert boxes.tolist() == [[0, 9, 1]]


def test_box_past_the_edge_of_the_only_image():
    """The authors' square can end a pixel past the view, hence past an image of the view's size:
    with one image in the batch no other image's padding covers it, and the missing pixels are 0
    (PIL's crop), not a narrower window."""
    rng = np.random.default_rng(6)
    for corner, width in (('bottom', G), ('right', G), ('bottom', G + 16)):    # the last one landscape
        image = theirs.random_image(rng, width, G)
        maps = np.zeros((1, G, G), dtype=np.float32)
        if corner == 'bottom':
            maps[0, G - 1, 4:7] = 1                          # 3 x 1 box on the bottom edge
        else:
            maps[0, 10:13, G - 1] = 1                        # 1 x 3 on the right edge
        box = crop.attention_boxes(torch.from_numpy(maps), G, 0.1)[0].tolist()
        assert max(box[0], box[1]) + box[2] == G + 1        # one pixel past
        expected = theirs.local_transform(image, maps[0], G, OUT, 0.1)
        assert torch.equal(ours(maps, [image])[0], expected)


def test_view_crop_uses_x_for_columns_and_y_for_rows():
    rng = np.random.default_rng(7)
    image = theirs.random_image(rng, G, G)
    views = theirs.global_transform(G)(image)[None]
    for box in ([3, 12, 14], [15, 2, 9]):
        boxes = torch.tensor([box])
        from_view = crop.crop_view(views, boxes, OUT)
        from_original = crop.crop_original(batch_of([image]), boxes, OUT)
        assert (from_view - from_original).abs().max() <= 1.01 / 255 / 0.224
