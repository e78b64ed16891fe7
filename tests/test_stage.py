"""The labeler stages in-process: device stage (actor) then host stage (tasks). A failing device batch
is retried image by image, loudly; a failing image, in either half, is an error row of that image only."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from pseudolabel.engine.decode import fetch_decode
from pseudolabel.engine.payload import pack_payload, unpack_payload
from pseudolabel.engine.sources import list_input
from pseudolabel.engine.stage import DeviceStage, host_stage, prepare_stage, prepared_column
from pseudolabel.schemas.spec import InputSpec
from pseudolabel.schemas.tables import LABELS_SCHEMA

PROVENANCE = {"labelers": ["flaky"], "weights": [""], "revisions": [""], "params_hash": "x",
              "engine_version": "0", "run_id": "r"}


@pytest.fixture()
def batch(tmp_path):
    """Three good images, one 97 px wide (forward/label fails), one 61 px wide (host half fails)."""
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(np.zeros((20, 97, 3), np.uint8)).save(tmp_path / "odd.png")
    Image.fromarray((rng.random((20, 61, 3)) * 255).astype(np.uint8)).save(tmp_path / "host.png")
    return fetch_decode(list_input(InputSpec(uri=str(tmp_path))), storage=None, max_pixels=10**6)


def _run(batch, spec, whole=False):
    stage = DeviceStage(spec, 0, None, 0, whole=whole)
    source = "record" if stage.whole else "payload"
    out = host_stage(stage(batch), [{"spec": spec, "source": source}], None, PROVENANCE)
    return stage, out


def test_batch_failure_is_retried_per_image_and_logged_once_with_traceback(batch, caplog):
    spec = {"name": "fault_labelers:Flaky"}
    stage = DeviceStage(spec, 0, None, 0)
    with caplog.at_level(logging.WARNING, logger="pseudolabel"):
        out = host_stage(stage(batch), [{"spec": spec, "source": "record"}], None, PROVENANCE)
        stage(batch)
    assert out.schema.equals(LABELS_SCHEMA, check_metadata=False)
    rows = {r["file_name"]: r for r in out.to_pylist()}
    assert rows["odd.png"]["status"] == "error" and "boom on width 97" in rows["odd.png"]["error"]
    assert all(rows[f"{i}.png"]["status"] == "ok" and len(rows[f"{i}.png"]["annotations"]) == 1 for i in range(3))
    warnings = [r.getMessage() for r in caplog.records if "labelling" in r.getMessage()]
    assert len(warnings) == 2 and "Traceback" in warnings[0] and "Traceback" not in warnings[1]
    assert "batch failure 2" in warnings[1]


def test_split_labeler_errors_stay_with_their_image(batch):
    """A forward failure falls back per image; a host-half failure is an error row for that image only."""
    stage, out = _run(batch, {"name": "fault_labelers:SplitFlaky"})
    assert not stage.whole and stage.batch_failures == 1
    rows = {r["file_name"]: r for r in out.to_pylist()}
    assert rows["odd.png"]["status"] == "error" and "forward boom on width 97" in rows["odd.png"]["error"]
    assert rows["host.png"]["status"] == "error" and rows["host.png"]["error"].startswith(
        "fault_labelers:SplitFlaky: ValueError: host boom on width 61")
    assert rows["host.png"]["annotations"] == []
    for i in range(3):
        anns = rows[f"{i}.png"]["annotations"]
        assert rows[f"{i}.png"]["status"] == "ok" and [a["id"] for a in anns] == [1]


def test_two_stage_and_whole_in_actor_give_identical_rows(batch):
    spec = {"name": "fault_labelers:SplitFlaky", "params": {"forward_fail_width": 1, "host_fail_width": 1}}
    _, split = _run(batch, spec)
    stage, whole = _run(batch, spec, whole=True)
    assert stage.whole
    assert split.to_pylist() == whole.to_pylist()
    rows = split.to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    assert sorted(len(r["annotations"]) for r in rows) == [0, 1, 1, 1, 1]  # the black image has no bright half


def test_annotation_ids_run_over_labelers_in_job_order(batch):
    a = {"name": "fault_labelers:SplitFlaky", "params": {"forward_fail_width": 1, "host_fail_width": 1}}
    b = {"name": "fault_labelers:Flaky", "params": {"fail_width": 1}}
    t = DeviceStage(a, 0, None, 0)(batch)
    t = DeviceStage(b, 1, None, 0)(t)
    assert {"_payload_0", "_record_1"} <= set(t.column_names)
    out = host_stage(t, [{"spec": a, "source": "payload"}, {"spec": b, "source": "record"}], None, PROVENANCE)
    assert "_payload_0" not in out.column_names and "pixels" not in out.column_names
    for row in out.to_pylist():
        if row["file_name"] == "odd.png":  # black: no bright half, no annotations
            continue
        assert [a["id"] for a in row["annotations"]] == [1, 2]
        assert [a["labeler"] for a in row["annotations"]] == ["fault_labelers:SplitFlaky", "fault_labelers:Flaky"]


def test_payload_round_trip_is_exact_and_never_pickles():
    payload = {"u16": np.arange(12, dtype=np.uint16).reshape(3, 4), "f": np.float32(0.25),
               "bits": np.packbits(np.eye(9, dtype=bool), axis=-1), "f16": np.linspace(0, 1, 5, dtype=np.float16)}
    back = unpack_payload(pack_payload(payload))
    assert list(back) == list(payload)
    for k, v in payload.items():
        assert back[k].dtype == np.asarray(v).dtype and np.array_equal(back[k], v)
    assert pack_payload(None) is None and unpack_payload(None) is None
    # layouts and dtypes .npy keeps, read back from an Arrow buffer (as the stages do): each array a
    # writable copy, 0-d arrays staying 0-d
    import pyarrow as pa

    odd = {"empty": np.zeros((0, 3), np.float32), "fortran": np.asfortranarray(np.arange(12).reshape(3, 4)),
           "strided": np.arange(10)[::2], "scalar": np.array(True), "big_endian": np.arange(6, dtype=">i4"),
           "record": np.zeros((2, 2), dtype=[("x", "<f4"), ("y", "u1")])}
    back = unpack_payload(pa.py_buffer(pack_payload(odd)))
    for k, v in odd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
        assert back[k].flags.writeable
    with pytest.raises(ValueError):
        pack_payload({"objects": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(TypeError):
        pack_payload([np.zeros(3)])


def test_prepare_runs_in_the_decode_step_and_its_failure_is_that_image_only(batch, tmp_path):
    """``prepare`` in the decode tasks (``prepare_stage``): its arrays reach ``forward`` (which does not
    prepare again), the in-flight column is gone after the device stage, a failing preparation is an
    error row naming the labeler, and the rows equal the labeler run whole."""
    import fault_labelers
    from PIL import Image

    Image.fromarray(np.full((20, 43, 3), 200, np.uint8)).save(tmp_path / "prep.png")
    batch = fetch_decode(list_input(InputSpec(uri=str(tmp_path))), storage=None, max_pixels=10**6)
    spec = {"name": "fault_labelers:PreparingFlaky", "params": {"forward_fail_width": 1, "host_fail_width": 1}}
    prepared = prepare_stage(batch, [{"index": 0, "spec": spec}], None)
    column = prepared.column(prepared_column(0)).to_pylist()
    names = prepared.column("file_name").to_pylist()
    assert column[names.index("prep.png")] is None  # failed: nothing shipped
    assert unpack_payload(column[names.index("0.png")])["grey"].shape == (20, 30)

    stage = DeviceStage(spec, 0, None, 0)
    assert stage.prepared and not stage.whole
    before = fault_labelers.PreparingFlaky.prepared_calls
    device_out = stage(prepared)
    assert fault_labelers.PreparingFlaky.prepared_calls == before + 1
    assert prepared_column(0) not in device_out.column_names
    split = host_stage(device_out, [{"spec": spec, "source": "payload"}], None, PROVENANCE)
    rows = {r["file_name"]: r for r in split.to_pylist()}
    assert rows["prep.png"]["status"] == "error"
    assert rows["prep.png"]["error"] == "fault_labelers:PreparingFlaky: ValueError: prepare boom on width 43"
    assert all(r["status"] == "ok" for name, r in rows.items() if name != "prep.png")

    whole_stage = DeviceStage(spec, 0, None, 0, whole=True)
    whole = {r["file_name"]: r for r in host_stage(whole_stage(batch), [{"spec": spec, "source": "record"}], None,
                                                   PROVENANCE).to_pylist()}
    assert whole["prep.png"]["status"] == "error"  # in-process, prepare fails inside label: the same image
    for name, row in rows.items():
        if name != "prep.png":
            assert row == whole[name]


def test_prepared_blocks_keep_to_the_memory_budget(tmp_path):
    """A labeler whose input is larger than the image: the decode task hands its prepared rows on in
    blocks of at most 3 bytes per budget pixel (a row over it alone), in order, none lost."""
    from pseudolabel.engine.stage import decode_then_prepare

    rng = np.random.default_rng(1)
    for i in range(7):
        Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    manifest = list_input(InputSpec(uri=str(tmp_path)))
    spec = {"name": "fault_labelers:PreparingFlaky"}  # prepares a (20, 30) float32 grey image: 2400 B + header
    budget = 1000  # pixels: 3000 bytes of prepared arrays per block, about one row
    decode = {"storage": None, "max_pixels": 10**6, "max_batch_pixels": budget}
    blocks = list(decode_then_prepare(manifest, decode, {"labelers": [{"index": 0, "spec": spec}], "storage": None}))
    assert len(blocks) == 7
    for block in blocks:
        sizes = [len(v) for v in block.column(prepared_column(0)).to_pylist()]
        assert sum(sizes) <= 3 * budget or len(sizes) == 1
    everything = list(decode_then_prepare(manifest, {**decode, "max_batch_pixels": 10**6},
                                          {"labelers": [{"index": 0, "spec": spec}], "storage": None}))
    assert len(everything) == 1
    names = [n for b in blocks for n in b.column("file_name").to_pylist()]
    assert names == everything[0].column("file_name").to_pylist() == manifest.column("file_name").to_pylist()
    grey = unpack_payload(blocks[2].column(prepared_column(0))[0].as_py())["grey"]
    assert grey.shape == (20, 30) and grey.dtype == np.float32
    # 1800 pixels: decoded blocks of 3 images (600 px each); prepared arrays of ~2600 B per row, so at
    # most 2 rows (5400 B) per block: the prepared bytes split the decoded blocks again
    row_bytes = len(blocks[0].column(prepared_column(0))[0].as_py())
    assert 5400 // row_bytes == 2
    split = list(decode_then_prepare(manifest, {**decode, "max_batch_pixels": 1800},
                                     {"labelers": [{"index": 0, "spec": spec}], "storage": None}))
    assert [b.num_rows for b in split] == [2, 1, 2, 1, 1]


def test_a_failed_batch_is_retried_image_by_image_with_its_prepared_inputs(batch):
    """forward fails for the batch (one 97 px image): each image is run again alone with its own prepared
    arrays; only that image is an error row, the others match the labeler run whole."""
    spec = {"name": "fault_labelers:PreparingFlaky", "params": {"host_fail_width": 1}}
    stage = DeviceStage(spec, 0, None, 0)
    out = host_stage(stage(prepare_stage(batch, [{"index": 0, "spec": spec}], None)),
                     [{"spec": spec, "source": "payload"}], None, PROVENANCE)
    assert stage.batch_failures == 1
    rows = {r["file_name"]: r for r in out.to_pylist()}
    assert rows["odd.png"]["status"] == "error" and "forward boom on width 97" in rows["odd.png"]["error"]
    _, whole = _run(batch, spec, whole=True)
    expected = {r["file_name"]: r for r in whole.to_pylist()}
    assert {n for n, r in rows.items() if r["status"] == "ok"} == {"0.png", "1.png", "2.png", "host.png"}
    for name in ("0.png", "1.png", "2.png", "host.png"):
        assert rows[name] == expected[name]
