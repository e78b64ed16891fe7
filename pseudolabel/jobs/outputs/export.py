"""Export a finished run's labels table for the tools that train on it or review it.

Formats (``export(output_uri, fmt, out_path, **options)``; ``EXPORTERS`` maps each name to its function):

- ``coco``: a COCO instances JSON that ``pycocotools.coco.COCO`` loads. One image entry per ``ok`` row
  (error rows are left out and counted); image ``id`` is the row's ``image_id`` when it is an integer
  string, else a stable integer assigned in ``image_id`` order after the largest integer id, with the
  original string kept as ``image_key``. Annotation ids are renumbered 1..N across the dataset;
  category ids are the run's ontology ids; segmentations are compressed RLE with str ``counts``;
  ``iscrowd`` is 0; ``score`` (and ``labeler``) are kept as extra fields.
- ``coco-results``: a list of ``{"image_id", "category_id", "segmentation", "score"}`` that
  ``COCO.loadRes`` accepts against the ground truth ``gt_json`` (required: without one there is no
  image id to give, and ``ExportError`` is raised). Images are matched by ``file_name`` (exact, else a
  unique basename) and categories by name; rows with no GT image are left out and counted in
  ``unmatched_images``. To score against the run's own ``coco`` export, pass that file as ``gt_json``.
  ``bbox`` is left out on purpose: loadRes would recompute ``area`` from it instead of from the mask.
- ``panoptic``: COCO panoptic for the subobject tokens. ``out_path`` is the JSON; one RGB PNG per
  image goes into the folder next to it named like the JSON without ``.json`` (``panoptic.json`` ->
  ``panoptic/<image id:012d>.png``), segment id = R + 256 G + 256^2 B, 0 = no token. One class-agnostic
  category ``{"id": 1, "name": "subobject", "isthing": 1}`` (isthing 1 because an image holds many
  segments of it; COCO panoptic allows one segment per stuff category per image). Segments never
  overlap: tokens are painted in stored order and a later token never overwrites an earlier one
  (partition-mode tokens tile the image and never overlap anyway); ``area``/``bbox`` are those of the
  visible segment, and tokens left with no visible pixel are dropped. A row holds the tokens of every
  token labeler of the run; ``labeler`` (a name or a list of names, default: all) keeps only those
  labelers' tokens.
- ``yolo``, ``masks``, ``label-studio``: see ``pseudolabel.jobs.outputs.export_formats`` (YOLO segmentation
  dataset, VOC-style semantic/instance PNGs, Label Studio tasks with predictions).

Confidence filters (every format that exports annotations; not ``panoptic``, whose tokens carry no
confidence): ``min_score`` drops annotations whose ``score`` is below it, and ``score_thresholds``
({category name: threshold}) drops those below their category's threshold; an annotation is kept when
its score reaches both. ``score_thresholds=None`` reads the thresholds from the run's ``job.json``
(the ``score_threshold`` of each labeler's ontology entries, where present; the highest when a
category appears in several labelers); ``{}`` applies none. An annotation without a score counts as
1.0. Dropped annotations are counted in ``dropped_low_score``.

A request the run or the format cannot satisfy raises ``ExportError`` (a ``UsageError``, so a ``ValueError``).
Local paths and s3:// work the same (pseudolabel.storage).
"""
from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import ndimage

from pseudolabel import storage as st
from pseudolabel.engine.formats import format_of_row
from pseudolabel.errors import UsageError
from pseudolabel.imageio import decode_png, encode_png
from pseudolabel.jobs.outputs.labels_io import read_job, read_labels, read_summary, rles_to_label_map
from pseudolabel.jobs.progress import image_progress
from pseudolabel.schemas.coco import category_ids, category_table, rle_area, rle_bbox_xywh
from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.schemas.tables import STATUS_OK

SUBOBJECT_CATEGORY = {"id": 1, "name": "subobject", "supercategory": "subobject", "isthing": 1}

INSTANCE_COLUMNS = ["image_id", "uri", "member", "file_name", "width", "height", "status", "error", "annotations"]


class ExportError(UsageError):
    """An export the run or the format cannot satisfy (the CLI prints it and exits with status 2)."""


