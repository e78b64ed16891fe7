"""End to end through a real Ray cluster: folder vs S3, every input layout, bad inputs, readers, exports."""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pseudolabel
from pseudolabel.engine.errors import OutputConflictError
from pseudolabel.jobs.outputs.labels_io import read_labels

COMPARE = ["image_id", "file_name", "width", "height", "status", "error", "annotations", "subobjects"]


def _job(input_uri, output_uri, storage=None, **input_extra):
    job = {
        "input": {"uri": input_uri, **input_extra},
        "output": {"uri": output_uri},
        "labelers": [
            {"name": "classical_grabcut", "ontology": [{"category": "shape"}]},
            {"name": "classical_tokens"},
        ],
        "resources": {"actors": 1, "cpus_per_actor": 0.25, "batch_size": 4, "decode_batch_size": 4},
    }
    if storage is not None:
        job["storage"] = storage.model_dump()
    return job


def _sorted(table: pa.Table) -> list[dict]:
    return sorted(table.select(COMPARE).to_pylist(), key=lambda r: r["image_id"])


@pytest.fixture(scope="module")
def local_run(ray_cluster, demo_root, tmp_path_factory):
    """The demo images plus four bad files, labelled from a local folder."""
    base = tmp_path_factory.mktemp("local")
    images = base / "images"
    shutil.copytree(f"{demo_root}/images", images)
    (images / "bad").mkdir()
    (images / "bad" / "zero.png").write_bytes(b"")
    (images / "bad" / "text.jpg").write_bytes(b"not an image")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(buf, "PNG")
    (images / "bad" / "huge.png").write_bytes(buf.getvalue())
    (images / "bad" / "truncated.png").write_bytes(buf.getvalue()[:200])
    out = str(base / "out")
    summary = pseudolabel.run(_job(str(images), out, max_pixels=200 * 200), progress=False)
    return str(images), out, summary


def test_local_run_labels_every_image_once_with_error_rows(local_run):
    _, out, summary = local_run
    table = read_labels(out)
    assert table.num_rows == 16 == summary["images"] == summary["labelled"]
    assert len(set(table.column("image_id").to_pylist())) == 16
    rows = {r["file_name"]: r for r in table.to_pylist()}
    errors = {k: v["error"] for k, v in rows.items() if v["status"] == "error"}
    assert set(errors) == {"bad/zero.png", "bad/text.jpg", "bad/huge.png", "bad/truncated.png"}
    assert "too many pixels" in errors["bad/huge.png"]
    assert summary["ok"] == 12 and summary["error"] == 4
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert all(r["width"] == 96 and r["height"] == 96 for r in ok)
    assert sum(len(r["annotations"]) for r in ok) > 0
    assert all(len(r["subobjects"]) > 0 for r in ok)
    for r in ok:  # annotation ids unique within an image, categories from the ontology
        ids = [a["id"] for a in r["annotations"]]
        assert len(ids) == len(set(ids)) and all(i >= 1 for i in ids)
        assert {a["category"] for a in r["annotations"]} <= {"shape"}
        assert r["provenance"]["labelers"] == ["classical_grabcut", "classical_tokens"]


def test_labels_read_in_pyarrow_duckdb_and_datasets(local_run):
    import datasets
    import duckdb

    _, out, _ = local_run
    files = sorted(f for f in os.listdir(f"{out}/labels") if f.endswith(".parquet"))
    assert files
    table = pads.dataset(f"{out}/labels", format="parquet").to_table()
    assert table.num_rows == 16
    con = duckdb.connect()
    n, distinct, anns = con.execute(
        f"SELECT count(*), count(DISTINCT image_id), sum(len(annotations)) FROM read_parquet('{out}/labels/*.parquet')"
    ).fetchone()
    assert (n, distinct) == (16, 16) and anns == sum(len(a) for a in table.column("annotations").to_pylist())
    counts = con.execute(
        "SELECT a.segmentation.counts FROM (SELECT unnest(annotations) AS a "
        f"FROM read_parquet('{out}/labels/*.parquet')) LIMIT 1"
    ).fetchone()[0]
    assert isinstance(counts, str)
    assert b"huggingface" in pq.read_schema(f"{out}/labels/{files[0]}").metadata  # datasets' feature types
    ds = datasets.load_dataset("parquet", data_files=[f"{out}/labels/{f}" for f in files], split="train")
    assert ds.num_rows == 16
    assert "annotations" in ds.features and "subobjects" in ds.features
    row = next(r for r in ds if r["status"] == "ok")
    assert isinstance(row["subobjects"][0]["segmentation"]["counts"], str)


