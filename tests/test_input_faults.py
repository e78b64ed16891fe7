"""The input side of reliability, through ``list_input`` and ``fetch_decode``: paths from data stay under
their root, only regular files are opened, hidden names are skipped, bad shards are error rows, decode
blocks stay within the pixel budget, transient store faults are retried and then become ``retry`` rows."""
from __future__ import annotations

import io
import json
import os
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pseudolabel.engine.decode import fetch_decode
from pseudolabel.engine.formats import SourceError, stable_image_id
from pseudolabel.engine.formats.transient import backoff_delays, is_transient, with_retries
from pseudolabel.engine.sources import list_input
from pseudolabel.schemas.spec import InputSpec, StorageSpec


def _png(value: int = 100, h: int = 12, w: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _decode(manifest, storage=None, **kw) -> pa.Table:
    out = fetch_decode(manifest, storage=storage, max_pixels=10**8, **kw)
    return out if isinstance(out, pa.Table) else pa.concat_tables(list(out))


def _by_name(manifest: pa.Table, out: pa.Table) -> dict[str, tuple[str, str | None]]:
    return dict(zip(manifest.column("file_name").to_pylist(),
                    zip(out.column("status").to_pylist(), out.column("error").to_pylist())))


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------- paths


def test_coco_file_names_stay_under_the_root(tmp_path):
    root = tmp_path / "data" / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(_png(10))
    (tmp_path / "data" / "secret.png").write_bytes(_png(250))
    os.symlink(tmp_path / "data" / "secret.png", root / "sub" / "link.png")
    names = ["a.png", "../secret.png", "../missing.png", str(tmp_path / "data" / "secret.png"),
             "sub/../../secret.png", "sub/link.png", "s3://other/x.png", "/otherbucket/key.png"]
    coco = {"images": [{"id": k + 1, "file_name": n, "width": 16, "height": 12} for k, n in enumerate(names)],
            "annotations": [], "categories": []}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    m = list_input(InputSpec(uri=str(root), coco_json=str(tmp_path / "coco.json")))
    out = _decode(m)
    got = _by_name(m, out)
    assert got["a.png"] == ("ok", None)
    refused = [got[n] for n in names[1:]]
    assert all(status == "error" for status, _ in refused)
    # one message, whether the target exists (../secret.png) or not (../missing.png)
    assert (got["../secret.png"][1].replace("../secret.png", "X")
            == got["../missing.png"][1].replace("../missing.png", "X"))
    assert all("outside the input root" in err for _, err in refused)
    # nothing outside was named as a source, and without the manifest's error column nothing is read either
    assert all(u == str(root) for u, n in zip(m.column("uri").to_pylist(), names) if n != "a.png")
    bare = _decode(m.drop_columns(["error"]))
    assert bare.column("status").to_pylist() == ["ok"] + ["error"] * (len(names) - 1)


def test_coco_on_s3_cannot_reach_another_bucket(s3_bucket, tmp_path):
    import s3fs

    bucket, storage = s3_bucket
    fs = s3fs.S3FileSystem(endpoint_url=storage.endpoint_url, key="testing", secret="testing")
    fs.pipe(f"{bucket[5:]}/images/a.png", _png(5))
    fs.mkdir("otherbucket-x")
    fs.pipe("otherbucket-x/key.png", _png(6))
    fs.pipe(f"{bucket[5:]}/private/p.png", _png(7))
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "/otherbucket-x/key.png"},
                       {"id": 3, "file_name": "../private/p.png"}], "annotations": []}
    fs.pipe(f"{bucket[5:]}/coco.json", json.dumps(coco).encode())
    m = list_input(InputSpec(uri=f"{bucket}/images", coco_json=f"{bucket}/coco.json"), storage)
    out = _decode(m, storage)
    assert out.column("status").to_pylist() == ["ok", "error", "error"]
    assert all("outside the input root" in e for e in out.column("error").to_pylist()[1:])


def test_special_files_and_links_leaving_the_root_are_never_opened(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "good.png").write_bytes(_png(1))
    os.mkfifo(root / "fifo.png")
    os.mkfifo(root / "pipe.tar")
    (tmp_path / "outside.png").write_bytes(_png(2))
    os.symlink(tmp_path / "outside.png", root / "leaves.png")
    os.symlink(root / "good.png", root / "inside.png")
    os.symlink("/dev/zero", root / "device.png")
    os.symlink(tmp_path, root / "dirlink")  # a symlinked folder is not descended into
    result: dict = {}

    def work():
        m = list_input(InputSpec(uri=str(root), format="folder"))
        result["m"], result["out"] = m, _decode(m)
        result["bare"] = _decode(m.drop_columns(["error"]))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "a FIFO was opened: the listing or the fetch hangs"
    got = _by_name(result["m"], result["out"])
    assert set(got) == {"good.png", "fifo.png", "leaves.png", "inside.png", "device.png"}
    assert got["good.png"][0] == got["inside.png"][0] == "ok"
    assert "not a regular file" in got["fifo.png"][1]
    assert "outside the input root" in got["leaves.png"][1] and "outside the input root" in got["device.png"][1]
    assert result["bare"].column("status").to_pylist() == result["out"].column("status").to_pylist()
    shards = list_input(InputSpec(uri=str(root), format="webdataset"))  # the FIFO shard: an error row
    assert shards.column("error").to_pylist() == ["not a regular file (a FIFO, device, socket or dangling link); "
                                                  "it was not opened"]