# ----------------------------------------------------------------------------- shared pieces

def integer_image_ids(image_ids: list[str]) -> dict[str, int]:
    """Stable integer COCO ids for string ``image_id``s.

    Integer strings keep their value; the others get max(integer ids) + 1, + 2, ... in sorted order.
    """
    out: dict[str, int] = {}
    for s in image_ids:
        if s is not None and s.isdigit() and int(s) >= 1:
            out[s] = int(s)
    nxt = max(out.values(), default=0) + 1
    taken = set(out.values())
    for s in sorted(i for i in set(image_ids) if i not in out):
        while nxt in taken:
            nxt += 1
        out[s] = nxt
        taken.add(nxt)
    return out


def row_file_name(row: dict) -> str:
    """The image's file name: the row's ``file_name``, else its tar member, else the uri's basename."""
    if row.get("file_name"):
        return row["file_name"]
    member = row.get("member")
    if member and format_of_row(str(row.get("uri") or ""), member) != "parquet":  # a tar member
        return member
    return posixpath.basename(str(row.get("uri") or row["image_id"]))


def labeler_filter(labeler: str | Sequence[str] | None) -> set[str] | None:
    """The set of labeler names a ``labeler`` argument selects (None = every labeler)."""
    if labeler is None:
        return None
    names = {labeler} if isinstance(labeler, str) else set(labeler)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ExportError(f"labeler: expected a labeler name or a list of names, got {labeler!r}")
    return names


def select_tokens(tokens: list[dict] | None, names: set[str] | None) -> list[dict]:
    """The row's subobject tokens of the selected labelers (all when ``names`` is None), in stored order."""
    tokens = tokens or []
    return tokens if names is None else [t for t in tokens if t.get("labeler") in names]


def _rle(seg: dict) -> dict:
    return {"size": [int(seg["size"][0]), int(seg["size"][1])], "counts": seg["counts"]}


def _ok_rows(table: pa.Table) -> tuple[list[dict], list[dict]]:
    """(ok rows sorted by image_id, error rows) as Python dicts."""
    rows = table.to_pylist()
    ok = sorted((r for r in rows if r["status"] == STATUS_OK), key=lambda r: r["image_id"])
    err = [r for r in rows if r["status"] != STATUS_OK]
    return ok, err


def category_table_of(output_uri: str, storage: StorageSpec | None, rows: list[dict]) -> tuple[list[dict], dict]:
    """(COCO categories, name -> id) of a run: its ontology plus any (id, name) seen in ``rows``'
    annotations (``schemas.coco.category_table``)."""
    anns = [a for r in rows for a in r["annotations"] or []]
    cats = category_table(read_summary(output_uri, storage).get("categories") or [], anns)
    return cats, category_ids(cats)


def _ann_category(a: dict, by_name: dict) -> int:
    if a.get("category_id") is not None:
        return int(a["category_id"])
    return by_name.get(a.get("category"), 1)


def score_thresholds_from_job(output_uri: str, storage: StorageSpec | None = None) -> dict[str, float]:
    """{category name: score_threshold} from the run's job.json ontology entries that set one.

    job.json holds the spec under ``spec`` (a bare spec is read too). A category set in several
    labelers' ontologies gets the highest of its thresholds.
    """
    job = read_job(output_uri, storage)
    given = job.get("spec")
    spec = given if isinstance(given, dict) else job
    out: dict[str, float] = {}
    for lab in spec.get("labelers") or []:
        for entry in (lab or {}).get("ontology") or []:
            thr = (entry or {}).get("score_threshold")
            if thr is None or not entry.get("category"):
                continue
            out[entry["category"]] = max(float(thr), out.get(entry["category"], float("-inf")))
    return out


def _check_min_score(min_score: float | None) -> float | None:
    """A score bound as a float (None stays None); ``ExportError`` when it is not a finite number."""
    if min_score is None:
        return None
    try:
        value = float(min_score)
    except (TypeError, ValueError):
        raise ExportError(f"min_score: expected a number, got {min_score!r}") from None
    if not np.isfinite(value):
        raise ExportError(f"min_score: expected a finite number, got {min_score!r}")
    return value


