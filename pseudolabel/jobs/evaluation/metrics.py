"""Segmentation metrics on plain arrays: boundary precision/recall/F1, ASA, token count, mIoU.

Pure numpy/scipy helpers, no I/O; ``evaluate`` and the DirectSAM recall-vs-token-count curve use them,
so the signatures below are kept stable.

Conventions:
- a *label map* is an (H, W) integer array; each distinct value is one segment. For predicted tokens,
  0 means "unassigned" (simple-mode boundary pixels, tokens dropped by ``max_tokens``); for ground
  truth, 0 is the background and counts as a segment of its own.
- a *boundary map* is an (H, W) bool array, True on boundary pixels.
- a label map's boundary is one pixel thick: pixel (y, x) is on it when its label differs from the
  pixel to its right or the pixel below (``label_boundaries``).

Boundary matching (the reference's tolerances): the predicted contour is thinned to 1 px; a predicted
boundary pixel is correct when a ground-truth boundary pixel lies within ``precision_tol`` = 2 px
(Euclidean); a ground-truth boundary pixel is recalled when a predicted boundary pixel lies within
``recall_tol`` = 5 px. Pixels within ``border`` px of the image edge are left out of both counts.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

PRECISION_TOL = 2.0
RECALL_TOL = 5.0
BORDER = 5


def label_boundaries(label_map: np.ndarray) -> np.ndarray:
    """(H, W) int label map -> (H, W) bool boundary, 1 px thick.

    Pixel (y, x) is a boundary pixel when ``label[y, x] != label[y, x+1]`` or ``label[y, x] != label[y+1, x]``
    (so the boundary lies on the top/left side of each label change, never doubled).
    """
    lm = np.asarray(label_map)
    out = np.zeros(lm.shape, dtype=bool)
    out[:, :-1] |= lm[:, :-1] != lm[:, 1:]
    out[:-1, :] |= lm[:-1, :] != lm[1:, :]
    return out


def thin_boundary(boundary: np.ndarray) -> np.ndarray:
    """(H, W) bool boundary map (any thickness) -> (H, W) bool skeleton, 1 px thick (skimage skeletonize)."""
    from skimage.morphology import skeletonize

    return skeletonize(np.asarray(boundary, dtype=bool))


def fill_unassigned(label_map: np.ndarray, unassigned: int = 0) -> np.ndarray:
    """Give every ``unassigned`` pixel the label of its nearest assigned pixel (Euclidean).

    Args:
        label_map: (H, W) int array.
        unassigned: the value of unassigned pixels.

    Returns:
        (H, W) array of the same dtype with no ``unassigned`` pixels left (unchanged if all are
        unassigned or none are).
    """
    lm = np.asarray(label_map)
    holes = lm == unassigned
    if not holes.any() or holes.all():
        return lm.copy()
    _, (iy, ix) = ndimage.distance_transform_edt(holes, return_indices=True)
    return lm[iy, ix]


def masks_to_label_map(masks: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(N, H, W) masks -> (H, W) int32 label map; mask k gets label k + 1, 0 where no mask.

    Where masks overlap the earlier mask wins (the same rule as the panoptic export). ``shape`` is
    only needed when N = 0.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] == 0:
        if shape is None:
            shape = masks.shape[-2:]
        return np.zeros(shape, dtype=np.int32)
    m = masks.astype(bool, copy=False)
    out = (m.argmax(axis=0) + 1).astype(np.int32)
    out[~m.any(axis=0)] = 0
    return out


def _border_mask(shape: tuple[int, int], border: int) -> np.ndarray:
    valid = np.ones(shape, dtype=bool)
    if border > 0:
        valid[:border, :] = valid[-border:, :] = False
        valid[:, :border] = valid[:, -border:] = False
    return valid


def _distance_to(boundary: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of ``boundary`` (inf if none)."""
    if not boundary.any():
        return np.full(boundary.shape, np.inf)
    return ndimage.distance_transform_edt(~boundary)


