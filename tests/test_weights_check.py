"""Missing weights are refused on the driver, before Ray starts and before anything is written."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import pseudolabel
from pseudolabel.engine.errors import WeightsError


def _job(tmp_path, weights: str, name: str = "directsam", **extra) -> dict:
    return {"input": {"uri": str(tmp_path / "images")}, "output": {"uri": str(tmp_path / "out")},
            "labelers": [{"name": "classical_tokens"}, {"name": name, "weights": weights, **extra}]}


def test_missing_local_directory_is_refused_before_any_output(tmp_path):
    with pytest.raises(WeightsError) as err:
        pseudolabel.run(_job(tmp_path, str(tmp_path / "nope")), progress=False)
    assert "labelers.1 (directsam) weights:" in str(err.value) and "nope does not exist" in str(err.value)
    assert not (tmp_path / "out").exists()  # no job record: the corrected re-run is not "a different job"


def test_empty_directory_and_file_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match="empty directory"):
        pseudolabel.run(_job(tmp_path, str(tmp_path / "empty")), progress=False)
    with pytest.raises(WeightsError, match="is a file"):
        pseudolabel.run(_job(tmp_path, str(tmp_path / "file.bin")), progress=False)


def test_secondary_checkpoints_are_checked_too(tmp_path):
    from directsam_tiny import save_tiny_segformer

    model = save_tiny_segformer(str(tmp_path / "segformer"))
    with pytest.raises(WeightsError, match="labelers.1 \\(directsam\\) weights: .*dino does not exist"):
        pseudolabel.run(_job(tmp_path, model, params={"embedding_weights": str(tmp_path / "dino")}), progress=False)


def test_hub_id_not_in_the_offline_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as err:
        pseudolabel.run(_job(tmp_path, "someone/not-cached"), progress=False)
    assert "not in the local hub cache" in str(err.value)
    assert "huggingface-cli download someone/not-cached" in str(err.value)


def test_empty_s3_prefix_is_refused(tmp_path, s3_bucket):
    bucket, storage = s3_bucket
    job = _job(tmp_path, f"{bucket}/models/none/")
    job["storage"] = storage.model_dump()
    with pytest.raises(WeightsError, match="no files under"):
        pseudolabel.run(job, progress=False)


def test_cli_exits_2_with_one_line_within_seconds(tmp_path):
    import yaml

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(_job(tmp_path, str(tmp_path / "missing-model"))))
    t = time.time()
    done = subprocess.run([sys.executable, "-m", "pseudolabel.cli", "run", str(spec)], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ""}, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: labelers.1 (directsam) weights:"), done.stderr
    assert time.time() - t < 60 and "Traceback" not in done.stderr
