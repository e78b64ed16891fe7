"""The input-format registry: one class per layout, one image-column rule for every reader, the format
recorded in the manifest and read back, a user's own format, and the spec naming the format."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pseudolabel.engine import formats
from pseudolabel.engine.decode import fetch_decode, pixels_to_image
from pseudolabel.engine.formats import (
    FetchRow,
    InputFormat,
    SourceError,
    check_format_name,
    format_class,
    format_names,
    format_of_row,
    manifest_format,
    register_format,
)
from pseudolabel.engine.formats.folder import FolderFormat, fetch_plain
from pseudolabel.engine.sources import list_input
from pseudolabel.jobs.outputs import labels_io
from pseudolabel.models.specs import load_spec
from pseudolabel.schemas.spec import InputSpec, JobSpec, SpecError
from pseudolabel.storage import to_uri


def _png(value: int, h=12, w=16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _decoded(manifest, **kw) -> list[np.ndarray]:
    out = fetch_decode(manifest, storage=None, max_pixels=10**8, **kw)
    assert out.column("status").to_pylist() == ["ok"] * out.num_rows, out.column("error").to_pylist()
    return [pixels_to_image(p.as_buffer(), h, w) for p, h, w in
            zip(out.column("pixels"), out.column("height").to_pylist(), out.column("width").to_pylist())]


def test_registry_names_and_unknown_format_message():
    assert format_names() == ["auto", "coco", "webdataset", "parquet", "folder"]
    assert format_class("folder") is FolderFormat
    with pytest.raises(SourceError, match=r"input.format: unknown format 'zarr'; known: auto, coco, webdataset"):
        check_format_name("zarr")
    with pytest.raises(SourceError, match="input.format: cannot import"):
        format_class("no_such_pkg.mod:Thing")
    with pytest.raises(SourceError, match="not an InputFormat"):
        format_class("json:loads")
    check_format_name("auto")


def test_spec_takes_a_format_name_and_the_listing_checks_it(tmp_path):
    job = {"input": {"uri": str(tmp_path), "format": "mypkg.formats:Mine"}, "output": {"uri": str(tmp_path / "o")},
           "labelers": [{"name": "classical_tokens"}]}
    assert load_spec(job).input.format == "mypkg.formats:Mine"  # schemas stay pure: only the shape is checked
    with pytest.raises(SpecError, match="input.format"):
        load_spec({**job, "input": {"uri": str(tmp_path), "format": "two words"}})
    (tmp_path / "a.png").write_bytes(_png(1))
    with pytest.raises(SourceError, match="input.format: unknown format 'zarr'"):
        list_input(InputSpec(uri=str(tmp_path), format="zarr"))


def test_manifest_records_the_format_and_readers_take_it_back(tmp_path):
    shard = tmp_path / "data" / "s.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for k in range(2):
            data = _png(10 * k)
            info = tarfile.TarInfo(f"{k}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    m = list_input(InputSpec(uri=str(tmp_path / "data")))
    assert manifest_format(m) == "webdataset"
    # a written manifest part keeps it, and the decode reads it from the batch when not told
    buf = io.BytesIO()
    pq.write_table(m, buf)
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    assert manifest_format(back.schema) == "webdataset"
    assert [int(a[0, 0, 0]) for a in _decoded(back)] == [0, 10]
    # a run folder: labels_io.run_source reads the manifest's format and the job's image column
    run = tmp_path / "run"
    (run / "manifest").mkdir(parents=True)
    pq.write_table(m, run / "manifest" / "part-00000.parquet")
    (run / "job.json").write_text(json.dumps({"spec": {"input": {"format": "auto", "image_column": "img"}}}))
    assert labels_io.run_source(str(run)) == {"input_format": "webdataset", "image_column": "img"}


def test_one_image_column_rule_for_engine_and_readers(tmp_path):
    """A struct {bytes, path} column before a binary one: the engine, labels_io and the report's loader
    all take the first in schema order (the one that was labelled)."""
    folder = tmp_path / "pq"
    folder.mkdir()
    table = pa.table({"hf": [{"bytes": _png(200), "path": "a.png"}],
                      "raw": pa.array([_png(50)], pa.binary())})
    pq.write_table(table, folder / "x.parquet")
    m = list_input(InputSpec(uri=str(folder)))
    (engine,) = _decoded(m)
    row = m.to_pylist()[0]
    read_back = labels_io.load_image(row["uri"], row["member"])
    assert engine[0, 0, 0] == 200 and np.array_equal(read_back, engine)
    (named,) = _decoded(m, image_column="raw")
    assert named[0, 0, 0] == 50
    assert np.array_equal(labels_io.load_image(row["uri"], row["member"], image_column="raw"), named)


def test_parquet_path_values_are_read_under_the_files_folder(tmp_path):
    folder = tmp_path / "pq"
    (folder / "imgs").mkdir(parents=True)
    (folder / "imgs" / "a.png").write_bytes(_png(77))
    (tmp_path / "secret.png").write_bytes(_png(1))
    table = pa.table({"image": [{"bytes": None, "path": "imgs/a.png"}, {"bytes": None, "path": "../secret.png"},
                                {"bytes": None, "path": str(tmp_path / "secret.png")},
                                {"bytes": None, "path": "../nothing_here.png"}]},
                     schema=pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]))
    pq.write_table(table, folder / "x.parquet")
    out = fetch_decode(list_input(InputSpec(uri=str(folder), format="parquet")), storage=None, max_pixels=10**8)
    status, errors = out.column("status").to_pylist(), out.column("error").to_pylist()
    assert status == ["ok", "error", "error", "error"]
    assert "outside the input root" in errors[1] and "outside the input root" in errors[2]
    assert errors[1].replace("../secret.png", "X") == errors[3].replace("../nothing_here.png", "X")  # exists or not


def test_a_users_own_format_by_registration_and_by_dotted_name(tmp_path):
    """A format = one InputFormat subclass: here a text file listing image names, one per line."""
    (tmp_path / "imgs").mkdir()
    for k in range(3):
        (tmp_path / "imgs" / f"{k}.png").write_bytes(_png(k * 40))
    (tmp_path / "imgs" / "list.txt").write_text("2.png\n0.png\n")
    register_format("listfile", ListFile)
    try:
        for name in ("listfile", f"{__name__}:ListFile"):
            m = list_input(InputSpec(uri=str(tmp_path / "imgs"), format=name))
            assert m.column("file_name").to_pylist() == ["2.png", "0.png"]
            assert manifest_format(m) == f"{__name__}:ListFile"  # workers import it by module:Class
            assert [int(a[0, 0, 0]) for a in _decoded(m)] == [80, 0]
    finally:
        formats.FORMATS.pop("listfile")
    with pytest.raises(TypeError):
        register_format("bad", dict)


class ListFile(InputFormat):
    name = "listfile"
    needs_files = False

    def list(self, spec, storage, fs, root, files):
        names = fs.cat_file(f"{root}/list.txt").decode().split()
        return [dict(image_id=n, uri=to_uri(fs, formats.confine(root, n)), member=None, shard=0, size=None,
                     file_name=n, prompts=None, error=None) for n in names]

    def fetch(self, fs, path, rows, image_column=None):
        return fetch_plain(fs, path, rows)


def test_format_of_row_tells_built_in_rows_apart():
    assert format_of_row("s3://b/x.parquet", "row:3") == "parquet"
    assert format_of_row("/d/shard.tar", "a/b.png") == "webdataset"
    assert format_of_row("/d/a.png", None) == "folder"
    assert formats.webdataset.TAR_STREAM_MODE == "r|" and formats.webdataset.TAR_SEEK_MODE == "r:"
    assert FetchRow("m", 1, 2).offset == 1


def test_job_spec_keeps_the_retry_settings(tmp_path):
    spec = InputSpec(uri=str(tmp_path))
    assert spec.fetch_retries == 7 and spec.fetch_backoff_s == 1.0
    assert JobSpec.model_fields["input"] is not None


def test_report_shows_the_image_column_that_was_labelled(tmp_path):
    """A Parquet input with three image columns, labelled from ``other`` (input.image_column): the report's
    source view is the ``other`` picture, not the first struct or first binary column's."""
    from labels_fixtures import write_rows

    from pseudolabel.jobs.outputs.report import report

    data = tmp_path / "pq"
    data.mkdir()
    pq.write_table(pa.table({"hf": [{"bytes": _png(200), "path": "a.png"}], "raw": pa.array([_png(50)], pa.binary()),
                             "other": pa.array([_png(90)], pa.binary())}), data / "x.parquet")
    m = list_input(InputSpec(uri=str(data), image_column="other"))
    row = {**m.select(["image_id", "uri", "member", "file_name"]).to_pylist()[0], "width": 16, "height": 12,
           "status": "ok", "error": None, "annotations": [], "subobjects": [], "layers": [], "provenance": None}
    run = tmp_path / "run"
    write_rows(run, [row], job={"spec": {"input": {"uri": str(data), "format": "auto", "image_column": "other"}}})
    (run / "manifest").mkdir()
    pq.write_table(m, run / "manifest" / "part-00000.parquet")
    report(str(run), str(tmp_path / "rep"), sample=1)
    shown = np.asarray(Image.open(tmp_path / "rep" / "sample_000_0.png"))
    assert shown.shape == (12, 16, 3) and (shown == 90).all()
