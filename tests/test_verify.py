"""`pseudolabel verify` and the repair `run` does first: labels files and Ray Data's checkpoint agree,
every image exactly once; lost, damaged, duplicated, orphaned and uncommitted files are found and
repaired; `retry` rows (and `error` rows with --retry-errors) are labelled again, once."""
from __future__ import annotations

import os
import shutil
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pseudolabel.cli import main
from pseudolabel.engine.layout import PENDING_SUFFIX
from pseudolabel.engine.pipeline import run_job
from pseudolabel.jobs.outputs.labels_io import read_labels
from pseudolabel.models.specs import load_spec


def _job(images, out):
    return {"input": {"uri": images}, "output": {"uri": out},
            "labelers": [{"name": "classical_tokens"}],
            "resources": {"actors": 1, "batch_size": 2, "decode_batch_size": 2}}


def _run(images, out, retry_errors=False):
    return run_job(load_spec(_job(images, out)), progress=False, retry_errors=retry_errors)


def _files(out, folder):
    d = os.path.join(out, folder)
    return sorted(f for f in os.listdir(d) if f.endswith(".parquet") and not f.startswith((".", "_")))


def _checkpoint_of(out, labels_file):
    """The committed checkpoint file whose name is the prefix of ``labels_file``."""
    [ckpt] = [c for c in _files(out, "_checkpoints") if labels_file.startswith(c[: -len(".parquet")])]
    return ckpt


def _verify(out, capsys):
    capsys.readouterr()
    code = main(["verify", out])
    return code, capsys.readouterr().out


def _exactly_once(out, n):
    ids = read_labels(out).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == n


@pytest.fixture(scope="module")
def base_run(ray_cluster, demo_root, tmp_path_factory):
    """A finished run of the 12 demo images, written in several labels files; copy it before changing it."""
    out = str(tmp_path_factory.mktemp("verify") / "out")
    summary = _run(f"{demo_root}/images", out)
    assert summary["this_run"] == 12 and len(_files(out, "labels")) >= 3
    return f"{demo_root}/images", out


@pytest.fixture()
def run_copy(base_run, tmp_path):
    images, out = base_run
    shutil.copytree(out, tmp_path / "out")
    return images, str(tmp_path / "out")


def test_pending_suffix_is_ray_datas():
    from ray.data.checkpoint.checkpoint_writer import PENDING_CHECKPOINT_SUFFIX

    assert PENDING_SUFFIX == f"{PENDING_CHECKPOINT_SUFFIX}.parquet"


def test_verify_passes_a_finished_run_and_refuses_a_path_without_one(base_run, capsys, tmp_path):
    _, out = base_run
    code, text = _verify(out, capsys)
    assert code == 0 and text.startswith("OK: 12 images, 12 rows (") and "every image exactly once" in text
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_lost_and_damaged_labels_files_are_reported_then_relabelled(run_copy, capsys):
    images, out = run_copy
    lost, damaged = _files(out, "labels")[:2]
    n_lost = pq.read_metadata(os.path.join(out, "labels", lost)).num_rows
    n_damaged = pq.read_metadata(os.path.join(out, "labels", damaged)).num_rows
    os.remove(os.path.join(out, "labels", lost))
    with open(os.path.join(out, "labels", damaged), "r+b") as f:
        f.truncate(40)
    code, text = _verify(out, capsys)
    assert code == 1 and text.startswith("FAILED:")
    assert f"lost: {n_lost + n_damaged} (" in text and "damaged files: 1 (" in text and damaged in text
    summary = _run(images, out)
    assert summary["this_run"] == n_lost + n_damaged  # exactly the missing images, labelled again
    assert summary["repaired"]["lost"] == n_lost + n_damaged and summary["repaired"]["damaged files"] == 1
    assert os.path.exists(os.path.join(out, "_damaged", damaged))  # kept aside, not read
    _exactly_once(out, 12)
    assert _verify(out, capsys)[0] == 0


def test_a_second_writers_duplicates_are_removed_without_relabelling(run_copy, capsys):
    images, out = run_copy
    # what a second run writing the same images leaves: another labels file and checkpoint, same ids
    name = _files(out, "labels")[0]
    ckpt = _checkpoint_of(out, name)
    prefix, twin = ckpt[: -len(".parquet")], uuid.uuid4().hex
    shutil.copy(os.path.join(out, "labels", name), os.path.join(out, "labels", twin + name[len(prefix):]))
    shutil.copy(os.path.join(out, "_checkpoints", ckpt), os.path.join(out, "_checkpoints", f"{twin}.parquet"))
    n = pq.read_metadata(os.path.join(out, "labels", name)).num_rows
    code, text = _verify(out, capsys)
    assert code == 1 and f"duplicate rows: {n} (" in text and f"duplicate checkpoint ids: {n} (" in text
    summary = _run(images, out)
    assert summary["this_run"] == 0 and summary["repaired"]["duplicate rows"] == n
    _exactly_once(out, 12)
    assert _verify(out, capsys)[0] == 0


