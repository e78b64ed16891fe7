"""The YOLO, mask-PNG and Label Studio exports, the score filters and the ``export`` command's options.

YOLO has no consumer library here (its trainer pulls torchvision): its files are parsed and the
polygons rasterised back with ``cv2.fillPoly``. Label Studio's brush RLE is decoded with
``label_studio_converter``'s own decoder.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest
import yaml
from labels_fixtures import CATEGORIES, GT_SHAPES, H, W, label_rows, render_image, shape_masks, write_rows, write_run

from pseudolabel import storage as st
from pseudolabel.errors import UsageError
from pseudolabel.jobs.outputs.export import EXPORTERS, ExportError, export, score_thresholds_from_job
from pseudolabel.jobs.outputs.export_formats import (
    image_stems,
    ls_brush_rle,
    outer_polygons,
    parse_split,
    read_yolo_labels,
    split_of,
)
from pseudolabel.schemas.coco import mask_to_rle, rle_to_mask

N_ANN = sum(len(s) for s in GT_SHAPES)
STEMS = {1: "img_1", 2: "img_2", 3: "img_3"}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _fill(polys_xy: list[np.ndarray], shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.fillPoly(m, [np.round(p).astype(np.int32) for p in polys_xy], 1)
    return m.astype(bool)


def _read_png(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


# ---------------------------------------------------------------- registry

def test_registry_drives_the_cli_choices():
    from pseudolabel.cli import build_parser
    from pseudolabel.engine.errors import UserError

    assert issubclass(ExportError, UsageError) and issubclass(ExportError, UserError)

    assert list(EXPORTERS) == ["coco", "coco-results", "panoptic", "yolo", "masks", "label-studio"]
    parser = build_parser()
    for fmt in EXPORTERS:
        assert parser.parse_args(["export", "r", "--format", fmt, "--out", "x"]).format == fmt
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "r", "--format", "voc-xml", "--out", "x"])


# ---------------------------------------------------------------- yolo

def test_yolo_files_parse_and_polygons_rasterise_back(tmp_path):
    out = write_run(tmp_path / "run")
    root = tmp_path / "yolo"
    info = export(out, "yolo", str(root))
    assert (info["images"], info["annotations"], info["errors"], info["classes"]) == (3, N_ANN, 1, 3)
    assert (info["images_linked"], info["images_copied"], info["images_missing"]) == (2, 1, 0)
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert data == {"path": str(root), "train": "images", "val": "images",
                    "names": {0: "box", 1: "disc", 2: "wedge"}}
    for i, stem in STEMS.items():
        lines = read_yolo_labels((root / "labels" / f"{stem}.txt").read_text())
        assert len(lines) == len(GT_SHAPES[i - 1])  # every fixture shape is in one piece
        for (cls, xy), (cat, _), mask in zip(lines, GT_SHAPES[i - 1], shape_masks(i)):
            assert cls == cat - 1 and xy.shape[1] == 2 and len(xy) >= 3
            assert ((xy >= 0) & (xy <= 1)).all()
            back = _fill([xy * [W, H]])
            assert _iou(back, mask) > 0.9
        img = cv2.imread(str(root / "images" / f"{stem}.png"))[..., ::-1]
        assert np.array_equal(img, render_image(i))
    # local source files are linked, the tar member is written out
    assert os.path.islink(root / "images" / "img_1.png") and not os.path.islink(root / "images" / "img_3.png")
    assert os.readlink(root / "images" / "img_1.png") == str(tmp_path / "run" / "source" / "a" / "img_1.png")
    # exporting again over the same folder works (links replaced, copies rewritten)
    again = export(out, "yolo", str(root), images="copy")
    assert again["images_copied"] == 3 and not os.path.islink(root / "images" / "img_1.png")
    assert os.path.exists(tmp_path / "run" / "source" / "a" / "img_1.png")


def test_yolo_multi_part_instance_gives_one_line_per_outer_contour(tmp_path):
    rows = label_rows()[:1]
    m = np.zeros((H, W), bool)
    m[5:15, 5:15] = True
    m[30:50, 40:70] = True
    m[35:45, 50:60] = False  # a hole: not kept
    m[60, 2] = True  # a one-pixel speck
    rows[0]["annotations"] = [dict(rows[0]["annotations"][0], segmentation=mask_to_rle(m))]
    out = write_rows(tmp_path / "run", rows)
    info = export(out, "yolo", str(tmp_path / "yolo"), images="none")
    assert info["polygons"] == 3 and info["images_copied"] == info["images_linked"] == 0
    lines = read_yolo_labels((tmp_path / "yolo" / "labels" / "img_1.txt").read_text())
    assert [c for c, _ in lines] == [0, 0, 0]
    back = _fill([xy * [W, H] for _, xy in lines])
    filled = m.copy()
    filled[35:45, 50:60] = True
    assert np.array_equal(back, filled)
    assert not (tmp_path / "yolo" / "images").exists()


def test_outer_polygons_of_thin_shapes():
    for mask in (np.eye(6, dtype=bool), np.pad(np.ones((1, 5), bool), 2), np.pad(np.ones((1, 1), bool), 3)):
        polys = outer_polygons(mask)
        assert all(len(p) >= 3 for p in polys)
        assert np.array_equal(_fill(polys, mask.shape), mask)


def test_yolo_split_is_stable_and_disjoint(tmp_path):
    fr = parse_split("train=0.9,val=0.1")
    assert fr == {"train": 0.9, "val": 0.1}
    assert parse_split({"train": 8, "val": 1, "test": 1}) == pytest.approx({"train": 0.8, "val": 0.1, "test": 0.1})
    ids = [f"img-{k}" for k in range(4000)]
    first = [split_of(i, fr) for i in ids]
    assert first == [split_of(i, dict(fr)) for i in ids]  # same every time
    assert 0.87 < first.count("train") / len(ids) < 0.93
    for bad in ("train=0.9,val", "train=1,dev=0.1", "val=1", "train=-1,val=2", "train=x", "train=1,train=2"):
        with pytest.raises(ExportError):
            parse_split(bad)
    out = write_run(tmp_path / "run")
    exports = []
    for name in ("a", "b"):
        info = export(out, "yolo", str(tmp_path / name), split="train=0.5,val=0.3,test=0.2")
        root = tmp_path / name
        got = {s: sorted(os.listdir(root / "labels" / s)) for s in ("train", "val", "test")
               if (root / "labels" / s).exists()}
        exports.append(got)
        listed = [f for files in got.values() for f in files]
        assert sorted(listed) == sorted(f"{s}.txt" for s in STEMS.values())  # disjoint, complete
        assert info["splits"] == {s: len(f) for s, f in got.items()}
        for s, files in got.items():
            assert sorted(os.listdir(root / "images" / s)) == [f[:-4] + ".png" for f in files]
        data = yaml.safe_load((root / "data.yaml").read_text())
        assert data["train"] == "images/train" and data["val"] == "images/val" and data["test"] == "images/test"
    assert exports[0] == exports[1]
    expect = {s: sorted(f"{STEMS[int(r['image_id'])]}.txt" for r in label_rows()[:3]
                        if split_of(r["image_id"], parse_split("train=0.5,val=0.3,test=0.2")) == s)
              for s in ("train", "val", "test")}
    assert exports[0] == {s: f for s, f in expect.items() if f}


def test_image_stems_unique_when_basenames_collide():
    rows = [{"image_id": "1", "file_name": "a/x.png"}, {"image_id": "2", "file_name": "b/x.png"},
            {"image_id": "3", "file_name": "c/we ird.jpg"}]
    assert image_stems(rows, {"1": 1, "2": 2, "3": 3}) == {"1": "x_1", "2": "x_2", "3": "we_ird"}


# ---------------------------------------------------------------- masks

def test_masks_pngs_decode_to_the_rle_masks(tmp_path):
    out = write_run(tmp_path / "run")
    root = tmp_path / "masks"
    info = export(out, "masks", str(root))
    assert (info["images"], info["instances"], info["hidden_instances"]) == (3, N_ANN, 0)
    assert info["semantic_dtype"] == "uint8"
    rows = {int(r["image_id"]): r for r in label_rows()[:3]}
    for i, stem in STEMS.items():
        sem = _read_png(root / "SegmentationClass" / f"{stem}.png")
        inst = _read_png(root / "SegmentationObject" / f"{stem}.png")
        assert sem.dtype == np.uint8 and inst.dtype == np.uint8 and sem.shape == inst.shape == (H, W)
        expect_sem = np.zeros((H, W), np.uint8)
        expect_inst = np.zeros((H, W), np.uint8)
        for k, a in enumerate(rows[i]["annotations"], start=1):
            m = rle_to_mask(a["segmentation"]).astype(bool)
            expect_sem[m] = a["category_id"]
            expect_inst[m] = k
        assert np.array_equal(sem, expect_sem) and np.array_equal(inst, expect_inst)
    cats = json.loads((root / "categories.json").read_text())
    assert cats["background"] == 0 and [(c["id"], c["name"]) for c in cats["categories"]] == [
        (c["id"], c["name"]) for c in CATEGORIES]
    assert (root / "labelmap.txt").read_text().splitlines() == ["0 background", "1 box", "2 disc", "3 wedge"]
    index = json.loads((root / "instances.json").read_text())
    assert [x["category"] for x in index["img_1"]["instances"]] == ["box", "disc"]
    assert (root / "ImageSets" / "Segmentation" / "default.txt").read_text().split() == list(STEMS.values())


def test_masks_overlap_higher_score_wins_and_uint16(tmp_path):
    rows = label_rows()[:1]
    a = np.zeros((H, W), bool)
    a[10:40, 10:40] = True
    b = np.zeros((H, W), bool)
    b[20:50, 20:60] = True
    c = a & b  # same score as b, later: hidden
    base = rows[0]["annotations"][0]
    rows[0]["annotations"] = [dict(base, segmentation=mask_to_rle(a), score=0.5, category_id=300, category="big"),
                              dict(base, segmentation=mask_to_rle(b), score=0.9, category_id=2, category="disc"),
                              dict(base, segmentation=mask_to_rle(c), score=0.9, category_id=2, category="disc")]
    out = write_rows(tmp_path / "run", rows)
    info = export(out, "masks", str(tmp_path / "m"))
    assert info["semantic_dtype"] == "uint16" and info["hidden_instances"] == 1
    sem = _read_png(tmp_path / "m" / "SegmentationClass" / "img_1.png")
    inst = _read_png(tmp_path / "m" / "SegmentationObject" / "img_1.png")
    assert sem.dtype == np.uint16 and inst.dtype == np.uint8
    assert np.array_equal(inst == 2, b) and np.array_equal(inst == 1, a & ~b) and not (inst == 3).any()
    assert np.array_equal(sem == 300, a & ~b) and np.array_equal(sem == 2, b) and (sem[~(a | b)] == 0).all()
    index = json.loads((tmp_path / "m" / "instances.json").read_text())["img_1"]["instances"]
    assert [x["visible_area"] for x in index] == [int((a & ~b).sum()), int(b.sum()), 0]


# ---------------------------------------------------------------- label studio

def _check_task_schema(task: dict, shape: str) -> None:
    assert set(task) == {"data", "predictions"} and isinstance(task["data"]["image"], str)
    (pred,) = task["predictions"]
    assert isinstance(pred["model_version"], str) and isinstance(pred["score"], float)
    for r in pred["result"]:
        assert {"id", "from_name", "to_name", "type", "value", "original_width", "original_height"} <= set(r)
        assert (r["from_name"], r["to_name"]) == ("label", "image")
        if shape == "brush":
            assert r["type"] == "brushlabels" and r["value"]["format"] == "rle"
            assert isinstance(r["value"]["rle"], list) and all(0 <= v < 256 for v in r["value"]["rle"])
            assert len(r["value"]["brushlabels"]) == 1
        else:
            assert r["type"] == "polygonlabels" and len(r["value"]["polygonlabels"]) == 1
            assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in r["value"]["points"])


def test_label_studio_brush_rle_decodes_with_label_studio_converter(tmp_path):
    from label_studio_converter import brush
    from label_studio_converter.converter import Converter

    out = write_run(tmp_path / "run")
    path = tmp_path / "ls" / "tasks.json"
    info = export(out, "label-studio", str(path))
    assert (info["tasks"], info["results"], info["errors"]) == (3, N_ANN, 1)
    tasks = json.loads(path.read_text())
    # the converter parses the written config and reads the predictions as it reads annotations
    conv = Converter(config=(tmp_path / "ls" / "tasks.xml").read_text(), project_dir=None)
    assert conv._schema["label"]["type"] == "BrushLabels" and conv._schema["label"]["labels"] == [
        c["name"] for c in CATEGORIES]
    rows = {r["image_id"]: r for r in label_rows()[:3]}
    assert [t["data"]["image_id"] for t in tasks] == ["1", "2", "3"]
    for t in tasks:
        _check_task_schema(t, "brush")
        row = rows[t["data"]["image_id"]]
        pred = t["predictions"][0]
        assert pred["model_version"] == "test@x"
        assert pred["score"] == pytest.approx(np.mean([a["score"] for a in row["annotations"]]))
        (item,) = conv.annotation_result_from_task({**t, "id": 1, "annotations": [{"id": 1, "result": pred["result"]}]})
        layers = list(brush.decode_from_annotation("label", item["output"]["label"]).values())
        assert len(layers) == len(row["annotations"])
        for layer, a in zip(layers, row["annotations"]):
            assert np.array_equal(layer, rle_to_mask(a["segmentation"]) * 255)
        for r, a in zip(pred["result"], row["annotations"]):
            expect = rle_to_mask(a["segmentation"]).astype(np.uint8) * 255
            got = brush.decode_rle(r["value"]["rle"]).reshape(H, W, 4)
            assert np.array_equal(got, np.repeat(expect[..., None], 4, axis=2))
            assert r["value"]["brushlabels"] == [a["category"]] and r["score"] == pytest.approx(a["score"])
    assert tasks[0]["data"]["image"] == str(tmp_path / "run" / "source" / "a" / "img_1.png")
    assert tasks[2]["data"]["image"].endswith("shard-00000.tar#img_3.png")
    config = ET.fromstring((tmp_path / "ls" / "tasks.xml").read_text())
    tag = config.find("BrushLabels")
    assert tag.get("name") == "label" and tag.get("toName") == config.find("Image").get("name") == "image"
    assert [x.get("value") for x in tag.findall("Label")] == [c["name"] for c in CATEGORIES]


def test_ls_brush_rle_long_runs_and_edge_cases():
    from label_studio_converter import brush

    rng = np.random.default_rng(0)
    big = np.ones((300, 301), np.uint8)  # one run of 4 * 90300 values: several 16-bit runs
    big[150, 7] = 0
    masks = [big, np.zeros((9, 5), bool), np.ones((3, 3), bool), rng.random((37, 23)) < 0.4,
             np.pad(np.ones((17, 70), bool), ((1, 2), (3, 0)))]
    for m in masks:
        got = brush.decode_rle(ls_brush_rle(m)).reshape(m.shape[0], m.shape[1], 4)
        assert np.array_equal(got[..., 3], (m != 0).astype(np.uint8) * 255) and (got == got[..., :1]).all()
    # the reference encoder's output decodes to the same values as ours
    m = masks[3].astype(np.uint8) * 255
    assert np.array_equal(brush.decode_rle(brush.mask2rle(m)), brush.decode_rle(ls_brush_rle(m)))


def test_label_studio_polygons_and_lowest(tmp_path):
    rows = label_rows()
    for k, r in enumerate(rows[:3]):
        for a in r["annotations"]:
            a["score"] = [0.6, 0.3, 0.9][k]
    out = write_rows(tmp_path / "run", rows)
    path = tmp_path / "poly.json"
    info = export(out, "label-studio", str(path), shape="polygon", image_prefix="/data/local-files/?d=imgs/")
    assert info["results"] == N_ANN
    tasks = json.loads(path.read_text())
    for t, i in zip(tasks, (1, 2, 3)):
        _check_task_schema(t, "polygon")
        assert t["data"]["image"] == f"/data/local-files/?d=imgs/{label_rows()[i - 1]['file_name']}"
        for r, mask in zip(t["predictions"][0]["result"], shape_masks(i)):
            pts = np.array(r["value"]["points"]) / 100.0 * [W, H]
            assert _iou(_fill([pts]), mask) > 0.9
    assert ET.fromstring(path.with_suffix(".xml").read_text()).find("PolygonLabels") is not None
    low = export(out, "label-studio", str(tmp_path / "low.json"), lowest=2)
    tasks = json.loads((tmp_path / "low.json").read_text())
    assert low["tasks"] == 2 and [t["data"]["image_id"] for t in tasks] == ["2", "1"]
    assert [t["predictions"][0]["score"] for t in tasks] == pytest.approx([0.3, 0.6])
    with pytest.raises(ExportError, match="lowest"):
        export(out, "label-studio", str(tmp_path / "x.json"), lowest=0)


# ---------------------------------------------------------------- score filters

def _annotation_counts(tmp_path, out, **kw) -> dict:
    gt = tmp_path / "gt.json"
    if not gt.exists():
        export(out, "coco", str(gt), score_thresholds={})
    got = {
        "coco": export(out, "coco", str(tmp_path / "c.json"), **kw)["annotations"],
        "coco-results": export(out, "coco-results", str(tmp_path / "r.json"), gt_json=str(gt), **kw)["results"],
        "yolo": export(out, "yolo", str(tmp_path / "y"), images="none", **kw)["annotations"],
        "masks": export(out, "masks", str(tmp_path / "m"), **kw)["instances"],
        "label-studio": export(out, "label-studio", str(tmp_path / "l.json"), **kw)["results"],
    }
    assert set(got) | {"panoptic"} == set(EXPORTERS)
    return got


def test_min_score_and_category_thresholds_in_every_format(tmp_path):
    out = write_run(tmp_path / "run")
    # fixture scores: 0.8 for the first annotation of an image, 0.7 for the second
    assert set(_annotation_counts(tmp_path, out).values()) == {N_ANN}
    assert set(_annotation_counts(tmp_path, out, min_score=0.75).values()) == {N_ANN - 2}
    assert set(_annotation_counts(tmp_path, out, min_score=0.95).values()) == {0}
    info = export(out, "coco", str(tmp_path / "c.json"), min_score=0.75)
    assert info["dropped_low_score"] == 2
    kept = json.loads((tmp_path / "c.json").read_text())["annotations"]
    assert all(a["score"] >= 0.75 for a in kept)
    # per-category thresholds: "disc" is on images 1 (0.7) and 2 (0.8)
    assert set(_annotation_counts(tmp_path, out, score_thresholds={"disc": 0.85}).values()) == {N_ANN - 2}
    assert set(_annotation_counts(tmp_path, out, score_thresholds={"disc": 0.75}).values()) == {N_ANN - 1}
    # the run's job.json ontology thresholds (the highest per category) apply when none are passed;
    # {} turns them off
    from pseudolabel.models.specs import load_spec

    spec = load_spec({"input": {"uri": "/in"}, "output": {"uri": out}, "labelers": [
        {"name": "classical_grabcut", "ontology": [{"category": "box", "score_threshold": 0.85}, {"category": "disc"}]},
        {"name": "classical_tokens", "ontology": [{"category": "box", "score_threshold": 0.5}]}]})
    job = {"fingerprint": "f", "spec": spec.model_dump(mode="json")}
    (tmp_path / "run" / "job.json").write_text(json.dumps(job))
    assert score_thresholds_from_job(out) == {"box": 0.85}
    assert set(_annotation_counts(tmp_path, out).values()) == {N_ANN - 2}  # boxes: 0.8 on images 1 and 3
    assert set(_annotation_counts(tmp_path, out, score_thresholds={}).values()) == {N_ANN}
    masks = json.loads((tmp_path / "m" / "instances.json").read_text())
    assert sum(len(v["instances"]) for v in masks.values()) == N_ANN
    with pytest.raises(ExportError, match="panoptic"):
        export(out, "coco", str(tmp_path / "x.json"), labeler="test")
    with pytest.raises(ExportError, match="min_score applies to"):
        export(out, "panoptic", str(tmp_path / "p.json"), min_score=0.5)
    with pytest.raises(ExportError, match="min_score"):
        export(out, "coco", str(tmp_path / "x.json"), min_score="high")


# ---------------------------------------------------------------- s3

def test_new_formats_on_s3(s3_bucket):
    bucket, storage = s3_bucket
    out = write_run(f"{bucket}/runs/fmt", storage=storage)
    info = export(out, "yolo", f"{bucket}/exports/yolo", storage, split="train=0.5,val=0.5")
    assert info["images_copied"] == 3 and info["images_linked"] == 0 and info["path"] == f"{bucket}/exports/yolo"
    data = yaml.safe_load(st.read_bytes(f"{bucket}/exports/yolo/data.yaml", storage))
    assert data["path"] == f"{bucket}/exports/yolo" and data["names"] == {0: "box", 1: "disc", 2: "wedge"}
    part = split_of("1", parse_split("train=0.5,val=0.5"))
    lines = read_yolo_labels(st.read_bytes(f"{bucket}/exports/yolo/labels/{part}/img_1.txt", storage).decode())
    assert [c for c, _ in lines] == [0, 1]
    raw = np.frombuffer(st.read_bytes(f"{bucket}/exports/yolo/images/{part}/img_1.png", storage), np.uint8)
    assert np.array_equal(cv2.imdecode(raw, cv2.IMREAD_COLOR)[..., ::-1], render_image(1))
    export(out, "masks", f"{bucket}/exports/masks", storage)
    raw = np.frombuffer(st.read_bytes(f"{bucket}/exports/masks/SegmentationObject/img_3.png", storage), np.uint8)
    assert np.array_equal(cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) == 1, shape_masks(3)[0])
    ls = export(out, "label-studio", f"{bucket}/exports/tasks.json", storage)
    tasks = json.loads(st.read_bytes(ls["path"], storage))
    assert len(tasks) == 3 and tasks[0]["data"]["image"].startswith("s3://")
    assert st.exists(f"{bucket}/exports/tasks.xml", storage)


# ---------------------------------------------------------------- command line

def test_export_command_new_formats_and_refusals(tmp_path, capsys):
    from pseudolabel.cli import main

    out = write_run(tmp_path / "run")
    root = tmp_path / "y"
    assert main(["export", out, "--format", "yolo", "--out", str(root), "--split", "train=0.7,val=0.3",
                 "--min-score", "0.75", "--images", "copy"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["annotations"] == N_ANN - 2 and sum(info["splits"].values()) == 3 and info["images_copied"] == 3
    assert main(["export", out, "--format", "masks", "--out", str(tmp_path / "m")]) == 0
    assert main(["export", out, "--format", "label-studio", "--out", str(tmp_path / "l.json"), "--lowest", "1",
                 "--shape", "polygon"]) == 0
    assert len(json.loads((tmp_path / "l.json").read_text())) == 1
    capsys.readouterr()
    for argv, msg in ((["--format", "coco-results", "--out", str(tmp_path / "r.json")], "ground truth"),
                      (["--format", "yolo", "--out", str(root), "--split", "train=0.7,dev=0.3"], "unknown split"),
                      (["--format", "coco", "--out", str(tmp_path / "c.json"), "--split", "train=1"],
                       "yolo format only"),
                      (["--format", "masks", "--out", str(tmp_path / "m"), "--lowest", "3"], "label-studio")):
        assert main(["export", out, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
