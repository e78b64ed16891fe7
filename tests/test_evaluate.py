"""Metrics on hand-made maps with known answers, and ``evaluate`` against a COCO ground truth."""
from __future__ import annotations

import json

import numpy as np
import pytest
from labels_fixtures import GT_SHAPES, gt_coco, shape_masks, write_rows, write_run

from pseudolabel.jobs.evaluation import metrics as M

# ---------------------------------------------------------------- metrics on hand-made maps

def _halves(h=64, w=64, split=32):
    lm = np.zeros((h, w), np.int32)
    lm[:, split:] = 1
    return lm


def test_perfect_prediction_scores_one():
    gt = _halves()
    gt[10:30, 10:20] = 2
    s = M.boundary_prf(gt + 1, gt)  # relabelled but identical segments
    assert s["precision"] == 1.0 and s["recall"] == 1.0 and s["f1"] == 1.0
    assert s["gt_pixels"] > 0 and s["pred_pixels"] == s["gt_pixels"]
    assert M.asa(gt + 1, gt) == 1.0
    assert M.token_count(gt + 1) == 3


def test_shifted_boundary_fails_precision_passes_recall():
    gt = _halves(split=32)
    pred = _halves(split=35) + 1  # 3 px to the right
    s = M.boundary_prf(pred, gt)
    assert s["precision"] == 0.0  # 3 px > t=2
    assert s["recall"] == 1.0  # 3 px <= t=5
    # within both tolerances when shifted by 2 px
    s2 = M.boundary_prf(_halves(split=34) + 1, gt)
    assert s2["precision"] == 1.0 and s2["recall"] == 1.0
    # beyond both when shifted by 6 px
    s6 = M.boundary_prf(_halves(split=38) + 1, gt)
    assert s6["precision"] == 0.0 and s6["recall"] == 0.0 and s6["f1"] == 0.0


def test_border_band_ignored():
    gt = np.zeros((64, 64), np.int32)
    pred = np.ones((64, 64), np.int32)
    pred[:, 2:] = 2  # a boundary inside the 5 px border band only
    s = M.boundary_prf(pred, gt)
    assert s["pred_pixels"] == 0 and s["gt_pixels"] == 0
    s0 = M.boundary_prf(pred, gt, border=0)
    assert s0["pred_pixels"] == 64 and s0["precision"] == 0.0


def test_extra_boundary_lowers_precision_only():
    gt = _halves()
    pred = _halves() + 1
    pred[:, 10] = 7  # a spurious one-column token far from the GT boundary
    s = M.boundary_prf(pred, gt)
    assert s["recall"] == 1.0
    assert 0.2 < s["precision"] < 0.5  # 54 true of 54 + 2 * 54 predicted pixels
    assert s["pred_matched"] == s["gt_pixels"]


def test_thick_boundary_map_is_thinned():
    gt = _halves()
    boundary = np.zeros((64, 64), bool)
    boundary[:, 30:35] = True  # 5 px wide band centred on x=32
    s = M.boundary_prf(boundary, gt, pred_is_boundary=True)
    assert s["precision"] == 1.0 and s["recall"] == 1.0
    assert s["pred_pixels"] <= 64  # one line, not five


def test_simple_mode_gaps_filled():
    gt = _halves()
    pred = _halves() + 1
    pred[:, 31:33] = 0  # unassigned boundary strip, as in simple mode
    s = M.boundary_prf(pred, gt)
    assert s["precision"] == 1.0 and s["recall"] == 1.0
    assert M.asa(M.fill_unassigned(pred), gt) >= 62 / 64
    assert M.token_count(pred) == 2


def test_asa_known_value():
    gt = _halves()
    pred = np.zeros((64, 64), np.int32)
    pred[:, 40:] = 1  # token 0 covers x<40: 32 columns of gt 0 + 8 of gt 1
    assert M.asa(pred, gt) == pytest.approx((32 + 24) / 64)
    # over-segmentation of the GT loses nothing
    fine = np.arange(64 * 64).reshape(64, 64)
    assert M.asa(fine, gt) == 1.0
    assert M.token_count(fine, unassigned=None) == 64 * 64