def filter_annotations(rows: list[dict], cats: list[dict], min_score: float | None = None,
                       score_thresholds: dict[str, float] | None = None) -> int:
    """Drop, in place, the annotations of ``rows`` below ``min_score`` or their category's threshold.

    The category of an annotation is its ``category`` name, else the name of its ``category_id`` in
    ``cats``; a missing score counts as 1.0. Returns the number of annotations dropped.
    """
    min_score = _check_min_score(min_score)
    checked = {str(k): _check_min_score(v) for k, v in (score_thresholds or {}).items()}
    thresholds = {k: v for k, v in checked.items() if v is not None}
    if min_score is None and not thresholds:
        return 0
    name_of = {c["id"]: c["name"] for c in cats}
    floor = min_score if min_score is not None else float("-inf")
    dropped = 0
    for r in rows:
        anns = r["annotations"] or []
        kept = []
        for a in anns:
            name = a.get("category")
            if name is None and a.get("category_id") is not None:
                name = name_of.get(int(a["category_id"]))
            score = float(a["score"]) if a.get("score") is not None else 1.0
            if score >= max(floor, thresholds.get(name, float("-inf"))):
                kept.append(a)
        dropped += len(anns) - len(kept)
        r["annotations"] = kept
    return dropped


def load_instances(output_uri: str, storage: StorageSpec | None = None, min_score: float | None = None,
                   score_thresholds: dict[str, float] | None = None, table: pa.Table | None = None,
                   columns: list[str] | None = None) -> tuple[list[dict], list[dict], list[dict], dict, int]:
    """The run's rows with their annotations filtered by score.

    Returns:
        (ok rows sorted by image_id, error rows, COCO categories, category name -> id,
        number of annotations dropped by the score filters).
    """
    if table is None:
        table = read_labels(output_uri, storage, columns=columns or INSTANCE_COLUMNS)
    ok, err = _ok_rows(table)
    cats, by_name = category_table_of(output_uri, storage, ok)
    dropped = filter_annotations(ok, cats, min_score, score_thresholds)
    return ok, err, cats, by_name, dropped


# ----------------------------------------------------------------------------- coco instances

def coco_instances(output_uri: str, storage: StorageSpec | None = None, min_score: float | None = None,
                   score_thresholds: dict[str, float] | None = None) -> tuple[dict, dict]:
    """The run as a COCO instances dataset in memory (score filters: see the module docstring).

    Returns:
        (dataset, counts): ``dataset`` has ``info``, ``images``, ``annotations``, ``categories``;
        ``counts`` = {"images", "annotations", "errors", "dropped_low_score"}.
    """
    ok, err, cats, by_name, dropped = load_instances(output_uri, storage, min_score, score_thresholds)
    ids = integer_image_ids([r["image_id"] for r in ok])
    images: list[dict] = []
    anns: list[dict] = []
    for r in ok:
        img = {"id": ids[r["image_id"]], "file_name": row_file_name(r), "width": int(r["width"]),
               "height": int(r["height"])}
        if str(img["id"]) != r["image_id"]:
            img["image_key"] = r["image_id"]
        images.append(img)
        row_anns = r["annotations"] or []
        rles = [_rle(a["segmentation"]) for a in row_anns]
        areas = rle_area(rles)
        boxes = rle_bbox_xywh(rles)
        for a, rle, area, box in zip(row_anns, rles, areas, boxes):
            ann = {"id": len(anns) + 1, "image_id": img["id"], "category_id": _ann_category(a, by_name),
                   "segmentation": rle, "area": float(area), "bbox": [float(v) for v in box], "iscrowd": 0}
            if a.get("score") is not None:
                ann["score"] = float(a["score"])
            if a.get("labeler"):
                ann["labeler"] = a["labeler"]
            anns.append(ann)
    info = {"description": f"pseudolabel run {output_uri}", "run_uri": output_uri}
    dataset = {"info": info, "images": images, "annotations": anns, "categories": cats}
    return dataset, {"images": len(images), "annotations": len(anns), "errors": len(err),
                     "dropped_low_score": dropped}


# ----------------------------------------------------------------------------- coco results