def test_s3_run_gives_identical_labels(local_run, s3_bucket):
    from pseudolabel.storage import filesystem

    images, out, _ = local_run
    bucket, storage = s3_bucket
    fs, _ = filesystem(bucket, storage)
    fs.put(images, f"{bucket[5:]}/data/images", recursive=True)
    summary = pseudolabel.run(_job(f"{bucket}/data/images", f"{bucket}/out", storage, max_pixels=200 * 200),
                              progress=False)
    assert summary["labelled"] == 16
    remote = read_labels(f"{bucket}/out", storage)
    assert _sorted(remote) == _sorted(read_labels(out))
    assert all(u.startswith("s3://") for u in remote.column("uri").to_pylist())


def test_rerun_skips_finished_images_and_conflicting_job_is_refused(local_run):
    images, out, _ = local_run
    late = os.path.join(images, "late_arrival.png")  # added after listing: the re-run must not re-list
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(late)
    try:
        again = pseudolabel.run(_job(images, out, max_pixels=200 * 200), progress=False)
    finally:
        os.remove(late)
    assert again["this_run"] == 0 and again["labelled"] == 16 and again["resumed"]
    assert "late_arrival.png" not in read_labels(out).column("file_name").to_pylist()
    changed = _job(images, out, max_pixels=200 * 200)
    changed["labelers"][1]["params"] = {"threshold": 0.5}
    with pytest.raises(OutputConflictError, match=r"different job \(labelers"):
        pseudolabel.run(changed, progress=False)
    with pytest.raises(OutputConflictError, match=r"different job \(input differ"):
        pseudolabel.run(_job(images, out, max_pixels=300 * 300), progress=False)


def test_coco_webdataset_and_parquet_inputs_run_end_to_end(ray_cluster, tmp_path):
    from pseudolabel.jobs.demo.data import generate

    coco_root = str(tmp_path / "c")
    generate(coco_root, images=4, shards=1, seed=1, size=64, progress=False)
    job = _job(f"{coco_root}/images", str(tmp_path / "out_coco"), format="coco",
               coco_json=f"{coco_root}/annotations/instances.json")
    job["labelers"] = [{"name": "classical_grabcut", "ontology": [
        {"category": c, "id": i} for i, c in enumerate(["circle", "square", "triangle", "star", "ellipse"], 1)]}]
    pseudolabel.run(job, progress=False)
    table = read_labels(str(tmp_path / "out_coco"))
    gt = json.load(open(f"{coco_root}/annotations/instances.json"))
    assert sorted(table.column("image_id").to_pylist()) == sorted(str(i["id"]) for i in gt["images"])
    # the COCO boxes became prompts: one instance per ground-truth box, with its category
    per_image = {str(i["id"]): sorted(a["category_id"] for a in gt["annotations"] if a["image_id"] == i["id"])
                 for i in gt["images"]}
    for r in table.to_pylist():
        assert sorted(a["category_id"] for a in r["annotations"]) == per_image[r["image_id"]]

    wds_root = str(tmp_path / "w")
    generate(wds_root, images=4, shards=2, seed=1, size=64, layout="webdataset", progress=False)
    pseudolabel.run(_job(f"{wds_root}/images", str(tmp_path / "out_wds")), progress=False)
    wds = read_labels(str(tmp_path / "out_wds"))
    assert wds.num_rows == 4 and set(wds.column("status").to_pylist()) == {"ok"}
    assert all(m.endswith(".png") for m in wds.column("member").to_pylist())

    pq_root = str(tmp_path / "p")
    generate(pq_root, images=4, shards=2, seed=1, size=64, layout="parquet", progress=False)
    pseudolabel.run(_job(f"{pq_root}/images", str(tmp_path / "out_pq"), id_column="image_id"), progress=False)
    par = read_labels(str(tmp_path / "out_pq"))
    assert sorted(par.column("image_id").to_pylist()) == ["1", "2", "3", "4"]
    assert set(par.column("status").to_pylist()) == {"ok"}
    # the same pixels as the tar shards: identical labels for the same images
    by_name = {r["file_name"].split("/")[-1]: r for r in wds.to_pylist()}
    for r in par.to_pylist():
        assert r["subobjects"] == by_name[r["file_name"].split("/")[-1]]["subobjects"]


