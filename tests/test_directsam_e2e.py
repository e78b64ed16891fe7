"""directsam end to end: demo data through Ray with a tiny random Segformer (and a tiny DINOv2 for token
embeddings), tokens in the labels table, the panoptic export round-trips to the same masks, and the
uint16 boundary layer is stored."""
from __future__ import annotations

import numpy as np
import pytest
from directsam_tiny import save_tiny_segformer, tiny_dinov2


def test_directsam_through_ray_on_demo_data(ray_cluster, tmp_path, monkeypatch):
    from pycocotools import mask as mask_utils

    import pseudolabel
    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.jobs.outputs.export import export, read_panoptic
    from pseudolabel.jobs.outputs.labels_io import read_labels
    from pseudolabel.models.directsam import DirectSAM
    from pseudolabel.schemas.coco import rle_to_mask
    from pseudolabel.schemas.spec import LabelerSpec

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_segformer(str(tmp_path / "tiny"), resolution=64)
    dino = tiny_dinov2(str(tmp_path / "dino"), hidden_size=16, image_size=56)
    data = tmp_path / "demo"
    generate(str(data), images=3, shards=1, size=64, progress=False)

    # the random network is uncalibrated: threshold at the median of its maps on this data
    import cv2

    from pseudolabel.storage import filesystem

    fs, root = filesystem(str(data / "images"))
    imgs = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in sorted(fs.find(root)) if p.endswith(".png")]
    probe = DirectSAM(LabelerSpec(name="directsam", weights=model_dir), device="cpu")
    thr = float(np.median(np.concatenate([m.numpy().ravel() for m in probe.boundary_maps(imgs)])))

    job = {
        "name": "directsam-demo",
        "input": {"uri": str(data / "images"), "format": "folder"},
        "output": {"uri": str(tmp_path / "out")},
        "labelers": [{"name": "directsam", "weights": model_dir, "dtype": "float32",
                      "params": {"threshold": thr, "mode": "partition", "pyramid_layers": 1, "max_tokens": 64,
                                 "save_boundary": True, "embedding_weights": dino, "embedding_resolution": 56}}],
        "resources": {"actors": 1, "batch_size": 2},
    }
    summary = pseudolabel.run(job, progress=False)
    assert summary
    rows = read_labels(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    tokens_by_id = {}
    for row in rows:
        toks = row["subobjects"]
        assert 1 <= len(toks) <= 64
        masks = np.stack([rle_to_mask(t["segmentation"]).astype(bool) for t in toks])
        assert masks.shape[1:] == (row["height"], row["width"])
        assert (masks.sum(0) == 1).all()  # partition: every pixel in exactly one token
        assert [t["area"] for t in toks] == sorted((t["area"] for t in toks), reverse=True)
        assert all(0 <= t["boundary_score"] <= 1 for t in toks)
        # embedding = 16 pooled DINOv2 channels + the box [x0/W, y0/H, x1/W, y1/H]; bbox = the RLE's box
        h, w = row["height"], row["width"]
        for t in toks:
            rle = {"size": t["segmentation"]["size"], "counts": t["segmentation"]["counts"].encode()}
            x, y, bw, bh = mask_utils.toBbox(rle).tolist()
            assert t["bbox"] == [x, y, bw, bh]
            assert len(t["embedding"]) == 16 + 4
            assert t["embedding"][-4:] == pytest.approx([x / w, y / h, (x + bw) / w, (y + bh) / h], rel=1e-6)
        tokens_by_id[row["image_id"]] = masks

    out_json = tmp_path / "panoptic.json"
    result = export(str(tmp_path / "out"), "panoptic", str(out_json))
    assert result["images"] == 3 and result["dropped_tokens"] == 0
    pan = read_panoptic(str(out_json))
    assert len(pan) == 3
    for entry in pan.values():
        key = entry["image"].get("image_key", str(entry["image"]["id"]))
        expected = tokens_by_id[key]
        got = entry["masks"]
        assert got.shape == expected.shape
        # same set of masks (order may be renumbered by the export)
        assert sorted(m.tobytes() for m in got) == sorted(m.tobytes() for m in expected)

    # the boundary layer went into the table as 16-bit PNG
    from pseudolabel.imageio import decode_png

    layers = [layer for row in rows for layer in row["layers"] if layer["name"] == "boundary"]
    assert len(layers) == 3 and all(decode_png(layer["png"]).dtype == np.uint16 for layer in layers)
