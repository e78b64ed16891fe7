"""``incontext`` (seggpt+inpaint, tiny random SegGPT) end to end through Ray on demo data with watermarks."""
from __future__ import annotations

import json

import numpy as np
from test_incontext_seggpt import _queries, calibrated_threshold, save_tiny_seggpt, watermark_pair


def test_incontext_through_ray_on_watermarked_demo_data(ray_cluster, tmp_path, monkeypatch):
    import cv2

    import pseudolabel
    from pseudolabel.imageio import decode_png
    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.jobs.outputs.labels_io import read_labels
    from pseudolabel.models.incontext.component import decode_query
    from pseudolabel.schemas.coco import rle_to_mask

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_seggpt(str(tmp_path / "seggpt"))
    demo_in, demo_out = watermark_pair(tmp_path)
    data = tmp_path / "demo"
    gen = generate(str(data), images=3, shards=1, size=64, seed=1, progress=False)
    # the data must hold what the demonstration shows: seed 1 puts a watermark on every image
    assert gen["images"] == 3 and gen["images_with_watermark"] == 3, gen
    components = json.loads(open(gen["components_json"]).read())["images"]
    marked = {c["file_name"] for c in components if "watermark" in c["components"]}
    assert len(marked) == 3
    assert all(m["area"] > 0 for c in components for m in c["masks"] if m["type"] == "watermark")
    thr = calibrated_threshold(model_dir, demo_in, demo_out, _queries(3))

    job = {
        "name": "incontext-demo",
        "input": {"uri": str(data / "images"), "format": "folder"},
        "output": {"uri": str(tmp_path / "out")},
        "labelers": [{"name": "incontext", "weights": model_dir, "dtype": "float32",
                      "params": {"backend": "seggpt+inpaint", "demo_in": demo_in, "demo_out": demo_out,
                                 "fg_threshold": thr, "min_area": 4},
                      "ontology": [{"category": "watermark"}]}],
        "resources": {"actors": 1, "batch_size": 2},
    }
    summary = pseudolabel.run(job, progress=False)
    assert summary
    rows = read_labels(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert {f for f in marked if any(r["uri"].endswith(f) for r in rows)} == marked  # every marked image labelled
    separated = 0
    for row in rows:
        query = cv2.cvtColor(cv2.imread(row["uri"]), cv2.COLOR_BGR2RGB)
        layers = {layer["name"]: decode_png(layer["png"]) for layer in row["layers"]}
        assert set(layers) == {"clean", "component"}
        clean, comp = layers["clean"], layers["component"]
        assert clean.shape == comp.shape == query.shape and clean.dtype == np.uint8
        np.testing.assert_array_equal(decode_query(clean, comp), query)  # component + clean == query
        for ann in row["annotations"]:
            assert ann["category"] == "watermark" and ann["labeler"] == "incontext"
            mask = rle_to_mask(ann["segmentation"]).astype(bool)
            assert mask.shape == query.shape[:2] and mask.sum() == ann["area"]
            separated += 1
            assert not np.array_equal(clean, query)
    assert separated >= 1
