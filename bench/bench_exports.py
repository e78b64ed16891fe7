"""Throughput of the jobs that read a finished run: read_labels, export (coco, coco-results, panoptic),
evaluate (instances, tokens, semantic) and report.

Builds a run by hand from demo data (no model, no Ray): for every demo image the labels row holds its
ground-truth masks as annotations and a partition of the image into tokens (GT segments cut by a
``--cell`` px grid, so a 256 px image carries a few hundred tokens), then times each job and prints
one table.

    python bench/bench_exports.py [--images 200] [--size 256] [--cell 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def build_run(root: str, images: int, size: int, cell: int) -> tuple[str, str]:
    """Demo data + a labels table derived from its GT; returns (output_uri, gt_json)."""
    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.schemas.coco import label_map_to_rles, rle_area, rle_bbox_xywh, rle_to_mask
    from pseudolabel.schemas.tables import LABELS_SCHEMA

    data = os.path.join(root, "demo")
    generate(data, images=images, shards=2, seed=0, size=size, progress=False)
    gt_path = os.path.join(data, "annotations", "instances.json")
    gt = json.load(open(gt_path))
    anns_of: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    rows = []
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        anns, seg_map = [], np.zeros((h, w), np.int64)
        for k, a in enumerate(anns_of.get(img["id"], []), start=1):
            m = rle_to_mask(a["segmentation"]).astype(bool)
            seg_map[m] = k
            anns.append({"id": k, "category_id": a["category_id"], "category": names[a["category_id"]],
                         "segmentation": a["segmentation"], "bbox": a["bbox"], "area": a["area"],
                         "score": 0.9, "iscrowd": 0, "labeler": "gt", "prompt": None})
        yy, xx = np.mgrid[0:h, 0:w]
        grid = (yy // cell) * ((w + cell - 1) // cell) + xx // cell
        tokens_map = seg_map * (grid.max() + 1) + grid + 1
        rles, _ = label_map_to_rles(tokens_map)
        areas, boxes = rle_area(rles), rle_bbox_xywh(rles)
        toks = [{"id": i + 1, "segmentation": r, "bbox": b.tolist(), "area": float(a), "boundary_score": 0.5,
                 "labeler": "grid", "embedding": None} for i, (r, a, b) in enumerate(zip(rles, areas, boxes))]
        rows.append({"image_id": str(img["id"]), "uri": os.path.join(data, "images", img["file_name"]),
                     "member": None, "file_name": img["file_name"], "width": w, "height": h, "status": "ok",
                     "error": None, "annotations": anns, "subobjects": toks, "layers": [], "provenance": None})
    out = os.path.join(root, "run")
    os.makedirs(os.path.join(out, "labels"))
    for part in range(2):
        pq.write_table(pa.Table.from_pylist(rows[part::2], schema=LABELS_SCHEMA),
                       os.path.join(out, "labels", f"part-{part:05d}.parquet"))
    cats = [{"id": c["id"], "name": c["name"], "labeler": "gt"} for c in gt["categories"]]
    json.dump({"run_id": "bench", "images": images, "ok": images, "error": 0, "seconds": 0.0,
               "images_per_s": 0.0, "output_uri": out, "categories": cats, "labelers": ["gt"]},
              open(os.path.join(out, "summary.json"), "w"))
    return out, gt_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--cell", type=int, default=16)
    args = ap.parse_args()

    from pseudolabel.jobs.evaluation.evaluate import evaluate
    from pseudolabel.jobs.outputs.export import export
    from pseudolabel.jobs.outputs.labels_io import read_labels
    from pseudolabel.jobs.outputs.report import report

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        out, gt = build_run(root, args.images, args.size, args.cell)
        build_s = time.perf_counter() - t0
        table = read_labels(out, columns=["subobjects"])
        tokens = sum(len(t) for t in table.column("subobjects").to_pylist())
        jobs = [
            ("read_labels (all columns)", lambda: read_labels(out)),
            ("export coco", lambda: export(out, "coco", os.path.join(root, "coco.json"))),
            ("export coco-results", lambda: export(out, "coco-results", os.path.join(root, "res.json"),
                                                   gt_json=os.path.join(root, "coco.json"))),
            ("export panoptic", lambda: export(out, "panoptic", os.path.join(root, "pan", "panoptic.json"))),
            ("evaluate instances", lambda: evaluate(out, gt)),
            ("evaluate tokens", lambda: evaluate(out, gt, task="tokens")),
            ("evaluate semantic", lambda: evaluate(out, gt, task="semantic")),
            ("report (24 samples)", lambda: report(out, os.path.join(root, "report"))),
        ]
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"python {platform.python_version()}")
        print(f"run: {args.images} images of {args.size}x{args.size}, {tokens} tokens "
              f"({tokens / args.images:.0f}/image); built in {build_s:.1f}s")
        print(f"{'job':<28}{'seconds':>10}{'images/s':>12}")
        for name, fn in jobs:
            t = time.perf_counter()
            res = fn()
            dt = time.perf_counter() - t
            n = 24 if name.startswith("report") else args.images
            print(f"{name:<28}{dt:>10.2f}{n / dt:>12.1f}")
            if name == "evaluate instances":
                assert res["AP"] > 0.99, res  # the run is the GT itself
            if name == "evaluate tokens":
                assert res["asa"] > 0.999, res


if __name__ == "__main__":
    main()