def gt_file_index(gt: dict) -> tuple[dict[str, int], dict[str, int]]:
    """(file_name -> GT image id, unique basename -> GT image id) of a COCO dataset dict."""
    exact = {img["file_name"]: img["id"] for img in gt["images"]}
    base: dict[str, int | None] = {}
    for img in gt["images"]:
        b = posixpath.basename(img["file_name"])
        base[b] = None if b in base else img["id"]
    return exact, {k: v for k, v in base.items() if v is not None}


def match_gt_image(row: dict, exact: dict[str, int], base: dict[str, int]) -> int | None:
    """GT image id of a labels row by file name (exact, else unique basename), or None."""
    fn = row_file_name(row)
    if fn in exact:
        return exact[fn]
    for cand in (fn, row.get("member") or "", str(row.get("uri") or "")):
        b = posixpath.basename(cand)
        if b in base:
            return base[b]
    return None


def load_json(uri: str, storage: StorageSpec | None = None) -> Any:
    """JSON from a local path or s3:// URI."""
    return json.loads(st.read_bytes(str(uri), storage))


def coco_results(output_uri: str, storage: StorageSpec | None = None, gt: dict | None = None,
                 table: pa.Table | None = None, min_score: float | None = None,
                 score_thresholds: dict[str, float] | None = None) -> tuple[list[dict], dict]:
    """The run's annotations as a COCO results list against a ground truth (no ``bbox``; see the
    module docstring).

    Args:
        output_uri: the run's output folder.
        storage: credentials for s3://.
        gt: the COCO ground-truth dataset dict (required): image ids are the GT's (matched by file
            name), category ids are mapped to the GT's by name where names match, and rows with no GT
            image are left out (counted in ``unmatched_images``).
        table: the labels table, if already read (columns of ``INSTANCE_COLUMNS``).
        min_score, score_thresholds: score filters (see the module docstring).

    Returns:
        (results, counts) with counts = {"images", "matched_images", "unmatched_images", "results",
        "errors", "dropped_low_score"}; ``matched_gt_ids`` lists the GT image ids the run covers.

    Raises:
        ExportError: ``gt`` is None (results need the ids of the ground truth they are scored against).
    """
    if gt is None:
        raise ExportError("coco-results needs the ground truth the results will be scored against "
                          "(--gt GT.json; images are matched to it by file name); to score against "
                          "this run's own 'coco' export, pass that file as the ground truth")
    ok, err, cats, by_name, dropped = load_instances(output_uri, storage, min_score, score_thresholds,
                                                     table=table)
    exact, base = gt_file_index(gt)
    image_of = {r["image_id"]: match_gt_image(r, exact, base) for r in ok}
    gt_by_name = {c["name"]: c["id"] for c in gt.get("categories", [])}
    gt_by_lower = {k.lower(): v for k, v in gt_by_name.items()}
    cat_map = {}
    for c in cats:
        cat_map[c["id"]] = gt_by_name.get(c["name"], gt_by_lower.get(c["name"].lower(), c["id"]))
    results = []
    for r in ok:
        img_id = image_of[r["image_id"]]
        if img_id is None:
            continue
        for a in r["annotations"] or []:
            cid = _ann_category(a, by_name)
            results.append({"image_id": int(img_id), "category_id": int(cat_map.get(cid, cid)),
                            "segmentation": _rle(a["segmentation"]),
                            "score": float(a["score"]) if a.get("score") is not None else 1.0})
    matched = sorted({v for v in image_of.values() if v is not None})
    counts = {"images": len(ok), "matched_images": len(matched),
              "unmatched_images": sum(v is None for v in image_of.values()), "results": len(results),
              "errors": len(err), "dropped_low_score": dropped, "matched_gt_ids": matched}
    return results, counts


# ----------------------------------------------------------------------------- panoptic

def encode_panoptic_ids(id_map: np.ndarray) -> np.ndarray:
    """(H, W) int segment ids -> (H, W, 3) uint8 RGB with id = R + 256 G + 256^2 B."""
    ids = np.asarray(id_map, dtype=np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


def decode_panoptic_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) int64 segment ids (inverse of ``encode_panoptic_ids``)."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _panoptic_folder(out_path: str) -> str:
    base = out_path[:-5] if out_path.endswith(".json") else out_path + "_png"
    return base


