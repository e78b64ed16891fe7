"""Recall-vs-token-count curve of boundary maps over thresholds (DirectSAM evaluation).

For each threshold the boundary maps are turned into tokens with the shared post-processing, and the
tokens are scored against ground-truth segment maps with ``pseudolabel.jobs.evaluation.metrics`` (boundary
precision/recall/F1 at the given pixel tolerances, by default the reference's, and ASA). The curve (mean
token count per image on x, boundary recall and ASA on y) is written as a PNG: with matplotlib when it is
installed, else drawn with OpenCV.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pseudolabel import storage as st
from pseudolabel.jobs.evaluation.metrics import (
    BORDER,
    PRECISION_TOL,
    RECALL_TOL,
    asa_counts,
    boundary_prf,
    fill_unassigned,
    prf_from_counts,
)
from pseudolabel.models.tokens import Mode, boundary_to_tokens
from pseudolabel.schemas.spec import StorageSpec

DEFAULT_THRESHOLDS = (0.02, 0.03, 0.05, 0.08, 0.12, 0.18, 0.25, 0.35, 0.5, 0.65)


def curve_points(probs: Sequence[np.ndarray], gt_label_maps: Sequence[np.ndarray],
                 thresholds: Sequence[float] = DEFAULT_THRESHOLDS, mode: Mode = "partition",
                 max_tokens: int | None = None, min_area: int = 0, precision_tol: float = PRECISION_TOL,
                 recall_tol: float = RECALL_TOL, border: int = BORDER) -> list[dict]:
    """Score the tokens of every threshold.

    Args:
        probs: N boundary maps, (H, W) float in [0, 1].
        gt_label_maps: N ground-truth segment maps, (H, W) int (every value a segment, 0 included).
        thresholds, mode, max_tokens, min_area: post-processing settings (see ``boundary_to_tokens``).
        precision_tol, recall_tol, border: boundary matching tolerances and ignored image border in px
            (see ``metrics.boundary_prf``).

    Returns:
        one dict per threshold, in the given order: threshold, tokens (mean token count per image),
        precision, recall, f1 (micro over the images' boundary pixels), asa (over all pixels).
    """
    rows = []
    for thr in thresholds:
        counts = np.zeros(4, np.int64)  # pred_pixels, pred_matched, gt_pixels, gt_matched
        correct = total = n_tokens = 0
        for prob, gt in zip(probs, gt_label_maps):
            lm = boundary_to_tokens(prob, float(thr), mode, max_tokens, min_area).label_map
            n_tokens += int(lm.max())
            s = boundary_prf(lm, gt, precision_tol=precision_tol, recall_tol=recall_tol, border=border)
            counts += [s["pred_pixels"], s["pred_matched"], s["gt_pixels"], s["gt_matched"]]
            c, t = asa_counts(fill_unassigned(lm), gt)
            correct, total = correct + c, total + t
        prf = prf_from_counts(*[int(v) for v in counts])
        rows.append({"threshold": float(thr), "tokens": n_tokens / max(len(probs), 1),
                     "precision": prf["precision"], "recall": prf["recall"], "f1": prf["f1"],
                     "asa": correct / total if total else 1.0})
    return rows


def plot_png(rows: list[dict], title: str = "boundary recall vs tokens") -> bytes:
    """PNG bytes of recall and ASA (y, 0..1) against mean token count (x, log scale)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(rows, key=lambda r: r["tokens"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([r["tokens"] for r in pts], [r["recall"] for r in pts], "o-", label="boundary recall")
    ax.plot([r["tokens"] for r in pts], [r["asa"] for r in pts], "s--", label="ASA")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("tokens per image")
    ax.set_title(title)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def token_recall_curve(probs: Sequence[np.ndarray], gt_label_maps: Sequence[np.ndarray], out_png: str,
                       thresholds: Sequence[float] = DEFAULT_THRESHOLDS, mode: Mode = "partition",
                       max_tokens: int | None = None, min_area: int = 0,
                       storage: StorageSpec | None = None, title: str = "boundary recall vs tokens",
                       precision_tol: float = PRECISION_TOL, recall_tol: float = RECALL_TOL,
                       border: int = BORDER) -> list[dict]:
    """Compute the recall-vs-token-count curve and write its plot to ``out_png`` (local path or s3://).

    Args: see ``curve_points``; ``out_png``: where the PNG goes.

    Returns:
        the rows of ``curve_points``.
    """
    rows = curve_points(probs, gt_label_maps, thresholds, mode, max_tokens, min_area, precision_tol, recall_tol, border)
    st.write_bytes(out_png, plot_png(rows, title), storage)
    return rows
