"""Bad inputs and store faults through ``pseudolabel.run`` on a local Ray cluster: the job finishes, the
good images are ``ok``, what cannot be read is an ``error`` row, what kept failing transiently a
``retry`` row, and nothing outside the input root is read."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

import pseudolabel
from pseudolabel.jobs.outputs.labels_io import read_labels


def _png(seed: int, h: int = 48, w: int = 64, dtype=np.uint8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    if dtype == np.uint16:
        Image.fromarray((rng.random((h, w)) * 65535).astype(np.uint16)).save(buf, "PNG")
    else:
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _job(input_uri: str, output_uri: str, storage=None, **input_extra) -> dict:
    job = {"input": {"uri": input_uri, **input_extra}, "output": {"uri": output_uri},
           "labelers": [{"name": "classical_tokens"}],
           "resources": {"actors": 1, "cpus_per_actor": 0.25, "batch_size": 4, "decode_batch_size": 4}}
    if storage is not None:
        job["storage"] = storage.model_dump()
    return job


def _status(out: str) -> dict[str, str]:
    t = read_labels(out, columns=["file_name", "status"])
    return dict(zip(t.column("file_name").to_pylist(), t.column("status").to_pylist()))


def test_run_finishes_with_special_files_links_and_deep_pixels(ray_cluster, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for k in range(3):
        (root / f"good{k}.png").write_bytes(_png(k))
    (root / "deep16.png").write_bytes(_png(9, dtype=np.uint16))
    (root / ".hidden.png").write_bytes(_png(5))
    os.mkfifo(root / "fifo.png")
    (tmp_path / "outside.png").write_bytes(_png(6))
    os.symlink(tmp_path / "outside.png", root / "escape.png")
    out = str(tmp_path / "out")
    summary = pseudolabel.run(_job(str(root), out), progress=False)
    status = _status(out)
    assert summary["images"] == 6 and len(status) == 6
    assert {k: v for k, v in status.items() if v == "ok"}.keys() == {"good0.png", "good1.png", "good2.png",
                                                                      "deep16.png"}
    assert status["fifo.png"] == status["escape.png"] == "error"
    t = read_labels(out, columns=["file_name", "uri"]).to_pylist()
    assert not any("outside" in (r["uri"] or "") for r in t)


def test_run_finishes_with_damaged_shards(ray_cluster, tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    for name, seeds in (("a.tar", (1, 2)), ("b.tar", (3, 4))):
        with tarfile.open(root / name, "w") as tar:
            for s in seeds:
                data = _png(s)
                info = tarfile.TarInfo(f"{s}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(root / "b.tar") as tar:
        last = tar.getmember("4.png")
    (root / "b.tar").write_bytes((root / "b.tar").read_bytes()[: last.offset_data + 100])
    (root / "c.tar").write_bytes(b"")
    (root / "d.tar").write_bytes(b"<html>not a tar</html>" * 30)
    out = str(tmp_path / "out")
    pseudolabel.run(_job(str(root), out), progress=False)
    status = _status(out)
    assert status == {"a.tar/1.png": "ok", "a.tar/2.png": "ok", "b.tar/3.png": "ok", "b.tar/4.png": "error",
                      "c.tar": "error", "d.tar": "error"}


@pytest.fixture()
def proxied_images(s3_bucket):
    import s3fs
    from s3_fault_proxy import S3FaultProxy

    from pseudolabel.schemas.spec import StorageSpec

    bucket, storage = s3_bucket
    fs = s3fs.S3FileSystem(endpoint_url=storage.endpoint_url, key="testing", secret="testing")
    for k in range(6):
        fs.pipe(f"{bucket[5:]}/images/{k}.png", _png(k))
    proxy = S3FaultProxy(storage.endpoint_url, seed=5).start()
    yield bucket, StorageSpec(**{**storage.model_dump(), "endpoint_url": proxy.endpoint_url}), proxy
    proxy.stop()


def test_run_rides_out_s3_faults(ray_cluster, proxied_images, tmp_path):
    bucket, storage, proxy = proxied_images
    # an outage at the start (the listing waits it out), then a third of the reads fail (500, 503)
    proxy.set_faults(0.3, kinds=("500", "503"), match=r"/images/")
    proxy.outage(1.0)
    job = _job(f"{bucket}/images", str(tmp_path / "out"), storage, fetch_retries=3, fetch_backoff_s=0.2)
    summary = pseudolabel.run(job, progress=False)
    assert proxy.injected > 0 and summary["images"] == 6
    assert set(_status(str(tmp_path / "out")).values()) == {"ok"}


@pytest.mark.slow
def test_run_marks_lasting_s3_faults_retry(ray_cluster, proxied_images, tmp_path):
    """One object fails every time: its row is ``retry``, the others ``ok``. (About 10 s when the
    pipeline hands ``input.fetch_retries`` to the decode tasks; with the defaults, 7 tries, about 90 s.)"""
    bucket, storage, proxy = proxied_images
    proxy.set_faults(1.0, kinds=("503",), match=r"/images/2\.png")
    pseudolabel.run(_job(f"{bucket}/images", str(tmp_path / "out"), storage, fetch_retries=2, fetch_backoff_s=0.1),
                    progress=False)
    status = _status(str(tmp_path / "out"))
    assert status.pop("2.png") == "retry" and set(status.values()) == {"ok"}
