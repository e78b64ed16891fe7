"""Reading a run back (labels_io) and the COCO / COCO-results / panoptic exports."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from labels_fixtures import (
    CATEGORIES,
    FILE_NAMES,
    GT_SHAPES,
    H,
    W,
    gt_coco,
    label_rows,
    render_image,
    shape_masks,
    two_labeler_rows,
    write_run,
)
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pseudolabel import storage as st
from pseudolabel.jobs.outputs import labels_io
from pseudolabel.jobs.outputs.export import (
    ExportError,
    decode_panoptic_ids,
    encode_panoptic_ids,
    export,
    integer_image_ids,
    read_panoptic,
)
from pseudolabel.schemas.coco import mask_to_rle, rle_to_mask
from pseudolabel.schemas.tables import LABELS_SCHEMA


def _quiet(fn, *a):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a)


# ---------------------------------------------------------------- labels_io

def test_read_labels_skips_junk_and_reads_summary(tmp_path):
    out = write_run(tmp_path / "run")
    t = labels_io.read_labels(out)
    assert t.num_rows == 4 and set(t.column("image_id").to_pylist()) == {"1", "2", "3", "bad-1"}
    assert labels_io.read_labels(out, columns=["image_id", "status"]).column_names == ["image_id", "status"]
    with pytest.raises(KeyError):
        labels_io.read_labels(out, columns=["nope"])
    assert labels_io.read_summary(out)["ok"] == 3
    assert [c["id"] for c in labels_io.categories(out)] == [1, 2, 3]
    empty = labels_io.read_labels(tmp_path / "none")
    assert empty.num_rows == 0 and empty.schema.names == LABELS_SCHEMA.names


def test_categories_fall_back_to_annotations(tmp_path):
    out = write_run(tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()
    cats = labels_io.categories(out)
    assert [(c["id"], c["name"]) for c in cats] == [(c["id"], c["name"]) for c in CATEGORIES]


def test_load_image_file_tar_and_parquet_row(tmp_path):
    out = write_run(tmp_path / "run")
    rows = {r["image_id"]: r for r in labels_io.read_labels(out).to_pylist()}
    for i in ("1", "3"):  # 1: a plain file, 3: a tar member
        img = labels_io.load_image(rows[i]["uri"], rows[i]["member"])
        assert np.array_equal(img, render_image(int(i)))
    from labels_fixtures import png

    table = pa.table({"id": ["a", "b"], "image": [{"bytes": png(render_image(1)), "path": "x"},
                                                   {"bytes": png(render_image(2)), "path": "y"}]})
    pq.write_table(table, tmp_path / "imgs.parquet")
    assert np.array_equal(labels_io.load_image(str(tmp_path / "imgs.parquet"), "row:1"), render_image(2))
    with pytest.raises(ValueError):
        labels_io.load_image(rows["3"]["uri"], "../escape.png")


def test_integer_image_ids():
    ids = integer_image_ids(["7", "b", "3", "a"])
    assert ids == {"7": 7, "3": 3, "a": 8, "b": 9}
    assert integer_image_ids(["x2", "x1"]) == {"x1": 1, "x2": 2}


# ---------------------------------------------------------------- coco

def test_coco_export_loads_and_matches_masks(tmp_path):
    out = write_run(tmp_path / "run")
    path = str(tmp_path / "coco.json")
    info = export(out, "coco", path)
    assert info == {"format": "coco", "path": path, "images": 3, "annotations": 5, "errors": 1, "dropped_low_score": 0}
    coco = _quiet(COCO, path)
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    ann_ids = coco.getAnnIds()
    assert sorted(ann_ids) == list(range(1, 6))
    assert sorted(coco.getCatIds()) == [1, 2, 3]
    for img_id in (1, 2, 3):
        img = coco.imgs[img_id]
        assert (img["file_name"], img["width"], img["height"]) == (FILE_NAMES[img_id - 1], W, H)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        assert [a["category_id"] for a in anns] == [c for c, _ in GT_SHAPES[img_id - 1]]
        for a, m in zip(anns, shape_masks(img_id)):
            assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
            assert np.array_equal(coco.annToMask(a).astype(bool), m)
            assert a["area"] == m.sum() and "score" in a


def test_coco_export_hash_ids_keep_key(tmp_path):
    out = write_run(tmp_path / "run", image_ids="hash")
    path = str(tmp_path / "coco.json")
    export(out, "coco", path)
    data = json.loads(open(path).read())
    keys = sorted(r["image_id"] for r in label_rows(image_ids="hash")[:3])
    assert [(i["id"], i["image_key"]) for i in sorted(data["images"], key=lambda i: i["id"])] == list(
        zip([1, 2, 3], keys))


def test_coco_results_against_export_and_gt(tmp_path):
    out = write_run(tmp_path / "run", image_ids="hash")
    gt_path = str(tmp_path / "coco.json")
    export(out, "coco", gt_path)
    res_path = str(tmp_path / "res.json")
    # without a ground truth there are no image ids to give: refused, nothing written
    with pytest.raises(ExportError, match="ground truth"):
        export(out, "coco-results", res_path)
    assert not (tmp_path / "res.json").exists()
    # against the run's own coco export: matched by file name
    info = export(out, "coco-results", res_path, gt_json=gt_path)
    assert info["results"] == 5 and info["errors"] == 1
    assert info["matched_images"] == 3 and info["unmatched_images"] == 0
    res = json.loads(open(res_path).read())
    assert all("bbox" not in r and isinstance(r["segmentation"]["counts"], str) for r in res)
    coco = _quiet(COCO, gt_path)
    dt = _quiet(coco.loadRes, res_path)
    ev = COCOeval(coco, dt, "segm")
    _quiet(ev.evaluate), _quiet(ev.accumulate), _quiet(ev.summarize)
    assert ev.stats[0] == pytest.approx(1.0)
    # against a separate ground truth: ids by file name (GT ids differ from the run's)
    gt = gt_coco()
    for img in gt["images"]:
        img["id"] += 40
    for a in gt["annotations"]:
        a["image_id"] += 40
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    info = export(out, "coco-results", res_path, gt_json=str(tmp_path / "gt.json"))
    assert info["matched_images"] == 3 and info["unmatched_images"] == 0
    res = json.loads(open(res_path).read())
    assert {r["image_id"] for r in res} == {41, 42, 43}
    coco_gt = _quiet(COCO, str(tmp_path / "gt.json"))
    _quiet(coco_gt.loadRes, res_path)


def test_unknown_format(tmp_path):
    with pytest.raises(ExportError, match="panoptic"):
        export(str(tmp_path), "voc-xml", str(tmp_path / "x.json"))


def test_coco_results_against_a_foreign_gt_reports_only_real_matches(tmp_path):
    out = write_run(tmp_path / "run")
    gt = gt_coco()
    gt["images"] = [dict(gt["images"][0], file_name="elsewhere/other.png", id=7)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    info = export(out, "coco-results", str(tmp_path / "res.json"), gt_json=str(tmp_path / "gt.json"))
    assert info["matched_images"] == 0 and info["unmatched_images"] == 3 and info["results"] == 0


# ---------------------------------------------------------------- panoptic

def test_panoptic_ids_roundtrip():
    ids = np.array([[0, 1, 255], [256, 70000, 16_777_215]])
    assert np.array_equal(decode_panoptic_ids(encode_panoptic_ids(ids)), ids)
    assert tuple(encode_panoptic_ids(ids)[1, 0]) == (0, 1, 0)


def test_panoptic_roundtrip(tmp_path):
    out = write_run(tmp_path / "run")
    path = str(tmp_path / "pan" / "panoptic.json")
    info = export(out, "panoptic", path)
    assert info["images"] == 3 and info["segments"] == sum(len(s) + 1 for s in GT_SHAPES) and info["errors"] == 1
    data = json.loads(open(path).read())
    assert data["categories"] == [{"id": 1, "name": "subobject", "supercategory": "subobject", "isthing": 1}]
    back = read_panoptic(path)
    rows = {int(r["image_id"]): r for r in label_rows()[:3]}
    for img_id, entry in back.items():
        toks = rows[img_id]["subobjects"]
        assert (tmp_path / "pan" / "panoptic" / f"{img_id:012d}.png").exists()
        assert len(entry["segments_info"]) == len(toks)
        for seg, mask, tok in zip(entry["segments_info"], entry["masks"], toks):
            expect = rle_to_mask(tok["segmentation"]).astype(bool)
            assert np.array_equal(mask, expect) and seg["area"] == expect.sum()
            ys, xs = np.nonzero(expect)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert (entry["id_map"] > 0).all()  # partition tokens tile the image


def test_panoptic_overlap_earlier_token_wins(tmp_path):
    rows = label_rows()[:1]
    a = np.zeros((H, W), bool)
    a[10:40, 10:40] = True
    b = np.zeros((H, W), bool)
    b[20:50, 20:60] = True
    c = a & b  # fully hidden by a
    rows[0]["subobjects"] = [
        {"id": k, "segmentation": mask_to_rle(m), "bbox": [0, 0, 1, 1], "area": float(m.sum()),
         "boundary_score": 0.1, "labeler": "t", "embedding": None} for k, m in enumerate([a, b, c], 1)]
    (tmp_path / "run" / "labels").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), tmp_path / "run" / "labels" / "p.parquet")
    path = str(tmp_path / "pan.json")
    info = export(str(tmp_path / "run"), "panoptic", path)
    assert info["dropped_tokens"] == 1
    entry = read_panoptic(path)[1]
    assert [s["id"] for s in entry["segments_info"]] == [1, 2]
    assert np.array_equal(entry["masks"][0], a) and np.array_equal(entry["masks"][1], b & ~a)
    assert entry["segments_info"][1]["area"] == (b & ~a).sum()


# ---------------------------------------------------------------- s3

def test_read_and_export_on_s3(s3_bucket):
    bucket, storage = s3_bucket
    out = write_run(f"{bucket}/runs/r1", storage=storage)
    t = labels_io.read_labels(out, storage)
    assert t.num_rows == 4
    rows = {r["image_id"]: r for r in t.to_pylist()}
    assert rows["3"]["uri"].startswith("s3://")
    assert np.array_equal(labels_io.load_image(rows["3"]["uri"], rows["3"]["member"], storage), render_image(3))
    info = export(out, "coco", f"{bucket}/exports/coco.json", storage)
    assert info["annotations"] == 5
    data = json.loads(st.read_bytes(f"{bucket}/exports/coco.json", storage))
    assert len(data["images"]) == 3
    pan = export(out, "panoptic", f"{bucket}/exports/panoptic.json", storage)
    assert len(read_panoptic(pan["path"], storage)) == 3


def test_rle_counts_equal_pycocotools_runs():
    """The string decoder gives the run lengths pycocotools encoded: random masks (short and long runs,
    so values of one to several characters, and differences of both signs), full, empty, one pixel."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(1)
    masks = [np.ones((7, 5), bool), np.zeros((3, 300), bool), np.eye(1, dtype=bool)]
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        m = rng.random((h, w)) < rng.random()
        y, x = (int(v) for v in rng.integers(0, (h, w)))
        m[y:, x:] = rng.random() < 0.5  # a long run
        masks.append(m)
    short = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        counts = labels_io.rle_counts(rle)
        dense = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)  # runs of 0, 1, 0, ... column-major
        assert counts.sum() == m.size and np.array_equal(dense, m.ravel(order="F"))
        assert np.array_equal(labels_io.rle_counts({**rle, "counts": rle["counts"].decode()}), counts)
        short.append(len(rle["counts"]) <= labels_io.SHORT_RLE)
    assert any(short) and not all(short)  # both decoders ran
    assert labels_io.rle_counts({"counts": [0, 3, 2]}).tolist() == [0, 3, 2]


