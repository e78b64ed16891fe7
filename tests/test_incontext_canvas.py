"""Canvas stitching/cropping, the component encoding, difference masks and OpenCV inpainting."""
from __future__ import annotations

import numpy as np
import pytest

from pseudolabel.models.incontext import canvas as cv
from pseudolabel.models.incontext.component import decode_query, difference_mask, dilate, encode_component
from pseudolabel.models.inpainting import inpaint_opencv


def _img(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["grid", "vertical"])
def test_stitch_split_are_exact_inverses(layout):
    rng = np.random.default_rng(0)
    cell = 24
    a, b, q = _img(rng, cell, cell), _img(rng, cell, cell), _img(rng, cell, cell)
    canvas = cv.stitch(a, b, q, cell, layout)
    assert canvas.shape == cv.canvas_shape(cell, layout)
    assert canvas.dtype == np.uint8
    a2, b2, q2 = cv.split(canvas, layout)
    np.testing.assert_array_equal(a2, a)
    np.testing.assert_array_equal(b2, b)
    np.testing.assert_array_equal(q2, q)
    # stitching the split cells again gives the same canvas
    np.testing.assert_array_equal(cv.stitch(a2, b2, q2, cell, layout), canvas)


def test_grid_answer_cell_is_bottom_right():
    rng = np.random.default_rng(1)
    cell = 16
    a, b, q = _img(rng, cell, cell), _img(rng, cell, cell), _img(rng, cell, cell)
    canvas = cv.stitch(a, b, q, cell, "grid")
    np.testing.assert_array_equal(canvas[:cell, :cell], a)
    np.testing.assert_array_equal(canvas[:cell, cell:], b)
    np.testing.assert_array_equal(canvas[cell:, :cell], q)
    np.testing.assert_array_equal(canvas[cell:, cell:], q)  # the cell the model repaints
    assert cv.answer_box(cell, "grid") == (cell, 2 * cell, cell, 2 * cell)
    out = canvas.copy()
    out[cell:, cell:] = 7
    np.testing.assert_array_equal(cv.crop_answer(out, "grid"), np.full((cell, cell, 3), 7, np.uint8))


def test_vertical_answer_cell_is_bottom_of_target_column():
    rng = np.random.default_rng(2)
    cell = 16
    a, b, q = _img(rng, cell, cell), _img(rng, cell, cell), _img(rng, cell, cell)
    canvas = cv.stitch(a, b, q, cell, "vertical")
    assert canvas.shape == (2 * cell, cell, 6)
    np.testing.assert_array_equal(canvas[:cell, :, :3], a)
    np.testing.assert_array_equal(canvas[cell:, :, :3], q)
    np.testing.assert_array_equal(canvas[:cell, :, 3:], b)
    np.testing.assert_array_equal(canvas[cell:, :, 3:], q)
    assert cv.answer_box(cell, "vertical") == (cell, 2 * cell, 0, cell)
    out = canvas[..., 3:].copy()  # a model output is the 3-channel target column
    assert out.shape == cv.output_shape(cell, "vertical")
    out[cell:] = 9
    np.testing.assert_array_equal(cv.crop_answer(out, "vertical"), np.full((cell, cell, 3), 9, np.uint8))


@pytest.mark.parametrize("layout", ["grid", "vertical"])
@pytest.mark.parametrize("hw", [(37, 53), (100, 29), (64, 64)])
def test_sizes_not_multiple_of_cell(layout, hw):
    rng = np.random.default_rng(3)
    cell = 32
    a, b, q = _img(rng, 45, 61), _img(rng, 45, 61), _img(rng, *hw)
    canvas = cv.stitch(a, b, q, cell, layout)
    assert canvas.shape == cv.canvas_shape(cell, layout)
    out = canvas if layout == "grid" else canvas[..., 3:]
    back = cv.crop_answer(out, layout, size=hw)
    assert back.shape == (*hw, 3)
    # a smooth query survives the round trip through the cell closely
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
    smooth = np.stack([xx * 200 // hw[1], yy * 200 // hw[0], np.full_like(xx, 90)], -1).astype(np.uint8)
    canvas = cv.stitch(a, b, smooth, cell, layout)
    back = cv.crop_answer(canvas if layout == "grid" else canvas[..., 3:], layout, size=hw)
    assert np.abs(back.astype(int) - smooth.astype(int)).mean() < 4


def test_transfer_residual_identity_and_edit():
    rng = np.random.default_rng(4)
    q = rng.uniform(size=(37, 53, 3)).astype(np.float32)
    q_cell = cv.to_cell(q, 16)
    np.testing.assert_array_equal(cv.transfer_residual(q, q_cell, q_cell), q)
    shifted = cv.transfer_residual(q * 0.5, cv.to_cell(q * 0.5, 16), cv.to_cell(q * 0.5, 16) + 0.25)
    np.testing.assert_allclose(shifted, np.clip(q * 0.5 + 0.25, 0, 1), atol=1e-5)


def test_component_encoding_is_lossless():
    rng = np.random.default_rng(5)
    q, c = _img(rng, 20, 30), _img(rng, 20, 30)
    comp = encode_component(q, c)
    assert comp.dtype == np.uint8 and comp.shape == q.shape
    np.testing.assert_array_equal(decode_query(c, comp), q)
    # zero difference is mid-grey; small differences are 128 + d
    np.testing.assert_array_equal(encode_component(q, q), np.full_like(q, 128))
    c2 = np.clip(q.astype(int) - 5, 0, 255).astype(np.uint8)
    d = q.astype(int) - c2
    np.testing.assert_array_equal(encode_component(q, c2), (128 + d).astype(np.uint8))


def test_difference_mask_and_inpainting():
    base = np.full((64, 64, 3), 100, np.uint8)
    marked = base.copy()
    marked[20:30, 10:50] = 220
    marked[5, 5] = 255  # a speck the clean-up drops
    m = difference_mask(marked, base, threshold=12, min_area=16)
    rect = np.zeros((64, 64), bool)
    rect[20:30, 10:50] = True
    assert not m[~rect].any() and not m[5, 5]  # the speck is dropped
    assert m.sum() >= 390  # the opening only rounds the corners
    m = dilate(m, 2)  # cover the rounded-off corners too
    filled = inpaint_opencv(marked, m, radius=3)
    np.testing.assert_array_equal(filled[~m], marked[~m])
    assert np.abs(filled[m].astype(int) - 100).max() < 10  # filled from the flat surroundings
    np.testing.assert_array_equal(inpaint_opencv(marked, np.zeros((64, 64), bool)), marked)
    with pytest.raises(ValueError):
        inpaint_opencv(marked, np.zeros((32, 32), bool))