def _asa_by_loops(pred: np.ndarray, gt: np.ndarray) -> int:
    """Correct pixels of ASA the slow way: for each predicted segment, its largest overlap with a GT segment."""
    return sum(max(int(((pred == t) & (gt == g)).sum()) for g in np.unique(gt)) for t in np.unique(pred))


@pytest.mark.parametrize("kind", ["small ints", "negative", "sparse large", "uint8"])
def test_asa_counts_equal_the_definition(kind):
    """Each way the counts are taken (one joint histogram for small non-negative labels, sorting
    otherwise) gives the definition's answer."""
    rng = np.random.default_rng(len(kind))
    for _ in range(5):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        pred, gt = rng.integers(0, 12, (h, w)), rng.integers(0, 5, (h, w))
        if kind == "negative":
            pred, gt = pred - 3, gt - 2
        elif kind == "sparse large":
            pred = pred * 1_000_003
        elif kind == "uint8":
            pred, gt = pred.astype(np.uint8), gt.astype(np.uint8)
        assert M.asa_counts(pred, gt) == (_asa_by_loops(pred, gt), h * w)


def test_miou_known_values():
    gt = np.zeros((4, 4), np.int64)
    gt[:, 2:] = 1
    gt[0, 0] = 255
    assert M.miou(gt, gt, 2) == 1.0
    pred = np.zeros((4, 4), np.int64)
    pred[:, 3:] = 1  # class 1: tp 4, union 8; class 0: tp 7, union 11
    assert M.miou(pred, gt, 2) == pytest.approx((4 / 8 + 7 / 11) / 2)
    # out-of-range predictions are wrong but nobody's false positive
    bad = gt.copy()
    bad[1, 0] = 255
    conf = M.confusion_matrix(bad, gt, 2)
    assert conf.shape == (2, 3) and conf[0, 2] == 1
    assert M.iou_per_class(conf)[0] == pytest.approx(6 / 7)
    # a class absent from both is left out of the mean
    assert M.miou(gt, gt, 5) == 1.0


def test_masks_to_label_map_first_wins():
    a = np.zeros((8, 8), bool)
    a[:4] = True
    b = np.zeros((8, 8), bool)
    b[2:6] = True
    lm = M.masks_to_label_map(np.stack([a, b]))
    assert (lm[:4] == 1).all() and (lm[4:6] == 2).all() and (lm[6:] == 0).all()
    assert M.masks_to_label_map(np.zeros((0, 8, 8), bool)).shape == (8, 8)


# ---------------------------------------------------------------- evaluate against COCO GT

@pytest.fixture()
def gt_path(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt_coco()))
    return str(path)


def test_evaluate_perfect_instances_and_tokens(tmp_path, gt_path):
    from pseudolabel.jobs.evaluation.evaluate import evaluate

    out = write_run(tmp_path / "run", mode="perfect")
    r = evaluate(out, gt_path)
    assert r["AP"] == pytest.approx(1.0, abs=1e-6) and r["AP50"] == pytest.approx(1.0, abs=1e-6)
    assert r["matched_images"] == len(GT_SHAPES) and r["predictions"] == sum(len(s) for s in GT_SHAPES)
    json.dumps(r)  # JSON-serialisable

    t = evaluate(out, gt_path, task="tokens")
    assert t["asa"] == pytest.approx(1.0) and t["boundary_recall"] == pytest.approx(1.0)
    assert t["boundary_precision"] == pytest.approx(1.0)
    assert t["mean_tokens"] == pytest.approx(np.mean([len(s) + 1 for s in GT_SHAPES]))
    json.dumps(t)


def test_evaluate_random_masks_low_ap(tmp_path, gt_path):
    from pseudolabel.jobs.evaluation.evaluate import evaluate

    out = write_run(tmp_path / "run", mode="random")
    r = evaluate(out, gt_path)
    assert r["AP"] < 0.1
    t = evaluate(out, gt_path, task="tokens")
    assert t["asa"] < 0.95 and t["boundary_precision"] < 0.5


