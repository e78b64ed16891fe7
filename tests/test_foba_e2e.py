"""foba end to end through Ray: fine-tuning and segmentation-network training on demo data, then jobs
that load both SD checkpoints (attention + inpainting) and the trained network through the real loading
path; the COCO export is read back with pycocotools. A missing inpainting checkpoint stops the job on the
driver."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"resolution": 64, "attention_steps": 2, "attention_stride": 300, "inpaint_steps": 2}


def _job(data, out, params):
    return {
        "name": "foba-demo",
        "input": {"uri": str(data / "images"), "format": "folder"},
        "output": {"uri": str(out)},
        "labelers": [{"name": "foba", "weights": params.pop("weights"), "dtype": "float32",
                      "ontology": [{"category": "circle", "id": 1}], "params": params}],
        "resources": {"actors": 1, "batch_size": 2},
    }


def _check_run(out, layers):
    from pseudolabel.imageio import decode_png
    from pseudolabel.jobs.outputs.labels_io import read_labels
    from pseudolabel.schemas.coco import rle_to_mask

    rows = read_labels(str(out)).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    n_ann = 0
    for row in rows:
        decoded = {layer["name"]: decode_png(layer["png"]) for layer in row["layers"]}
        assert set(decoded) == set(layers)
        fg = decoded["foreground_mask"]
        assert fg.shape == (row["height"], row["width"]) and set(np.unique(fg)) <= {0, 255}
        if "background" in decoded:
            assert decoded["background"].shape == (row["height"], row["width"], 3)
        assert len(row["annotations"]) == (1 if fg.any() else 0)
        for ann in row["annotations"]:
            assert ann["labeler"] == "foba" and ann["category"] == "circle" and ann["category_id"] == 1
            assert np.array_equal(rle_to_mask(ann["segmentation"]).astype(bool), fg > 0)
        n_ann += len(row["annotations"])
    return n_ann


def test_foba_training_and_labeling_through_ray(ray_cluster, tiny_sd, tmp_path):
    from pycocotools.coco import COCO

    import pseudolabel
    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.jobs.outputs.export import export
    from pseudolabel.jobs.training.foba import train_foba

    data = tmp_path / "demo"
    generate(str(data), images=3, shards=1, size=64, progress=False)
    # 1. fine-tuning (preliminary masks of the base model) -> the inpainting checkpoint
    ft = tmp_path / "ft"
    train_foba({"weights": tiny_sd, "data": str(data / "images"), "output": str(ft), "category": "circle",
                "resolution": 64, "steps": 2, "batch_size": 2,
                "preliminary_params": {k: v for k, v in FAST.items() if k != "resolution"}})
    # 2. the diffusion path through Ray: attention from the base model, inpainting with the fine-tuned one
    summary = pseudolabel.run(_job(data, tmp_path / "out1", {**FAST, "weights": tiny_sd,
                                                              "inpaint_weights": str(ft)}), progress=False)
    assert summary
    n_ann = _check_run(tmp_path / "out1", ("background", "foreground_mask"))
    # 3. the segmentation network on the refined masks, then the job that labels with it
    seg = tmp_path / "seg"
    train_foba({"stage": "segmentation", "weights": tiny_sd, "inpaint_weights": str(ft), "category": "circle",
                "data": str(data / "images"), "output": str(seg), "resolution": 64,
                "labeler_params": {k: v for k, v in FAST.items() if k != "resolution"},
                "seg_resolution": 32, "seg_steps": 2, "seg_batch_size": 3, "seg_width": 2})
    pseudolabel.run(_job(data, tmp_path / "out2", {"weights": tiny_sd, "segmentation_weights": str(seg)}),
                    progress=False)
    _check_run(tmp_path / "out2", ("foreground_mask",))

    out_json = tmp_path / "coco.json"
    export(str(tmp_path / "out1"), "coco", str(out_json))
    coco = COCO(str(out_json))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) == n_ann
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle"]
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(ann).sum() == ann["area"] > 0


def test_missing_inpainting_checkpoint_stops_the_job_on_the_driver(tiny_sd, tmp_path):
    import pseudolabel
    from pseudolabel.engine.errors import WeightsError
    from pseudolabel.jobs.demo.data import generate

    data = tmp_path / "demo"
    generate(str(data), images=1, shards=1, size=64, progress=False)
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(WeightsError, match=r"labelers\.0 \(foba\) weights: .*no-such-checkpoint does not exist"):
        pseudolabel.run(_job(data, tmp_path / "out", {**FAST, "weights": tiny_sd, "inpaint_weights": missing}),
                        progress=False)
