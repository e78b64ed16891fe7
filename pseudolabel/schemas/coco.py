"""COCO helpers on pycocotools: masks <-> compressed RLE (``counts`` as str), area, bbox.

Conventions:
- a mask is a 2-D array of shape (H, W), any dtype, non-zero = inside;
- an RLE is ``{"size": [H, W], "counts": str}`` (COCO compressed);
- boxes named ``xywh`` are [x, y, w, h] in pixels, ``xyxy`` are [x0, y0, x1, y1].

``category_table`` is the one builder of a run's category table (declared ontology + what annotations add).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pycocotools import mask as mask_utils


def mask_to_rle(mask: np.ndarray) -> dict:
    """(H, W) mask -> COCO compressed RLE with ``counts`` as str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def masks_to_rles(masks: np.ndarray) -> list[dict]:
    """(N, H, W) masks -> N compressed RLEs in one pycocotools call."""
    if len(masks) == 0:
        return []
    stack = np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1))
    return [
        {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}
        for r in mask_utils.encode(stack)
    ]


def label_map_to_rles(label_map: np.ndarray, labels: np.ndarray | None = None) -> tuple[list[dict], np.ndarray]:
    """Encode every region of an int label map (0 = unassigned) as RLE.

    Args:
        label_map: (H, W) integer array; region k is ``label_map == k``.
        labels: which labels to encode (default: every non-zero label, ascending). A label absent
            from the map gets an empty mask.

    Returns:
        (rles, labels): one RLE per label, in the order of ``labels``.

    The runs of the whole map are found once in column-major order (COCO's order); each label's
    uncompressed counts are the gaps between its runs, and pycocotools compresses them in one call.
    The cost is one pass over the image plus the number of runs, not one full mask per label, and the
    strings are identical to ``mask_to_rle(label_map == k)``.
    """
    regions = label_map_regions(label_map, labels)
    return regions[0], regions[3]


def label_map_regions(label_map: np.ndarray, labels: np.ndarray | None = None
                      ) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """``label_map_to_rles`` with each region's area and box, computed from the same runs.

    Returns:
        (rles, areas, boxes_xywh, labels): areas (N,) float64 in pixels; boxes (N, 4) float32
        ``[x, y, w, h]``; both equal to pycocotools' ``area`` and ``toBbox`` of the RLEs (a run that
        continues into the next column spans the full height in the box, as there); zeros for a
        label absent from the map.
    """
    label_map = np.asarray(label_map)
    h, w = label_map.shape
    flat = label_map.ravel(order="F")
    n = flat.size
    if labels is None:
        labels = np.unique(flat)
        labels = labels[labels != 0]
    labels = np.asarray(labels)
    if len(labels) == 0:
        return [], np.zeros(0, np.float64), np.zeros((0, 4), np.float32), labels
    # 1. runs of equal values in column-major order, [start, end)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [n]))
    values = flat[starts]
    # 2. the requested label each run belongs to (runs of other values count as background)
    sorter = np.argsort(labels, kind="stable")
    pos = np.minimum(np.searchsorted(labels[sorter], values), len(labels) - 1)
    hit = labels[sorter][pos] == values
    owner = sorter[pos[hit]]
    starts, ends = starts[hit], ends[hit]
    order = np.argsort(owner, kind="stable")
    owner, starts, ends = owner[order], starts[order], ends[order]
    # 3. per label, alternating zero/one run lengths starting with zeros: [0, bounds..., n] differenced,
    # for every label at once; a trailing empty zero run is dropped (as pycocotools' encoder does)
    split = np.searchsorted(owner, np.arange(len(labels) + 1))
    runs = np.diff(split)  # runs per label
    # label i occupies slots [offset_i, offset_i + 2 * runs_i + 2) of ``padded``: 0, its bounds, n
    offsets = 2 * split[:-1] + 2 * np.arange(len(labels))
    padded = np.empty(2 * len(starts) + 2 * len(labels), dtype=np.int64)
    is_bound = np.ones(len(padded), dtype=bool)
    is_bound[offsets] = False
    is_bound[offsets + 2 * runs + 1] = False
    padded[offsets] = 0
    padded[offsets + 2 * runs + 1] = n
    bounds = np.empty(2 * len(starts), dtype=np.int64)
    bounds[0::2] = starts
    bounds[1::2] = ends
    padded[is_bound] = bounds
    counts_all = np.diff(padded).astype(np.uint32)  # differences across two labels are never read
    lengths = 2 * runs + 1
    lengths -= (lengths > 1) & (counts_all[offsets + lengths - 1] == 0)
    uncompressed = [{"size": [h, w], "counts": counts_all[o:o + k]} for o, k in zip(offsets.tolist(), lengths.tolist())]
    # 4. compress (C code in pycocotools)
    rles = mask_utils.frPyObjects(uncompressed, h, w)
    # 5. areas and boxes from the runs: first and last pixel of each run as (column x, row y)
    areas = np.bincount(owner, weights=ends - starts, minlength=len(labels)).astype(np.float64)
    x0, y0 = np.divmod(starts, h)
    x1, y1 = np.divmod(ends - 1, h)
    wraps = x1 > x0
    top = np.where(wraps, 0, np.minimum(y0, y1))
    bottom = np.where(wraps, h - 1, np.maximum(y0, y1))
    boxes = np.zeros((len(labels), 4), np.float32)
    present = runs > 0
    if present.any():
        first = split[:-1][present]
        xs, xe = np.minimum.reduceat(x0, first), np.maximum.reduceat(x1, first)
        ys, ye = np.minimum.reduceat(top, first), np.maximum.reduceat(bottom, first)
        boxes[present] = np.stack([xs, ys, xe - xs + 1, ye - ys + 1], axis=1)
    return ([{"size": [int(h), int(w)], "counts": r["counts"].decode("ascii")} for r in rles], areas, boxes,
            labels)


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (counts str or bytes) -> (H, W) uint8 mask of 0/1."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return mask_utils.decode({"size": [int(s) for s in rle["size"]], "counts": counts})