def test_evaluate_class_agnostic(tmp_path, gt_path):
    from pseudolabel.jobs.evaluation.evaluate import evaluate

    out = write_run(tmp_path / "run", mode="perfect", wrong_categories=True)
    assert evaluate(out, gt_path)["AP"] < 0.2
    agn = evaluate(out, gt_path, class_agnostic=True)
    assert agn["AP"] == pytest.approx(1.0, abs=1e-6)


IGNORE_BAND = 4  # the top rows of every GT semantic PNG are 255 (ignored); every shape lies below them


def _write_semantic_pngs(root, band: int = IGNORE_BAND):
    """GT class-map PNGs of the three images under ``root``, rows [0, band) set to the ignore index 255."""
    import cv2

    for img in gt_coco()["images"]:
        sem = np.zeros((img["height"], img["width"]), np.uint8)
        for (cat, _), m in zip(GT_SHAPES[img["id"] - 1], shape_masks(img["id"])):
            sem[m] = cat
        sem[:band] = 255
        (root / img["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / img["file_name"]), sem)
    return root


def _run_with_extra_mask(out, mask: np.ndarray, category_id: int):
    """The perfect run plus one annotation of ``category_id`` on ``mask`` in image 1 (top score)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from labels_fixtures import CATEGORIES, label_rows

    from pseudolabel.schemas.coco import mask_to_rle, rle_area, rle_bbox_xywh
    from pseudolabel.schemas.tables import LABELS_SCHEMA

    rows = label_rows("perfect")
    rle = mask_to_rle(mask)
    rows[0]["annotations"].append({
        "id": 99, "segmentation": rle, "area": float(rle_area([rle])[0]),
        "bbox": [float(v) for v in rle_bbox_xywh([rle])[0]], "iscrowd": 0, "category_id": category_id,
        "category": CATEGORIES[category_id - 1]["name"], "score": 0.99, "labeler": "test", "prompt": None})
    (out / "labels").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), out / "labels" / "p.parquet")
    return str(out)


def test_evaluate_semantic_ignores_wrong_predictions_in_the_ignore_band(tmp_path, gt_path):
    from labels_fixtures import H, W

    from pseudolabel.jobs.evaluation.evaluate import evaluate

    root = str(_write_semantic_pngs(tmp_path / "sem"))
    for img in gt_coco()["images"]:  # the band holds only background in the GT shapes
        assert not np.any(np.stack(shape_masks(img["id"]))[:, :IGNORE_BAND + 4])
    inside = np.zeros((H, W), bool)
    inside[:IGNORE_BAND, 10:40] = True            # class 3 where the GT says "ignore"
    outside = np.zeros((H, W), bool)
    outside[IGNORE_BAND:IGNORE_BAND + 4, 10:40] = True  # the same error just below the band
    perfect = evaluate(write_run(tmp_path / "perfect", mode="perfect"), gt_path, task="semantic",
                       gt_semantic_root=root)
    in_band = evaluate(_run_with_extra_mask(tmp_path / "in", inside, 3), gt_path, task="semantic",
                       gt_semantic_root=root)
    below = evaluate(_run_with_extra_mask(tmp_path / "below", outside, 3), gt_path, task="semantic",
                     gt_semantic_root=root)
    assert perfect["miou"] == pytest.approx(1.0)
    assert in_band["miou"] == perfect["miou"] and in_band["iou"] == perfect["iou"]
    assert below["miou"] < 0.99 and below["iou"]["wedge"] < 1.0 and below["iou"]["background"] < 1.0
    # without the ignore band the in-band error counts too
    no_band = str(_write_semantic_pngs(tmp_path / "sem0", band=0))
    counted = evaluate(str(tmp_path / "in"), gt_path, task="semantic", gt_semantic_root=no_band)
    assert counted["miou"] < 0.99


def test_evaluate_semantic(tmp_path, gt_path):
    from pseudolabel.jobs.evaluation.evaluate import evaluate

    out = write_run(tmp_path / "run", mode="perfect")
    r = evaluate(out, gt_path, task="semantic")
    assert r["miou"] == pytest.approx(1.0)
    # from PNG label maps with an ignore band
    root = _write_semantic_pngs(tmp_path / "sem")
    r2 = evaluate(out, gt_path, task="semantic", gt_semantic_root=str(root))
    assert r2["miou"] == pytest.approx(1.0)
    rnd = evaluate(write_run(tmp_path / "rnd", mode="random"), gt_path, task="semantic")
    assert rnd["miou"] < 0.6


# ---------------------------------------------------------------- end to end on the engine's output

def test_engine_run_on_demo_data_export_evaluate_report(ray_cluster, tmp_path):
    """demo data -> real run (GrabCut + edge tokens) -> exports load, AP well above random masks, report."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pycocotools.coco import COCO

    import pseudolabel
    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.jobs.evaluation.evaluate import evaluate
    from pseudolabel.jobs.outputs.export import export, read_panoptic
    from pseudolabel.jobs.outputs.labels_io import read_labels
    from pseudolabel.jobs.outputs.report import report
    from pseudolabel.schemas.coco import mask_to_rle
    from pseudolabel.schemas.tables import LABELS_SCHEMA

    demo = str(tmp_path / "demo")
    generate(demo, images=6, shards=2, seed=3, size=80, progress=False)
    gt = f"{demo}/annotations/instances.json"
    out = str(tmp_path / "run")
    job = {"input": {"uri": f"{demo}/images"}, "output": {"uri": out},
           "labelers": [{"name": "classical_grabcut", "ontology": [{"category": "shape"}]},
                        {"name": "classical_tokens", "params": {"mode": "partition"}}],
           "resources": {"actors": 1, "cpus_per_actor": 0.25, "batch_size": 4}}
    pseudolabel.run(job, progress=False)

    info = export(out, "coco", str(tmp_path / "coco.json"))
    assert info["images"] == 6 and info["annotations"] > 0
    COCO(str(tmp_path / "coco.json"))
    pan = export(out, "panoptic", str(tmp_path / "pan.json"))
    assert len(read_panoptic(pan["path"])) == 6

    res = evaluate(out, gt, class_agnostic=True)
    assert res["matched_images"] == 6 and res["predictions"] > 0
    tok = evaluate(out, gt, task="tokens")
    assert tok["images_evaluated"] == 6 and tok["mean_tokens"] > 1
    assert 0 < tok["boundary_recall"] <= 1 and 0 < tok["asa"] <= 1

    # the same rows with every mask replaced by a random box
    rng = np.random.default_rng(0)
    rows = read_labels(out).to_pylist()
    for r in rows:
        for a in r["annotations"]:
            h, w = a["segmentation"]["size"]
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
            m[y:y + 20, x:x + 20] = True
            a["segmentation"] = mask_to_rle(m)
    (tmp_path / "rnd" / "labels").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), tmp_path / "rnd" / "labels" / "p.parquet")
    rnd = evaluate(str(tmp_path / "rnd"), gt, class_agnostic=True)
    assert res["AP50"] > rnd["AP50"] + 0.1, (res, rnd)

    page = open(report(out, str(tmp_path / "report"), sample=4)).read()
    assert "<th>ok</th><td>6</td>" in page