def test_labeler_exception_is_an_error_row_and_actor_death_loses_nothing(ray_cluster, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
    Image.fromarray(np.zeros((30, 97, 3), np.uint8)).save(root / "odd.png")
    job = {"input": {"uri": str(root)}, "output": {"uri": str(tmp_path / "out")},
           "labelers": [{"name": "fault_labelers:Flaky", "params": {"die_marker": str(tmp_path / "died")}}],
           "resources": {"actors": 1, "batch_size": 3, "decode_batch_size": 3}}
    summary = pseudolabel.run(job, progress=False)
    assert (tmp_path / "died").exists()  # the actor really died once
    table = read_labels(str(tmp_path / "out"))
    assert table.num_rows == 11 == len(set(table.column("image_id").to_pylist()))
    rows = {r["file_name"]: r for r in table.to_pylist()}
    assert rows["odd.png"]["status"] == "error" and "boom on width 97" in rows["odd.png"]["error"]
    assert all(r["status"] == "ok" for k, r in rows.items() if k != "odd.png")
    assert summary["ok"] == 10 and summary["error"] == 1


def test_a_record_without_committed_labels_does_not_block_a_changed_job(ray_cluster, tmp_path):
    """An earlier run that wrote its record and manifest but committed no labels (it died, or every
    actor failed) is replaced by a corrected job into the same output, listing anew."""
    from pseudolabel.engine.pipeline import prepare_output
    from pseudolabel.models.specs import load_spec

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    out = str(tmp_path / "out")
    first = _job(str(images), out, max_pixels=100)
    prepare_output(load_spec(first))  # the record and manifest of a run that then committed nothing
    assert os.path.exists(os.path.join(out, "job.json")) and os.path.isdir(os.path.join(out, "manifest"))
    summary = pseudolabel.run(_job(str(images), out, max_pixels=200 * 200), progress=False)
    assert summary["labelled"] == summary["ok"] == 3 and not summary["resumed"]
    with open(os.path.join(out, "job.json")) as f:
        assert json.load(f)["spec"]["input"]["max_pixels"] == 200 * 200
    # once labels are committed, a changed job is refused again
    with pytest.raises(OutputConflictError):
        pseudolabel.run(first, progress=False)


def test_summary_has_category_counts_score_quantiles_and_labeler_seconds(local_run):
    _, out, summary = local_run
    rows = read_labels(out).to_pylist()
    scores = [a["score"] for r in rows for a in r["annotations"]]
    assert scores, "the fixture run has annotations"
    [stats] = summary["category_stats"]
    assert (stats["labeler"], stats["category"], stats["annotations"]) == ("classical_grabcut", "shape", len(scores))
    assert stats["score_p50"] == pytest.approx(float(np.quantile(np.float32(scores).astype(np.float64), 0.5)), abs=1e-4)
    assert stats["score_p10"] <= stats["score_p50"] <= stats["score_p90"]
    timing = {t["labeler"]: t for t in summary["labeler_seconds"]}
    assert set(timing) == {"classical_grabcut", "classical_tokens"}
    # no network: host only
    assert all(set(t) == {"labeler", "host"} and t["host"] > 0 for t in timing.values()), timing
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["category_stats"] == summary["category_stats"]


def test_read_labels_from_the_package_gives_masks_as_arrays(local_run):
    from pseudolabel.schemas.coco import rle_to_mask

    _, out, _ = local_run
    rows = pseudolabel.read_labels(out, columns=["file_name", "width", "height", "annotations"]).to_pylist()
    ann_rows = [r for r in rows if r["annotations"]]
    assert len(rows) == 16 and ann_rows
    for r in ann_rows:
        masks = [rle_to_mask(a["segmentation"]) for a in r["annotations"]]
        assert all(m.shape == (r["height"], r["width"]) and m.dtype == np.uint8 and m.any() for m in masks)
