"""train-directsam: contour labels, a few steps on demo data lower the loss, the result loads as a labeler."""
from __future__ import annotations

import numpy as np
import pytest

from pseudolabel.jobs.training.directsam import boundary_label, masks_to_segments, train_directsam
from pseudolabel.schemas.spec import LabelerSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_boundary_label_draws_3px_contours_of_every_segment():
    masks = np.zeros((2, 40, 50), bool)
    masks[0, 10:30, 10:30] = True   # a square
    masks[1, 13:22, 13:22] = True   # a smaller square on top of it
    seg = masks_to_segments(masks)
    assert seg[17, 17] == 2 and seg[12, 12] == 1 and seg[0, 0] == 0
    lab = boundary_label(seg, 3)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1}
    # the big square's outline (x = 10 column) drawn by cv2 with thickness 3: a band centred on x = 10
    assert lab[25, 8:13].all() and not lab[25, 7] and not lab[25, 13]
    # the small square's outline, the interior of both squares untouched
    assert lab[17, 13] and lab[17, 21]
    assert not lab[17, 17] and not lab[25, 20]
    # the background segment touches the image edge: the frame is boundary too (as in the reference)
    assert lab[0, 25] and lab[20, 0] and not lab[3, 25]
    # thickness 1
    assert boundary_label(seg, 1)[25, 10] and not boundary_label(seg, 1)[25, 9]


def test_train_few_steps_lowers_loss_and_loads_as_labeler(tmp_path, monkeypatch):
    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.models.directsam import DirectSAM

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    demo = str(tmp_path / "demo")
    generate(demo, images=4, shards=1, size=64, progress=False)
    out = str(tmp_path / "ft")
    result = train_directsam({"data": demo, "model_size": "tiny", "output": out, "resolution": 64,
                              "steps": 30, "lr": 3e-3, "batch_size": 4, "log_every": 100})
    losses = result["losses"]
    assert result["images"] == 4 and len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])

    lab = DirectSAM(LabelerSpec(name="directsam", weights=out), device="cpu")
    assert lab.resolution == 64
    img = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    tok = lab([img])[0].tokens
    assert tok.label_map.shape == (64, 80) and tok.label_map.max() >= 1

    # training continues from the saved weights (same architecture, num_labels=1)
    again = train_directsam({"data": demo, "weights": out, "output": str(tmp_path / "ft2"), "resolution": 64,
                             "steps": 2, "lr": 1e-4, "batch_size": 2, "log_every": 100})
    assert abs(again["losses"][0] - np.mean(losses[-5:])) < 0.5 * np.mean(losses[:5])


def test_training_data_is_uint8_and_its_cache_bounded(demo_root):
    import torch

    from pseudolabel.jobs.training.directsam import CocoBoundaryData, TrainSpec

    spec = TrainSpec(data=demo_root, output="unused", resolution=48, cache_examples=3, limit=8)
    data = CocoBoundaryData(spec)
    assert len(data) == 8
    first_pixels, first_labels = data.batch([0, 1])
    assert first_pixels.shape == (2, 3, 48, 48) and first_pixels.dtype == torch.uint8
    assert first_labels.shape == (2, 48, 48) and first_labels.dtype == torch.uint8
    assert set(torch.unique(first_labels).tolist()) == {0, 1}
    for start in range(0, 8, 2):  # every image once, then again in another order
        data.batch([start, start + 1, start])
        assert len(data._cache) <= 3
    for i in (7, 0, 5, 5, 2):
        data.example(i)
        assert len(data._cache) <= 3
    assert list(data._cache) == [0, 5, 2]  # least recently used dropped first
    # what comes back does not depend on the cache
    again = CocoBoundaryData(spec.model_copy(update={"cache_examples": 0}))
    pixels, labels = again.batch([0, 1])
    assert torch.equal(pixels, first_pixels) and torch.equal(labels, first_labels)
    assert len(again._cache) == 0


