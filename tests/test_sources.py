"""Listing inputs into a manifest, and fetch+decode of every layout, with bad inputs as error rows."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pseudolabel.engine.decode import ImageError, decode_image, fetch_decode, pixels_to_image
from pseudolabel.engine.sources import SourceError, list_input
from pseudolabel.schemas.spec import InputSpec


def _png(h=20, w=30, value=100) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _decode_all(manifest: pa.Table, max_pixels=10**8, **kw) -> pa.Table:
    return fetch_decode(manifest, storage=None, max_pixels=max_pixels, **kw)


def test_folder_listing_is_stable_and_relative(demo_root, tmp_path):
    import shutil

    a = list_input(InputSpec(uri=f"{demo_root}/images"))
    copy = tmp_path / "elsewhere" / "images"
    shutil.copytree(f"{demo_root}/images", copy)
    b = list_input(InputSpec(uri=f"file://{copy}"))
    assert a.num_rows == 12
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    assert len(set(a.column("shard").to_pylist())) == 3
    gt = json.load(open(f"{demo_root}/annotations/instances.json"))
    assert sorted(a.column("file_name").to_pylist()) == sorted(im["file_name"] for im in gt["images"])


def test_coco_listing_takes_ids_names_and_boxes(demo_root):
    m = list_input(InputSpec(uri=f"{demo_root}/images", format="coco",
                             coco_json=f"{demo_root}/annotations/instances.json"))
    gt = json.load(open(f"{demo_root}/annotations/instances.json"))
    assert (sorted(m.column("image_id").to_pylist(), key=int)
            == [str(im["id"]) for im in sorted(gt["images"], key=lambda i: i["id"])])
    prompts = json.loads(m.column("prompts")[0].as_py())
    first = [a for a in gt["annotations"] if a["image_id"] == int(m.column("image_id")[0].as_py())]
    x, y, w, h = first[0]["bbox"]
    assert prompts["boxes_xyxy"][0] == pytest.approx([x, y, x + w, y + h])
    assert len(prompts["categories"]) == len(first)
    out = _decode_all(m)
    assert out.column("status").to_pylist() == ["ok"] * m.num_rows


def test_webdataset_and_parquet_layouts_decode_to_the_same_pixels(tmp_path):
    from pseudolabel.jobs.demo.data import generate

    roots = {}
    for layout in ("folder", "webdataset", "parquet"):
        roots[layout] = str(tmp_path / layout)
        generate(roots[layout], images=5, shards=2, seed=3, size=64, layout=layout, progress=False)
    pixels = {}
    for layout, root in roots.items():
        spec = InputSpec(uri=f"{root}/images", id_column="image_id" if layout == "parquet" else None)
        m = list_input(spec)
        assert m.num_rows == 5
        out = _decode_all(m)
        assert out.column("status").to_pylist() == ["ok"] * 5
        names = [n.split("/")[-1] for n in out.column("file_name").to_pylist()]
        pixels[layout] = {n: out.column("pixels")[i].as_py() for i, n in enumerate(names)}
        if layout == "webdataset":
            assert all(mem.endswith(".png") for mem in m.column("member").to_pylist())
        if layout == "parquet":
            assert sorted(m.column("image_id").to_pylist(), key=int) == [str(i) for i in range(1, 6)]
    assert pixels["folder"] == pixels["webdataset"] == pixels["parquet"]


def test_hf_style_and_plain_binary_parquet_columns(tmp_path):
    data = [_png(value=v) for v in (10, 20, 30)]
    pq.write_table(pa.table({"img": data, "key": ["a", "b", "c"]}), tmp_path / "x.parquet", row_group_size=1)
    m = list_input(InputSpec(uri=str(tmp_path), id_column="key"))
    assert m.column("image_id").to_pylist() == ["a", "b", "c"]
    out = _decode_all(m)
    assert [pixels_to_image(out.column("pixels")[i].as_buffer(), 20, 30)[0, 0, 0] for i in range(3)] == [10, 20, 30]
    with pytest.raises(SourceError, match="input.image_column"):
        list_input(InputSpec(uri=str(tmp_path), image_column="nope"))
    with pytest.raises(SourceError, match="input.prompts_column: no column 'seeds'"):
        list_input(InputSpec(uri=str(tmp_path), prompts_column="seeds"))


def test_parquet_prompts_column_reaches_the_manifest_as_json(tmp_path):
    seeds = [{"points_xy": [[3, 4]]}, None, {"boxes_xyxy": [[0, 0, 5, 5]]}]
    pq.write_table(pa.table({"image": [_png()] * 3, "seeds": seeds}), tmp_path / "x.parquet")
    m = list_input(InputSpec(uri=str(tmp_path), prompts_column="seeds"))
    got = [json.loads(p) if p is not None else None for p in m.column("prompts").to_pylist()]
    assert got == seeds


def test_bad_images_become_error_rows(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "good.png").write_bytes(_png())
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_bytes(b"this is not an image at all")
    (root / "truncated.png").write_bytes(_png(200, 200)[:300])
    (root / "huge.png").write_bytes(_png(150, 150))
    m = list_input(InputSpec(uri=str(root)))
    out = _decode_all(m, max_pixels=100 * 100)
    got = dict(zip([n for n in out.column("file_name").to_pylist()],
                   zip(out.column("status").to_pylist(), out.column("error").to_pylist())))
    assert got["good.png"] == ("ok", None)
    assert got["zero.png"][0] == "error" and "0 bytes" in got["zero.png"][1]
    assert got["text.jpg"][0] == "error" and "cannot decode" in got["text.jpg"][1]
    assert got["truncated.png"][0] == "error"
    assert got["huge.png"][0] == "error" and "too many pixels" in got["huge.png"][1]


def test_exif_orientation_is_applied():
    arr = np.zeros((10, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 clockwise on display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue(), 10**6)
    assert out.shape == (40, 10, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


def test_tar_members_never_escape_and_missing_members_error(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("../evil.png", "ok.png"):
            data = _png()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    m = list_input(InputSpec(uri=str(tmp_path), format="webdataset"))
    out = _decode_all(m)
    status = dict(zip(m.column("member").to_pylist(),
                      zip(out.column("status").to_pylist(), out.column("error").to_pylist())))
    assert status["ok.png"][0] == "ok"
    assert status["../evil.png"][0] == "error" and "unsafe" in status["../evil.png"][1]
    with pytest.raises(ImageError):
        decode_image(b"", 10)


def test_manifest_sizes_and_tar_members_read_by_offset(tmp_path):
    """Folder rows carry file sizes; tar members carry (offset, size) and are fetched by ranged reads,
    so a batch never streams its shard from the start."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.png").write_bytes(_png(value=10))
    m = list_input(InputSpec(uri=str(tmp_path / "folder")))
    assert m.column("size").to_pylist() == [len(_png(value=10))]

    shard = tmp_path / "wds" / "shard.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, value in (("a.png", 10), ("b.png", 200)):
            data = _png(value=value)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    m = list_input(InputSpec(uri=str(tmp_path / "wds")))
    offsets, sizes = m.column("offset").to_pylist(), m.column("size").to_pylist()
    raw = shard.read_bytes()
    assert [raw[o:o + n] for o, n in zip(offsets, sizes)] == [_png(value=10), _png(value=200)]
    # wipe the first member's header: reading the shard as a stream now ends before b.png...
    shard.write_bytes(b"\0" * 512 + raw[512:])
    only_b = m.filter(pc.equal(m.column("member"), "b.png"))
    streamed = _decode_all(only_b.drop_columns(["offset"]))
    assert streamed.column("status").to_pylist() == ["error"]
    # ...while the ranged read of b.png still finds its bytes
    ranged = _decode_all(only_b)
    assert ranged.column("status").to_pylist() == ["ok"]
    assert set(ranged.column("pixels")[0].as_py()) == {200}


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="input.uri"):
        list_input(InputSpec(uri=str(tmp_path / "nothing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        list_input(InputSpec(uri=str(tmp_path / "empty")))


def test_s3_listings_are_never_stale(s3_bucket):
    """A listing taken before another client writes (Ray workers write labels/) must not hide new files."""
    import boto3
    import pyarrow.dataset as pads

    from pseudolabel.storage import arrow_filesystem, filesystem, join

    bucket, storage = s3_bucket
    fs, path = filesystem(join(bucket, "labels"), storage)
    client = boto3.client("s3", endpoint_url=storage.endpoint_url, region_name="us-east-1")
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_id": ["a", "b"]}), buf)
    client.put_object(Bucket=bucket.split("://")[1], Key="labels/part-0.parquet", Body=buf.getvalue())
    assert len(fs.find(path)) == len(fs.ls(path)) == 1  # listings taken now...
    client.put_object(Bucket=bucket.split("://")[1], Key="labels/part-1.parquet", Body=buf.getvalue())
    assert len(fs.find(path)) == len(fs.ls(path)) == 2  # ...do not hide what is written after
    afs, apath = arrow_filesystem(join(bucket, "labels"), storage)
    assert pads.dataset(apath, filesystem=afs, format="parquet").to_table().num_rows == 4