def test_rows_without_checkpoint_and_uncommitted_files_are_dropped_and_relabelled_once(run_copy, capsys):
    images, out = run_copy
    name, other = _files(out, "labels")[:2]
    os.remove(os.path.join(out, "_checkpoints", _checkpoint_of(out, name)))  # its checkpoint went missing
    n = pq.read_metadata(os.path.join(out, "labels", name)).num_rows
    # a write that never committed: a pending checkpoint and its labels file (a copy of committed rows)
    twin = uuid.uuid4().hex
    prefix = _checkpoint_of(out, other)[: -len(".parquet")]
    shutil.copy(os.path.join(out, "labels", other), os.path.join(out, "labels", twin + other[len(prefix):]))
    pq.write_table(pa.table({"image_id": ["x"]}), os.path.join(out, "_checkpoints", twin + PENDING_SUFFIX))
    code, text = _verify(out, capsys)
    assert code == 1 and f"orphan: {n} (" in text and "uncommitted files: 2 (" in text
    summary = _run(images, out)
    assert summary["this_run"] == n
    _exactly_once(out, 12)
    assert not any(f.startswith(twin) for f in os.listdir(os.path.join(out, "labels")))
    assert _verify(out, capsys)[0] == 0


def test_retry_rows_are_labelled_again_by_the_next_run(run_copy, capsys):
    images, out = run_copy
    # two rows of transient failures, as the fetch stage writes them (the checkpoint has their ids)
    name = _files(out, "labels")[0]
    path = os.path.join(out, "labels", name)
    table = pq.read_table(path)
    k = table.num_rows
    status = pa.array(["retry"] * min(2, k) + table.column("status").to_pylist()[2:], pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("status"), "status", status), path)
    retried = table.column("image_id").to_pylist()[:2]
    code, text = _verify(out, capsys)
    assert code == 1 and f"retry: {len(retried)} (" in text
    summary = _run(images, out)
    assert summary["this_run"] == len(retried) and summary["repaired"]["relabel"] == len(retried)
    _exactly_once(out, 12)
    rows = {r["image_id"]: r for r in read_labels(out).to_pylist()}
    assert all(rows[i]["status"] == "ok" and rows[i]["provenance"]["run_id"] == summary["run_id"] for i in retried)
    assert _verify(out, capsys)[0] == 0


def test_retry_errors_relabels_error_rows_on_purpose(ray_cluster, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray((rng.random((32, 40, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    (images / "later.png").write_bytes(b"not yet an image")
    out = str(tmp_path / "out")
    first = _run(str(images), out)
    assert (first["ok"], first["error"]) == (4, 1)
    Image.fromarray(np.full((32, 40, 3), 200, np.uint8)).save(images / "later.png")  # fixed since
    plain = _run(str(images), out)
    assert plain["this_run"] == 0 and plain["error"] == 1  # error rows are done unless asked
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(_job(str(images), out)))
    capsys.readouterr()
    assert main(["run", str(spec), "--retry-errors", "--quiet"]) == 0
    table = read_labels(out)
    _exactly_once(out, 5)
    assert pc.all(pc.equal(table.column("status"), "ok")).as_py()
    row = next(r for r in table.to_pylist() if r["file_name"] == "later.png")
    assert row["provenance"]["run_id"] not in (first["run_id"], plain["run_id"])
    assert _verify(out, capsys)[0] == 0


def test_verify_and_repair_on_s3(base_run, s3_bucket, capsys):
    from pseudolabel.engine.audit import inspect, repair
    from pseudolabel.engine.pipeline import read_manifest
    from pseudolabel.storage import filesystem

    _, local = base_run
    bucket, storage = s3_bucket
    out = f"{bucket}/out"
    fs, root = filesystem(out, storage)
    fs.put(local, root, recursive=True)
    assert main(["verify", out, "--endpoint-url", storage.endpoint_url]) == 0
    # one labels file lost, another written twice (with its checkpoint) by a second writer
    lost, twice = _files(local, "labels")[:2]
    n_lost = pq.read_metadata(os.path.join(local, "labels", lost)).num_rows
    fs.rm(f"{root}/labels/{lost}")
    prefix, twin = _checkpoint_of(local, twice)[: -len(".parquet")], uuid.uuid4().hex
    fs.copy(f"{root}/labels/{twice}", f"{root}/labels/{twin}{twice[len(prefix):]}")
    fs.copy(f"{root}/_checkpoints/{prefix}.parquet", f"{root}/_checkpoints/{twin}.parquet")
    capsys.readouterr()
    code, text = main(["verify", out, "--endpoint-url", storage.endpoint_url]), capsys.readouterr().out
    assert code == 1 and f"lost: {n_lost} (" in text and "duplicate rows:" in text
    manifest_ids = set(read_manifest(out, storage).column("image_id").to_pylist())
    repair(out, storage, manifest_ids)
    audit = inspect(out, storage, manifest_ids)
    assert sorted(audit.row_ids()) == sorted(audit.checkpoint_ids()) == sorted(set(audit.row_ids()))
    assert set(audit.problems()) == {"not labelled"} and len(audit.row_ids()) == 12 - n_lost
