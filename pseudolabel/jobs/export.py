"""Export a finished run's labels table as COCO instances, COCO results or COCO panoptic.

Formats (``export(output_uri, fmt, out_path)``):

- ``coco``: a COCO instances JSON that ``pycocotools.coco.COCO`` loads. One image entry per ``ok`` row
  (error rows are left out and counted); image ``id`` is the row's ``image_id`` when it is an integer
  string, else a stable integer assigned in ``image_id`` order after the largest integer id, with the
  original string kept as ``image_key``. Annotation ids are renumbered 1..N across the dataset;
  category ids are the run's ontology ids; segmentations are compressed RLE with str ``counts``;
  ``iscrowd`` is 0; ``score`` (and ``labeler``) are kept as extra fields.
- ``coco-results``: a list of ``{"image_id", "category_id", "segmentation", "score"}`` that
  ``COCO.loadRes`` accepts, against the ``coco`` export or, with ``gt_json``, against a ground truth:
  then images are matched by ``file_name`` (exact, else a unique basename) and categories by name.
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

Local paths and s3:// work the same (pseudolabel.storage).
"""
from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from scipy import ndimage

from pseudolabel import storage as st
from pseudolabel.jobs.labels_io import read_labels, read_summary, rles_to_label_map
from pseudolabel.schemas.coco import rle_area, rle_bbox_xywh
from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.schemas.tables import STATUS_OK

FORMATS = ("coco", "coco-results", "panoptic")
SUBOBJECT_CATEGORY = {"id": 1, "name": "subobject", "supercategory": "subobject", "isthing": 1}

_INSTANCE_COLUMNS = ["image_id", "uri", "member", "file_name", "width", "height", "status", "error", "annotations"]


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
    if member and not member.startswith("row:"):
        return member
    return posixpath.basename(str(row.get("uri") or row["image_id"]))


def labeler_filter(labeler: str | Sequence[str] | None) -> set[str] | None:
    """The set of labeler names a ``labeler`` argument selects (None = every labeler)."""
    if labeler is None:
        return None
    names = {labeler} if isinstance(labeler, str) else set(labeler)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"labeler: expected a labeler name or a list of names, got {labeler!r}")
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


def _category_table(output_uri: str, storage: StorageSpec | None, rows: list[dict]) -> tuple[list[dict], dict]:
    """(COCO categories, name -> id) from the run's ontology plus any (id, name) seen in annotations."""
    cats = {}
    for c in read_summary(output_uri, storage).get("categories") or []:
        if c.get("id") is not None:
            cats.setdefault(int(c["id"]), {"id": int(c["id"]), "name": str(c.get("name") or c["id"]),
                                           "supercategory": c.get("labeler") or "object"})
    by_name = {c["name"]: c["id"] for c in cats.values()}
    for r in rows:
        for a in r["annotations"] or []:
            cid, name = a.get("category_id"), a.get("category")
            if cid is None:
                if name is None or name in by_name:
                    continue
                cid = max(cats, default=0) + 1
            cid = int(cid)
            if cid not in cats:
                cats[cid] = {"id": cid, "name": name or str(cid), "supercategory": a.get("labeler") or "object"}
                by_name.setdefault(cats[cid]["name"], cid)
    return [cats[k] for k in sorted(cats)], by_name


def _ann_category(a: dict, by_name: dict) -> int:
    if a.get("category_id") is not None:
        return int(a["category_id"])
    return by_name.get(a.get("category"), 1)


# ----------------------------------------------------------------------------- coco instances