def test_rles_to_label_map_matches_dense_painting():
    from pseudolabel.jobs.evaluation.metrics import masks_to_label_map

    rng = np.random.default_rng(0)
    for trial in range(10):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        masks = rng.random((6, h, w)) < 0.3  # many runs, overlapping
        if trial == 0:
            masks[2] = True
        rles = [mask_to_rle(m) for m in masks]
        assert np.array_equal(labels_io.rles_to_label_map(rles, (h, w)), masks_to_label_map(masks))
    assert labels_io.rles_to_label_map([], (3, 4)).shape == (3, 4)


# ---------------------------------------------------------------- labeler filter

def write_two_labeler_run(out) -> str:
    """A run (hand-built labels table) whose rows hold the tokens of two labelers: ``other`` (the image
    quadrants, stored first) and ``test`` (the GT partition)."""
    rows = two_labeler_rows()
    (out / "labels").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), out / "labels" / "p.parquet")
    return str(out)


def test_panoptic_labeler_filter(tmp_path):
    out = write_two_labeler_run(tmp_path / "run")
    rows = {int(r["image_id"]): r for r in label_rows()[:3]}
    merged = export(out, "panoptic", str(tmp_path / "all.json"))
    assert merged["labelers"] == "all"
    # the quadrants come first and tile the image: every GT token is hidden
    assert merged["segments"] == 12 and merged["dropped_tokens"] == sum(len(s) + 1 for s in GT_SHAPES)
    only = export(out, "panoptic", str(tmp_path / "test.json"), labeler="test")
    assert only["labelers"] == ["test"] and only["dropped_tokens"] == 0
    for img_id, entry in read_panoptic(only["path"]).items():
        expect = [rle_to_mask(t["segmentation"]).astype(bool) for t in rows[img_id]["subobjects"]]
        assert len(entry["masks"]) == len(expect)
        assert all(np.array_equal(a, b) for a, b in zip(entry["masks"], expect))
    quads = export(out, "panoptic", str(tmp_path / "other.json"), labeler=["other"])
    assert quads["segments"] == 12 and quads["dropped_tokens"] == 0
    with pytest.raises(ValueError, match="panoptic"):
        export(out, "coco", str(tmp_path / "coco.json"), labeler="test")
