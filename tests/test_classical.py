"""Classical weight-free baselines: EdgeTokens (classical_tokens) and GrabCutForeground (classical_grabcut)."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from pseudolabel.jobs.demo.data import render_index
from pseudolabel.jobs.evaluation.metrics import boundary_prf, masks_to_label_map
from pseudolabel.models.base import LabelOutput
from pseudolabel.models.classical import ClassicalInpaint, EdgeTokens, GrabCutForeground, edge_boundary_map
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.spec import LabelerSpec


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def striped_scene(h: int, w: int, seed: int = 0, with_background: bool = False):
    """A saturated ellipse and a square on a grey striped, noisy background.

    Returns (image (h, w, 3) uint8 RGB, ellipse mask (h, w) bool, square mask (h, w) bool), plus the
    background alone (h, w, 3) uint8 RGB with ``with_background``.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    stripes = 110 + 25 * np.sign(np.sin((xx + yy) / 1.2))  # ~7.5 px period: texture
    img = np.repeat(stripes[..., None], 3, axis=2) + rng.normal(0, 6, (h, w, 3))
    background = np.clip(img, 0, 255).astype(np.uint8)
    ellipse = ((yy - 0.45 * h) / (0.22 * h)) ** 2 + ((xx - 0.3 * w) / (0.18 * w)) ** 2 <= 1.0
    square = (np.abs(yy - 0.6 * h) < 0.15 * h) & (np.abs(xx - 0.72 * w) < 0.12 * w)
    img[ellipse] = (200, 40, 50) + rng.normal(0, 6, (int(ellipse.sum()), 3))
    img[square] = (40, 170, 60) + rng.normal(0, 6, (int(square.sum()), 3))
    if with_background:
        return np.clip(img, 0, 255).astype(np.uint8), ellipse, square, background
    return np.clip(img, 0, 255).astype(np.uint8), ellipse, square


def spec(name: str, params: dict | None = None, ontology: list | None = None) -> LabelerSpec:
    return LabelerSpec(name=name, params=params or {}, ontology=ontology or [])


def union(output: LabelOutput, shape) -> np.ndarray:
    m = np.zeros(shape, bool)
    for inst in output.instances:
        m |= inst.mask
    return m


# ---------------------------------------------------------------------------------------------
# registry and params
# ---------------------------------------------------------------------------------------------

def test_registry_names_and_baseline_flags():
    assert labeler_class("classical_tokens") is EdgeTokens
    assert labeler_class("classical_grabcut") is GrabCutForeground
    assert labeler_class("classical_inpaint") is ClassicalInpaint
    for cls in (EdgeTokens, GrabCutForeground, ClassicalInpaint):
        assert cls.baseline is True
        assert "baseline" in cls.summary and "baseline" in cls.__doc__.lower()


@pytest.mark.parametrize("cls,name", [(EdgeTokens, "classical_tokens"), (GrabCutForeground, "classical_grabcut")])
def test_params_reject_unknown_and_invalid(cls, name):
    with pytest.raises(ValidationError):
        cls(spec(name, {"no_such_param": 1}))
    bad = {"threshold": 2.0} if cls is EdgeTokens else {"working_size": 4}
    with pytest.raises(ValidationError):
        cls(spec(name, bad))
    cls(spec(name, {}))  # defaults are valid


# ---------------------------------------------------------------------------------------------
# EdgeTokens
# ---------------------------------------------------------------------------------------------

def test_edge_map_range_and_peaks_on_edges():
    img, ellipse, square = striped_scene(90, 150)
    prob = edge_boundary_map(img)
    assert prob.shape == (90, 150) and prob.dtype == np.float32
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    gt = masks_to_label_map(np.stack([ellipse, square]))
    edge = np.zeros_like(ellipse)
    edge[:, 1:] |= gt[:, 1:] != gt[:, :-1]
    edge[1:] |= gt[1:] != gt[:-1]
    # the stripes are smoothed away: object edges are far stronger than the texture away from them
    far = ndimage.distance_transform_edt(~edge) > 4
    assert prob[edge].mean() > 0.5
    assert prob[edge].mean() > 4 * prob[far].mean()


@pytest.mark.parametrize("mode", ["partition", "simple"])
def test_edge_tokens_recall_shape_edges_with_few_tokens(mode):
    labeler = EdgeTokens(spec("classical_tokens", {"mode": mode}))
    recalls, counts = [], []
    scenes = [render_index(7, i, 256) for i in range(3)]
    outs = labeler([s.image for s in scenes])
    for scene, out in zip(scenes, outs):
        lm = out.tokens.label_map
        assert lm.shape == scene.image.shape[:2] and lm.dtype == np.int32
        if mode == "partition":
            assert (lm > 0).all()
        else:
            assert (lm == 0).any()
        k = int(lm.max())
        assert out.tokens.boundary_score.shape == (k,)
        gt = masks_to_label_map(scene.masks, lm.shape)
        recalls.append(boundary_prf(lm, gt, recall_tol=3, border=3)["recall"])
        counts.append(k)
    assert np.mean(recalls) > 0.85, recalls
    assert max(counts) <= 60 and min(counts) >= 2, counts


def test_edge_tokens_non_square_and_max_tokens():
    img, ellipse, square = striped_scene(72, 130, seed=1)
    out = EdgeTokens(spec("classical_tokens", {"max_tokens": 2, "max_side": 64}))([img])[0]
    lm = out.tokens.label_map
    assert lm.shape == (72, 130)
    assert lm.max() <= 2 and (lm > 0).all()
    # full labeler on the same image: the ellipse and square are separate tokens
    lm = EdgeTokens(spec("classical_tokens"))([img])[0].tokens.label_map
    best = [np.bincount(lm[m]).argmax() for m in (ellipse, square)]
    assert best[0] != best[1]
    assert iou(lm == best[0], ellipse) > 0.8 and iou(lm == best[1], square) > 0.8


