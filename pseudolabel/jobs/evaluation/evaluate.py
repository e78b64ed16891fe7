"""Evaluate a finished run against a COCO ground truth.

Tasks (``evaluate(..., task=...)``):

- ``instances``: the run's annotations as COCO results (in memory), matched to the GT images by
  ``file_name`` (exact, else a unique basename) and to GT categories by name (see below), scored with
  pycocotools' COCOeval ``segm`` over the matched images and categories, ``maxDets`` = [1, 10, ``max_dets``]
  (raise it for dense outputs). ``class_agnostic`` maps every GT and predicted category to one. Returns AP,
  AP50, AP75, AP_small/medium/large, AR@1/10/max and counts.
- ``tokens``: per matched image, the GT instances rasterised to a label map (background 0 is a
  segment of its own; smaller instances painted over larger ones) against the predicted subobject
  tokens (first token wins where tokens overlap): boundary precision/recall/F1 with the reference
  tolerances (pseudolabel.jobs.evaluation.metrics), ASA and token count. Boundary scores are micro-averaged over
  pixels of all images (``boundary_*``) and also averaged per image (``mean_image_boundary_*``).
  A row holds the tokens of every token labeler of the run; ``labeler`` (a name or a list, default
  all) scores only those labelers' tokens (and, for the curve, their ``boundary`` layers).
- ``semantic``: mIoU of the annotations painted as a class map (higher score on top, 0 = background)
  against PNG label maps under ``gt_semantic_root`` (``<root>/<GT file_name with .png extension>``, values
  = GT category ids, 0 = background, 255 = ignore) or, without it, the GT instances rasterised by
  category id (crowd regions ignored).

Categories (``instances`` without ``class_agnostic``, ``semantic``): every run category (the run's ontology
plus any category seen in its annotations) is matched to the GT category of the same name (exact, else
case-insensitive when unique), or to the GT name ``category_map`` gives for it. A run category with no GT
category is an ``EvaluationError`` that lists the names; ids are never matched. GT categories that no run
category matches are left out of the scores (a one-line warning; in the result: ``categories_evaluated``,
``gt_categories_not_evaluated``, and ``category_map``, every run name -> its GT name).

Every result is a JSON-serialisable dict (NaN becomes None).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import posixpath
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pseudolabel import storage as st
from pseudolabel.errors import UsageError
from pseudolabel.imageio import ImageError, decode_png
from pseudolabel.jobs.evaluation import metrics as M
from pseudolabel.jobs.outputs.export import (
    INSTANCE_COLUMNS,
    category_table_of,
    coco_results,
    gt_file_index,
    labeler_filter,
    load_json,
    match_gt_image,
    select_tokens,
)
from pseudolabel.jobs.outputs.labels_io import read_job, read_labels, rles_to_label_map
from pseudolabel.jobs.progress import image_progress
from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.schemas.tables import STATUS_OK

log = logging.getLogger(__name__)

TASKS = ("instances", "tokens", "semantic")
_COCO_STATS = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR",
               "AR_small", "AR_medium", "AR_large"]


class EvaluationError(UsageError):
    """The evaluation cannot be done as asked (unmatched categories, a missing layer, a bad option); the
    message says how to fix it."""


def _name_list(names, limit: int = 20) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def parse_category_map(pairs: Sequence[str]) -> dict[str, str]:
    """``["run_name=gt_name", ...]`` (the CLI's repeated ``--category-map``) as ``{run_name: gt_name}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        run_name, sep, gt_name = pair.partition("=")
        run_name, gt_name = run_name.strip(), gt_name.strip()
        if not sep or not run_name or not gt_name:
            raise EvaluationError(f"--category-map {pair!r}: expected RUN_NAME=GT_NAME, "
                                  "e.g. --category-map car=automobile")
        if out.get(run_name, gt_name) != gt_name:
            raise EvaluationError(f"--category-map maps {run_name!r} twice ({out[run_name]!r} and {gt_name!r})")
        out[run_name] = gt_name
    return out


def _run_categories(output_uri: str, storage, table: pa.Table) -> list[dict]:
    """The run's COCO categories (ontology plus any (id, name) seen in the ok rows' annotations), with the
    ids ``coco_results`` gives its results."""
    ok = table.select(["image_id", "status", "annotations"])
    ok = ok.filter(pc.equal(ok["status"], STATUS_OK)).sort_by("image_id")  # the order coco_results reads them in
    return category_table_of(output_uri, storage, ok.to_pylist())[0]


def match_categories(run_cats: list[dict], gt: dict, category_map: dict[str, str] | None = None,
                     agnostic_hint: bool = True) -> dict:
    """Run categories -> GT categories by name (see the module docstring); ``agnostic_hint``: the error
    suggests ``--class-agnostic`` too.

    Returns:
        {"ids": {run id: GT id}, "names": {run name: GT name}, "evaluated": [GT ids], "missing": [GT names
        no run category matches]}.

    Raises:
        EvaluationError: a ``category_map`` name is not a run (or GT) category, or a run category has no
        GT category.
    """
    gt_cats = list(gt.get("categories") or [])
    gt_by_name: dict[str, int] = {}
    for c in gt_cats:
        gt_by_name.setdefault(str(c["name"]), int(c["id"]))
    lower: dict[str, list[str]] = defaultdict(list)
    for n in gt_by_name:
        lower[n.lower()].append(n)
    run_names = list(dict.fromkeys(str(c["name"]) for c in run_cats))
    category_map = dict(category_map or {})
    bad_run = [n for n in category_map if n not in run_names]
    if bad_run:
        raise EvaluationError(f"category map: {_name_list(repr(n) for n in bad_run)} not among the run's categories "
                              f"({_name_list(run_names) or 'none'})")
    bad_gt = sorted({g for g in category_map.values() if g not in gt_by_name})
    if bad_gt:
        raise EvaluationError(f"category map: {_name_list(repr(n) for n in bad_gt)} not among the ground truth's "
                              f"categories ({_name_list(gt_by_name) or 'none'})")
    names: dict[str, str] = {}
    unmatched = []
    for n in run_names:
        if n in category_map:
            names[n] = category_map[n]
        elif n in gt_by_name:
            names[n] = n
        elif len(lower.get(n.lower(), [])) == 1:
            names[n] = lower[n.lower()][0]
        else:
            unmatched.append(n)
    if unmatched:
        raise EvaluationError(
            f"run categories with no ground-truth category of the same name: {_name_list(unmatched)} (ground truth "
            f"has: {_name_list(gt_by_name) or 'none'}); map each with --category-map RUN_NAME=GT_NAME (repeatable; "
            "category_map={...} in Python)" + (" or score with --class-agnostic" if agnostic_hint else ""))
    used = {gt_by_name[g] for g in names.values()}
    evaluated = [int(c["id"]) for c in gt_cats if int(c["id"]) in used]
    missing = [str(c["name"]) for c in gt_cats if int(c["id"]) not in used]
    if missing:
        log.warning("evaluating %d of %d ground-truth categories: no run category for %s (pass --category-map "
                    "RUN_NAME=GT_NAME to add one)", len(evaluated), len(gt_cats),
                    _name_list(missing))
    return {"ids": {int(c["id"]): gt_by_name[names[str(c["name"])]] for c in run_cats},
            "names": names, "evaluated": evaluated, "missing": missing}


def _category_results(output_uri: str, storage, gt: dict, category_map: dict[str, str] | None,
                      agnostic_hint: bool = True) -> tuple[list[dict], dict, dict]:
    """``coco_results`` with the run's categories matched to the GT's by ``match_categories``:
    (results with GT category ids, counts, the match)."""
    table = read_labels(output_uri, storage, columns=INSTANCE_COLUMNS)
    # no GT categories: the results keep the run's category ids, matched here
    results, counts = coco_results(output_uri, storage, gt={**gt, "categories": []}, table=table)
    run_cats = _run_categories(output_uri, storage, table)
    known = {int(c["id"]) for c in run_cats}
    run_cats += [{"id": i, "name": str(i)} for i in sorted({int(r["category_id"]) for r in results} - known)]
    match = match_categories(run_cats, gt, category_map, agnostic_hint)
    for r in results:
        r["category_id"] = match["ids"][int(r["category_id"])]
    return results, counts, match


def _category_info(match: dict, gt: dict) -> dict:
    names = {int(c["id"]): str(c["name"]) for c in gt.get("categories") or []}
    return {"categories_evaluated": [names[i] for i in match["evaluated"]],
            "gt_categories_not_evaluated": match["missing"], "category_map": match["names"]}


def _clean(v):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _coco(dataset: dict):
    """pycocotools COCO over an in-memory dataset dict, without its prints."""
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


def _agnostic_gt(gt: dict) -> dict:
    gt = copy.deepcopy(gt)
    for a in gt["annotations"]:
        a["category_id"] = 1
    gt["categories"] = [{"id": 1, "name": "object", "supercategory": "object"}]
    return gt


def _gt_instance_masks(coco_gt, img_id: int) -> tuple[list[np.ndarray], list[dict]]:
    """GT masks of one image (polygons or RLE), largest first, and their annotations."""
    anns = sorted(coco_gt.imgToAnns.get(img_id, []), key=lambda a: -float(a.get("area", 0)))
    masks = []
    for a in anns:
        seg = a["segmentation"]
        if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
            a = {**a, "segmentation": {"size": seg["size"], "counts": seg["counts"].encode("ascii")}}
        masks.append(coco_gt.annToMask(a).astype(bool))
    return masks, anns


# ----------------------------------------------------------------------------- instances

def evaluate_instances(output_uri: str, gt: dict, storage: StorageSpec | None = None,
                       class_agnostic: bool = False, max_dets: int = 100,
                       category_map: dict[str, str] | None = None) -> dict:
    """COCOeval ``segm`` of the run's annotations against a GT dataset dict (see the module docstring)."""
    from pycocotools.cocoeval import COCOeval

    cat_ids, cat_info = None, {}
    if class_agnostic:
        results, counts = coco_results(output_uri, storage, gt=gt)
        gt = _agnostic_gt(gt)
        for r in results:
            r["category_id"] = 1
    else:
        results, counts, match = _category_results(output_uri, storage, gt, category_map)
        cat_ids, cat_info = match["evaluated"], _category_info(match, gt)
    matched = counts.pop("matched_gt_ids")
    out = {"task": "instances", "class_agnostic": class_agnostic, "max_dets": max_dets,
           "gt_images": len(gt["images"]), **counts, "predictions": len(results), **cat_info}
    del out["results"]
    if not results or not matched:
        return _clean({**out, **{k: 0.0 for k in _COCO_STATS}})
    coco_gt = _coco(gt)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "segm")
        ev.params.imgIds = matched
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.params.maxDets = [1, 10, int(max_dets)]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: float(v) for k, v in zip(_COCO_STATS, ev.stats)}
    return _clean({**out, **stats, "coco_summary": log.getvalue().splitlines()[-12:]})


