"""A finished run's output built by hand (labels Parquet + summary.json + source images), so the
export/evaluate/report tests don't depend on the engine.

Three images of 80x64 (W x H) with non-overlapping shapes of categories 1-3, a COCO ground truth for
them, and a run whose annotations/tokens are the GT masks (``perfect``) or unrelated ones (``random``).
"""
from __future__ import annotations

import io
import json
import tarfile

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel import storage as st
from pseudolabel.schemas.coco import mask_to_rle, rle_area, rle_bbox_xywh
from pseudolabel.schemas.tables import LABELS_SCHEMA

W, H = 80, 64
CATEGORIES = [{"id": 1, "name": "box"}, {"id": 2, "name": "disc"}, {"id": 3, "name": "wedge"}]
FILE_NAMES = ["a/img_1.png", "b/img_2.png", "c/img_3.png"]
# per image: (category_id, shape) with shape ("rect", x0, y0, x1, y1) | ("circle", cx, cy, r) | ("poly", pts)
GT_SHAPES = [
    [(1, ("rect", 8, 10, 30, 40)), (2, ("circle", 55, 32, 12))],
    [(2, ("rect", 40, 8, 70, 28)), (3, ("poly", [(15, 52), (35, 52), (25, 30)]))],
    [(1, ("circle", 40, 32, 18))],
]


def _draw(shape) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    if shape[0] == "rect":
        _, x0, y0, x1, y1 = shape
        m[y0:y1, x0:x1] = 1
    elif shape[0] == "circle":
        cv2.circle(m, (shape[1], shape[2]), shape[3], 1, -1)
    else:
        cv2.fillPoly(m, [np.array(shape[1], np.int32)], 1)
    return m.astype(bool)


def shape_masks(image_id: int) -> list[np.ndarray]:
    """GT masks of image ``image_id`` (1-based), (H, W) bool each."""
    return [_draw(s) for _, s in GT_SHAPES[image_id - 1]]


def _ann(mask: np.ndarray, **extra) -> dict:
    rle = mask_to_rle(mask)
    return {"segmentation": rle, "area": float(rle_area([rle])[0]),
            "bbox": [float(v) for v in rle_bbox_xywh([rle])[0]], "iscrowd": 0, **extra}


def gt_coco() -> dict:
    """COCO instances ground truth of the three images (ids 1..3)."""
    images, anns = [], []
    for i, fn in enumerate(FILE_NAMES, start=1):
        images.append({"id": i, "file_name": fn, "width": W, "height": H})
        for k, ((cat, _), m) in enumerate(zip(GT_SHAPES[i - 1], shape_masks(i)), start=1):
            anns.append(_ann(m, id=i * 100 + k, image_id=i, category_id=cat))
    cats = [{**c, "supercategory": "shape"} for c in CATEGORIES]
    return {"images": images, "annotations": anns, "categories": cats}