def coco_instances(output_uri: str, storage: StorageSpec | None = None) -> tuple[dict, dict]:
    """The run as a COCO instances dataset in memory.

    Returns:
        (dataset, counts): ``dataset`` has ``info``, ``images``, ``annotations``, ``categories``;
        ``counts`` = {"images", "annotations", "errors"}.
    """
    ok, err = _ok_rows(read_labels(output_uri, storage, columns=_INSTANCE_COLUMNS))
    ids = integer_image_ids([r["image_id"] for r in ok])
    cats, by_name = _category_table(output_uri, storage, ok)
    images, anns = [], []
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
    return dataset, {"images": len(images), "annotations": len(anns), "errors": len(err)}


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
                 table: pa.Table | None = None) -> tuple[list[dict], dict]:
    """The run's annotations as a COCO results list (no ``bbox``; see the module docstring).

    Args:
        output_uri: the run's output folder.
        storage: credentials for s3://.
        gt: a COCO ground-truth dataset dict; when given, image ids are the GT's (matched by file name),
            category ids are mapped to the GT's by name where names match, and rows with no GT image are
            left out (counted in ``unmatched_images``).
        table: the labels table, if already read (columns of ``_INSTANCE_COLUMNS``).

    Returns:
        (results, counts) with counts = {"images", "matched_images", "unmatched_images", "results",
        "errors"}; ``matched_gt_ids`` lists the GT image ids the run covers.
    """
    table = table if table is not None else read_labels(output_uri, storage, columns=_INSTANCE_COLUMNS)
    ok, err = _ok_rows(table)
    cats, by_name = _category_table(output_uri, storage, ok)
    if gt is None:
        ids = integer_image_ids([r["image_id"] for r in ok])
        image_of = {r["image_id"]: ids[r["image_id"]] for r in ok}
        cat_map = {c["id"]: c["id"] for c in cats}
    else:
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
              "errors": len(err), "matched_gt_ids": matched}
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
    for r in ok:
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
        ok_png, buf = cv2.imencode(".png", encode_panoptic_ids(label)[..., ::-1])
        if not ok_png:
            raise RuntimeError(f"PNG encoding failed for image {r['image_id']}")
        st.write_bytes(st.join(folder, png_name), buf.tobytes(), storage)
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
        raw = np.frombuffer(st.read_bytes(st.join(folder, ann["file_name"]), storage), np.uint8)
        bgr = cv2.imdecode(raw, cv2.IMREAD_COLOR)
        id_map = decode_panoptic_ids(bgr[..., ::-1])
        seg_ids = np.array([s["id"] for s in ann["segments_info"]], dtype=np.int64)
        masks = id_map[None] == seg_ids[:, None, None] if len(seg_ids) else np.zeros((0,) + id_map.shape, bool)
        out[ann["image_id"]] = {"image": images.get(ann["image_id"]), "segments_info": ann["segments_info"],
                                "id_map": id_map, "masks": masks}
    return out


# ----------------------------------------------------------------------------- entry point

def export(output_uri: str, fmt: str, out_path: str, storage: StorageSpec | None = None,
           gt_json: str | None = None, labeler: str | Sequence[str] | None = None) -> dict:
    """Export a run's labels.

    Args:
        output_uri: the run's output folder (local path, file:// or s3://).
        fmt: ``coco`` | ``coco-results`` | ``panoptic`` (see the module docstring).
        out_path: the JSON to write (local path or s3://); panoptic PNGs go next to it.
        storage: endpoint/credentials for s3:// (used for reading the run and writing the export).
        gt_json: for ``coco-results`` only: a COCO ground truth to match image/category ids against.
        labeler: for ``panoptic`` only: the token labeler name(s) whose tokens are exported; None = all.

    Returns:
        JSON-serialisable counts: {"format", "path", "images", "annotations" | "results" | "segments",
        "errors", ...}.
    """
    output_uri, out_path = str(output_uri), str(out_path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if labeler is not None and fmt != "panoptic":
        raise ValueError("labeler applies to the panoptic format only")
    if fmt == "panoptic":
        return panoptic(output_uri, out_path, storage, labeler)
    if fmt == "coco":
        dataset, counts = coco_instances(output_uri, storage)
        st.write_bytes(out_path, json.dumps(dataset).encode(), storage)
        return {"format": fmt, "path": out_path, **counts}
    gt = load_json(gt_json, storage) if gt_json else None
    results, counts = coco_results(output_uri, storage, gt=gt)
    counts.pop("matched_gt_ids")
    st.write_bytes(out_path, json.dumps(results).encode(), storage)
    return {"format": fmt, "path": out_path, **counts}
