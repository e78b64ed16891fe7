"""foba's pure steps, each against a small case worked out by hand from the method's definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pseudolabel.models.foba_steps import (
    compose_refined_mask,
    ddim_schedule,
    ddim_step,
    ema_decay,
    ema_update,
    gmm_fit,
    gmm_threshold,
    long_edge_size,
    masked_eps_loss,
    orphan_filter,
    pad_to_canvas,
    q_sample,
    rectangular_inpainting_mask,
    resize_long_edge,
    suggest_mask,
    training_example,
    unpad_canvas,
    upsample_mask_bilinear,
    warmup_factor,
)

# -- canvas -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw, side, expected", [
    ((72, 96), 64, (48, 64)),     # short 72 * 64 / 96 = 48, long int(48 * 96 / 72) = 64
    ((100, 50), 64, (64, 32)),    # portrait: short 50 -> 32, long 64
    ((3, 7), 64, (27, 63)),       # short round(27.43) = 27, long int(27 * 7 / 3) = 63 (truncated)
    ((64, 64), 64, (64, 64)),
])
def test_long_edge_size(hw, side, expected):
    assert long_edge_size(hw, side) == expected
    assert resize_long_edge(np.zeros(hw + (3,), np.uint8), side).shape == expected + (3,)


def test_canvas_pad_and_unpad():
    part = np.arange(6, dtype=np.uint8).reshape(2, 3) + 1
    canvas = pad_to_canvas(part, 4)
    assert canvas.tolist() == [[1, 2, 3, 0], [4, 5, 6, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert np.array_equal(unpad_canvas(canvas, (2, 3)), part)
    rgb = pad_to_canvas(np.full((1, 2, 3), 9, np.uint8), 3)
    assert rgb.shape == (3, 3, 3) and rgb[0, :2].min() == 9 and rgb.sum() == 9 * 6
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_canvas(np.zeros((5, 2)), 4)


# -- GMM with regularisation, orphan filter -----------------------------------------------------------

def test_gmm_adds_reg_covar_to_each_variance():
    # two point masses: without regularisation the variances collapse to 0; the rule adds 1e-6
    x = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    w, mu, var = gmm_fit(x)
    assert sorted(mu) == pytest.approx([0.0, 1.0]) and np.allclose(w, [0.5, 0.5])
    assert np.allclose(var, [1e-6, 1e-6], rtol=1e-9, atol=0)
    assert gmm_threshold(x) == pytest.approx(0.5)
    # masses closer than sqrt(reg_covar) overlap: EM pulls the means together (no zero-variance fit)
    _, mu_close, _ = gmm_fit(x * 1e-3)
    assert abs(mu_close[1] - mu_close[0]) < 1e-4


def test_gmm_fit_on_two_clusters():
    # k-means from (min, max) splits {0, 1, 2} | {10, 11, 12}; means 1 and 11, variance 2/3 + 1e-6
    x = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    _, mu, var = gmm_fit(x)
    assert sorted(mu) == pytest.approx([1.0, 11.0], abs=1e-9)
    assert var == pytest.approx([2 / 3 + 1e-6] * 2, abs=1e-9)
    assert gmm_threshold(x) == pytest.approx(6.0)
    assert gmm_fit(x, reg_covar=0.5)[2] == pytest.approx([2 / 3 + 0.5] * 2, abs=1e-6)


def test_gmm_on_a_constant_map_does_not_crash():
    assert math.isfinite(gmm_threshold(np.full((4, 4), 0.3)))
    with pytest.raises(ValueError):
        gmm_fit(np.array([1.0]))


def test_orphan_filter_interior_majority_and_border_kept():
    m = np.zeros((6, 6), bool)
    m[0, 0] = True                  # border pixel: kept as it is
    m[1:4, 1:4] = True              # 3x3 block: its corners see 4 of 9 -> removed; edges see 6 -> kept
    m[2, 2] = False                 # a hole seeing 8 of 9 -> filled
    m[4, 4] = True                  # isolated interior pixel: 2 of 9 (with (3,3)) -> removed
    out = orphan_filter(m)
    expected = np.zeros((6, 6), bool)
    expected[0, 0] = True
    expected[1:4, 1:4] = True
    expected[[1, 1, 3, 3], [1, 3, 1, 3]] = False
    assert np.array_equal(out, expected)
    assert not orphan_filter(m)[4, 4]


def test_suggest_mask_is_gmm_then_orphan_filter():
    v = np.full((5, 5), 0.01)
    v[1:4, 1:4] = 0.2
    expected = v > 0.1
    expected[[1, 1, 3, 3], [1, 3, 1, 3]] = False
    assert np.array_equal(suggest_mask(v), expected)


# -- refinement schedule ------------------------------------------------------------------------------

def test_ddim_schedule_uniform_with_offset_one():
    abar = torch.linspace(0.99, 0.1, 10, dtype=torch.float64)
    ts, a_t, a_prev = ddim_schedule(abar, 5)        # c = 2: 1, 3, 5, 7, 9
    assert ts == [9, 7, 5, 3, 1]
    assert torch.equal(a_t, abar[[9, 7, 5, 3, 1]])
    assert torch.equal(a_prev, abar[[7, 5, 3, 1, 0]])
    ts50, _, _ = ddim_schedule(torch.ones(1000) * 0.5, 50)
    assert ts50[0] == 981 and ts50[-1] == 1 and len(ts50) == 50 and ts50[0] - ts50[1] == 20
    with pytest.raises(ValueError):
        ddim_schedule(abar, 20)


def test_ddim_step_and_q_sample_by_hand():
    x, eps = torch.tensor(1.0), torch.tensor(0.5)
    # x0 = (1 - sqrt(.75) * .5) / .5 = 2 - sqrt(.75); x_prev = .8 * x0 + .6 * .5
    assert float(ddim_step(x, eps, 0.25, 0.64)) == pytest.approx(0.8 * (2 - math.sqrt(0.75)) + 0.3)
    assert float(q_sample(torch.tensor(2.0), torch.tensor(1.0), 0.36)) == pytest.approx(2.0)


# -- mask composition ---------------------------------------------------------------------------------

def test_bilinear_upsampling_counts_any_positive_weight():
    # one cell of a 2x2 grid to 8x8: output pixel x samples (x + .5) / 4 - .5, positive for x <= 5
    up = upsample_mask_bilinear(np.array([[True, False], [False, False]]), (8, 8))
    expected = np.zeros((8, 8), bool)
    expected[:6, :6] = True
    assert np.array_equal(up, expected)


def test_compose_refined_mask_by_hand():
    side, part = 16, (16, 12)
    prelim = np.array([[True, False], [False, False]])   # upsampled: rows/cols 0..11 on the 16 canvas
    original = np.zeros(part + (3,), np.uint8)
    inpainted = original.copy()
    inpainted[2:14, 2:10] = 255                           # difference 1 on a 12 x 8 rectangle
    expected = np.zeros(part, bool)
    expected[2:12, 2:10] = True                           # cut at row 11 by the preliminary mask
    expected[2, 2] = expected[2, 9] = False               # rectangle corners: 4 of 9 -> orphan filter
    assert np.array_equal(compose_refined_mask(original, inpainted, prelim, side), expected)


# -- fine-tuning rules --------------------------------------------------------------------------------

def test_rectangle_all_foreground_gives_nothing():
    fg = np.ones((16, 16), bool)
    fg[0, 0] = False                                      # one background pixel is not enough
    assert not rectangular_inpainting_mask(fg, np.random.default_rng(0)).any()


def test_rectangle_falls_back_to_the_whole_background_when_no_box_fits():
    rng = np.random.default_rng(0)
    small = np.zeros((8, 8), bool)                        # every box has sides <= 7 <= 10
    assert rectangular_inpainting_mask(small, rng).all()
    strips = np.ones((64, 64), bool)                      # background: two 6-px strips 52 px apart
    strips[:, :6] = strips[:, 58:] = False
    # same strip: width <= 5 (too small); across: width >= 52, so area > 1024 unless height <= 19,
    # and then at most 12 of the >= 52 columns are background (ratio < 2/3)
    assert np.array_equal(rectangular_inpainting_mask(strips, rng), ~strips)


@pytest.mark.parametrize("seed", range(5))
def test_rectangle_respects_the_size_limits(seed):
    fg = np.zeros((64, 64), bool)
    fg[:, :30] = True                                     # background: columns 30..63
    out = rectangular_inpainting_mask(fg, np.random.default_rng(seed))
    assert out.any() and not (out & fg).any()
    rows, cols = np.nonzero(out)
    dy, dx = rows.max() - rows.min(), cols.max() - cols.min()
    assert out.sum() == (dy + 1) * (dx + 1)               # a full box (the background is convex here)
    assert dy > 10 and dx > 10 and dy * dx >= 256 and dy * dx <= 1024 and not (dy > 32 and dx > 32)


def test_prompt_mixing_and_examples():
    rng = np.random.default_rng(0)
    part = np.zeros((64, 64, 3), np.uint8)
    part[:, 32:] = 255                                    # right half white
    fg = np.zeros((8, 8), bool)
    fg[:4, :4] = True
    is_fg, x, m = training_example(part, fg, rng, 64, foreground_probability=1.0)
    assert is_fg and x.shape == (3, 64, 64) and torch.equal(m, torch.ones(1, 8, 8))
    for _ in range(4):                                    # background branch: 8x8 latent -> whole background
        is_fg, x, m = training_example(part, fg, rng, 64, foreground_probability=0.0)
        flipped = bool(x[0, 0, 0] > 0)                    # the white half moved left
        expect = ~(fg[:, ::-1] if flipped else fg)
        assert not is_fg and torch.equal(m[0].bool(), torch.from_numpy(expect.copy()))
    draws = [training_example(part[:8, :8], fg[:1, :1], rng, 8, foreground_probability=0.5)[0] for _ in range(400)]
    assert 0.4 < np.mean(draws) < 0.6


def test_augment_resizes_the_short_edge_then_crops():
    rng = np.random.default_rng(1)
    part = np.zeros((32, 64, 3), np.uint8)                # short edge 32 -> 64, long edge 128, then a 64 crop
    _, x, _ = training_example(part, np.zeros((8, 8), bool), rng, 64, foreground_probability=1.0)
    assert x.shape == (3, 64, 64) and float(x.min()) == pytest.approx(-1.0)


def test_loss_is_the_mean_over_all_latent_elements():
    pred, target = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert float(masked_eps_loss(pred, target, mask)) == pytest.approx(4 / 16)   # not 1 (area-normalised)


def test_ema_update_by_hand():
    assert ema_decay(1) == pytest.approx(2 / 11) and ema_decay(10 ** 6) == 0.9999
    shadow, params = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    n = ema_update(shadow, params, 0)                    # d = 2/11: 0 - (9/11)(0 - 1)
    assert n == 1 and torch.allclose(shadow["w"], torch.full((2,), 9 / 11))
    n = ema_update(shadow, params, n)                    # d = 3/12: 9/11 + .75 * 2/11
    assert n == 2 and torch.allclose(shadow["w"], torch.full((2,), 10.5 / 11))


def test_warmup_factor():
    assert warmup_factor(0) == 1e-6 and warmup_factor(1) == 1.0 and warmup_factor(5, 10) == pytest.approx(0.5 + 0.5e-6)
