"""The labeler stage in-process: a failing batch is retried image by image, loudly, losing nothing."""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from pseudolabel.engine.decode import fetch_decode
from pseudolabel.engine.sources import list_input
from pseudolabel.engine.stage import LabelerStage
from pseudolabel.schemas.spec import InputSpec
from pseudolabel.schemas.tables import LABELS_SCHEMA

PROVENANCE = {"labelers": ["flaky"], "weights": [""], "revisions": [""], "params_hash": "x",
              "engine_version": "0", "run_id": "r"}


def test_batch_failure_is_retried_per_image_and_logged_once_with_traceback(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(np.zeros((20, 97, 3), np.uint8)).save(tmp_path / "odd.png")
    batch = fetch_decode(list_input(InputSpec(uri=str(tmp_path))), storage=None, max_pixels=10**6)
    stage = LabelerStage({"name": "fault_labelers:Flaky"}, None, 0, final=True, provenance=PROVENANCE)
    with caplog.at_level(logging.WARNING, logger="pseudolabel"):
        out = stage(batch)
        stage(batch)
    assert out.schema.equals(LABELS_SCHEMA, check_metadata=False)
    rows = {r["file_name"]: r for r in out.to_pylist()}
    assert rows["odd.png"]["status"] == "error" and "boom on width 97" in rows["odd.png"]["error"]
    assert all(rows[f"{i}.png"]["status"] == "ok" and len(rows[f"{i}.png"]["annotations"]) == 1 for i in range(3))
    warnings = [r.getMessage() for r in caplog.records if "labelling" in r.getMessage()]
    assert len(warnings) == 2 and "Traceback" in warnings[0] and "Traceback" not in warnings[1]
    assert "batch failure 2" in warnings[1]
