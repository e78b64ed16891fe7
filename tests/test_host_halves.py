"""Light host halves (``models.registry.HOST_HALVES``): the engine's CPU tasks build a labeler's host half
from a base class that imports no torch, and the labels equal those of the whole labeler."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from directsam_tiny import blocks_image, noise_image, save_tiny_segformer
from PIL import Image

from pseudolabel.models.registry import HOST_HALVES, host_class, labeler_class

PROVENANCE = {"labelers": ["directsam"], "weights": [""], "revisions": [""], "params_hash": "x",
              "engine_version": "0", "run_id": "r"}

#: one CPU-task step of the engine in a fresh interpreter: reads an Arrow file, writes one, and reports
#: which heavy modules the step imported
CPU_TASK = r"""
import json, sys
import pyarrow as pa
from pseudolabel.engine import stage
from pseudolabel.engine.decode import fetch_decode
from pseudolabel.engine.sources import list_input
from pseudolabel.schemas.spec import InputSpec

step, spec, src, dst = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
if step == "prepare":
    batch = fetch_decode(list_input(InputSpec(uri=src)), storage=None, max_pixels=10**6)
    out = stage.prepare_stage(batch, [{"index": 0, "spec": spec}], None)
else:
    with pa.memory_map(src) as f:
        batch = pa.ipc.open_file(f).read_all()
    out = stage.host_stage(batch, [{"spec": spec, "source": "payload"}], None, json.loads(sys.argv[5]))
with pa.OSFile(dst, "wb") as f, pa.ipc.new_file(f, out.schema) as w:
    w.write_table(out)
print(json.dumps({m: m in sys.modules for m in ("torch", "transformers")}))
"""


def test_host_halves_are_bases_of_their_labelers_with_the_same_host_methods():
    """The tasks and the actor run the same ``prepare``/``postprocess`` code: the labeler class may not
    override what its light host half defines, nor rename it or change its parameters."""
    assert HOST_HALVES, "no light host half registered"
    for name in HOST_HALVES:
        full, host = labeler_class(name), host_class(name)
        assert full is not host and issubclass(full, host)
        assert full.name == host.name == name and full.Params is host.Params
        for attr in ("setup_host", "prepare", "postprocess", "weight_sources"):
            assert getattr(full, attr) is getattr(host, attr), f"{name}: {full.__name__} overrides {attr}"
        assert host.prepares() and host.splits() and not host.has_device_half()
    assert host_class("classical_tokens") is labeler_class("classical_tokens")  # not listed: itself


def _cpu_task(step: str, spec: dict, src: str, dst: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CPU_TASK, step, json.dumps(spec), src, dst, json.dumps(PROVENANCE)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _read(path: str) -> pa.Table:
    with pa.memory_map(path) as f:
        return pa.ipc.open_file(f).read_all()


def _write(table: pa.Table, path: str) -> None:
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


@pytest.mark.usefixtures("one_torch_thread")
def test_directsam_cpu_tasks_import_no_torch_and_label_as_the_whole_labeler(tmp_path, monkeypatch):
    """DirectSAM through the engine's three stages, the two CPU ones (decode + ``prepare``; ``postprocess``
    + encoding) each in a fresh interpreter: neither imports torch or transformers, and the rows equal
    the labeler run whole in its actor."""
    from pseudolabel.engine.decode import fetch_decode
    from pseudolabel.engine.sources import list_input
    from pseudolabel.engine.stage import DeviceStage, host_stage, prepared_column
    from pseudolabel.schemas.spec import InputSpec, LabelerSpec

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    weights = save_tiny_segformer(str(tmp_path / "tiny"), resolution=64)
    images = tmp_path / "images"
    images.mkdir()
    pixels = [blocks_image(80, 112), noise_image(64, 48, seed=3)]
    for name, image in zip(("a.png", "b.png"), pixels):
        Image.fromarray(image).save(images / name)
    params = {"pyramid_layers": 1, "overlap": 12, "mode": "partition", "save_boundary": True}
    # the random network is not calibrated: its median probability gives many tokens
    whole_labeler = labeler_class("directsam")(LabelerSpec(name="directsam", weights=weights, params=params))
    probs = whole_labeler.boundary_maps(pixels)
    params["threshold"] = float(np.median(np.concatenate([p.numpy().ravel() for p in probs])))
    spec = {"name": "directsam", "weights": weights, "params": params}
    env = {**os.environ, "PSEUDOLABEL_CACHE": str(tmp_path / "cache")}

    # 1. decode + prepare in a CPU task: the views, resized by PIL, without torch
    seen = _cpu_task("prepare", spec, str(images), str(tmp_path / "prepared.arrow"), env)
    assert seen == {"torch": False, "transformers": False}
    prepared = _read(str(tmp_path / "prepared.arrow"))
    assert prepared.column(prepared_column(0)).null_count == 0
    # 2. the device half in this process (the actor)
    device = DeviceStage(spec, 0, None, 0)
    assert device.prepared and not device.whole
    _write(device(prepared), str(tmp_path / "device.arrow"))
    # 3. postprocess + encoding in a CPU task, again without torch
    seen = _cpu_task("host", spec, str(tmp_path / "device.arrow"), str(tmp_path / "labels.arrow"), env)
    assert seen == {"torch": False, "transformers": False}
    split = {r["file_name"]: r for r in _read(str(tmp_path / "labels.arrow")).to_pylist()}

    batch = fetch_decode(list_input(InputSpec(uri=str(images))), storage=None, max_pixels=10**6)
    whole_stage = DeviceStage(spec, 0, None, 0, whole=True)
    whole = {r["file_name"]: r for r in host_stage(whole_stage(batch), [{"spec": spec, "source": "record"}],
                                                   None, PROVENANCE).to_pylist()}
    assert set(split) == set(whole) == {"a.png", "b.png"}
    for name in whole:
        assert split[name]["status"] == "ok" and len(split[name]["subobjects"]) > 1, name
        assert split[name] == whole[name]
