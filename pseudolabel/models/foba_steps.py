"""Pure steps of the ``foba`` method (no model weights): canvas, mask suggestion, refinement schedule,
mask composition, and the fine-tuning data/loss/EMA rules.

Everything follows the published method's definitions (Dombrowski et al., ICCV 2023):

- Canvas. An image is resized so its long edge is ``side`` (aspect kept) and placed at the top-left of a
  black ``side`` x ``side`` square; the part of the canvas the image covers is ``(h', w')``.
- Mask suggestion. A 2-component Gaussian mixture is fitted to a map's values with the rules of
  scikit-learn's ``GaussianMixture`` defaults (k-means initialisation, EM with ``reg_covar`` = 1e-6 added
  to each variance, ``tol`` = 1e-3 on the mean log-likelihood, at most 100 iterations); the threshold is
  the mean of the two component means. An orphan filter then replaces every interior pixel by the
  majority of its 3x3 neighbourhood (border pixels are kept).
- Refinement schedule. DDIM with ``steps`` uniform timesteps ``1, 1 + c, ..., 1 + (steps - 1) c``
  (c = T // steps), alphas ``a_t = abar[t]`` and ``a_prev`` the previous timestep's (``abar[0]`` for
  the first), eta = 0.
- Mask composition. The preliminary mask (latent grid of the canvas) is upsampled bilinearly (no
  antialias, half-pixel centres) to the canvas, every positive value counts as foreground, cropped to the
  image part and ANDed with the suggestion of the difference map.
- Fine-tuning. With probability 0.5 the foreground prompt on the whole image, else the background
  prompt on a random background rectangle (``rectangular_inpainting_mask``); loss = mean over all latent
  elements of ``(m * eps_pred - m * eps)^2``; EMA of the weights with decay ``min(0.9999, (1+n)/(10+n))``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

GMM_REG_COVAR = 1e-6
GMM_TOL = 1e-3
GMM_MAX_ITER = 100


# ---------------------------------------------------------------------------------------------------
# Canvas
# ---------------------------------------------------------------------------------------------------

def long_edge_size(hw: tuple[int, int], side: int) -> tuple[int, int]:
    """(H, W) -> (h', w') after resizing so the short edge is ``round(short * side / long)`` and the long
    edge follows (then cut at ``side``), as a short-edge resize to that length does."""
    h, w = int(hw[0]), int(hw[1])
    long_, short = max(h, w), min(h, w)
    new_short = max(1, round(short * side / long_))
    new_long = min(side, int(new_short * long_ / short))
    return (new_short, new_long) if h <= w else (new_long, new_short)


def resize_bilinear(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, C) or (H, W) array -> float32 resized to ``hw``: bilinear, half-pixel centres, no antialias."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    y = F.interpolate(x, size=tuple(int(s) for s in hw), mode="bilinear", align_corners=False)
    return (y[0, 0] if image.ndim == 2 else y[0].permute(1, 2, 0)).numpy()


def resize_long_edge(image: np.ndarray, side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h', w', 3) uint8 with long edge ``side`` (bilinear, rounded)."""
    out = resize_bilinear(image, long_edge_size(image.shape[:2], side))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def pad_to_canvas(image: np.ndarray, side: int, fill: int = 0) -> np.ndarray:
    """(h', w', C) or (h', w') with h', w' <= side -> (side, side[, C]) with the image at the top left."""
    h, w = image.shape[:2]
    if h > side or w > side:
        raise ValueError(f"image {h}x{w} does not fit a {side} canvas")
    canvas = np.full((side, side) + image.shape[2:], fill, dtype=image.dtype)
    canvas[:h, :w] = image
    return canvas


