"""Exports for training and review tools: YOLO segmentation, VOC-style mask PNGs, Label Studio tasks.

Every exporter here reads the run's ``ok`` rows (error rows are counted in ``errors``), applies the
score filters of ``pseudolabel.jobs.outputs.export`` (``min_score``, ``score_thresholds``) and returns
JSON-serialisable counts. Local paths and s3:// work the same for reading and writing.

Image names: each image gets a file stem, the basename of its file name without the extension, with
characters other than letters, digits, ``.``, ``_``, ``-`` replaced by ``_``; when several images of
the run share a stem, each of those becomes ``<stem>_<id>`` with the image's COCO id (the id of the
``coco`` export).

Polygons (``yolo``, and ``label-studio`` with ``shape="polygon"``): every outer contour of a mask
(OpenCV ``findContours``, external contours, simple chain approximation) is one polygon, so an
instance in several pieces gives several polygons; holes are not kept. Vertices are pixel indices
(x = column, y = row), the convention ``cv2.fillPoly`` rasterises back to the mask; a contour of
one or two points (a speck or a straight one-pixel line) keeps its points, the last repeated to make
three (a zero-area polygon that ``fillPoly`` still draws as those pixels).

``yolo`` (``out_path`` is the dataset folder):

- ``labels/<stem>.txt``: one line per polygon, ``class x1 y1 x2 y2 ...`` with x divided by the width
  and y by the height (6 decimals); an image without annotations gets an empty file (a background
  image). Class indices are contiguous from 0 in category-id order over all the run's categories.
- ``images/<stem><ext>``: with ``images="link"`` (default) a symbolic link to the source image when it
  is a local file and the export is local; otherwise (``images="copy"``, an s3:// source or export, a
  tar member, a Parquet row) the source's encoded bytes, unchanged, when its extension is one YOLO
  reads (jpg, jpeg, png, bmp, tif, tiff, webp), else the decoded image as PNG. ``images="none"``
  writes no image. A source that cannot be read is counted in ``images_missing`` (its labels are written).
- ``data.yaml``: ``path`` (the dataset folder), ``train``, ``val`` (and ``test``) folders relative to
  it, ``names`` {class index: category name}. Without ``split`` every image is in ``images/`` and
  both ``train`` and ``val`` name it. With ``split`` ({"train": 0.9, "val": 0.1} or
  ``"train=0.9,val=0.1"``; names among train/val/test, fractions normalised to sum 1) images and
  labels go to ``images/<split>/`` and ``labels/<split>/``; an image's split follows from the SHA-256
  of its ``image_id`` alone, so it is the same on every export and every run holding that image. A
  split left out of ``split`` is not written (``val`` then names the train folder).

``masks`` (``out_path`` is the dataset folder), VOC-style:

- ``SegmentationClass/<stem>.png``: pixel = category id, 0 = background; single-channel uint8 PNGs,
  or uint16 for the whole export when a category id exceeds 255.
- ``SegmentationObject/<stem>.png``: pixel = instance index 1..N, the position of the annotation in
  the image's (score-filtered) annotation list, 0 = none; uint8, or uint16 for an image with more
  than 255 instances.
- where instances overlap the higher score wins (ties: the earlier annotation); an instance can be
  hidden entirely (counted in ``hidden_instances``, still listed in ``instances.json``).
- ``categories.json`` ({"background": 0, "semantic_dtype", "categories": [{"id", "name", "supercategory"}]}),
  ``labelmap.txt`` (``<id> <name>`` per line, ``0 background`` first), ``instances.json`` ({stem:
  {"image_id", "file_name", "width", "height", "instances": [{"index", "category_id", "category",
  "score", "labeler", "visible_area"}]}}) and ``ImageSets/Segmentation/default.txt`` (the stems).

``label-studio`` (``out_path`` is the tasks JSON; the labeling config goes beside it, ``tasks.json`` ->
``tasks.xml``): a list of tasks, one per image:

- ``data``: ``image`` = ``image_prefix`` + the image's file name when ``image_prefix`` is given (e.g.
  ``/data/local-files/?d=images/`` for Label Studio's local storage), else the source URI (an s3:// or
  local path; ``<uri>#<member>`` for an image inside a tar shard or Parquet file, which Label Studio
  cannot open: give ``image_prefix`` for those); also ``image_id`` and ``file_name``.
- ``predictions``: one per task, ``model_version`` = the row's labeler names joined by ``+``, ``@``,
  its params hash; ``score`` = the mean score of its instances (a missing score counts as 1.0; 0.0
  for an image without instances); ``result``: one ``brushlabels`` item per instance (``shape="brush"``,
  default: ``value.format = "rle"``, ``value.rle`` = Label Studio's brush RLE of the RGBA image whose
  four channels are 255 inside the mask, row-major) or one ``polygonlabels`` item per polygon
  (``shape="polygon"``: ``value.points`` in percent of width/height), each with its instance's
  ``score``, ``original_width``/``original_height`` and ``from_name``/``to_name`` (default
  ``label``/``image``, as in the written config).
- tasks are in ``image_id`` order; ``lowest=N`` keeps the N least confident (by prediction score,
  ascending, ties by ``image_id``) in that order, for human review.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections import Counter
from typing import Any
from xml.sax.saxutils import quoteattr

import cv2
import numpy as np
import yaml

from pseudolabel import storage as st
from pseudolabel.imageio import encode_png
from pseudolabel.jobs.outputs.labels_io import load_image, load_image_bytes, rles_to_label_map
from pseudolabel.jobs.progress import image_progress
from pseudolabel.schemas.coco import rle_to_mask
from pseudolabel.schemas.spec import StorageSpec

SPLIT_NAMES = ("train", "val", "test")
YOLO_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LS_SHAPES = ("brush", "polygon")
IMAGE_MODES = ("link", "copy", "none")

_LS_COLUMNS = ["image_id", "uri", "member", "file_name", "width", "height", "status", "error", "annotations",
               "provenance"]


def _ex():
    """The ``export`` module (imported at call time: it imports this one to build its registry)."""
    from pseudolabel.jobs.outputs import export

    return export


# ----------------------------------------------------------------------------- shared pieces

def parse_split(split: str | dict | None) -> dict[str, float] | None:
    """``"train=0.9,val=0.1"`` or a dict -> {split name: fraction} normalised to sum 1 (None -> None)."""
    err = _ex().ExportError
    if split is None:
        return None
    if isinstance(split, str):
        pairs = {}
        for part in split.split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise err(f"split {split!r}: expected name=fraction pairs, e.g. train=0.9,val=0.1")
            if name.strip() in pairs:
                raise err(f"split {split!r}: {name.strip()!r} given twice")
            pairs[name.strip()] = value.strip()
    elif isinstance(split, dict):
        pairs = dict(split)
    else:
        raise err(f"split: expected 'train=0.9,val=0.1' or a dict, got {split!r}")
    out = {}
    for name, value in pairs.items():
        if name not in SPLIT_NAMES:
            raise err(f"split: unknown split {name!r}; use {', '.join(SPLIT_NAMES)}")
        try:
            frac = float(value)
        except (TypeError, ValueError):
            raise err(f"split: fraction of {name!r} is not a number: {value!r}") from None
        if not np.isfinite(frac) or frac < 0:
            raise err(f"split: fraction of {name!r} must be >= 0, got {value!r}")
        out[name] = frac
    total = sum(out.values())
    if "train" not in out or total <= 0:
        raise err(f"split {split!r}: needs a train fraction and a positive total")
    return {k: out[k] / total for k in SPLIT_NAMES if k in out}


def split_of(image_id: str, fractions: dict[str, float]) -> str:
    """The split of an image: a point in [0, 1) from the SHA-256 of its ``image_id``, placed on the
    cumulative fractions (train, val, test order). The same id always lands in the same split."""
    u = int.from_bytes(hashlib.sha256(str(image_id).encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    acc = 0.0
    names = [k for k in SPLIT_NAMES if fractions.get(k, 0) > 0]
    for name in names:
        acc += fractions[name]
        if u < acc:
            return name
    return names[-1]  # u just under 1 when rounding left the total short of it


def image_stems(rows: list[dict], ids: dict[str, int]) -> dict[str, str]:
    """{image_id: unique file stem} (see the module docstring)."""
    ex = _ex()
    base = {}
    for r in rows:
        stem = posixpath.splitext(posixpath.basename(ex.row_file_name(r)))[0]
        base[r["image_id"]] = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".") or "image"
    seen = Counter(base.values())
    return {k: (v if seen[v] == 1 else f"{v}_{ids[k]}") for k, v in base.items()}


def outer_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outer contours of a mask as (K, 2) int arrays of (x, y) pixel indices, K >= 3 (see the docstring)."""
    m = np.ascontiguousarray(np.asarray(mask) != 0, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        pts = c.reshape(-1, 2)
        if len(pts) < 3:  # a speck or a straight one-pixel line: its end points, the last repeated
            pts = np.concatenate([pts, np.repeat(pts[-1:], 3 - len(pts), axis=0)])
        out.append(pts.astype(np.int64))
    return out


def _score(a: dict) -> float:
    return float(a["score"]) if a.get("score") is not None else 1.0


def _is_local(uri: str) -> bool:
    return st.protocol_of(str(uri)) == "file"


def _local_path(uri: str) -> str:
    return st.strip_protocol(str(uri))


# ----------------------------------------------------------------------------- yolo

def _write_image(row: dict, dst_stem: str, mode: str, storage: StorageSpec | None) -> str | None:
    """Put the row's source image at ``dst_stem`` + extension; returns "linked" | "copied" | None (missing)."""
    ex = _ex()
    uri, member = row.get("uri"), row.get("member")
    ext = posixpath.splitext(ex.row_file_name(row))[1].lower()
    if not uri:
        return None
    dst_local = _is_local(dst_stem)
    if mode == "link" and member is None and _is_local(uri) and dst_local and ext in YOLO_IMAGE_EXTS:
        src = _local_path(uri)
        if not os.path.isfile(src):
            return None
        dst = _local_path(dst_stem) + ext
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(src, dst)
        return "linked"
    try:
        if ext in YOLO_IMAGE_EXTS:
            data = load_image_bytes(uri, member, storage)
        else:
            rgb = load_image(uri, member, storage)
            data, ext = encode_png(rgb), ".png"
    except (OSError, KeyError, IndexError, ValueError):
        return None
    dst = dst_stem + ext
    if dst_local and os.path.lexists(_local_path(dst)):
        os.remove(_local_path(dst))  # a link left by an earlier export: replace it, never write through it
    st.write_bytes(dst, data, storage)
    return "copied"


def yolo(output_uri: str, out_path: str, storage: StorageSpec | None = None, *,
         split: str | dict | None = None, images: str = "link", min_score: float | None = None,
         score_thresholds: dict[str, float] | None = None) -> dict:
    """Write a YOLO segmentation dataset (see the module docstring); returns counts."""
    ex = _ex()
    if images not in IMAGE_MODES:
        raise ex.ExportError(f"images: expected one of {', '.join(IMAGE_MODES)}, got {images!r}")
    fractions = parse_split(split)
    ok, err, cats, by_name, dropped = ex.load_instances(output_uri, storage, min_score, score_thresholds)
    ids = ex.integer_image_ids([r["image_id"] for r in ok])
    stems = image_stems(ok, ids)
    cls_of = {c["id"]: k for k, c in enumerate(cats)}
    root = _local_path(out_path) if _is_local(out_path) else out_path
    per_split: Counter = Counter()
    n_ann = n_poly = 0
    image_counts: Counter = Counter()
    for r in image_progress(ok, len(ok), "export yolo"):
        h, w = int(r["height"]), int(r["width"])
        part = split_of(r["image_id"], fractions) if fractions else None
        sub = (part,) if part else ()
        per_split[part or "train"] += 1
        lines = []
        for a in r["annotations"] or []:
            cid = ex._ann_category(a, by_name)
            if cid not in cls_of:  # a category outside the table (cannot happen with category_table_of)
                continue
            n_ann += 1
            for poly in outer_polygons(rle_to_mask(a["segmentation"])):
                xy = np.stack([poly[:, 0] / w, poly[:, 1] / h], axis=1).clip(0.0, 1.0).ravel()
                lines.append(f"{cls_of[cid]} " + " ".join(f"{v:.6f}" for v in xy))
                n_poly += 1
        stem = stems[r["image_id"]]
        st.write_bytes(st.join(root, "labels", *sub, stem + ".txt"),
                       ("\n".join(lines) + ("\n" if lines else "")).encode(), storage)
        if images != "none":
            image_counts[_write_image(r, st.join(root, "images", *sub, stem), images, storage)] += 1
    names = {k: c["name"] for k, c in enumerate(cats)}
    data: dict[str, Any]
    if fractions:
        data = {"path": root, **{k: f"images/{k}" for k in fractions}}
        data.setdefault("val", "images/train")
    else:
        data = {"path": root, "train": "images", "val": "images"}
    data["names"] = names
    st.write_bytes(st.join(root, "data.yaml"), yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode(),
                   storage)
    return {"format": "yolo", "path": root, "images": len(ok), "annotations": n_ann, "polygons": n_poly,
            "classes": len(cats), "splits": {k: per_split[k] for k in SPLIT_NAMES if per_split[k]},
            "images_linked": image_counts["linked"], "images_copied": image_counts["copied"],
            "images_missing": image_counts[None], "errors": len(err), "dropped_low_score": dropped}


def read_yolo_labels(txt: str) -> list[tuple[int, np.ndarray]]:
    """Parse a YOLO segmentation label file's text -> [(class index, (K, 2) normalised xy)]."""
    out = []
    for line in txt.splitlines():
        parts = line.split()
        if not parts:
            continue
        vals = np.array([float(v) for v in parts[1:]], dtype=np.float64)
        out.append((int(parts[0]), vals.reshape(-1, 2)))
    return out


# ----------------------------------------------------------------------------- masks

def paint_instances(rles: list[dict], scores: list[float], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) int32 map of instance indices 1..N (position in ``rles``), 0 = none; where instances
    overlap the higher score wins, ties the earlier instance."""
    order = sorted(range(len(rles)), key=lambda k: (-scores[k], k))
    painted = rles_to_label_map([rles[k] for k in order], shape)  # earlier in ``order`` wins
    lut = np.concatenate([[0], np.asarray(order, dtype=np.int64) + 1]).astype(np.int32)
    return lut[painted]


def masks(output_uri: str, out_path: str, storage: StorageSpec | None = None, *,
          min_score: float | None = None, score_thresholds: dict[str, float] | None = None) -> dict:
    """Write VOC-style semantic and instance PNGs (see the module docstring); returns counts."""
    ex = _ex()
    ok, err, cats, by_name, dropped = ex.load_instances(output_uri, storage, min_score, score_thresholds)
    ids = ex.integer_image_ids([r["image_id"] for r in ok])
    stems = image_stems(ok, ids)
    name_of = {c["id"]: c["name"] for c in cats}
    sem_dtype = np.uint16 if max(name_of, default=0) > 255 else np.uint8
    root = out_path
    index, n_inst, hidden = {}, 0, 0
    for r in image_progress(ok, len(ok), "export masks"):
        h, w = int(r["height"]), int(r["width"])
        anns = r["annotations"] or []
        rles = [ex._rle(a["segmentation"]) for a in anns]
        scores = [_score(a) for a in anns]
        cids = np.array([0] + [ex._ann_category(a, by_name) for a in anns], dtype=np.int64)
        inst = paint_instances(rles, scores, (h, w))
        sem = cids[inst]
        visible = np.bincount(inst.ravel(), minlength=len(anns) + 1)
        inst_dtype = np.uint16 if len(anns) > 255 else np.uint8
        stem = stems[r["image_id"]]
        st.write_bytes(st.join(root, "SegmentationClass", stem + ".png"), encode_png(sem.astype(sem_dtype)), storage)
        st.write_bytes(st.join(root, "SegmentationObject", stem + ".png"), encode_png(inst.astype(inst_dtype)), storage)
        n_inst += len(anns)
        hidden += int((visible[1:] == 0).sum())
        index[stem] = {"image_id": r["image_id"], "file_name": ex.row_file_name(r), "width": w, "height": h,
                       "instances": [{"index": k + 1, "category_id": int(cids[k + 1]),
                                      "category": name_of.get(int(cids[k + 1]), a.get("category")),
                                      "score": a.get("score"), "labeler": a.get("labeler"),
                                      "visible_area": int(visible[k + 1])} for k, a in enumerate(anns)]}
    categories = {"background": 0, "semantic_dtype": np.dtype(sem_dtype).name,
                  "categories": [{"id": c["id"], "name": c["name"], "supercategory": c.get("supercategory")}
                                 for c in cats]}
    st.write_bytes(st.join(root, "categories.json"), json.dumps(categories, indent=1).encode(), storage)
    labelmap = "0 background\n" + "".join(f"{c['id']} {c['name']}\n" for c in cats)
    st.write_bytes(st.join(root, "labelmap.txt"), labelmap.encode(), storage)
    st.write_bytes(st.join(root, "instances.json"), json.dumps(index).encode(), storage)
    st.write_bytes(st.join(root, "ImageSets", "Segmentation", "default.txt"),
                   "".join(f"{s}\n" for s in index).encode(), storage)
    return {"format": "masks", "path": root, "images": len(ok), "instances": n_inst, "hidden_instances": hidden,
            "semantic_dtype": np.dtype(sem_dtype).name, "errors": len(err), "dropped_low_score": dropped}


# ----------------------------------------------------------------------------- label studio

#: header of every brush RLE: word size 8 bits, run-length field sizes 3, 4, 8 and 16 bits
_LS_HEADER = f"{8 - 1:05b}" + "".join(f"{b - 1:04b}" for b in (3, 4, 8, 16))
_LS_FIELDS = ((8, "00", 3), (16, "01", 4), (256, "10", 8), (65536, "11", 16))


def ls_brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a mask: the RGBA image (row-major, 4 values per pixel, all 255 inside
    the mask, 0 outside) in Label Studio's rle-pack encoding (32-bit value count, 5-bit word size - 1,
    four 4-bit run-field sizes - 1, then per run: bit 1, 2-bit field choice, run length - 1, 8-bit
    value), padded with zero bits to whole bytes; returned as a list of byte values."""
    flat = (np.asarray(mask) != 0).reshape(-1).astype(np.uint8)
    n = flat.size
    bits = [f"{4 * n:032b}", _LS_HEADER]
    if n:
        starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
        lengths = np.diff(np.concatenate([starts, [n]])) * 4
        for length, v in zip(lengths.tolist(), flat[starts].tolist()):
            value = "11111111" if v else "00000000"
            while length > 0:
                chunk = min(length, 65536)
                for limit, code, width in _LS_FIELDS:
                    if chunk <= limit:
                        bits.append(f"1{code}{chunk - 1:0{width}b}{value}")
                        break
                length -= chunk
    s = "".join(bits)
    s += "0" * (-len(s) % 8)
    return np.packbits(np.frombuffer(s.encode("ascii"), np.uint8) - 48).tolist()


def _ls_image(row: dict, image_prefix: str | None) -> str:
    ex = _ex()
    if image_prefix is not None:
        return image_prefix + ex.row_file_name(row)
    uri = str(row.get("uri") or "")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return f"{uri}#{row['member']}" if row.get("member") else uri


def _model_version(prov: dict | None) -> str:
    if not prov:
        return "pseudolabel"
    names = "+".join(str(n) for n in prov.get("labelers") or []) or "pseudolabel"
    return f"{names}@{prov['params_hash']}" if prov.get("params_hash") else names


def label_studio_config(cats: list[dict], shape: str = "brush", from_name: str = "label",
                        to_name: str = "image") -> str:
    """The Label Studio labeling config XML that matches the exported predictions."""
    tag = "BrushLabels" if shape == "brush" else "PolygonLabels"
    labels = "".join(f"    <Label value={quoteattr(c['name'])}/>\n" for c in cats)
    return (f"<View>\n  <Image name={quoteattr(to_name)} value=\"$image\" zoom=\"true\"/>\n"
            f"  <{tag} name={quoteattr(from_name)} toName={quoteattr(to_name)}>\n{labels}  </{tag}>\n</View>\n")


def label_studio(output_uri: str, out_path: str, storage: StorageSpec | None = None, *,
                 shape: str = "brush", lowest: int | None = None, image_prefix: str | None = None,
                 from_name: str = "label", to_name: str = "image", min_score: float | None = None,
                 score_thresholds: dict[str, float] | None = None) -> dict:
    """Write Label Studio tasks with predictions (see the module docstring); returns counts."""
    ex = _ex()
    if shape not in LS_SHAPES:
        raise ex.ExportError(f"shape: expected one of {', '.join(LS_SHAPES)}, got {shape!r}")
    if lowest is not None and (isinstance(lowest, bool) or not isinstance(lowest, int) or lowest < 1):
        raise ex.ExportError(f"lowest: expected a positive integer, got {lowest!r}")
    ok, err, cats, by_name, dropped = ex.load_instances(output_uri, storage, min_score, score_thresholds,
                                                        columns=_LS_COLUMNS)
    name_of = {c["id"]: c["name"] for c in cats}
    kind = "brushlabels" if shape == "brush" else "polygonlabels"
    tasks: list[dict[str, Any]] = []
    n_results = 0
    for r in image_progress(ok, len(ok), "export label-studio"):
        h, w = int(r["height"]), int(r["width"])
        anns = r["annotations"] or []
        result = []
        for k, a in enumerate(anns):
            label = name_of.get(ex._ann_category(a, by_name), a.get("category") or "object")
            base = {"from_name": from_name, "to_name": to_name, "type": kind, "original_width": w,
                    "original_height": h, "image_rotation": 0, "score": _score(a)}
            mask = rle_to_mask(a["segmentation"])
            if shape == "brush":
                result.append({"id": f"{r['image_id']}-{k + 1}", **base,
                               "value": {"format": "rle", "rle": ls_brush_rle(mask), kind: [label]}})
            else:
                for j, poly in enumerate(outer_polygons(mask)):
                    pts = [[round(100.0 * x / w, 4), round(100.0 * y / h, 4)] for x, y in poly.tolist()]
                    result.append({"id": f"{r['image_id']}-{k + 1}-{j + 1}", **base,
                                   "value": {"points": pts, "closed": True, kind: [label]}})
        n_results += len(result)
        score = float(np.mean([_score(a) for a in anns])) if anns else 0.0
        tasks.append({"data": {"image": _ls_image(r, image_prefix), "image_id": r["image_id"],
                               "file_name": ex.row_file_name(r)},
                      "predictions": [{"model_version": _model_version(r.get("provenance")), "score": score,
                                       "result": result}]})
    if lowest is not None:
        order = sorted(range(len(tasks)), key=lambda i: (tasks[i]["predictions"][0]["score"], ok[i]["image_id"]))
        tasks = [tasks[i] for i in order[:lowest]]
    st.write_bytes(out_path, json.dumps(tasks).encode(), storage)
    config_path = (out_path[:-5] if out_path.endswith(".json") else out_path) + ".xml"
    st.write_bytes(config_path, label_studio_config(cats, shape, from_name, to_name).encode(), storage)
    return {"format": "label-studio", "path": out_path, "config": config_path, "tasks": len(tasks),
            "results": sum(len(t["predictions"][0]["result"]) for t in tasks), "images": len(ok),
            "errors": len(err), "dropped_low_score": dropped}
