"""Pure helpers that turn per-prompt masks and scores into kept instances."""
from __future__ import annotations

import numpy as np


def mask_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, H, W) bool, (M, H, W) bool -> (N, M) float64 IoU (0 where both masks are empty)."""
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float64)


def select_instances(masks: np.ndarray, scores: np.ndarray, *, score_threshold: float = 0.0, min_area: int = 1,
                     dedup_iou: float | None = None) -> list[int]:
    """Indices of the masks to keep, highest score first.

    masks: (P, H, W) bool; scores: (P,) float in [0, 1].
    1. drop masks scoring below ``score_threshold`` or with fewer than ``max(1, min_area)`` pixels;
    2. if ``dedup_iou`` is set, walk by descending score and drop any mask whose IoU with an already
       kept mask exceeds it (cross-prompt de-duplication).
    """
    if len(masks) == 0:
        return []
    areas = masks.reshape(len(masks), -1).sum(1)
    order = [int(i) for i in np.argsort(-scores, kind="stable")
             if scores[i] >= score_threshold and areas[i] >= max(1, min_area)]
    if dedup_iou is None or len(order) < 2:
        return order
    iou = mask_iou_matrix(masks[order], masks[order])
    kept: list[int] = []
    for j in range(len(order)):
        if all(iou[j, k] <= dedup_iou for k in kept):
            kept.append(j)
    return [order[j] for j in kept]
