"""Mask helpers: GMM threshold, majority filter, closing + hole filling."""
from __future__ import annotations

import numpy as np

from pseudolabel.models.masks import close_and_fill, gmm_fit_1d, gmm_mask, gmm_threshold, majority_filter


def _planted_square(seed=0, size=64, lo=0.2, hi=0.8, noise=0.08):
    rng = np.random.default_rng(seed)
    truth = np.zeros((size, size), bool)
    truth[16:44, 20:50] = True
    values = np.where(truth, hi, lo) + rng.normal(0, noise, truth.shape)
    return truth, values


def test_gmm_recovers_planted_bimodal_square():
    truth, values = _planted_square()
    mu, var, w = gmm_fit_1d(values)
    assert abs(mu[0] - 0.2) < 0.02 and abs(mu[1] - 0.8) < 0.02
    frac = truth.mean()
    assert abs(w[1] - frac) < 0.02
    assert np.all(np.sqrt(var) < 0.12)
    thr = gmm_threshold(values)
    assert abs(thr - 0.5) < 0.03
    pred = gmm_mask(values)
    assert (pred == truth).mean() > 0.995


def test_gmm_threshold_follows_unequal_modes():
    """A small bright object on a large dark background: threshold sits between the means, not at the median."""
    rng = np.random.default_rng(1)
    truth = np.zeros((80, 80), bool)
    truth[5:20, 5:20] = True  # 3.5 % of the pixels
    values = np.where(truth, 5.0, 1.0) + rng.normal(0, 0.3, truth.shape)
    thr = gmm_threshold(values)
    assert 2.5 < thr < 3.5
    assert (gmm_mask(values) == truth).mean() > 0.999


def test_gmm_constant_input_does_not_crash():
    mu, var, w = gmm_fit_1d(np.full((8, 8), 0.3))
    assert np.allclose(mu, 0.3)


def test_majority_filter_removes_isolated_pixels():
    truth = np.zeros((32, 32), bool)
    truth[8:24, 8:24] = True
    noisy = truth.copy()
    for y, x in [(2, 2), (30, 5), (4, 28), (28, 28)]:
        noisy[y, x] = True          # isolated foreground specks
    for y, x in [(12, 12), (16, 20), (20, 10)]:
        noisy[y, x] = False         # isolated holes inside the square
    out = majority_filter(noisy)
    assert out.dtype == bool and out.shape == noisy.shape
    assert not out[2, 2] and not out[30, 5] and not out[4, 28] and not out[28, 28]
    assert out[12, 12] and out[16, 20] and out[20, 10]
    # the square's body is kept (corners of a square lose at most their corner pixel)
    assert out[9:23, 9:23].all()
    assert (out != truth).sum() <= 4


def test_majority_filter_keeps_solid_regions_and_empty():
    assert not majority_filter(np.zeros((10, 10), bool)).any()
    assert majority_filter(np.ones((10, 10), bool)).all()


def test_close_and_fill_closes_gaps_and_fills_holes():
    ring = np.zeros((40, 40), bool)
    ring[10:30, 10:30] = True
    ring[14:26, 14:26] = False        # a big hole: only hole filling can close it
    ring[10:30, 20] = False            # a one-pixel slit through the ring: closing bridges it
    out = close_and_fill(ring, radius=2)
    # the slit is bridged except where it notches the outer edge (closing keeps such notches)
    assert out[11:29, 10:30].all()
    assert out.sum() >= 400 - 2
    assert not out[:8].any() and not out[32:].any()
    # hole filling alone does not bridge the slit, so the big hole stays open without closing
    assert not close_and_fill(ring, radius=0)[20, 20]


def test_close_and_fill_keeps_border_shapes():
    m = np.zeros((20, 20), bool)
    m[:, :6] = True
    out = close_and_fill(m, radius=2)
    assert out[:, :6].all() and not out[:, 9:].any()
