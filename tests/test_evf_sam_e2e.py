"""evf_sam end to end: demo data through Ray with a random-weight checkpoint and a 3-class ontology;
the labels carry exactly the ontology's categories, and the COCO exports load in pycocotools."""
from __future__ import annotations

import json

import numpy as np

ONTOLOGY = [
    {"category": "circle", "prompts": ["circle", "a round shape"]},
    {"category": "square", "id": 5},
    {"category": "triangle", "prompts": ["triangle"]},
]


def test_evf_sam_through_ray_on_demo_data(ray_cluster, tmp_path):
    from pycocotools.coco import COCO

    import pseudolabel
    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.jobs.outputs.export import export
    from pseudolabel.jobs.outputs.labels_io import read_labels
    from pseudolabel.models.evf_sam.random_checkpoint import write_random_checkpoint
    from pseudolabel.schemas.coco import rle_to_mask

    weights = tmp_path / "evf-sam2"
    write_random_checkpoint(weights, "sam2", seed=3)
    data = tmp_path / "demo"
    generate(str(data), images=4, shards=2, size=96, progress=False)
    out = tmp_path / "out"
    job = {
        "name": "evf-demo",
        "input": {"uri": str(data / "images"), "format": "folder"},
        "output": {"uri": str(out)},
        "labelers": [{"name": "evf_sam", "weights": str(weights), "dtype": "float32", "ontology": ONTOLOGY,
                      "params": {"score_threshold": 0.0}}],
        "resources": {"actors": 1, "batch_size": 2},
    }
    assert pseudolabel.run(job, progress=False)

    # 1. labels: every annotation's category comes from the ontology, with its id and the prompt used
    expected = {("circle", 1): {"circle", "a round shape"}, ("square", 5): {"square"}, ("triangle", 2): {"triangle"}}
    rows = read_labels(str(out)).to_pylist()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    n_ann = 0
    for row in rows:
        for ann in row["annotations"]:
            key = (ann["category"], ann["category_id"])
            assert key in expected and ann["prompt"] in expected[key]
            assert ann["labeler"] == "evf_sam" and 0.0 <= ann["score"] <= 1.0
            mask = rle_to_mask(ann["segmentation"])
            assert mask.shape == (row["height"], row["width"]) and mask.any()
        n_ann += len(row["annotations"])
    assert n_ann >= 1

    # 2. COCO instances export: categories exactly the ontology's
    inst = tmp_path / "coco.json"
    export(str(out), "coco", str(inst))
    coco = COCO(str(inst))
    assert len(coco.getImgIds()) == 4 and len(coco.getAnnIds()) == n_ann
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert cats == {1: "circle", 5: "square", 2: "triangle"}
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(ann).sum() == ann["area"] > 0

    # 3. COCO results export, against the run's own instances file as the ground truth, loads against it
    res = tmp_path / "results.json"
    export(str(out), "coco-results", str(res), gt_json=str(inst))
    results = json.loads(res.read_text())
    assert len(results) == n_ann and all("bbox" not in r for r in results)
    loaded = coco.loadRes(str(res))
    assert len(loaded.getAnnIds()) == n_ann
    assert {a["category_id"] for a in loaded.loadAnns(loaded.getAnnIds())} <= set(cats)
    assert np.isfinite([a["score"] for a in results]).all()


def test_evf_sam_on_a_coco_input_prompts_each_image_with_its_own_categories(ray_cluster, tmp_path):
    """A COCO input gives every row its ground-truth categories: each image is prompted with the ontology
    entries it holds only, so no annotation names a category its image does not have."""
    import pseudolabel
    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.jobs.outputs.labels_io import read_labels
    from pseudolabel.models.evf_sam.random_checkpoint import write_random_checkpoint

    weights = tmp_path / "evf-sam2"
    write_random_checkpoint(weights, "sam2", seed=3)
    data = tmp_path / "demo"
    generate(str(data), images=6, shards=1, size=96, seed=2, progress=False)
    gt = json.loads((data / "annotations" / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    present = {im["file_name"]: set() for im in gt["images"]}
    by_id = {im["id"]: im["file_name"] for im in gt["images"]}
    for ann in gt["annotations"]:
        present[by_id[ann["image_id"]]].add(names[ann["category_id"]])
    out = tmp_path / "out"
    job = {"input": {"uri": str(data / "images"), "format": "coco",
                     "coco_json": str(data / "annotations" / "instances.json")},
           "output": {"uri": str(out)},
           "labelers": [{"name": "evf_sam", "weights": str(weights), "dtype": "float32", "ontology": ONTOLOGY}],
           "resources": {"actors": 1, "batch_size": 3}}
    assert pseudolabel.run(job, progress=False)["labelled"] == 6
    rows = read_labels(str(out)).to_pylist()
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    n_ann = 0
    for row in rows:
        got = {a["category"] for a in row["annotations"]}
        assert got <= present[row["file_name"]] & {e["category"] for e in ONTOLOGY}, (row["file_name"], got)
        n_ann += len(row["annotations"])
    assert n_ann >= 1
