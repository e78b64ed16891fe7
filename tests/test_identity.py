"""Job identity and the listing: part sizes follow the image count only, a listing that a crash cut
short is done again from scratch, and a re-run with other resources labels every image once."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

import pseudolabel
from pseudolabel.engine.pipeline import (
    manifest_part_rows,
    manifest_parts,
    prepare_output,
)
from pseudolabel.jobs.outputs.labels_io import read_labels
from pseudolabel.models.specs import load_spec


def _job(images, out, decode_batch_size):
    return {"input": {"uri": images}, "output": {"uri": out},
            "labelers": [{"name": "classical_tokens"}],
            "resources": {"actors": 1, "batch_size": 2, "decode_batch_size": decode_batch_size}}


def test_manifest_parts_do_not_depend_on_resources(demo_root, tmp_path):
    listings = []
    for k, dbs in enumerate([1, 5, 64]):
        out = str(tmp_path / f"out{k}")
        manifest, resumed = prepare_output(load_spec(_job(f"{demo_root}/images", out, dbs)))
        assert not resumed and manifest.num_rows == 12
        with open(os.path.join(out, "manifest", "_SUCCESS")) as f:
            listings.append(json.load(f))
        with open(os.path.join(out, "job.json")) as f:
            identity = json.load(f)["identity"]
        assert identity["listing"] == {k: listings[-1][k] for k in ("images", "parts", "rows")}
        assert identity["input"]["uri"] == f"{demo_root}/images" and "resources" not in identity
    assert listings[0] == listings[1] == listings[2]
    assert listings[0]["rows"] == [12] and manifest_part_rows(12) == 16
    assert manifest_part_rows(100_000) == 100_000 // 64 + 1 and manifest_part_rows(10**8) == 10_000


def test_crash_during_listing_then_rerun_with_other_decode_batch_size_labels_each_image_once(
        ray_cluster, demo_root, tmp_path):
    images, out = f"{demo_root}/images", str(tmp_path / "out")
    # 1. A run that died while listing: parts of another size (1 row each) written, no _SUCCESS.
    manifest, _ = prepare_output(load_spec(_job(images, out, 1)))
    os.remove(os.path.join(out, "manifest", "_SUCCESS"))
    os.remove(os.path.join(out, "manifest", "part-00000.parquet"))
    for k in range(manifest.num_rows - 3):  # the interrupted listing got this far
        pq.write_table(manifest.slice(k, 1), os.path.join(out, "manifest", f"part-{k:05d}.parquet"))
    # 2. The re-run, with another decode_batch_size, lists again from scratch.
    summary = pseudolabel.run(_job(images, out, 4), progress=False)
    assert not summary["resumed"] and summary["images"] == 12
    uris, rows = manifest_parts(load_spec(_job(images, out, 4)))
    assert [os.path.basename(u) for u in uris] == ["part-00000.parquet"] and rows == [12]
    assert sorted(os.listdir(os.path.join(out, "manifest"))) == ["_SUCCESS", "part-00000.parquet"]
    ids = read_labels(out).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12 == summary["this_run"]
    # 3. A stray part that appears later is not read either: the listing names its parts.
    pq.write_table(manifest.slice(0, 5), os.path.join(out, "manifest", "part-00001.parquet"))
    again = pseudolabel.run(_job(images, out, 3), progress=False)
    assert again["resumed"] and again["this_run"] == 0 and again["images"] == 12
    assert read_labels(out).num_rows == 12