# ----------------------------------------------------------------------------- tokens

def _matched_rows(output_uri: str, storage, gt: dict, columns: list[str]) -> tuple[list[tuple[dict, int]], int, int]:
    """([(labels row, GT image id)], unmatched ok rows, error rows)."""
    table = read_labels(output_uri, storage, columns=columns)
    exact, base = gt_file_index(gt)
    pairs, unmatched, errors = [], 0, 0
    for r in table.to_pylist():
        if r["status"] != STATUS_OK:
            errors += 1
            continue
        gid = match_gt_image(r, exact, base)
        if gid is None:
            unmatched += 1
        else:
            pairs.append((r, gid))
    return pairs, unmatched, errors


def _boundary_layer(row: dict, names: set[str] | None = None) -> tuple[np.ndarray | None, str | None]:
    """The row's first ``boundary`` layer (of the labelers in ``names``; any when None) as an (H, W)
    float32 probability map in [0, 1] (uint16 layers / 65535, uint8 / 255) and its labeler; (None, None)
    when there is none."""
    for layer in row.get("layers") or []:
        if layer.get("name") != "boundary" or not layer.get("png"):
            continue
        if names is not None and layer.get("labeler") not in names:
            continue
        try:
            m = decode_png(layer["png"])
        except ImageError:
            return None, None
        m = m if m.ndim == 2 else m[..., 0]
        return m.astype(np.float32) / (65535.0 if m.dtype == np.uint16 else 255.0), layer.get("labeler")
    return None, None


