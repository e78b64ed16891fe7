"""Synthetic demo data: determinism, ground truth consistency, the three layouts, S3."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from pseudolabel import storage as st
from pseudolabel.jobs.demo import data as dd
from pseudolabel.schemas.coco import rle_to_mask

N, SIZE = 8, 128


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folder_ds(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "ds"
    summary = dd.generate(str(out), images=N, shards=3, seed=7, size=SIZE, progress=False)
    return out, summary


def test_render_scene_ground_truth_is_consistent():
    for i in range(12):
        sc = dd.render_index(3, i, SIZE)
        n = len(sc.masks)
        assert sc.image.shape == sc.clean.shape == (SIZE, SIZE, 3) and sc.image.dtype == np.uint8
        assert 1 <= n <= dd.MAX_OBJECTS and sc.masks.shape == (n, SIZE, SIZE) and sc.masks.dtype == bool
        assert set(sc.category_ids.tolist()) <= {c["id"] for c in dd.CATEGORIES}
        assert [dd.CATEGORY_NAMES[c] for c in sc.category_ids] == sc.category_names
        # visible instance masks are disjoint and non-empty; the semantic map is their union by category
        assert (sc.masks.sum(0) <= 1).all() and (sc.masks.sum((1, 2)) > 0).all()
        expect = np.zeros((SIZE, SIZE), np.uint8)
        for m, c in zip(sc.masks, sc.category_ids):
            expect[m] = c
        np.testing.assert_array_equal(sc.semantic, expect)
        # image and clean differ exactly on the component masks
        diff = (sc.image != sc.clean).any(-1)
        comp = sc.shadow_mask | sc.watermark_mask
        assert not diff[~comp].any()
        if comp.any():
            assert diff[comp].mean() > 0.99
        # a shadow lies off its visible casters and darkens; objects stand out from the background
        if sc.shadow_mask.any():
            only = sc.shadow_mask & ~sc.watermark_mask
            assert (sc.image[only].astype(int) <= sc.clean[only].astype(int)).all()
        fg = sc.masks.any(0)
        assert np.abs(sc.clean[fg].mean(0) - sc.clean[~fg].mean(0)).max() > 10 or fg.mean() > 0.5


def test_components_present_across_dataset():
    scenes = [dd.render_index(0, i, SIZE) for i in range(16)]
    assert any("shadow" in s.components for s in scenes)
    assert any("watermark" in s.components for s in scenes)
    assert any(not s.components for s in scenes)
    assert len({c for s in scenes for c in s.category_names}) >= 4


def test_components_paste_on_any_background():
    rng = np.random.default_rng(0)
    for _ in range(2):
        bg = dd.render_background(rng, 96)
        caster = dd.shape_mask("star", 96, (48, 48), 25, 0.3)
        painted = dd.paint_shape(bg, caster, rng)
        assert ((painted != bg).any(-1) == caster).all()
        shadowed, smask = dd.add_shadow(painted, caster, rng, offset=(6, 4))
        assert smask.any() and not (smask & caster).any()
        assert ((shadowed != painted).any(-1) == smask).all()
        marked, wmask = dd.add_watermark(shadowed, rng, text="SAMPLE")
        assert 0 < wmask.mean() < 0.5
        assert ((marked != shadowed).any(-1) == wmask).all()
        logo, lmask = dd.add_watermark(bg, rng, text="")
        assert lmask.any() and ((logo != bg).any(-1) == lmask).all()


def test_determinism_and_subset(tmp_path, folder_ds):
    out, summary = folder_ds
    assert summary["images"] == N and summary["shards"] == 3 and summary["layout"] == "folder"
    again = tmp_path / "again"
    dd.generate(str(again), images=N, shards=3, seed=7, size=SIZE, progress=False)
    assert _files(out) == _files(again)

    other = tmp_path / "other"
    dd.generate(str(other), images=N, shards=3, seed=8, size=SIZE, progress=False)
    a, b = _files(out), _files(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.startswith("images/"))

    # a subset (fewer images, other sharding) renders the same pictures under the same names
    sub = tmp_path / "sub"
    dd.generate(str(sub), images=3, shards=1, seed=7, size=SIZE, progress=False)
    by_name = {Path(k).name: v for k, v in a.items() if k.startswith("images/")}
    sub_files = {Path(k).name: v for k, v in _files(sub).items() if k.startswith("images/")}
    assert len(sub_files) == 3 and all(by_name[k] == v for k, v in sub_files.items())
    np.testing.assert_array_equal(dd.decode_png(by_name["demo_000002.png"]), dd.render_index(7, 2, SIZE).image)


def test_coco_ground_truth(folder_ds):
    out, summary = folder_ds
    gt = COCO(str(out / "annotations" / "instances.json"))
    assert sorted(gt.getImgIds()) == list(range(1, N + 1))
    assert [c["id"] for c in gt.loadCats(gt.getCatIds())] == [c["id"] for c in dd.CATEGORIES]
    ann_ids = gt.getAnnIds()
    assert len(ann_ids) == len(set(ann_ids)) == summary["instances"] and min(ann_ids) >= 1
    for img in gt.loadImgs(gt.getImgIds()):
        scene = dd.render_index(7, img["id"] - 1, SIZE)
        path = out / "images" / img["file_name"]
        np.testing.assert_array_equal(dd.decode_png(path.read_bytes()), scene.image)
        np.testing.assert_array_equal(dd.decode_png((out / "clean" / img["file_name"]).read_bytes()), scene.clean)
        np.testing.assert_array_equal(dd.decode_png((out / "semantic" / img["file_name"]).read_bytes()),
                                      scene.semantic)
        anns = sorted(gt.loadAnns(gt.getAnnIds(imgIds=img["id"])), key=lambda a: a["id"])
        assert len(anns) == len(scene.masks)
        for ann, mask, cid in zip(anns, scene.masks, scene.category_ids):
            assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
            np.testing.assert_array_equal(gt.annToMask(ann).astype(bool), mask)
            assert ann["category_id"] == cid and ann["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_components_json_matches_images(folder_ds):
    out, _ = folder_ds
    comps = json.loads((out / "annotations" / "components.json").read_text())
    assert comps["component_types"] == ["shadow", "watermark"] and len(comps["images"]) == N
    seen = set()
    for rec in comps["images"]:
        img = dd.decode_png((out / "images" / rec["file_name"]).read_bytes())
        clean = dd.decode_png((out / "clean" / rec["file_name"]).read_bytes())
        union = np.zeros(img.shape[:2], bool)
        for m in rec["masks"]:
            mask = rle_to_mask(m["segmentation"]).astype(bool)
            assert m["area"] == mask.sum() > 0
            union |= mask
            seen.add(m["type"])
        assert [m["type"] for m in rec["masks"]] == rec["components"]
        diff = (img != clean).any(-1)
        assert not diff[~union].any()
        if union.any():
            assert diff[union].mean() > 0.99
    assert seen == {"shadow", "watermark"}


def test_webdataset_and_parquet_layouts(tmp_path, folder_ds):
    out, _ = folder_ds
    folder_imgs = {Path(k).name: v for k, v in _files(out).items() if k.startswith("images/")}
    gt = json.loads((out / "annotations" / "instances.json").read_text())

    wds = tmp_path / "wds"
    s = dd.generate(str(wds), images=N, shards=3, seed=7, size=SIZE, layout="webdataset", progress=False)
    tars = sorted((wds / "images").glob("shard-*.tar"))
    assert s["layout"] == "webdataset" and [t.name for t in tars] == [f"shard-{k:05d}.tar" for k in range(3)]
    members = {}
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                members[m.name] = tf.extractfile(m).read()
    pngs = {k: v for k, v in members.items() if k.endswith(".png")}
    assert pngs == folder_imgs
    wgt = json.loads((wds / "annotations" / "instances.json").read_text())
    assert wgt["annotations"] == gt["annotations"]
    meta = json.loads(members["demo_000004.json"])
    assert meta["id"] == 5 and meta["file_name"] == wgt["images"][4]["file_name"]
    for img in wgt["images"]:  # file_name = <tar relative to OUT/images>/<member>
        tar_name, member = img["file_name"].split("/")
        assert (wds / "images" / tar_name).is_file() and member in pngs
        assert (wds / "clean" / img["file_name"]).is_file() and (wds / "semantic" / img["file_name"]).is_file()

    par = tmp_path / "par"
    dd.generate(str(par), images=N, shards=2, seed=7, size=SIZE, layout="parquet", progress=False)
    parts = sorted((par / "images").glob("part-*.parquet"))
    assert len(parts) == 2
    table = pq.read_table(str(par / "images"))
    assert table.column_names == ["image_id", "image", "file_name"]
    rows = table.to_pylist()
    assert sorted(int(r["image_id"]) for r in rows) == list(range(1, N + 1))
    pgt = json.loads((par / "annotations" / "instances.json").read_text())
    assert {r["file_name"] for r in rows} == {im["file_name"] for im in pgt["images"]}
    for r in rows:
        assert r["image"]["bytes"] == folder_imgs[Path(r["file_name"]).name]
        assert r["image"]["path"] == r["file_name"]
    assert (par / "clean" / rows[0]["file_name"]).exists()
    assert (par / "semantic" / rows[0]["file_name"]).exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        dd.generate(str(tmp_path / "x"), images=2, layout="zip", progress=False)
    with pytest.raises(ValueError, match="shards"):
        dd.generate(str(tmp_path / "x"), images=2, shards=0, progress=False)


def test_generate_to_s3(s3_bucket, folder_ds):
    bucket, storage = s3_bucket
    out_local, _ = folder_ds
    uri = f"{bucket}/demo"
    s = dd.generate(uri, images=N, shards=3, seed=7, size=SIZE, storage=storage, progress=False)
    assert s["uri"] == uri and s["instances_json"] == f"{uri}/annotations/instances.json"
    fs, root = st.filesystem(uri, storage)
    remote = sorted(p[len(root) + 1:] for p in fs.find(root))
    local = _files(out_local)
    assert remote == sorted(local)
    for rel in (remote[0], "annotations/instances.json", "clean/00001/demo_000003.png"):
        assert st.read_bytes(st.join(uri, rel), storage) == local[rel]


def test_a_job_asking_for_demo_data_gets_it_once(tmp_path):
    from pseudolabel.jobs.demo.data import ensure_demo_input
    from pseudolabel.models.specs import load_spec

    job = load_spec({"input": {"uri": str(tmp_path / "d" / "images"), "format": "folder",
                               "demo": {"images": 3, "shards": 1, "seed": 0, "size": 32}},
                     "output": {"uri": str(tmp_path / "out")}, "labelers": [{"name": "classical_tokens"}]})
    info = ensure_demo_input(job)
    assert info is not None and info["images"] == 3
    written = sorted(p.name for p in (tmp_path / "d" / "images").rglob("*.png"))
    assert len(written) == 3
    assert ensure_demo_input(job) is None  # present: left as it is
    no_demo = job.model_copy(update={"input": job.input.model_copy(update={"demo": None, "uri": str(tmp_path / "x")})})
    assert ensure_demo_input(no_demo) is None and not (tmp_path / "x").exists()