def render_image(image_id: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB picture of the image's shapes."""
    rng = np.random.default_rng(image_id)
    img = np.full((H, W, 3), 90, np.uint8) + rng.integers(0, 20, (H, W, 3), dtype=np.uint8)
    colours = {1: (220, 60, 60), 2: (60, 200, 80), 3: (70, 90, 230)}
    for (cat, _), m in zip(GT_SHAPES[image_id - 1], shape_masks(image_id)):
        img[m] = colours[cat]
    return img


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", rgb[..., ::-1] if rgb.ndim == 3 else rgb)
    assert ok
    return buf.tobytes()


def _random_masks(image_id: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 + image_id)
    out = []
    for _ in range(n):
        x0, y0 = int(rng.integers(0, W - 12)), int(rng.integers(0, H - 12))
        m = np.zeros((H, W), bool)
        m[y0:y0 + int(rng.integers(4, 12)), x0:x0 + int(rng.integers(4, 12))] = True
        out.append(m)
    return out


def _tokens(masks: list[np.ndarray]) -> list[dict]:
    toks = []
    for k, m in enumerate(sorted(masks, key=lambda m: -int(m.sum())), start=1):
        a = _ann(m)
        toks.append({"id": k, "segmentation": a["segmentation"], "bbox": a["bbox"], "area": a["area"],
                     "boundary_score": 0.5, "labeler": "test", "embedding": None})
    return toks


def label_rows(mode: str = "perfect", wrong_categories: bool = False, image_ids: str = "int",
               sources: dict | None = None) -> list[dict]:
    """Rows of the labels table: three ok rows and one error row.

    Args:
        mode: ``perfect`` (GT masks as annotations, GT partition as tokens) or ``random``.
        wrong_categories: shift every category id cyclically (1->2->3->1) with its name.
        image_ids: ``int`` ("1", "2", "3") or ``hash`` (non-integer strings).
        sources: image_id (1-based int) -> (uri, member) of the source image.
    """
    rows = []
    for i in (1, 2, 3):
        gt = shape_masks(i)
        cats = [c for c, _ in GT_SHAPES[i - 1]]
        if wrong_categories:
            cats = [c % 3 + 1 for c in cats]
        if mode == "perfect":
            masks = gt
            fg = np.any(gt, axis=0)
            tokens = _tokens([~fg] + gt)
        else:
            masks = _random_masks(i, len(gt) + 1)
            cats = [1 + k % 3 for k in range(len(masks))]
            quads = np.zeros((H, W), np.int32)
            quads[H // 2:, :] += 2
            quads[:, W // 2:] += 1
            tokens = _tokens([quads == q for q in range(4)])
        anns = [_ann(m, id=k, category_id=c, category=CATEGORIES[c - 1]["name"], score=0.9 - 0.1 * k,
                     labeler="test", prompt=None)
                for k, (m, c) in enumerate(zip(masks, cats), start=1)]
        uri, member = (sources or {}).get(i, (f"/nonexistent/{FILE_NAMES[i - 1]}", None))
        fgm = (np.any(gt, axis=0) * 255).astype(np.uint8)
        rows.append({
            "image_id": str(i) if image_ids == "int" else f"h{(i * 7919) % 1000:03x}z",
            "uri": uri, "member": member, "file_name": FILE_NAMES[i - 1], "width": W, "height": H,
            "status": "ok", "error": None, "annotations": anns, "subobjects": tokens,
            "layers": [{"name": "foreground_mask", "labeler": "test", "png": png(fgm)},
                       {"name": "clean", "labeler": "test", "png": png(render_image(i))}],
            "provenance": {"labelers": ["test"], "weights": [None], "revisions": [None], "params_hash": "x",
                           "engine_version": "0", "run_id": "run-test"},
        })
    rows.append({"image_id": "bad-1", "uri": "/nonexistent/bad.png", "member": None, "file_name": "bad.png",
                 "width": 0, "height": 0, "status": "error", "error": "cannot decode image: truncated <file>",
                 "annotations": [], "subobjects": [], "layers": [], "provenance": None})
    return rows


def write_run(out, mode: str = "perfect", wrong_categories: bool = False, image_ids: str = "int",
              storage=None, with_images: bool = True) -> str:
    """Write a run's output (labels in two Parquet files + junk files the reader must skip, summary.json,
    source images: two PNG files and one tar member) under ``out``; returns the output URI."""
    out = str(out)
    sources = {}
    if with_images:
        base = st.join(out, "source")
        for i in (1, 2):
            uri = st.join(base, FILE_NAMES[i - 1])
            st.write_bytes(uri, png(render_image(i)), storage)
            sources[i] = (uri, None)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = png(render_image(3))
            info = tarfile.TarInfo("img_3.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        st.write_bytes(st.join(base, "shard-00000.tar"), buf.getvalue(), storage)
        sources[3] = (st.join(base, "shard-00000.tar"), "img_3.png")
    rows = label_rows(mode, wrong_categories, image_ids, sources)
    for name, part in (("part-00000.parquet", rows[:2]), ("part-00001.parquet", rows[2:])):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(part, schema=LABELS_SCHEMA), sink)
        st.write_bytes(st.join(out, "labels", name), sink.getvalue().to_pybytes(), storage)
    st.write_bytes(st.join(out, "labels", "_SUCCESS"), b"", storage)
    st.write_bytes(st.join(out, "labels", ".tmp-part.parquet"), b"not parquet", storage)
    cats = [dict(c) for c in CATEGORIES]
    summary = {"run_id": "run-test", "images": 4, "ok": 3, "error": 1, "seconds": 2.0, "images_per_s": 2.0,
               "output_uri": out, "categories": [{**c, "labeler": "test"} for c in cats], "labelers": ["test"]}
    st.write_bytes(st.join(out, "summary.json"), json.dumps(summary).encode(), storage)
    st.write_bytes(st.join(out, "job.json"), json.dumps({"name": "test"}).encode(), storage)
    return out


def two_labeler_rows(mode: str = "perfect") -> list[dict]:
    """``label_rows(mode)`` whose first three rows also hold the tokens of a second labeler ``other``
    (the image quadrants), stored before the ``test`` labeler's tokens: merging both changes every score."""
    rows = label_rows(mode)
    quads = np.zeros((H, W), np.int32)
    quads[H // 2:, :] += 2
    quads[:, W // 2:] += 1
    for r in rows[:3]:
        other = [{"id": 100 + q, "segmentation": mask_to_rle(quads == q), "bbox": [0.0, 0.0, 1.0, 1.0],
                  "area": float((quads == q).sum()), "boundary_score": 0.5, "labeler": "other", "embedding": None}
                 for q in range(4)]
        r["subobjects"] = other + r["subobjects"]
    return rows


def write_rows(out, rows: list[dict], job: dict | None = None) -> str:
    """A run folder with ``rows`` as its one labels file (and ``job`` as its job.json); returns its path."""
    (out / "labels").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), out / "labels" / "p.parquet")
    if job is not None:
        (out / "job.json").write_text(json.dumps(job))
    return str(out)