def _as_coco(rles: list[dict]) -> list[dict]:
    return [
        {"size": [int(s) for s in r["size"]],
         "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"]}
        for r in rles
    ]


def rle_area(rles: list[dict]) -> np.ndarray:
    """Areas in pixels, float64, shape (N,)."""
    if not rles:
        return np.zeros(0, np.float64)
    coco = _as_coco(rles)
    # pycocotools' area() overflows a uint8 for 256+ RLEs in one call (numpy 2): chunk by 255
    return np.concatenate([np.asarray(mask_utils.area(coco[i:i + 255]), dtype=np.float64)
                           for i in range(0, len(coco), 255)])


def rle_bbox_xywh(rles: list[dict]) -> np.ndarray:
    """Boxes [x, y, w, h], float32, shape (N, 4)."""
    if not rles:
        return np.zeros((0, 4), np.float32)
    return np.asarray(mask_utils.toBbox(_as_coco(rles)), dtype=np.float32).reshape(-1, 4)


def box_xyxy_to_xywh(box: np.ndarray) -> np.ndarray:
    box = np.asarray(box, dtype=np.float32)
    out = box.copy()
    out[..., 2:] = box[..., 2:] - box[..., :2]
    return out


def box_xywh_to_xyxy(box: np.ndarray) -> np.ndarray:
    box = np.asarray(box, dtype=np.float32)
    out = box.copy()
    out[..., 2:] = box[..., :2] + box[..., 2:]
    return out


def mask_iou(rles_a: list[dict], rles_b: list[dict]) -> np.ndarray:
    """(len(a), len(b)) IoU matrix of two RLE lists."""
    if not rles_a or not rles_b:
        return np.zeros((len(rles_a), len(rles_b)))
    return np.asarray(mask_utils.iou(_as_coco(rles_a), _as_coco(rles_b), [0] * len(rles_b)))


def category_table(declared: Iterable[dict], annotations: Iterable[dict] = ()) -> list[dict]:
    """A run's COCO categories: the declared ones, then any seen only in annotations.

    Args:
        declared: ``{"id", "name", "labeler"?, "semantic"?}`` entries (the job's ontology, as summary.json
            stores it); entries without an id are skipped; the first name given for an id wins.
        annotations: annotation dicts (``category_id``, ``category``, ``labeler``); a pair not declared
            is added, and a name seen without an id gets the next free id.

    Returns:
        ``[{"id": int, "name": str, "supercategory": str, "labeler": str | None, "semantic": bool}]``
        sorted by id (``supercategory`` is the labeler's name, or "object"). ``category_ids`` gives the
        name -> id map of a table.
    """
    cats: dict[int, dict] = {}

    def add(cid: int, name: str | None, labeler: str | None, semantic: bool = False) -> None:
        cats.setdefault(cid, {"id": cid, "name": str(name or cid), "supercategory": labeler or "object",
                              "labeler": labeler, "semantic": bool(semantic)})

    for c in declared:
        if c.get("id") is not None:
            add(int(c["id"]), c.get("name"), c.get("labeler"), c.get("semantic", False))
    names = {c["name"] for c in cats.values()}
    for a in annotations:
        cid, name = a.get("category_id"), a.get("category")
        if cid is None:
            if name is None or name in names:
                continue
            cid = max(cats, default=0) + 1
        if int(cid) not in cats:
            add(int(cid), name, a.get("labeler"))
            names.add(cats[int(cid)]["name"])
    return [cats[k] for k in sorted(cats)]


def category_ids(table: list[dict]) -> dict[str, int]:
    """name -> id of a ``category_table`` (the lowest id of a name given twice)."""
    out: dict[str, int] = {}
    for c in table:
        out.setdefault(c["name"], c["id"])
    return out