def test_evaluate_tokens_curve_from_boundary_layers(tmp_path, gt_path):
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq
    from labels_fixtures import label_rows, png

    from pseudolabel.jobs.evaluation.evaluate import evaluate
    from pseudolabel.schemas.tables import LABELS_SCHEMA

    rows = label_rows("perfect")
    for r in rows[:3]:
        gt_map = M.masks_to_label_map(np.stack(shape_masks(int(r["image_id"]))))
        prob = cv2.dilate(M.label_boundaries(gt_map).astype(np.uint8) * 255, np.ones((3, 3), np.uint8))
        r["layers"].append({"name": "boundary", "labeler": "test", "png": png(prob)})
    (tmp_path / "run" / "labels").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), tmp_path / "run" / "labels" / "p.parquet")
    curve = str(tmp_path / "curve.png")
    r = evaluate(str(tmp_path / "run"), gt_path, task="tokens", curve_png=curve)
    assert r["curve_images"] == 3 and len(r["curve"]) > 1
    assert max(p["recall"] for p in r["curve"]) == pytest.approx(1.0)
    assert cv2.imread(curve) is not None
    with pytest.raises(ValueError, match="save_boundary"):
        evaluate(write_run(tmp_path / "plain"), gt_path, task="tokens", curve_png=curve)
    with pytest.raises(ValueError, match="tokens"):
        evaluate(str(tmp_path / "run"), gt_path, task="instances", curve_png=curve)


