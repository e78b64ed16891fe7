"""Encode labeler outputs into `labels` table records: masks -> COCO RLE, layers -> PNG bytes."""
from __future__ import annotations

import numpy as np

from pseudolabel.imageio import decode_png, encode_png  # noqa: F401  (decode_png: for readers of layers)
from pseudolabel.models.base import LabelOutput
from pseudolabel.schemas.coco import label_map_regions, masks_to_rles, rle_area, rle_bbox_xywh


def encode_output(out: LabelOutput, labeler: str, height: int, width: int, first_id: int = 1) -> dict:
    """One labeler's output for one image -> {"annotations": [...], "subobjects": [...], "layers": [...]}.

    Masks must be (height, width); empty instance masks are dropped. Annotation ids count up from
    ``first_id`` so several labelers on one image never share an id.
    """
    annotations = []
    instances = [inst for inst in out.instances if inst.mask.any()]
    for inst in instances:
        if inst.mask.shape != (height, width):
            raise ValueError(f"{labeler}: mask shape {inst.mask.shape} != image shape {(height, width)}")
    if instances:
        rles = masks_to_rles(np.stack([inst.mask for inst in instances]))
        areas, boxes = rle_area(rles), rle_bbox_xywh(rles)
        for k, (inst, rle) in enumerate(zip(instances, rles)):
            annotations.append({
                "id": first_id + k, "category_id": int(inst.category_id), "category": inst.category,
                "segmentation": rle, "bbox": boxes[k].tolist(), "area": float(areas[k]),
                "score": float(inst.score), "iscrowd": 0, "labeler": labeler, "prompt": inst.prompt,
            })
    subobjects = []
    if out.tokens is not None:
        label_map = out.tokens.label_map
        if label_map.shape != (height, width):
            raise ValueError(f"{labeler}: token map shape {label_map.shape} != image shape {(height, width)}")
        count = int(label_map.max()) if label_map.size else 0
        if count:
            rles, areas, boxes, labels = label_map_regions(label_map, np.arange(1, count + 1))
            scores = out.tokens.boundary_score
            emb = out.tokens.embeddings
            for k in range(count):
                if areas[k] == 0:
                    continue
                subobjects.append({
                    "id": int(labels[k]), "segmentation": rles[k], "bbox": boxes[k].tolist(),
                    "area": float(areas[k]),
                    "boundary_score": float(scores[k]) if scores is not None else None,
                    "labeler": labeler,
                    "embedding": emb[k].astype(np.float32).tolist() if emb is not None else None,
                })
    layers = [{"name": name, "labeler": labeler, "png": encode_png(img)} for name, img in out.layers.items()]
    return {"annotations": annotations, "subobjects": subobjects, "layers": layers}