def panoptic(output_uri: str, out_path: str, storage: StorageSpec | None = None,
             labeler: str | Sequence[str] | None = None) -> dict:
    """Write the COCO panoptic export of the run's tokens (see the module docstring); returns counts.

    ``labeler``: export only the tokens of this labeler (or these labelers); None = all.
    """
    names = labeler_filter(labeler)
    table = read_labels(output_uri, storage,
                        columns=["image_id", "uri", "member", "file_name", "width", "height", "status", "subobjects"])
    ok, err = _ok_rows(table)
    ids = integer_image_ids([r["image_id"] for r in ok])
    folder = _panoptic_folder(out_path)
    images, annotations, n_segments, dropped = [], [], 0, 0
    for r in image_progress(ok, len(ok), "export panoptic"):
        h, w = int(r["height"]), int(r["width"])
        img_id = ids[r["image_id"]]
        img = {"id": img_id, "file_name": row_file_name(r), "width": w, "height": h}
        if str(img_id) != r["image_id"]:
            img["image_key"] = r["image_id"]
        images.append(img)
        # 1. paint tokens first-wins into a label map of token indices (1-based)
        toks = select_tokens(r["subobjects"], names)
        label = rles_to_label_map([_rle(t["segmentation"]) for t in toks], (h, w))
        # 2. visible area and box of each painted token
        areas = np.bincount(label.ravel(), minlength=len(toks) + 1)
        slices = ndimage.find_objects(label, max_label=len(toks))
        segments = []
        for k in range(1, len(toks) + 1):
            if areas[k] == 0:
                dropped += 1
                continue
            sy, sx = slices[k - 1]
            seg = {"id": k, "category_id": SUBOBJECT_CATEGORY["id"], "area": int(areas[k]),
                   "bbox": [int(sx.start), int(sy.start), int(sx.stop - sx.start), int(sy.stop - sy.start)],
                   "iscrowd": 0}
            if toks[k - 1].get("boundary_score") is not None:
                seg["boundary_score"] = float(toks[k - 1]["boundary_score"])
            segments.append(seg)
        n_segments += len(segments)
        # 3. the id-encoded PNG (segment id = token index)
        png_name = f"{img_id:012d}.png"
        st.write_bytes(st.join(folder, png_name), encode_png(encode_panoptic_ids(label)), storage)
        annotations.append({"image_id": img_id, "file_name": png_name, "segments_info": segments})
    dataset = {"info": {"description": f"pseudolabel subobject tokens {output_uri}", "run_uri": output_uri},
               "images": images, "annotations": annotations, "categories": [dict(SUBOBJECT_CATEGORY)]}
    st.write_bytes(out_path, json.dumps(dataset).encode(), storage)
    return {"format": "panoptic", "path": out_path, "png_folder": folder, "images": len(images),
            "segments": n_segments, "dropped_tokens": dropped, "errors": len(err),
            "labelers": sorted(names) if names is not None else "all"}


def read_panoptic(json_path: str, storage: StorageSpec | None = None) -> dict[int, dict]:
    """Decode a panoptic export back to masks.

    Returns:
        {image id: {"image": image entry, "segments_info": [...], "id_map": (H, W) int64 segment ids,
        "masks": (N, H, W) bool in segments_info order}}.
    """
    json_path = str(json_path)
    data = load_json(json_path, storage)
    folder = _panoptic_folder(json_path)
    images = {img["id"]: img for img in data["images"]}
    out = {}
    for ann in data["annotations"]:
        rgb = decode_png(st.read_bytes(st.join(folder, ann["file_name"]), storage))
        id_map = decode_panoptic_ids(rgb[..., :3])
        seg_ids = np.array([s["id"] for s in ann["segments_info"]], dtype=np.int64)
        masks = id_map[None] == seg_ids[:, None, None] if len(seg_ids) else np.zeros((0,) + id_map.shape, bool)
        out[ann["image_id"]] = {"image": images.get(ann["image_id"]), "segments_info": ann["segments_info"],
                                "id_map": id_map, "masks": masks}
    return out


# ----------------------------------------------------------------------------- entry point