def test_hidden_files_and_folders_are_skipped_in_every_layout(tmp_path):
    root = tmp_path / "f"
    for rel in ("a.png", ".b.png", ".git/c.png", "sub/.cache/d.png", "sub/e.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png())
    assert sorted(list_input(InputSpec(uri=str(root))).column("file_name").to_pylist()) == ["a.png", "sub/e.png"]
    shards = tmp_path / "w"
    shards.mkdir()
    _tar(shards / "s.tar", {"x.png": _png(), ".y.png": _png(), "d/.z.png": _png(), ".d/w.png": _png()})
    _tar(shards / ".old.tar", {"q.png": _png()})
    assert list_input(InputSpec(uri=str(shards))).column("member").to_pylist() == ["x.png"]
    pqs = tmp_path / "p"
    pqs.mkdir()
    pq.write_table(pa.table({"image": [_png()]}), pqs / "a.parquet")
    pq.write_table(pa.table({"image": [_png(), _png()]}), pqs / ".partial.parquet")
    assert list_input(InputSpec(uri=str(pqs))).num_rows == 1


# -------------------------------------------------------------------------------------- bad shards


def test_bad_tar_shards_are_error_rows_and_the_rest_is_read(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    _tar(root / "a_good.tar", {"0.png": _png(1), "1.png": _png(2)})
    _tar(root / "b_cut.tar", {"0.png": _png(3), "1.png": _png(4, 64, 64)})
    with tarfile.open(root / "b_cut.tar") as tar:
        second = tar.getmember("1.png")
    whole = (root / "b_cut.tar").read_bytes()
    (root / "b_cut.tar").write_bytes(whole[:second.offset_data + second.size // 2])  # cut inside its data
    _tar(root / "c_header.tar", {"0.png": _png(5), "1.png": _png(6)})
    with tarfile.open(root / "c_header.tar") as tar:
        header = tar.getmember("1.png").offset
    (root / "c_header.tar").write_bytes((root / "c_header.tar").read_bytes()[:header + 200])  # inside a header
    (root / "d_empty.tar").write_bytes(b"")
    (root / "e_text.tar").write_bytes(b"this is not a tar file at all" * 40)
    spec = InputSpec(uri=str(root))
    m = list_input(spec)
    assert list_input(spec).column("image_id").to_pylist() == m.column("image_id").to_pylist()  # stable
    out = _decode(m)
    got = _by_name(m, out)
    assert got["a_good.tar/0.png"][0] == got["a_good.tar/1.png"][0] == got["b_cut.tar/0.png"][0] == "ok"
    assert got["c_header.tar/0.png"][0] == "ok"
    assert got["b_cut.tar/1.png"][0] == "error" and "cut short" in got["b_cut.tar/1.png"][1]
    for shard in ("c_header.tar", "d_empty.tar", "e_text.tar"):
        assert got[shard][0] == "error" and "unreadable tar shard" in got[shard][1], got[shard]
    ids = dict(zip(m.column("file_name").to_pylist(), m.column("image_id").to_pylist()))
    assert ids["d_empty.tar"] == stable_image_id("d_empty.tar")
    bare = _decode(m.drop_columns(["error"]))  # the rows stay errors even without the listing's message
    assert bare.column("status").to_pylist() == out.column("status").to_pylist()


def test_corrupt_parquet_files_are_error_rows_when_listing(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    pq.write_table(pa.table({"image": [_png(1), _png(2)]}), root / "a.parquet")
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [_png(3)] * 3}), buf)
    (root / "b_cut.parquet").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "c_noise.parquet").write_bytes(os.urandom(300))
    (root / "d_empty.parquet").write_bytes(b"")
    m = list_input(InputSpec(uri=str(root)))
    out = _decode(m)
    assert out.column("status").to_pylist() == ["ok", "ok", "error", "error", "error"]
    assert all("unreadable Parquet file" in e for e in out.column("error").to_pylist()[2:])
    assert m.column("image_id").to_pylist()[2] == stable_image_id("b_cut.parquet")


# ---------------------------------------------------------------------------------- memory budget


def test_decode_blocks_stay_within_the_pixel_budget(tmp_path):
    sizes = [(100, 100), (100, 100), (300, 300), (50, 100), (100, 100)]  # 10k 10k 90k 5k 10k pixels
    for k, (h, w) in enumerate(sizes):
        (tmp_path / f"{k}.png").write_bytes(_png(k, h, w))
    (tmp_path / "5.png").write_bytes(b"broken")
    m = list_input(InputSpec(uri=str(tmp_path)))
    whole = fetch_decode(m, storage=None, max_pixels=10**8)
    assert isinstance(whole, pa.Table)
    blocks = fetch_decode(m, storage=None, max_pixels=10**8, max_batch_pixels=25_000)
    assert not isinstance(blocks, pa.Table)
    blocks = list(blocks)
    pixels = [[w * h for w, h in zip(b.column("width").to_pylist(), b.column("height").to_pylist())] for b in blocks]
    assert pixels == [[10_000, 10_000], [90_000], [5_000, 10_000, 0]]
    assert all(sum(p) <= 25_000 or len(p) == 1 for p in pixels)
    assert pa.concat_tables(blocks).equals(whole)


# ------------------------------------------------------------------------------ transient faults


def test_transient_and_permanent_errors_are_told_apart():
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(client_error("SlowDown", 503)) and is_transient(client_error("InternalError", 500))
    assert not is_transient(client_error("NoSuchKey", 404)) and not is_transient(client_error("AccessDenied", 403))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x")) and is_transient(ConnectionResetError())
    assert not is_transient(NoCredentialsError()) and not is_transient(FileNotFoundError("k"))
    wrapped = OSError("Service Unavailable")
    wrapped.__cause__ = client_error("503", 503)
    assert is_transient(wrapped) and not is_transient(ValueError("bad bytes"))
    assert backoff_delays(7, 1.0) == [1, 2, 4, 8, 16, 16] and sum(backoff_delays(7, 1.0)) > 40
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "done"

    assert with_retries(flaky, 3, 0.5, sleep=waits.append) == "done" and waits == [0.5, 1.0]
    with pytest.raises(FileNotFoundError):
        with_retries(lambda: (_ for _ in ()).throw(FileNotFoundError("x")), 5, 0.1, sleep=waits.append)
    assert waits == [0.5, 1.0]  # a permanent error is not tried again


@pytest.fixture()
def proxied(s3_bucket):
    """(bucket uri, storage through a fault proxy, proxy, s3fs) with images/0..2.png in the bucket."""
    import s3fs
    from s3_fault_proxy import S3FaultProxy

    bucket, storage = s3_bucket
    fs = s3fs.S3FileSystem(endpoint_url=storage.endpoint_url, key="testing", secret="testing")
    for k in range(3):
        fs.pipe(f"{bucket[5:]}/images/{k}.png", _png(k * 50))
    proxy = S3FaultProxy(storage.endpoint_url, seed=3).start()
    through = StorageSpec(**{**storage.model_dump(), "endpoint_url": proxy.endpoint_url})
    yield bucket, through, proxy, fs
    proxy.stop()


def test_fetch_rides_out_a_short_outage_and_marks_lasting_faults_retry(proxied):
    bucket, storage, proxy, fs = proxied
    m = list_input(InputSpec(uri=f"{bucket}/images"), storage)
    proxy.outage(1.5)  # every request fails for 1.5 s
    out = _decode(m, storage, fetch_retries=4, fetch_backoff_s=0.5)
    assert out.column("status").to_pylist() == ["ok"] * 3 and proxy.counts["outage"] > 0
    proxy.clear()
    proxy.set_faults(1.0, kinds=("503",), match=r"/images/1\.png")  # one object keeps failing
    fs.rm(f"{bucket[5:]}/images/2.png")  # and one is gone for good
    out = _decode(m, storage, fetch_retries=2, fetch_backoff_s=0.1)
    assert out.column("status").to_pylist() == ["ok", "retry", "error"]
    errors = out.column("error").to_pylist()
    assert "after 2 tries" in errors[1] and "FileNotFoundError" in errors[2]


def test_listing_is_retried_and_a_lasting_outage_is_one_line(proxied):
    bucket, storage, proxy, _ = proxied
    proxy.outage(1.0)
    assert list_input(InputSpec(uri=f"{bucket}/images", fetch_retries=4, fetch_backoff_s=0.5), storage).num_rows == 3
    proxy.outage(60)
    with pytest.raises(SourceError, match=r"listing .* failed after 2 tries .*run again"):
        list_input(InputSpec(uri=f"{bucket}/images", fetch_retries=2, fetch_backoff_s=0.1), storage)
    proxy.clear()


def test_trainer_reads_through_the_formats_and_refuses_paths_leaving_its_root(tmp_path):
    from pseudolabel.jobs.training.directsam import CocoBoundaryData, TrainSpec

    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(_png(30, 32, 32))
    (tmp_path / "secret.png").write_bytes(_png(1, 32, 32))
    box = {"segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]], "bbox": [2, 2, 18, 18], "area": 324, "iscrowd": 0,
           "category_id": 1}
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
                       {"id": 2, "file_name": "../secret.png", "width": 32, "height": 32}],
            "annotations": [{**box, "id": 1, "image_id": 1}, {**box, "id": 2, "image_id": 2}],
            "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    data = CocoBoundaryData(TrainSpec(data=str(root), coco_json=str(tmp_path / "coco.json"), output="unused",
                                      resolution=32, cache_examples=0))
    pixels, labels = data.batch([0])
    assert pixels.shape == (1, 3, 32, 32) and int(pixels[0, 0, 0, 0]) == 30
    with pytest.raises(ValueError, match="outside the input root"):
        data.batch([1])
