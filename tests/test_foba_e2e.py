"""foba end to end: demo data through Ray with a tiny random Stable Diffusion, then the COCO export
loaded by pycocotools."""
from __future__ import annotations

import numpy as np



def test_foba_through_ray_on_demo_data(ray_cluster, tiny_sd, tmp_path):
    import pseudolabel
    from pycocotools.coco import COCO

    from pseudolabel.engine.encode import decode_png
    from pseudolabel.jobs.demo_data import generate
    from pseudolabel.jobs.export import export
    from pseudolabel.jobs.labels_io import read_labels
    from pseudolabel.schemas.coco import rle_to_mask

    sd_dir = tiny_sd
    data = tmp_path / "demo"
    generate(str(data), images=3, shards=1, size=64, progress=False)
    job = {
        "name": "foba-demo",
        "input": {"uri": str(data / "images"), "format": "folder"},
        "output": {"uri": str(tmp_path / "out")},
        "labelers": [{"name": "foba", "weights": sd_dir, "dtype": "float32",
                      "ontology": [{"category": "circle", "id": 1}],
                      "params": {"resolution": 64, "attention_steps": 2, "attention_stride": 300,
                                 "inpaint_steps": 2}}],
        "resources": {"actors": 1, "batch_size": 2},
    }
    summary = pseudolabel.run(job, progress=False)
    assert summary
    rows = read_labels(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    n_ann = 0
    for row in rows:
        layers = {layer["name"]: decode_png(layer["png"]) for layer in row["layers"]}
        assert set(layers) == {"background", "foreground_mask"}
        fg = layers["foreground_mask"]
        assert fg.shape == (row["height"], row["width"]) and set(np.unique(fg)) <= {0, 255}
        assert layers["background"].shape == (row["height"], row["width"], 3)
        assert len(row["annotations"]) == (1 if fg.any() else 0)
        for ann in row["annotations"]:
            assert ann["labeler"] == "foba" and ann["category"] == "circle" and ann["category_id"] == 1
            assert np.array_equal(rle_to_mask(ann["segmentation"]).astype(bool), fg > 0)
        n_ann += len(row["annotations"])
    assert n_ann >= 1

    out_json = tmp_path / "coco.json"
    export(str(tmp_path / "out"), "coco", str(out_json))
    coco = COCO(str(out_json))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) == n_ann
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle"]
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(ann).sum() == ann["area"] > 0