def curve_settings(output_uri: str, storage, labeler: str | None) -> dict:
    """Post-processing of the recall-vs-token-count curve: the ``mode``, ``max_tokens`` and ``min_area``
    the run's ``labeler`` used (its params in the run's ``job.json``, unset ones at the ``directsam``
    defaults), so the curve's point at the run's threshold reproduces the run's tokens. Without a
    ``job.json`` entry for it: partition, no token cap, no minimum area."""
    settings = {"mode": "partition", "max_tokens": None, "min_area": 0}
    job = read_job(output_uri, storage)
    specs = [lab for lab in job.get("spec", job).get("labelers") or [] if lab.get("name") == labeler]
    if specs:
        from pseudolabel.models.directsam_host import DirectSAMParams

        defaults = DirectSAMParams()
        params = specs[0].get("params") or {}
        settings = {k: params.get(k, getattr(defaults, k)) for k in settings}
    return settings


def evaluate_tokens(output_uri: str, gt: dict, storage: StorageSpec | None = None,
                    precision_tol: float = M.PRECISION_TOL, recall_tol: float = M.RECALL_TOL,
                    border: int = M.BORDER, curve_png: str | None = None,
                    labeler: str | Sequence[str] | None = None) -> dict:
    """Boundary P/R/F1, ASA and token count of the run's subobject tokens (see the module docstring).

    ``labeler``: score only the tokens of this labeler (or these labelers); None = all of them.

    With ``curve_png``, the rows' ``boundary`` layers (DirectSAM ``save_boundary: true``) are re-tokenised
    over thresholds and the recall-vs-token-count curve is written there (pseudolabel.jobs.evaluation.directsam_eval),
    scored with the same ``precision_tol``/``recall_tol``/``border`` and tokenised with the post-processing
    the layers' labeler used in the run (``curve_settings``); the points are returned under ``curve``.
    """
    names = labeler_filter(labeler)
    cols = ["image_id", "uri", "member", "file_name", "width", "height", "status", "subobjects"]
    if curve_png:
        cols.append("layers")
    pairs, unmatched, errors = _matched_rows(output_uri, storage, gt, cols)
    coco_gt = _coco(gt)
    totals: defaultdict[str, int] = defaultdict(int)
    per_image: defaultdict[str, list[float]] = defaultdict(list)
    probs: list[np.ndarray] = []
    gt_maps: list[np.ndarray] = []
    layer_labelers: set[str | None] = set()
    other_layers: set[str] = set()
    skipped = 0
    for r, gid in image_progress(pairs, len(pairs), "evaluate tokens"):
        img = coco_gt.imgs[gid]
        h, w = int(img["height"]), int(img["width"])
        if (int(r["height"]), int(r["width"])) != (h, w):
            skipped += 1
            continue
        # 1. GT label map: background 0, instance k (largest first, smaller painted on top)
        gt_map = np.zeros((h, w), np.int32)
        for k, m in enumerate(_gt_instance_masks(coco_gt, gid)[0], start=1):
            gt_map[m] = k
        if curve_png:
            prob, layer_labeler = _boundary_layer(r, names)
            other_layers.update(str(lay.get("labeler")) for lay in r.get("layers") or []
                                if lay.get("name") == "boundary")
            if prob is not None and prob.shape == (h, w):
                probs.append(prob)
                gt_maps.append(gt_map)
                layer_labelers.add(layer_labeler)
        # 2. predicted token label map (0 = unassigned)
        toks = select_tokens(r["subobjects"], names)
        pred = rles_to_label_map([t["segmentation"] for t in toks], (h, w))
        # 3. metrics
        b = M.boundary_prf(pred, gt_map, precision_tol=precision_tol, recall_tol=recall_tol, border=border)
        correct, total = M.asa_counts(M.fill_unassigned(pred), gt_map)
        for key in ("pred_pixels", "pred_matched", "gt_pixels", "gt_matched"):
            totals[key] += b[key]
        totals["asa_correct"] += correct
        totals["asa_total"] += total
        for key in ("precision", "recall", "f1"):
            per_image[key].append(b[key])
        per_image["asa"].append(correct / total if total else 1.0)
        per_image["tokens"].append(M.token_count(pred))
    micro = M.prf_from_counts(totals["pred_pixels"], totals["pred_matched"], totals["gt_pixels"], totals["gt_matched"])
    n = len(per_image["tokens"])
    out = {
        "task": "tokens", "images_evaluated": n, "unmatched_images": unmatched, "size_mismatch": skipped,
        "errors": errors, "precision_tol": precision_tol, "recall_tol": recall_tol, "border": border,
        "labelers": sorted(names) if names is not None else "all",
        "boundary_precision": micro["precision"] if n else float("nan"),
        "boundary_recall": micro["recall"] if n else float("nan"),
        "boundary_f1": micro["f1"] if n else float("nan"),
        "mean_image_boundary_precision": float(np.mean(per_image["precision"])) if n else float("nan"),
        "mean_image_boundary_recall": float(np.mean(per_image["recall"])) if n else float("nan"),
        "mean_image_boundary_f1": float(np.mean(per_image["f1"])) if n else float("nan"),
        "asa": totals["asa_correct"] / totals["asa_total"] if totals["asa_total"] else float("nan"),
        "mean_image_asa": float(np.mean(per_image["asa"])) if n else float("nan"),
        "mean_tokens": float(np.mean(per_image["tokens"])) if n else float("nan"),
        "total_tokens": int(np.sum(per_image["tokens"])) if n else 0,
    }
    if curve_png:
        if not probs:
            if names is not None and other_layers:
                raise EvaluationError(f"no 'boundary' layers of labeler {', '.join(sorted(names))} in the run "
                                      f"{output_uri}; it has those of {', '.join(sorted(other_layers))}: choose "
                                      "one with --labeler NAME (labeler= in Python)")
            raise EvaluationError(f"no 'boundary' layers in the run {output_uri}: the recall-vs-token-count "
                                  "curve needs the boundary maps; rerun with the directsam labeler param "
                                  "save_boundary: true (or leave out --curve)")
        if len(layer_labelers) > 1:
            several = ", ".join(sorted(map(str, layer_labelers)))
            raise EvaluationError(f"boundary layers of several labelers ({several}): "
                                  "choose one with --labeler NAME (labeler= in Python)")
        from pseudolabel.jobs.evaluation.directsam_eval import token_recall_curve

        settings = curve_settings(output_uri, storage, next(iter(layer_labelers)))
        out["curve"] = token_recall_curve(probs, gt_maps, curve_png, storage=storage, precision_tol=precision_tol,
                                          recall_tol=recall_tol, border=border, **settings)
        out["curve_settings"] = settings
        out["curve_png"] = curve_png
        out["curve_images"] = len(probs)
    return _clean(out)


