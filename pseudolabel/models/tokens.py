"""Boundary map -> subobject tokens: the post-processing shared by the ``directsam`` labeler and the
classical edge-token baseline.

Pure numpy / OpenCV / scikit-image helpers, no model code. Every step is vectorised: connected
components come from OpenCV in one call, areas and edge scores from ``np.bincount``, relabelling from one
lookup table, so the cost is a few passes over the image whatever the token count.

Modes (DESIGN.md §4, directsam):

- ``simple``: the 8-connected components of ``prob < threshold`` are the tokens; boundary pixels
  (``prob >= threshold``) stay 0 (unassigned).
- ``partition``: the 4-connected components of ``~(prob > threshold)`` are seeds, then a watershed on the
  probability map (4-connected flooding) assigns every boundary pixel to a seed, so the tokens tile the
  image: every pixel belongs to exactly one token, no zeros.

Token selection (``max_tokens``, ``min_area``) is made on the seed components: those smaller than
``min_area`` pixels and those beyond the ``max_tokens`` largest are dropped. In ``simple`` mode their
pixels become 0. In ``partition`` mode the watershed runs once with only the kept seeds, so the pixels of
dropped seeds are flooded by their neighbouring kept tokens and the tiling stays complete. The final
labels 1..K are ordered by final token area, descending (ties: by seed label, i.e. raster order of the
seed's first pixel).
"""
from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from skimage.segmentation import watershed

from pseudolabel.models.base import Tokens

Mode = Literal["simple", "partition"]


def connected_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Label the connected components of a boolean mask.

    Args:
        mask: (H, W) bool (or 0/1), True = foreground.
        connectivity: 4 or 8.

    Returns:
        (labels, areas): labels (H, W) int32 with 0 = background and 1..N the components in raster order
        of their first pixel; areas (N + 1,) int64 pixel counts, ``areas[0]`` is the background count.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(mask, dtype=np.uint8), connectivity=connectivity, ltype=cv2.CV_32S)
    return labels, stats[:, cv2.CC_STAT_AREA].astype(np.int64)


def select_labels(areas: np.ndarray, max_tokens: int | None, min_area: int) -> np.ndarray:
    """Which labels to keep: area >= ``min_area`` and among the ``max_tokens`` largest.

    Args:
        areas: (N + 1,) pixel counts with ``areas[0]`` the background (never kept).
        max_tokens: keep at most this many (None = no limit).
        min_area: minimum area in pixels (0 or 1 = keep all).

    Returns:
        (K,) int64 kept labels ordered by area descending (stable: ties keep ascending label order).
    """
    labels = np.arange(1, len(areas), dtype=np.int64)
    fg = areas[1:]
    order = np.argsort(-fg, kind="stable")
    kept = labels[order]
    kept = kept[fg[order] >= max(int(min_area), 1)]
    if max_tokens is not None:
        kept = kept[: max(int(max_tokens), 0)]
    return kept