def boundary_scores(pred_boundary: np.ndarray, gt_boundary: np.ndarray, precision_tol: float = PRECISION_TOL,
                    recall_tol: float = RECALL_TOL, border: int = BORDER) -> dict:
    """Boundary precision/recall/F1 of two 1-px boundary maps.

    Args:
        pred_boundary: (H, W) bool, predicted boundary, already thin (see ``thin_boundary``).
        gt_boundary: (H, W) bool, ground-truth boundary (e.g. ``label_boundaries(gt_labels)``).
        precision_tol: a predicted pixel is correct if a GT boundary pixel is within this distance (px).
        recall_tol: a GT pixel is recalled if a predicted boundary pixel is within this distance (px).
        border: pixels closer than this to the image edge are ignored.

    Returns:
        {"precision", "recall", "f1": float in [0, 1], "pred_pixels", "pred_matched", "gt_pixels",
        "gt_matched": int}. Summing the counts over images gives dataset-level (micro) scores.
        With no predicted boundary pixels precision is 1.0; with no GT boundary pixels recall is 1.0.
    """
    pred = np.asarray(pred_boundary, dtype=bool)
    gt = np.asarray(gt_boundary, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs gt {gt.shape}")
    valid = _border_mask(gt.shape, border)
    pred_v, gt_v = pred & valid, gt & valid
    pred_matched = int(np.count_nonzero(pred_v & (_distance_to(gt) <= precision_tol)))
    gt_matched = int(np.count_nonzero(gt_v & (_distance_to(pred) <= recall_tol)))
    return prf_from_counts(int(pred_v.sum()), pred_matched, int(gt_v.sum()), gt_matched)


def prf_from_counts(pred_pixels: int, pred_matched: int, gt_pixels: int, gt_matched: int) -> dict:
    """Precision/recall/F1 from boundary pixel counts (same conventions as ``boundary_scores``)."""
    p = pred_matched / pred_pixels if pred_pixels else 1.0
    r = gt_matched / gt_pixels if gt_pixels else 1.0
    f = 2 * p * r / (p + r) if (p + r) > 0 else 0.0
    return {"precision": float(p), "recall": float(r), "f1": float(f), "pred_pixels": int(pred_pixels),
            "pred_matched": int(pred_matched), "gt_pixels": int(gt_pixels), "gt_matched": int(gt_matched)}


def boundary_prf(pred: np.ndarray, gt_labels: np.ndarray, pred_is_boundary: bool = False,
                 precision_tol: float = PRECISION_TOL, recall_tol: float = RECALL_TOL,
                 border: int = BORDER) -> dict:
    """Boundary precision/recall/F1 of a prediction against a ground-truth label map.

    Args:
        pred: (H, W) int label map of predicted tokens (0 = unassigned; unassigned pixels are first
            given to the nearest token, so simple-mode gaps become one boundary line), or, with
            ``pred_is_boundary``, an (H, W) bool / probability>0 boundary map, thinned to 1 px here.
        gt_labels: (H, W) int ground-truth label map (every value a segment, 0 included).
        precision_tol, recall_tol, border: see ``boundary_scores``.

    Returns:
        the dict of ``boundary_scores``.
    """
    if pred_is_boundary:
        pred_b = thin_boundary(np.asarray(pred) > 0)
    else:
        pred_b = label_boundaries(fill_unassigned(pred))
    return boundary_scores(pred_b, label_boundaries(gt_labels), precision_tol, recall_tol, border)


def asa_counts(pred_labels: np.ndarray, gt_labels: np.ndarray) -> tuple[int, int]:
    """(correct pixels, total pixels) of achievable segmentation accuracy; see ``asa``."""
    p = np.asarray(pred_labels).ravel()
    g = np.asarray(gt_labels).ravel()
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: pred {np.shape(pred_labels)} vs gt {np.shape(gt_labels)}")
    if p.size == 0:
        return 0, 0
    if p.dtype.kind in "iu" and g.dtype.kind in "iu" and p.min() >= 0 and g.min() >= 0:
        n_p, n_g = int(p.max()) + 1, int(g.max()) + 1
        if n_p * n_g <= 4 * p.size + 1_000_000:  # small labels (token indices, class ids): one joint histogram
            joint = np.bincount(p.astype(np.int64) * n_g + g, minlength=n_p * n_g).reshape(n_p, n_g)
            return int(joint.max(1).sum()), int(p.size)
    _, pi = np.unique(p, return_inverse=True)
    gu, gi = np.unique(g, return_inverse=True)
    keys, counts = np.unique(pi.astype(np.int64) * len(gu) + gi, return_counts=True)
    best = np.zeros(int(pi.max()) + 1, dtype=np.int64)
    np.maximum.at(best, keys // len(gu), counts)
    return int(best.sum()), int(p.size)


def asa(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float:
    """Achievable segmentation accuracy in [0, 1].

    Each predicted segment (every distinct value of ``pred_labels``, 0 included; call
    ``fill_unassigned`` first to hand unassigned pixels to tokens) is assigned to the GT segment it
    overlaps most; ASA is the fraction of pixels whose GT segment is that one. 1.0 when the prediction
    is the GT or any refinement of it.

    Args:
        pred_labels: (H, W) int label map.
        gt_labels: (H, W) int label map of the same shape.
    """
    correct, total = asa_counts(pred_labels, gt_labels)
    return correct / total if total else 1.0


def token_count(label_map: np.ndarray, unassigned: int | None = 0) -> int:
    """Number of distinct labels in an (H, W) label map, not counting ``unassigned`` (None: count all)."""
    u = np.unique(np.asarray(label_map))
    if unassigned is not None:
        u = u[u != unassigned]
    return int(u.size)


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Semantic confusion matrix, (num_classes, num_classes + 1) int64; rows = GT class, columns = predicted.

    Pixels whose GT is ``ignore_index`` (or outside [0, num_classes)) are left out. Predictions outside
    [0, num_classes) (including ``ignore_index``) land in the last column ("no valid class"): they are
    wrong for their GT class but are no class's false positive. Sum matrices over images for a dataset.
    """
    p = np.asarray(pred).ravel().astype(np.int64)
    g = np.asarray(gt).ravel().astype(np.int64)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: pred {np.shape(pred)} vs gt {np.shape(gt)}")
    keep = (g != ignore_index) & (g >= 0) & (g < num_classes)
    p, g = p[keep], g[keep]
    p = np.where((p >= 0) & (p < num_classes), p, num_classes)
    conf = np.bincount(g * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1))
    return conf.reshape(num_classes, num_classes + 1)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """(C,) float64 IoU per class from a ``confusion_matrix``; NaN for classes absent from GT and prediction."""
    c = conf.shape[0]
    tp = np.diag(conf[:, :c]).astype(np.float64)
    union = conf.sum(axis=1) + conf[:, :c].sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def miou(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> float:
    """Mean IoU over the classes present in GT or prediction (ignored GT pixels left out).

    Args:
        pred: (H, W) int predicted class map.
        gt: (H, W) int GT class map; ``ignore_index`` pixels are not scored.
        num_classes: classes are 0..num_classes-1 (0 is usually the background).

    Returns:
        float in [0, 1]; NaN when no class is present at all.
    """
    ious = iou_per_class(confusion_matrix(pred, gt, num_classes, ignore_index))
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")