# ----------------------------------------------------------------------------- semantic

def _semantic_png(root: str, file_name: str, storage) -> np.ndarray | None:
    stem, _ = posixpath.splitext(file_name)
    for cand in (stem + ".png", file_name):
        uri = st.join(root, cand)
        if st.exists(uri, storage):
            try:
                m = decode_png(st.read_bytes(uri, storage))
            except ImageError:
                raise EvaluationError(f"{uri}: not a readable image") from None
            return m if m.ndim == 2 else m[..., 0]  # grey ids (a colour PNG: its first channel)
    return None


def evaluate_semantic(output_uri: str, gt: dict, storage: StorageSpec | None = None,
                      gt_semantic_root: str | None = None, ignore_index: int = 255,
                      category_map: dict[str, str] | None = None) -> dict:
    """mIoU of the run's annotations painted as a class map (see the module docstring); GT categories no run
    category matches are ignored like ``ignore_index``."""
    results, counts, match = _category_results(output_uri, storage, gt, category_map, agnostic_hint=False)
    matched = counts.pop("matched_gt_ids")
    not_evaluated = sorted({int(c["id"]) for c in gt.get("categories") or []} - set(match["evaluated"]))
    coco_gt = _coco(gt)
    by_image = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    cat_ids = [c["id"] for c in gt.get("categories", [])] + [r["category_id"] for r in results]
    num_classes = max(cat_ids, default=0) + 1
    if num_classes > ignore_index:
        raise EvaluationError(f"category id {num_classes - 1} collides with ignore_index {ignore_index}")
    conf = np.zeros((num_classes, num_classes + 1), np.int64)
    missing = 0
    for gid in image_progress(matched, len(matched), "evaluate semantic"):
        img = coco_gt.imgs[gid]
        h, w = int(img["height"]), int(img["width"])
        # 1. GT class map
        if gt_semantic_root:
            gt_map = _semantic_png(gt_semantic_root, img["file_name"], storage)
            if gt_map is None or gt_map.shape != (h, w):
                missing += 1
                continue
            if not_evaluated:
                gt_map = np.where(np.isin(gt_map, not_evaluated), ignore_index, gt_map)
        else:
            gt_map = np.zeros((h, w), np.int32)
            masks, anns = _gt_instance_masks(coco_gt, gid)
            skip = set(not_evaluated)
            for m, a in zip(masks, anns):
                ignored = a.get("iscrowd") or int(a["category_id"]) in skip
                gt_map[m] = ignore_index if ignored else int(a["category_id"])
        # 2. predicted class map: lowest score first, so the highest score ends on top
        pred = np.zeros((h, w), np.int32)
        for r in sorted(by_image.get(gid, []), key=lambda r: r["score"]):
            m = rles_to_label_map([r["segmentation"]], (h, w)) > 0
            pred[m] = r["category_id"]
        conf += M.confusion_matrix(pred, gt_map, num_classes, ignore_index)
    ious = M.iou_per_class(conf)
    names = {0: "background", **{c["id"]: c["name"] for c in gt.get("categories", [])}}
    per_class = {names.get(k, str(k)): float(ious[k]) for k in range(num_classes) if np.isfinite(ious[k])}
    out = {"task": "semantic", "miou": float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan"),
           "iou": per_class, "num_classes": num_classes, "images_evaluated": len(matched) - missing,
           "missing_gt_maps": missing, "source": "png" if gt_semantic_root else "instances",
           "unmatched_images": counts["unmatched_images"], "errors": counts["errors"], **_category_info(match, gt)}
    return _clean(out)