# ---------------------------------------------------------------- tokens: curve settings, labeler filter

def _shifted_boundary_rows(shift: int = 3):
    """Perfect rows whose uint16 ``boundary`` layer (labeler ``directsam``) has every GT edge ``shift`` px
    off (down and right)."""
    import cv2
    from labels_fixtures import label_rows, png

    rows = label_rows("perfect")
    for r in rows[:3]:
        gt_map = M.masks_to_label_map(np.stack(shape_masks(int(r["image_id"]))))
        edges = cv2.dilate(M.label_boundaries(gt_map).astype(np.uint8), np.ones((3, 3), np.uint8))
        prob = np.roll(edges.astype(np.uint16) * 50000, (shift, shift), axis=(0, 1))
        r["layers"].append({"name": "boundary", "labeler": "directsam", "png": png(prob)})
    return rows


def test_evaluate_tokens_curve_uses_tolerances_and_the_runs_settings(tmp_path, gt_path):
    from pseudolabel.jobs.evaluation.evaluate import evaluate

    curve = str(tmp_path / "curve.png")
    # a run without job.json: partition, no token cap
    plain = write_rows(tmp_path / "plain", _shifted_boundary_rows())
    loose = evaluate(plain, gt_path, task="tokens", curve_png=curve)
    strict = evaluate(plain, gt_path, task="tokens", curve_png=curve, precision_tol=1, recall_tol=1, border=0)
    assert loose["curve_settings"] == {"mode": "partition", "max_tokens": None, "min_area": 0}
    # the edges are 3 px off: within the default recall tolerance (5 px), not within 1 px
    assert max(p["recall"] for p in loose["curve"]) > 0.9
    assert max(p["recall"] for p in strict["curve"]) < 0.35
    assert (strict["precision_tol"], strict["recall_tol"], strict["border"]) == (1, 1, 0)
    # the directsam labeler's post-processing from the run's job.json (min_area at its default)
    job = {"labelers": [{"name": "classical_tokens", "params": {"mode": "partition"}},
                        {"name": "directsam", "params": {"mode": "simple", "max_tokens": 2}}]}
    capped = evaluate(write_rows(tmp_path / "run", _shifted_boundary_rows(), job), gt_path, task="tokens",
                      curve_png=curve)
    assert capped["curve_settings"] == {"mode": "simple", "max_tokens": 2, "min_area": 0}
    assert max(p["tokens"] for p in loose["curve"]) > 2
    assert max(p["tokens"] for p in capped["curve"]) == 2


def _two_labeler_rows():
    from labels_fixtures import two_labeler_rows

    return two_labeler_rows("perfect")


def test_evaluate_tokens_labeler_filter(tmp_path, gt_path):
    from pseudolabel.jobs.evaluation.evaluate import evaluate

    out = write_rows(tmp_path / "run", _two_labeler_rows())
    merged = evaluate(out, gt_path, task="tokens")
    only_test = evaluate(out, gt_path, task="tokens", labeler="test")
    only_other = evaluate(out, gt_path, task="tokens", labeler=["other"])
    assert merged["labelers"] == "all" and only_test["labelers"] == ["test"]
    assert only_test["asa"] == pytest.approx(1.0) and only_test["boundary_precision"] == pytest.approx(1.0)
    assert only_test["mean_tokens"] == pytest.approx(np.mean([len(s) + 1 for s in GT_SHAPES]))
    assert only_other["mean_tokens"] == 4 and only_other["asa"] < 0.95
    assert merged["asa"] < 0.95 and merged["boundary_precision"] < 0.9
    both = evaluate(out, gt_path, task="tokens", labeler=["test", "other"])
    assert both["asa"] == merged["asa"] and both["mean_tokens"] == merged["mean_tokens"]
    with pytest.raises(ValueError, match="tokens"):
        evaluate(out, gt_path, task="instances", labeler="test")