def unpad_canvas(canvas: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(side, side, ...) -> the top-left (h', w', ...) part the image covers."""
    return canvas[: int(hw[0]), : int(hw[1])]


# ---------------------------------------------------------------------------------------------------
# Mask suggestion: 2-component GMM (scikit-learn's default rules) + orphan filter
# ---------------------------------------------------------------------------------------------------

def kmeans_1d_labels(x: np.ndarray, iters: int = 300) -> np.ndarray:
    """Two-cluster 1-D Lloyd k-means started from the minimum and maximum; (N,) -> (N,) int labels."""
    c = np.array([x.min(), x.max()], dtype=np.float64)
    labels = np.zeros(x.shape[0], dtype=np.int64)
    for _ in range(iters):
        new = (np.abs(x - c[1]) < np.abs(x - c[0])).astype(np.int64)
        for k in (0, 1):
            if (new == k).any():
                c[k] = x[new == k].mean()
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def _gaussian_params(x: np.ndarray, resp: np.ndarray, reg_covar: float):
    nk = resp.sum(axis=0) + 10 * np.finfo(resp.dtype).eps
    means = (resp * x[:, None]).sum(axis=0) / nk
    var = (resp * (x[:, None] - means[None, :]) ** 2).sum(axis=0) / nk + reg_covar
    return nk / x.shape[0], means, var


def gmm_fit(values: np.ndarray, reg_covar: float = GMM_REG_COVAR, tol: float = GMM_TOL,
            max_iter: int = GMM_MAX_ITER) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a 2-component 1-D Gaussian mixture to all ``values`` (any shape, flattened).

    Returns (weights (2,), means (2,), variances (2,)) float64. Initialisation from k-means labels,
    ``reg_covar`` added to every variance at every M-step, stop when the mean log-likelihood changes by
    less than ``tol``.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError("gmm_fit needs at least two values")
    labels = kmeans_1d_labels(x)
    resp = np.zeros((x.size, 2))
    resp[np.arange(x.size), labels] = 1.0
    w, mu, var = _gaussian_params(x, resp, reg_covar)
    lower = -np.inf
    for _ in range(max_iter):
        # E-step in log space, one component at a time (N-vectors, no (N, 2) temporaries)
        lp = [np.log(w[k]) - 0.5 * np.log(2 * np.pi * var[k]) - 0.5 * (x - mu[k]) ** 2 / var[k] for k in (0, 1)]
        hi = np.maximum(lp[0], lp[1])
        norm = hi + np.log(np.exp(lp[0] - hi) + np.exp(lp[1] - hi))
        resp = np.stack([np.exp(lp[0] - norm), np.exp(lp[1] - norm)], axis=1)
        w, mu, var = _gaussian_params(x, resp, reg_covar)
        prev, lower = lower, float(norm.mean())
        if abs(lower - prev) < tol:
            break
    return w, mu, var


def gmm_threshold(values: np.ndarray, **kwargs) -> float:
    """The mean of the two fitted component means."""
    return float(np.mean(gmm_fit(values, **kwargs)[1]))


def orphan_filter(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: interior pixels take the 3x3 mean >= 0.5 (5 of 9), border pixels stay."""
    m = np.asarray(mask, dtype=bool)
    out = m.copy()
    if m.shape[0] < 3 or m.shape[1] < 3:
        return out
    f = m.astype(np.float32)
    s = sum(f[1 + dy: f.shape[0] - 1 + dy, 1 + dx: f.shape[1] - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    out[1:-1, 1:-1] = s / 9.0 >= 0.5
    return out


def suggest_mask(values: np.ndarray, **gmm_kwargs) -> np.ndarray:
    """(H, W) float map -> (H, W) bool: values above the GMM threshold, then the orphan filter."""
    values = np.asarray(values)
    return orphan_filter(values > gmm_threshold(values, **gmm_kwargs))


# ---------------------------------------------------------------------------------------------------
# Refinement: DDIM schedule, mask composition
# ---------------------------------------------------------------------------------------------------

def ddim_schedule(alphas_cumprod: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Uniform DDIM schedule, noisiest first.

    alphas_cumprod: (T,) abar. Returns (timesteps, a_t (S,), a_prev (S,)) with timesteps
    ``[1 + (S-1)c, ..., 1 + c, 1]`` (c = T // S) and a_prev the abar of the next (less noisy) timestep,
    ``abar[0]`` after the last.
    """
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    c = abar.shape[0] // steps
    if c < 1:
        raise ValueError(f"{steps} DDIM steps exceed {abar.shape[0]} training timesteps")
    ascending = [i * c + 1 for i in range(steps)]
    a_t = abar[ascending]
    a_prev = torch.cat([abar[:1], abar[ascending[:-1]]])
    return ascending[::-1], a_t.flip(0), a_prev.flip(0)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
    """One deterministic (eta 0) DDIM update: sqrt(a_prev) * x0_pred + sqrt(1 - a_prev) * eps."""
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps


def q_sample(z0: torch.Tensor, noise: torch.Tensor, abar_t: float) -> torch.Tensor:
    """z0 noised to a timestep with cumulative alpha ``abar_t``."""
    return math.sqrt(abar_t) * z0 + math.sqrt(1.0 - abar_t) * noise


def upsample_mask_bilinear(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) bool -> (H, W) bool: bilinear upsampling (half-pixel centres, no antialias); > 0 is True."""
    return resize_bilinear(np.asarray(mask, dtype=np.float32), hw) > 0


def difference_map(original: np.ndarray, inpainted: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 x2 -> (h, w) float32: mean over RGB of |original - inpainted| on the [0, 1] scale."""
    return np.abs(original.astype(np.float32) / 255.0 - inpainted.astype(np.float32) / 255.0).mean(-1)


def compose_refined_mask(original: np.ndarray, inpainted: np.ndarray, prelim: np.ndarray, side: int) -> np.ndarray:
    """The refined mask of one image at the canvas scale.

    original, inpainted: (h', w', 3) uint8, the image part of the canvas and its inpainting.
    prelim: (h, w) bool preliminary mask on the canvas's latent grid. side: canvas side.
    Returns (h', w') bool: suggest_mask(difference) AND the bilinearly upsampled preliminary mask.
    """
    diff_mask = suggest_mask(difference_map(original, inpainted))
    up = unpad_canvas(upsample_mask_bilinear(prelim, (side, side)), original.shape[:2])
    return diff_mask & up


# ---------------------------------------------------------------------------------------------------
# Fine-tuning: rectangle sampling, prompt mixing, augmentation, loss, EMA
# ---------------------------------------------------------------------------------------------------

def rectangular_inpainting_mask(foreground: np.ndarray, rng: np.random.Generator, *, retries: int = 100,
                                min_side: int = 10, min_area: int = 16 ** 2, max_side: int = 32,
                                max_area: int = 32 ** 2, min_background: float = 2 / 3) -> np.ndarray:
    """A random background rectangle of a latent-grid foreground mask.

    foreground: (h, w) bool, True = foreground. Two distinct background pixels are drawn as opposite
    corners; with extents dy = |r1 - r0|, dx = |c1 - c0| and area dy * dx the box is rejected when
    dy <= min_side or dx <= min_side or area < min_area, when (dy > max_side and dx > max_side) or
    area > max_area, or when (background pixels in the inclusive box) / area < min_background. Each
    rejection uses one of ``retries``; after the last one the whole background is returned.
    Returns (h, w) bool, True = background pixels of the accepted box (all False when at most one pixel
    is background).
    """
    fg = np.asarray(foreground, dtype=bool)
    if fg.sum() >= fg.size - 1:
        return np.zeros_like(fg)
    rows, cols = np.nonzero(~fg)
    left = retries
    while left > 0:
        a, b = int(rng.integers(0, len(rows))), int(rng.integers(0, len(rows)))
        if a == b:
            continue
        r0, r1 = sorted((rows[a], rows[b]))
        c0, c1 = sorted((cols[a], cols[b]))
        dy, dx = r1 - r0, c1 - c0
        area = dy * dx
        too_small = dy <= min_side or dx <= min_side or area < min_area
        too_large = (dy > max_side and dx > max_side) or area > max_area
        if too_small or too_large:
            left -= 1
            continue
        box = np.zeros_like(fg)
        box[r0:r1 + 1, c0:c1 + 1] = True
        inside = box & ~fg
        if inside.sum() / area < min_background:
            left -= 1
            continue
        return inside
    return ~fg


def training_example(image: np.ndarray, fg_latent: np.ndarray, rng: np.random.Generator, side: int,
                     latent_factor: int = 8, foreground_probability: float = 0.5,
                     **rect_kwargs) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """One fine-tuning example.

    image: (h', w', 3) uint8, the image part of the canvas; fg_latent: (side/f, side/f) bool foreground
    on the canvas's latent grid. With probability ``foreground_probability`` (draw u <= p): the
    foreground prompt, the augmented image, mask all ones. Else: the background prompt; the mask is
    nearest-upsampled to the canvas, cropped to the image, augmented with it, averaged back to the
    latent grid and rounded, and a ``rectangular_inpainting_mask`` of it is drawn.
    Returns (use_foreground_prompt, image (3, side, side) float in about [-1, 1], mask (1, side/f, side/f)
    float 0/1).
    """
    x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    h, w = image.shape[:2]
    lat = side // latent_factor
    if rng.random() <= foreground_probability:
        out = augment(x, side, rng).clamp(-1, 1)
        return True, out, torch.ones(1, lat, lat)
    up = np.kron(fg_latent.astype(np.float32), np.ones((latent_factor, latent_factor), np.float32))[:h, :w]
    both = augment(torch.cat([x, torch.from_numpy(up)[None]]), side, rng)
    m = F.avg_pool2d(both[3:4][None], latent_factor)[0, 0].round().bool().numpy()
    rect = rectangular_inpainting_mask(m, rng, **rect_kwargs)
    return False, both[:3], torch.from_numpy(rect.astype(np.float32))[None]


def augment(x: torch.Tensor, side: int, rng: np.random.Generator, mode: str = "bicubic") -> torch.Tensor:
    """(C, H, W) float -> (C, side, side): short edge to ``side`` (``mode`` interpolation, no antialias),
    random side x side crop, horizontal flip with probability 0.5."""
    h, w = x.shape[-2:]
    if min(h, w) != side:
        nh, nw = (side, int(side * w / h)) if h <= w else (int(side * h / w), side)
        x = F.interpolate(x[None], size=(nh, nw), mode=mode, align_corners=False)[0]
    h, w = x.shape[-2:]
    i = int(rng.integers(0, h - side + 1))
    j = int(rng.integers(0, w - side + 1))
    x = x[:, i:i + side, j:j + side]
    if rng.random() < 0.5:
        x = x.flip(-1)
    return x


def masked_eps_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) x2, mask (B, 1 or C, h, w) -> 0-d: mean over all elements of (m*pred - m*target)^2."""
    m = mask.to(pred.dtype)
    return ((pred.float() * m - target.float() * m) ** 2).mean()


def ema_decay(num_updates: int, decay: float = 0.9999) -> float:
    """Decay of the ``num_updates``-th update (counted from 1): min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


@torch.no_grad()
def ema_update(shadow: dict[str, torch.Tensor], params: dict[str, torch.Tensor], num_updates: int,
               decay: float = 0.9999) -> int:
    """shadow -= (1 - d) * (shadow - param) for every entry, d = ema_decay(num_updates + 1).

    Returns the new update count."""
    n = num_updates + 1
    d = ema_decay(n, decay)
    for name, p in params.items():
        s = shadow[name]
        s.sub_((1.0 - d) * (s - p.detach().to(s.dtype)))
    return n


def warmup_factor(step: int, warmup_steps: int = 1, start: float = 1e-6) -> float:
    """Learning-rate multiplier: linear from ``start`` to 1 over ``warmup_steps`` steps, then 1."""
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    return 1.0
