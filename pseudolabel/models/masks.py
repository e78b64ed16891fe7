"""Pure mask helpers: a two-component Gaussian-mixture threshold, a 3×3 majority filter, and
morphological clean-up (closing + hole filling).

No model code here; every function takes and returns numpy arrays.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def gmm_fit_1d(values: np.ndarray, *, iters: int = 100, tol: float = 1e-6,
               max_samples: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a 2-component 1-D Gaussian mixture by expectation-maximisation.

    values: any shape, float; flattened. More than ``max_samples`` values are subsampled (seeded).
    Returns (means (2,), variances (2,), weights (2,)) as float64, means sorted ascending.
    Initialisation: the means at the 25th and 75th percentiles, both variances the global variance.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("gmm_fit_1d: no finite values")
    if x.size > max_samples:
        x = np.random.default_rng(seed).choice(x, max_samples, replace=False)
    var0 = float(x.var())
    if var0 <= 0.0:
        return np.array([x[0], x[0]]), np.zeros(2), np.array([0.5, 0.5])
    mu = np.percentile(x, [25.0, 75.0]).astype(np.float64)
    if mu[0] == mu[1]:
        mu = np.array([x.min(), x.max()], dtype=np.float64)
    var = np.array([var0, var0])
    w = np.array([0.5, 0.5])
    floor = var0 * 1e-6
    prev = -np.inf
    for _ in range(iters):
        # 1. E-step: responsibilities in log space for stability
        logp = (np.log(w)[None, :] - 0.5 * np.log(2.0 * np.pi * var)[None, :]
                - 0.5 * (x[:, None] - mu[None, :]) ** 2 / var[None, :])
        mx = logp.max(axis=1, keepdims=True)
        lse = mx + np.log(np.exp(logp - mx).sum(axis=1, keepdims=True))
        resp = np.exp(logp - lse)
        ll = float(lse.sum())
        # 2. M-step
        nk = resp.sum(axis=0) + 1e-12
        w = nk / x.size
        mu = (resp * x[:, None]).sum(axis=0) / nk
        var = np.maximum((resp * (x[:, None] - mu[None, :]) ** 2).sum(axis=0) / nk, floor)
        if abs(ll - prev) <= tol * max(1.0, abs(ll)):
            break
        prev = ll
    order = np.argsort(mu)
    return mu[order], var[order], w[order]


def gmm_threshold(values: np.ndarray, **kwargs) -> float:
    """Threshold between the two modes of ``values``: the midpoint of the two fitted Gaussian means."""
    mu, _, _ = gmm_fit_1d(values, **kwargs)
    return float(0.5 * (mu[0] + mu[1]))


def gmm_mask(values: np.ndarray, **kwargs) -> np.ndarray:
    """(H, W) float map -> (H, W) bool, True where the value exceeds the GMM midpoint threshold."""
    values = np.asarray(values)
    return values > gmm_threshold(values, **kwargs)


def majority_filter(mask: np.ndarray, size: int = 3) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: each pixel takes the majority value of its size×size neighbourhood.

    Borders replicate the edge pixels. With size 3 a pixel is on iff at least 5 of its 9 neighbours
    (itself included) are on, so isolated pixels and one-pixel gaps disappear.
    """
    m = np.asarray(mask, dtype=bool)
    counts = ndimage.uniform_filter(m.astype(np.float32), size=size, mode="nearest") * (size * size)
    return counts > (size * size) / 2.0


def close_and_fill(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: binary closing with a (2r+1)² disk, then hole filling.

    The image is padded by ``radius`` before closing so shapes touching the border are not eroded.
    """
    m = np.asarray(mask, dtype=bool)
    if radius > 0:
        yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
        disk = (yy * yy + xx * xx) <= radius * radius
        padded = np.pad(m, radius, mode="edge")
        m = ndimage.binary_closing(padded, structure=disk)[radius:-radius, radius:-radius]
    return ndimage.binary_fill_holes(m)