# ---------------------------------------------------------------- categories: matched by name, never by id

# GT categories renamed and re-numbered: box -> "cube" (id 7), disc -> "ball" (id 5), wedge -> "slice" (id 9)
RENAMED = {"box": ("cube", 7), "disc": ("ball", 5), "wedge": ("slice", 9)}


def _gt_file(path, names: dict[str, tuple[str, int]] | None = None, drop: tuple[str, ...] = ()) -> str:
    """The fixture GT with categories renamed/re-numbered by ``names`` (name -> (new name, new id)) and the
    categories in ``drop`` (old names) removed with their annotations."""
    gt = gt_coco()
    names = names or {}
    new_id, keep = {}, []
    for c in gt["categories"]:
        if c["name"] in drop:
            continue
        name, cid = names.get(c["name"], (c["name"], c["id"]))
        if cid not in new_id.values():  # two old categories may become one
            keep.append({**c, "name": name, "id": cid})
        new_id[c["id"]] = cid
    gt["categories"] = keep
    gt["annotations"] = [{**a, "category_id": new_id[a["category_id"]]} for a in gt["annotations"]
                         if a["category_id"] in new_id]
    path.write_text(json.dumps(gt))
    return str(path)


def _imperfect_run(out) -> str:
    """The perfect run plus a top-scored false positive "disc" in image 1: 0 < AP < 1."""
    from labels_fixtures import H, W

    fp = np.zeros((H, W), bool)
    fp[45:60, 40:75] = True  # background in image 1
    assert not np.any(np.stack(shape_masks(1))[:, 45:60, 40:75])
    return _run_with_extra_mask(out, fp, 2)


def test_evaluate_refuses_run_categories_missing_from_the_gt(tmp_path):
    from pseudolabel.jobs.evaluation.evaluate import EvaluationError, evaluate

    out = write_run(tmp_path / "run", mode="perfect")
    gt = _gt_file(tmp_path / "renamed.json", RENAMED)
    for task in ("instances", "semantic"):
        with pytest.raises(EvaluationError) as err:
            evaluate(out, gt, task=task)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("run categories with no ground-truth category of the same name")
        assert "box, disc, wedge" in msg and "(ground truth has: cube, ball, slice)" in msg and "--category-map" in msg
        assert ("--class-agnostic" in msg) == (task == "instances")  # semantic has no class-agnostic mode
    # one run category left unmatched: only it is listed
    with pytest.raises(EvaluationError, match=r"same name: wedge \(") as err:
        evaluate(out, gt, category_map={"box": "cube", "disc": "ball"})
    assert "box" not in str(err.value).split("(")[0]
    # class-agnostic needs no names
    assert evaluate(out, gt, class_agnostic=True)["AP"] == pytest.approx(1.0, abs=1e-6)
    # names match case-insensitively
    upper = _gt_file(tmp_path / "upper.json", {"box": ("Box", 1), "disc": ("DISC", 2), "wedge": ("Wedge", 3)})
    r = evaluate(out, upper)
    assert r["AP"] == pytest.approx(1.0, abs=1e-6)
    assert r["category_map"] == {"box": "Box", "disc": "DISC", "wedge": "Wedge"}