# ----------------------------------------------------------------------------- entry point

def evaluate(output_uri: str, gt_json: str, storage: StorageSpec | None = None, class_agnostic: bool = False,
             task: str = "instances", max_dets: int = 100, gt_semantic_root: str | None = None,
             precision_tol: float = M.PRECISION_TOL, recall_tol: float = M.RECALL_TOL,
             border: int = M.BORDER, curve_png: str | None = None,
             labeler: str | Sequence[str] | None = None, category_map: dict[str, str] | None = None) -> dict:
    """Evaluate a run against a COCO ground truth.

    Args:
        output_uri: the run's output folder (local path, file:// or s3://).
        gt_json: COCO instances JSON of the ground truth (local path or s3://); images are matched to
            the run's rows by ``file_name``.
        storage: endpoint/credentials for s3:// (run, GT JSON and semantic PNGs).
        class_agnostic: instances only: every category counts as one.
        task: ``instances`` | ``tokens`` | ``semantic``.
        max_dets: instances only: the largest COCOeval maxDets (raise for dense outputs).
        gt_semantic_root: semantic only: folder of GT class-map PNGs (else GT instances are rasterised).
        precision_tol, recall_tol, border: tokens only: boundary tolerances in pixels (2, 5, 5).
        curve_png: tokens only: write the recall-vs-token-count curve over thresholds here (PNG, local
            or s3://); needs the rows' ``boundary`` layers (directsam ``save_boundary: true``).
        labeler: tokens only: the token labeler name(s) to score; None = every labeler's tokens.
        category_map: instances (not class-agnostic) and semantic: ``{run category name: GT category
            name}`` for run categories whose names the GT does not use (see the module docstring).

    Returns:
        a JSON-serialisable dict of metrics and counts (see the module docstring).

    Raises:
        EvaluationError: an option that does not apply, unmatched categories, a curve without boundary
            layers, an unreadable GT file.
    """
    if task not in TASKS:
        raise EvaluationError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if curve_png and task != "tokens":
        raise EvaluationError("curve_png (--curve) applies to task='tokens' only")
    if labeler is not None and task != "tokens":
        raise EvaluationError("labeler (--labeler) applies to task='tokens' only")
    if category_map and (task == "tokens" or (task == "instances" and class_agnostic)):
        raise EvaluationError("category_map (--category-map) applies to task 'instances' without class_agnostic "
                              "(--class-agnostic) and to task 'semantic' only")
    output_uri = str(output_uri)
    try:
        gt = load_json(gt_json, storage)
    except FileNotFoundError:
        raise EvaluationError(f"ground truth {gt_json}: no such file") from None
    except ValueError as err:
        raise EvaluationError(f"ground truth {gt_json} is not JSON: {err}") from None
    if task == "instances":
        return evaluate_instances(output_uri, gt, storage, class_agnostic, max_dets, category_map)
    if task == "tokens":
        return evaluate_tokens(output_uri, gt, storage, precision_tol, recall_tol, border, curve_png, labeler)
    return evaluate_semantic(output_uri, gt, storage, gt_semantic_root, category_map=category_map)
