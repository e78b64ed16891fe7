"""Recall-vs-token-count curve: scores move the right way with the threshold, the PNG is written."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pseudolabel.jobs.evaluation.directsam_eval import token_recall_curve


def _scene(seed: int):
    """A ground-truth segment map of rectangles and a boundary map: GT edges at 0.6, noise edges at 0.1."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((64, 80), np.int32)
    gt[10:40, 8:50] = 1
    gt[30:60, 40:75] = 2
    edges = np.zeros(gt.shape, bool)
    edges[:, :-1] |= gt[:, :-1] != gt[:, 1:]
    edges[:-1, :] |= gt[:-1, :] != gt[1:, :]
    prob = rng.uniform(0, 0.02, gt.shape).astype(np.float32)
    prob[cv2.dilate(edges.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0] = 0.6
    prob[::16, :] = np.maximum(prob[::16, :], 0.1)  # weak spurious lines
    return prob, gt


def test_token_recall_curve(tmp_path):
    probs, gts = zip(*[_scene(s) for s in range(2)])
    out = tmp_path / "curve.png"
    rows = token_recall_curve(probs, gts, str(out), thresholds=[0.05, 0.3, 0.9])
    assert [r["threshold"] for r in rows] == [0.05, 0.3, 0.9]
    low, mid, high = rows
    # above every boundary value: one token, nothing recalled; between: GT edges only, near-perfect ASA
    assert high["tokens"] == 1 and high["recall"] < 0.1
    assert mid["recall"] > 0.95 and mid["asa"] > 0.95 > high["asa"]
    # a low threshold also cuts along the spurious lines: more tokens, lower precision
    assert low["tokens"] > mid["tokens"] and low["precision"] < mid["precision"]
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 100 and img.std() > 0


def test_curve_points_score_with_the_given_tolerances_and_border():
    from pseudolabel.jobs.evaluation.directsam_eval import curve_points
    from pseudolabel.jobs.evaluation.metrics import boundary_prf
    from pseudolabel.models.tokens import boundary_to_tokens

    prob, gt = _scene(0)
    shifted = [np.roll(prob, (3, 3), axis=(0, 1))]  # every predicted edge 3 px off the GT edge
    default = curve_points(shifted, [gt], thresholds=[0.3])[0]
    strict = curve_points(shifted, [gt], thresholds=[0.3], precision_tol=1, recall_tol=1)[0]
    assert default["recall"] > 0.9  # 3 px is within the default recall tolerance of 5
    assert strict["recall"] < 0.2 and strict["precision"] < 0.2  # but not within 1 px
    # every setting reaches boundary_prf: the same numbers as scoring the tokens directly
    lm = boundary_to_tokens(shifted[0], 0.3, "simple", None, 0).label_map
    for kw in ({"precision_tol": 4, "recall_tol": 1, "border": 12}, {"precision_tol": 1, "recall_tol": 8, "border": 0}):
        row = curve_points(shifted, [gt], thresholds=[0.3], mode="simple", **kw)[0]
        direct = boundary_prf(lm, gt, **kw)
        assert (row["precision"], row["recall"]) == pytest.approx((direct["precision"], direct["recall"]))