def test_train_from_the_coco_export_of_a_webdataset_run(ray_cluster, tmp_path, monkeypatch):
    """COCO file names of a WebDataset run are "<shard>.tar/<member>": training reads the tar members."""
    import io
    import json
    import tarfile

    import torch
    from PIL import Image

    import pseudolabel
    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.jobs.outputs.export import export
    from pseudolabel.jobs.training.directsam import CocoBoundaryData, TrainSpec
    from pseudolabel.models.directsam_pyramid import resize_uint8

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    demo = str(tmp_path / "demo")
    generate(demo, images=4, shards=2, size=64, layout="webdataset", progress=False)
    out = str(tmp_path / "run")
    pseudolabel.run({"input": {"uri": f"{demo}/images", "format": "webdataset"}, "output": {"uri": out},
                     "labelers": [{"name": "classical_grabcut", "ontology": [{"category": "shape"}]}],
                     "resources": {"actors": 1, "cpus_per_actor": 0.25, "batch_size": 4}}, progress=False)
    coco_json = str(tmp_path / "coco.json")
    assert export(out, "coco", coco_json)["images"] == 4
    coco = json.loads(open(coco_json).read())
    assert all(".tar/" in img["file_name"] for img in coco["images"]) and coco["annotations"]

    spec = {"data": f"{demo}/images", "coco_json": coco_json, "model_size": "tiny", "output": str(tmp_path / "ft"),
            "resolution": 32, "steps": 2, "batch_size": 2, "log_every": 100}
    result = train_directsam(spec)
    assert result["images"] == 4 and len(result["losses"]) == 2 and np.isfinite(result["losses"]).all()
    assert (tmp_path / "ft" / "config.json").exists()
    # the pixels trained on are the tar member's
    data = CocoBoundaryData(TrainSpec(**spec))
    shard, member = coco["images"][0]["file_name"].split("/", 1)
    with tarfile.open(f"{demo}/images/{shard}") as tar:
        rgb = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
    images = sorted(coco["images"], key=lambda im: im["id"])
    i = [im["file_name"] for im in images].index(coco["images"][0]["file_name"])
    expected = resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1)[None], 32)[0].to(torch.uint8)
    assert torch.equal(data.example(i)[0], expected)
    assert data._tar_index  # members fetched by ranged reads from an index of the shard's headers


def test_split_file_name_finds_tar_and_parquet_containers():
    from pseudolabel.jobs.training.directsam import split_file_name

    assert split_file_name("a/shard-0.tar/x/000.png") == ("a/shard-0.tar", "x/000.png")
    assert split_file_name("p.parquet/row:3") == ("p.parquet", "row:3")
    assert split_file_name("d/p.parquet/img.png") == ("d/p.parquet/img.png", None)
    assert split_file_name("00000/img.png") == ("00000/img.png", None)
    assert split_file_name("x.tar") == ("x.tar", None)


def test_every_coco_segmentation_form_gives_the_same_label(tmp_path):
    """Polygons, uncompressed RLE and compressed RLE of the same shapes rasterise to the same label."""
    import json

    import cv2
    import torch
    from pycocotools import mask as mask_utils

    from pseudolabel.jobs.training.directsam import CocoBoundaryData, TrainSpec

    h, w = 40, 60
    cv2.imwrite(str(tmp_path / "a.png"), np.full((h, w, 3), 128, np.uint8))
    square = np.zeros((h, w), np.uint8)
    square[8:24, 10:30] = 1
    bar = np.zeros((h, w), np.uint8)
    bar[28:36, 5:55] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    compressed["counts"] = compressed["counts"].decode()
    flat = bar.flatten(order="F")
    runs, value, n = [], 0, 0
    for v in flat:  # uncompressed RLE: alternating run lengths starting with zeros
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    forms = {
        "polygon": [{"segmentation": [[10, 8, 30, 8, 30, 24, 10, 24]]},
                    {"segmentation": [[5, 28, 55, 28, 55, 36, 5, 36]]}],
        "rle": [{"segmentation": compressed}, {"segmentation": {"size": [h, w], "counts": runs}}],
    }
    labels = {}
    for name, anns in forms.items():
        coco = {"images": [{"id": 1, "file_name": "a.png"}],
                "annotations": [dict(a, id=i + 1, image_id=1, category_id=1) for i, a in enumerate(anns)],
                "categories": [{"id": 1, "name": "thing"}]}
        (tmp_path / f"{name}.json").write_text(json.dumps(coco))
        spec = TrainSpec(data=str(tmp_path), coco_json=str(tmp_path / f"{name}.json"), output="unused",
                         resolution=w, cache_examples=0)
        labels[name] = CocoBoundaryData(spec).example(0)[1]
    expected = boundary_label(masks_to_segments(np.stack([square, bar]).astype(bool)), 3)
    expected = torch.from_numpy(cv2.resize(expected, (w, w), interpolation=cv2.INTER_NEAREST))
    assert int(expected.sum()) > 0
    # polygons rasterise their corners inclusively: compare with a one-pixel tolerance on the contours
    assert torch.equal(labels["rle"], expected)
    assert (labels["polygon"] != expected).float().mean() < 0.05