# ---------------------------------------------------------------------------------------------
# GrabCut
# ---------------------------------------------------------------------------------------------

def test_grabcut_beats_centre_box_on_demo_scenes():
    labeler = GrabCutForeground(spec("classical_grabcut", {"working_size": 128}))
    scenes = [render_index(3, i, 160) for i in range(5)]
    outs = labeler([s.image for s in scenes])
    ours, centre, rand = [], [], []
    rng = np.random.default_rng(0)
    for scene, out in zip(scenes, outs):
        gt = scene.masks.any(axis=0)
        h, w = gt.shape
        box = np.zeros_like(gt)
        box[h // 10: h - h // 10, w // 10: w - w // 10] = True
        ours.append(iou(union(out, gt.shape), gt))
        centre.append(iou(box, gt))
        rand.append(iou(rng.random(gt.shape) < gt.mean(), gt))
        for inst in out.instances:
            assert inst.mask.shape == gt.shape and inst.mask.dtype == bool
            assert 0.0 <= inst.score <= 1.0
            assert (inst.category_id, inst.category) == (1, "foreground")
    assert np.mean(ours) > 0.6, ours
    assert np.mean(ours) > np.mean(centre) + 0.25 and np.mean(ours) > np.mean(rand) + 0.3


def test_grabcut_non_square_whole_image_and_ontology_category():
    img, ellipse, square = striped_scene(96, 150)
    onto = [{"category": "thing", "prompts": ["object"]}]
    out = GrabCutForeground(spec("classical_grabcut", {"working_size": 100}, onto))([img])[0]
    assert len(out.instances) >= 2
    for inst in out.instances:
        assert inst.mask.shape == (96, 150)
        assert (inst.category_id, inst.category) == (1, "thing")
    assert iou(union(out, (96, 150)), ellipse | square) > 0.8
    # the rectangle initialisation also finds the objects, if less cleanly
    rect = GrabCutForeground(spec("classical_grabcut", {"init": "rect", "working_size": 100}))([img])[0]
    assert iou(union(rect, (96, 150)), ellipse | square) > 0.3


def test_grabcut_box_prompts_one_instance_each_with_ontology_categories():
    img, ellipse, square = striped_scene(100, 140, seed=2)

    def box(m):
        ys, xs = np.nonzero(m)
        return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]

    onto = [{"category": "ball", "prompts": ["ellipse"]}, {"category": "block"}]
    labeler = GrabCutForeground(spec("classical_grabcut", {}, onto))
    prompts = {"boxes_xyxy": [box(ellipse), box(square), box(square)], "categories": ["ellipse", "block", "tree"]}
    outs = labeler([img, img], [prompts, None])
    boxed = outs[0].instances
    assert [(i.category_id, i.category, i.prompt) for i in boxed] == [(1, "ball", "ellipse"), (2, "block", "block")]
    assert iou(boxed[0].mask, ellipse) > 0.85 and iou(boxed[1].mask, square) > 0.85
    x0, y0, x1, y1 = (int(v) for v in box(square))
    assert not boxed[1].mask[:, : x0 - 12].any()  # stays near its box
    assert outs[1].instances  # the row without prompts falls back to the whole image
    # empty ontology: every box is "foreground" id 1
    plain = GrabCutForeground(spec("classical_grabcut"))([img], [{"boxes_xyxy": [box(ellipse)]}])[0]
    assert [(i.category_id, i.category) for i in plain.instances] == [(1, "foreground")]
    assert iou(plain.instances[0].mask, ellipse) > 0.85


def test_grabcut_is_deterministic_and_handles_flat_images():
    img, _, _ = striped_scene(64, 80, seed=3)
    labeler = GrabCutForeground(spec("classical_grabcut"))
    a = labeler([img])[0].instances
    b = labeler([img])[0].instances
    assert len(a) == len(b) and all(np.array_equal(x.mask, y.mask) and x.score == y.score for x, y in zip(a, b))
    flat = np.full((40, 50, 3), 128, np.uint8)
    assert labeler([flat])[0].instances == []
    # a degenerate box yields nothing rather than an error
    assert labeler([img], [{"boxes_xyxy": [[10, 10, 10.5, 30]]}])[0].instances == []


# ---------------------------------------------------------------------------------------------
# ClassicalInpaint
# ---------------------------------------------------------------------------------------------

def test_inpaint_removes_the_foreground():
    img, ellipse, square, background = striped_scene(80, 120, seed=4, with_background=True)
    out = ClassicalInpaint(spec("classical_inpaint", {"dilate": 2}))([img])[0]
    plate, fgm = out.layers["background"], out.layers["foreground_mask"]
    assert plate.shape == img.shape and plate.dtype == np.uint8
    assert fgm.shape == img.shape[:2] and fgm.dtype == np.uint8 and set(np.unique(fgm)) <= {0, 255}
    objects = ellipse | square
    assert iou(fgm > 0, objects) > 0.7 and (fgm > 0)[objects].mean() > 0.95
    assert np.array_equal(plate[fgm == 0], img[fgm == 0])  # only the filled region changes
    # inside each object the plate's colour is the background's (stripes cannot be restored, so
    # compare mean colours), unlike the input's
    for m in (ellipse, square):
        truth = background[m].astype(float).mean(axis=0)
        assert np.abs(plate[m].astype(float).mean(axis=0) - truth).max() < 15
        assert np.abs(img[m].astype(float).mean(axis=0) - truth).max() > 50
    assert out.instances and all(i.category == "foreground" for i in out.instances)