def test_evaluate_category_map_scores_as_renaming_the_gt(tmp_path):
    from pseudolabel.jobs.evaluation.evaluate import evaluate

    out = _imperfect_run(tmp_path / "run")
    renamed = _gt_file(tmp_path / "renamed.json", RENAMED)
    # the same re-numbered GT with the run's names: matched by name, no map needed
    renumbered = _gt_file(tmp_path / "renumbered.json", {k: (k, cid) for k, (_, cid) in RENAMED.items()})
    cmap = {k: name for k, (name, _) in RENAMED.items()}
    mapped = evaluate(out, renamed, category_map=cmap)
    by_name = evaluate(out, renumbered)
    assert 0.3 < mapped["AP"] < 0.99
    for k in ("AP", "AP50", "AP75", "AR", "predictions", "matched_images"):
        assert mapped[k] == by_name[k], k
    assert mapped["category_map"] == cmap and mapped["categories_evaluated"] == ["cube", "ball", "slice"]
    assert mapped["gt_categories_not_evaluated"] == [] and by_name["categories_evaluated"] == ["box", "disc", "wedge"]
    sem_mapped = evaluate(out, renamed, task="semantic", category_map=cmap)
    sem_by_name = evaluate(out, renumbered, task="semantic")
    assert 0.5 < sem_mapped["miou"] < 0.99 and sem_mapped["miou"] == sem_by_name["miou"]
    assert sem_mapped["iou"]["ball"] == sem_by_name["iou"]["disc"] < 1.0
    # two run categories scored as one GT category
    merged = _gt_file(tmp_path / "merged.json", {"disc": ("round", 2), "wedge": ("round", 2)})
    with pytest.raises(ValueError, match="same name: disc, wedge"):
        evaluate(out, merged)
    one = evaluate(out, merged, category_map={"disc": "round", "wedge": "round"})
    assert one["categories_evaluated"] == ["box", "round"] and 0.3 < one["AP"] < 0.99


def test_evaluate_category_map_is_validated(tmp_path, gt_path):
    from pseudolabel.jobs.evaluation.evaluate import EvaluationError, evaluate, parse_category_map

    out = write_run(tmp_path / "run", mode="perfect")
    with pytest.raises(EvaluationError, match=r"'cube' not among the run's categories \(box, disc, wedge\)"):
        evaluate(out, gt_path, category_map={"cube": "box"})
    with pytest.raises(EvaluationError, match=r"'cube' not among the ground truth's categories \(box, disc, wedge\)"):
        evaluate(out, gt_path, category_map={"box": "cube"})
    with pytest.raises(EvaluationError, match="class_agnostic"):
        evaluate(out, gt_path, category_map={"box": "box"}, class_agnostic=True)
    with pytest.raises(EvaluationError, match="category_map"):
        evaluate(out, gt_path, task="tokens", category_map={"box": "box"})
    pairs = ["box=cube", " traffic light = light=pole "]
    assert parse_category_map(pairs) == {"box": "cube", "traffic light": "light=pole"}
    for bad in (["box"], ["=cube"], ["box="], ["box=cube", "box=ball"]):
        with pytest.raises(EvaluationError, match="--category-map"):
            parse_category_map(bad)
    with pytest.raises(EvaluationError, match="no such file"):
        evaluate(out, str(tmp_path / "nope.json"))


def test_evaluate_partial_gt_coverage_warns_and_scores_the_matched_categories(tmp_path, gt_path, caplog):
    from labels_fixtures import label_rows

    from pseudolabel.jobs.evaluation.evaluate import evaluate

    rows = label_rows("perfect")
    for r in rows:  # the run knows no "wedge"
        r["annotations"] = [a for a in r["annotations"] if a["category"] != "wedge"]
    out = write_rows(tmp_path / "run", rows)
    with caplog.at_level("WARNING", logger="pseudolabel.jobs.evaluation.evaluate"):
        r = evaluate(out, gt_path)
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "2 of 3 ground-truth categories" in warnings[0] and "wedge" in warnings[0]
    assert r["categories_evaluated"] == ["box", "disc"] and r["gt_categories_not_evaluated"] == ["wedge"]
    assert r["AP"] == pytest.approx(1.0, abs=1e-6)  # the wedge GT is not a miss
    without = evaluate(out, _gt_file(tmp_path / "two.json", drop=("wedge",)))
    assert without["AP"] == r["AP"] and without["AR"] == r["AR"] and without["gt_categories_not_evaluated"] == []
    # semantic: the wedge region is ignored, not scored as missed
    sem = evaluate(out, gt_path, task="semantic")
    assert sem["miou"] == pytest.approx(1.0) and "wedge" not in sem["iou"]
    assert sem["categories_evaluated"] == ["box", "disc"]