def export_coco(output_uri: str, out_path: str, storage: StorageSpec | None = None, *,
                min_score: float | None = None, score_thresholds: dict[str, float] | None = None) -> dict:
    """Write the ``coco`` instances JSON to ``out_path``; returns counts."""
    dataset, counts = coco_instances(output_uri, storage, min_score, score_thresholds)
    st.write_bytes(out_path, json.dumps(dataset).encode(), storage)
    return {"format": "coco", "path": out_path, **counts}


def export_coco_results(output_uri: str, out_path: str, storage: StorageSpec | None = None, *,
                        gt_json: str | None = None, min_score: float | None = None,
                        score_thresholds: dict[str, float] | None = None) -> dict:
    """Write the ``coco-results`` list against the ground truth ``gt_json`` (required); returns counts."""
    if not gt_json:
        coco_results(output_uri, storage, gt=None)  # raises ExportError
    assert gt_json  # coco_results raised without it
    gt = load_json(gt_json, storage)
    results, counts = coco_results(output_uri, storage, gt=gt, min_score=min_score,
                                   score_thresholds=score_thresholds)
    counts.pop("matched_gt_ids")
    st.write_bytes(out_path, json.dumps(results).encode(), storage)
    return {"format": "coco-results", "path": out_path, **counts}


from pseudolabel.jobs.outputs import export_formats as _formats  # noqa: E402  (it uses the helpers above at call time)

#: format name -> exporter ``fn(output_uri, out_path, storage=None, **options) -> counts``; an option a
#: format does not take is refused by ``export``.
EXPORTERS: dict[str, Callable[..., dict]] = {
    "coco": export_coco,
    "coco-results": export_coco_results,
    "panoptic": panoptic,
    "yolo": _formats.yolo,
    "masks": _formats.masks,
    "label-studio": _formats.label_studio,
}
FORMATS = tuple(EXPORTERS)


def format_options(fmt: str) -> list[str]:
    """The keyword options the exporter of ``fmt`` takes."""
    import inspect

    params = inspect.signature(EXPORTERS[fmt]).parameters.values()
    return [p.name for p in params if p.kind == p.KEYWORD_ONLY or (p.default is not p.empty and p.name != "storage")]


def export(output_uri: str, fmt: str, out_path: str, storage: StorageSpec | None = None,
           gt_json: str | None = None, labeler: str | Sequence[str] | None = None, **options: Any) -> dict:
    """Export a run's labels.

    Args:
        output_uri: the run's output folder (local path, file:// or s3://).
        fmt: a name in ``EXPORTERS`` (see the module docstring and ``export_formats``).
        out_path: the JSON to write (coco, coco-results, panoptic, label-studio) or the dataset folder
            (yolo, masks); local path or s3://.
        storage: endpoint/credentials for s3:// (used for reading the run and writing the export).
        gt_json: for ``coco-results`` (required there): the COCO ground truth to match ids against.
        labeler: for ``panoptic`` only: the token labeler name(s) whose tokens are exported; None = all.
        **options: the format's own options (``min_score``, ``score_thresholds``, ``split``,
            ``lowest``, ...); None means "not given". ``score_thresholds`` not given = the run's
            job.json thresholds, for the formats that take it.

    Returns:
        JSON-serialisable counts: {"format", "path", "images", "errors", ...}.

    Raises:
        ExportError: unknown format, an option the format does not take, or a request it cannot satisfy.
    """
    output_uri, out_path = str(output_uri), str(out_path)
    if fmt not in EXPORTERS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORTERS)}")
    given = {k: v for k, v in {"gt_json": gt_json, "labeler": labeler, **options}.items() if v is not None}
    takes = format_options(fmt)
    for name in given:
        if name not in takes:
            users = [f for f in EXPORTERS if name in format_options(f)]
            if not users:
                raise ExportError(f"unknown export option {name!r}")
            raise ExportError(f"{name} applies to the {', '.join(users)} format{'s' if len(users) > 1 else ''} only")
    if "score_thresholds" in takes and "score_thresholds" not in given:
        given["score_thresholds"] = score_thresholds_from_job(output_uri, storage)
    return EXPORTERS[fmt](output_uri, out_path, storage, **given)