def relabel(labels: np.ndarray, keep: np.ndarray, n_labels: int) -> np.ndarray:
    """Map ``keep[i]`` -> i + 1 and every other label -> 0 with one lookup table.

    labels: (H, W) int32 in [0, n_labels]; keep: (K,) distinct labels in 1..n_labels.
    Returns (H, W) int32.
    """
    lut = np.zeros(n_labels + 1, dtype=np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lut[labels]


def edge_scores(label_map: np.ndarray, prob: np.ndarray, n_tokens: int) -> np.ndarray:
    """Mean boundary probability along each token's edge.

    A token's edge is the set of 4-adjacent pixel pairs (p, q) with p in the token and q in a different
    label (another token or unassigned 0; the image border is not an edge). Each pair contributes
    ``max(prob[p], prob[q])``, the strength of the boundary it crosses: in ``partition`` mode the boundary
    pixel itself lies inside one of the two tokens, in ``simple`` mode it is the unassigned neighbour.
    A token with no edge (it covers the image) scores 0.

    Args:
        label_map: (H, W) int32, 0 = unassigned, 1..n_tokens tokens.
        prob: (H, W) float boundary probability in [0, 1].
        n_tokens: K.

    Returns:
        (K,) float32, mean over each token's edge pairs, in [0, 1].
    """
    sums = np.zeros(n_tokens + 1, dtype=np.float64)
    counts = np.zeros(n_tokens + 1, dtype=np.float64)
    for a_sl, b_sl in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                       ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
        la, lb = label_map[a_sl], label_map[b_sl]
        diff = la != lb
        if not diff.any():
            continue
        la, lb = la[diff], lb[diff]
        strength = np.maximum(prob[a_sl][diff], prob[b_sl][diff]).astype(np.float64)
        # each pair is an edge of both sides (the 0 side accumulates into a discarded bin)
        for side in (la, lb):
            sums += np.bincount(side, weights=strength, minlength=n_tokens + 1)
            counts += np.bincount(side, minlength=n_tokens + 1)
    score = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return score[1:].astype(np.float32)


def flood_unlabelled(prob: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Watershed on ``prob`` (4-connected) from ``markers``, assigning every 0 pixel of ``markers``.

    The flooding is restricted to the unlabelled pixels plus a one-pixel ring of marker pixels around
    them: marker interiors cannot change, and leaving them out of the priority queue makes this several
    times faster than a full-image watershed with the same result.

    Args:
        prob: (H, W) float32 boundary probability (the flooding landscape).
        markers: (H, W) int32, 0 = to fill, 1..K = seeds; at least one seed.

    Returns:
        (H, W) int32 with no 0 left (every unlabelled region touches some seed).
    """
    unlabelled = (markers == 0).astype(np.uint8)
    if not unlabelled.any():
        return markers
    band = cv2.dilate(unlabelled, cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))).astype(bool)
    flooded = watershed(prob, markers=np.where(band, markers, 0), mask=band, connectivity=1)
    return np.where(band, flooded, markers).astype(np.int32, copy=False)


def boundary_to_tokens(prob: np.ndarray, threshold: float, mode: Mode = "partition",
                       max_tokens: int | None = None, min_area: int = 0) -> Tokens:
    """Turn a boundary probability map into subobject tokens.

    Args:
        prob: (H, W) float (float32 preferred) boundary probability in [0, 1]; high = boundary.
        threshold: boundary threshold in [0, 1]; pixels with ``prob < threshold`` (simple) or
            ``prob <= threshold`` (partition) are token interiors.
        mode: ``"simple"`` or ``"partition"`` (see the module docstring).
        max_tokens: keep at most this many tokens (the largest seed components); None = all.
        min_area: drop seed components smaller than this many pixels.

    Returns:
        Tokens with ``label_map`` (H, W) int32 (0 = unassigned, 1..K sorted by area descending) and
        ``boundary_score`` (K,) float32 (see :func:`edge_scores`). In ``partition`` mode there is no 0
        unless the map has no interior pixel at all; then the whole image is one token.
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"prob must be (H, W), got shape {prob.shape}")
    if mode not in ("simple", "partition"):
        raise ValueError(f"mode must be 'simple' or 'partition', got {mode!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError("max_tokens must be >= 1 or None")
    prob = prob.astype(np.float32, copy=False)

    if mode == "simple":
        # 1. seeds = tokens: 8-connected interiors
        seeds, areas = connected_components(prob < threshold, connectivity=8)
        # 2. keep the largest, already in area order
        keep = select_labels(areas, max_tokens, min_area)
        label_map = relabel(seeds, keep, len(areas) - 1)
    else:
        # 1. seeds: 4-connected components of the non-boundary pixels
        seeds, areas = connected_components(~(prob > threshold), connectivity=4)
        keep = select_labels(areas, max_tokens, min_area)
        if len(keep) == 0:
            # no interior pixel survives: the whole image is a single token
            label_map = np.ones(prob.shape, dtype=np.int32)
        else:
            # 2. markers: kept seeds only, numbered 1..K; dropped seeds are flooded like boundary pixels
            markers = relabel(seeds, keep, len(areas) - 1)
            # 3. watershed on the probability map fills every unlabelled pixel from the nearest basin
            flooded = flood_unlabelled(prob, markers)
            # 4. final order by final area (stable on the seed order)
            final_areas = np.bincount(flooded.ravel(), minlength=len(keep) + 1)
            order = select_labels(final_areas, None, 0)
            label_map = relabel(flooded, order, len(keep))
    n_tokens = int(label_map.max()) if label_map.size else 0
    return Tokens(label_map=label_map, boundary_score=edge_scores(label_map, prob, n_tokens))


def token_areas(label_map: np.ndarray) -> np.ndarray:
    """(K,) int64 pixel count of tokens 1..K of a label map (0 = unassigned is left out)."""
    return np.bincount(label_map.ravel(), minlength=int(label_map.max()) + 1)[1:]