def test_evaluate_curve_without_boundary_layers_names_the_fix(tmp_path, gt_path):
    from pseudolabel.jobs.evaluation.evaluate import EvaluationError, evaluate

    out = write_run(tmp_path / "plain")
    curve = str(tmp_path / "curve.png")
    with pytest.raises(EvaluationError) as err:
        evaluate(out, gt_path, task="tokens", curve_png=curve)
    assert "save_boundary: true" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(EvaluationError, match="of labeler test in the run .*; it has those of directsam"):
        evaluate(write_rows(tmp_path / "run", _shifted_boundary_rows()), gt_path, task="tokens", curve_png=curve,
                 labeler="test")


def test_cli_evaluate_category_errors_and_map(tmp_path, capsys):
    from pseudolabel.cli import main

    out = write_run(tmp_path / "run", mode="perfect")
    gt = _gt_file(tmp_path / "renamed.json", RENAMED)
    assert main(["evaluate", out, "--gt", gt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: run categories with no ground-truth category") and "box, disc, wedge" in err[-1]
    args = ["evaluate", out, "--gt", gt, "--category-map", "box=cube", "--category-map", "disc=ball",
            "--category-map", "wedge=slice"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["AP"] == pytest.approx(1.0, abs=1e-6) and res["categories_evaluated"] == ["cube", "ball", "slice"]
    assert main(["evaluate", out, "--gt", gt, "--category-map", "box"]) == 2
    assert "RUN_NAME=GT_NAME" in capsys.readouterr().err
    assert main(["evaluate", out, "--gt", gt, "--task", "tokens", "--curve", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no 'boundary' layers") and "save_boundary: true" in err[-1]


def test_curve_settings_come_from_the_runs_job_record(tmp_path):
    """The token curve re-tokenises with the settings the run used, read from job.json's spec."""
    import json as _json

    from pseudolabel.jobs.evaluation.evaluate import curve_settings

    (tmp_path / "job.json").write_text(_json.dumps({"fingerprint": "x", "spec": {"labelers": [
        {"name": "directsam", "params": {"mode": "simple", "max_tokens": 7}}]}}))
    assert curve_settings(str(tmp_path), None, "directsam") == {"mode": "simple", "max_tokens": 7, "min_area": 0}
    assert curve_settings(str(tmp_path / "none"), None, "directsam")["mode"] == "partition"


# ---------------------------------------------------------------- progress at the command line

def _cli_with_stderr(argv: list[str], terminal: bool) -> tuple[int, str, str]:
    """Run the command line with stdout piped and stderr a pseudo-terminal (``terminal``) or a pipe;
    returns (exit status, stdout, stderr)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    cmd = [sys.executable, "-m", "pseudolabel.cli", *argv]
    if not terminal:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # rows, columns, as a terminal has
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    out, _ = proc.communicate(timeout=120)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal's other end is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(not hasattr(__import__("os"), "openpty"), reason="needs a pseudo-terminal (POSIX)")
def test_long_jobs_show_progress_on_a_terminal_only(tmp_path, gt_path):
    """``evaluate`` and ``export`` move a per-image bar on stderr when it is a terminal; piped, stderr
    stays free of it; stdout carries the result either way."""
    out = write_run(tmp_path / "run", mode="perfect")
    code, stdout, stderr = _cli_with_stderr(["evaluate", out, "--gt", gt_path, "--task", "tokens"], terminal=True)
    assert code == 0 and json.loads(stdout)["images_evaluated"] == 3
    assert "evaluate tokens" in stderr and "3/3" in stderr and "100%" in stderr
    code, stdout, stderr = _cli_with_stderr(["evaluate", out, "--gt", gt_path, "--task", "tokens"], terminal=False)
    assert code == 0 and json.loads(stdout)["images_evaluated"] == 3 and "evaluate tokens" not in stderr
    pan = str(tmp_path / "pan.json")
    code, stdout, stderr = _cli_with_stderr(["export", out, "--format", "panoptic", "--out", pan], terminal=True)
    assert code == 0 and "export panoptic" in stderr and "3/3" in stderr
    assert len(json.loads(open(pan).read())["annotations"]) == 3
