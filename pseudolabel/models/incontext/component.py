"""Component layers and difference masks: pure numpy/OpenCV helpers.

The ``component`` layer stores the signed difference query − clean losslessly in one (H, W, 3) uint8
RGB image: ``component = (query − clean + 128) mod 256``. Zero difference is mid-grey (128); a
difference d with |d| ≤ 127 is stored as 128 + d (so small components look like a grey relief), larger
ones wrap around. Decode with ``query = (clean + component − 128) mod 256`` (``decode_query``), which is
exact for every pixel.
"""
from __future__ import annotations

import cv2
import numpy as np

COMPONENT_OFFSET = 128


def encode_component(query: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 query and clean -> (H, W, 3) uint8 component = (query − clean + 128) mod 256."""
    d = query.astype(np.int16) - clean.astype(np.int16) + COMPONENT_OFFSET
    return np.mod(d, 256).astype(np.uint8)


def decode_query(clean: np.ndarray, component: np.ndarray) -> np.ndarray:
    """Inverse of ``encode_component``: (H, W, 3) uint8 clean + component -> the query, exactly."""
    d = clean.astype(np.int16) + component.astype(np.int16) - COMPONENT_OFFSET
    return np.mod(d, 256).astype(np.uint8)


def clean_mask(mask: np.ndarray, open_radius: int = 1, close_radius: int = 2, min_area: int = 16) -> np.ndarray:
    """Morphological clean-up of a (H, W) bool mask.

    1. opening with a disk of ``open_radius`` (removes speckle); 2. closing with ``close_radius``
    (bridges thin gaps, e.g. between the strokes of a letter); 3. drop 8-connected components smaller
    than ``min_area`` pixels. Radii of 0 skip a step. Returns (H, W) bool.
    """
    m: np.ndarray = mask.astype(np.uint8)
    if open_radius > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * open_radius + 1,) * 2)
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k)
    if close_radius > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * close_radius + 1,) * 2)
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, k)
    if min_area > 1 and m.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
        m = keep[labels].astype(np.uint8)
    return m.astype(bool)


def difference_mask(a: np.ndarray, b: np.ndarray, threshold: int = 12, open_radius: int = 1,
                    close_radius: int = 2, min_area: int = 16) -> np.ndarray:
    """Where two (H, W, 3) uint8 images differ: max over channels of |a − b| > ``threshold``, cleaned.

    Returns (H, W) bool.
    """
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)
    return clean_mask(diff > threshold, open_radius, close_radius, min_area)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) bool dilated by a disk of ``radius`` pixels (0: unchanged copy)."""
    if radius <= 0:
        return mask.copy()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
    return cv2.dilate(mask.astype(np.uint8), k).astype(bool)
