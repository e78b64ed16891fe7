"""The command line end to end, as the README uses it: demo-data -> run (the quickstart spec) ->
export -> evaluate -> report, plus `models`."""
from __future__ import annotations

import json
import os

from pycocotools.coco import COCO

from pseudolabel.cli import main
from pseudolabel.models.specs import load_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "examples", "quickstart.yaml")


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_models_lists_every_labeler_with_parameters_and_defaults(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name in ("directsam", "evf_sam", "iseg", "foba", "incontext", "classical_tokens", "classical_grabcut"):
        assert name in text
    assert "[baseline]" in text and "threshold" in text and "max_tokens" in text
    assert "dtype auto = bfloat16 on CUDA" in text.split("evf_sam")[0]  # directsam's; each labeler says its own


def test_quickstart_through_the_command_line(ray_cluster, tmp_path, capsys):
    demo, out = str(tmp_path / "demo"), str(tmp_path / "run")
    assert main(["demo-data", demo, "--images", "6", "--shards", "2", "--size", "64"]) == 0
    assert _json_out(capsys)["images"] == 6

    load_spec(QUICKSTART)  # the shipped example is a valid spec as it is
    assert main(["run", QUICKSTART, "--quiet", "--set", f"input.uri={demo}/images",
                 "--set", f"output.uri={out}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] == summary["ok"] == summary["distinct"] == 6

    assert main(["export", out, "--format", "coco", "--out", str(tmp_path / "coco.json")]) == 0
    coco = COCO(str(tmp_path / "coco.json"))
    assert len(coco.getImgIds()) == 6 and coco.loadCats(coco.getCatIds())[0]["name"] == "shape"
    capsys.readouterr()

    gt = f"{demo}/annotations/instances.json"
    assert main(["evaluate", out, "--gt", gt, "--class-agnostic"]) == 0
    assert 0 < _json_out(capsys)["AP50"] <= 1
    assert main(["evaluate", out, "--gt", gt, "--task", "tokens", "--precision-tol", "3", "--border", "2"]) == 0
    tokens = _json_out(capsys)
    assert (tokens["precision_tol"], tokens["recall_tol"], tokens["border"]) == (3, 5, 2)
    assert 0 < tokens["boundary_recall"] <= 1 and tokens["images_evaluated"] == 6

    assert main(["report", out, "--out", str(tmp_path / "report"), "--sample", "3"]) == 0
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.count("<img") >= 3


def test_every_shipped_example_is_a_valid_spec():
    from pseudolabel.jobs.training import directsam as train_directsam
    from pseudolabel.jobs.training import foba as train_foba
    from pseudolabel.jobs.training import incontext as train_incontext
    from pseudolabel.schemas.spec import validate_spec

    trainers = {"train_directsam": train_directsam.TrainSpec, "train_foba": train_foba.TrainSpec,
                "train_incontext": train_incontext.TrainSpec}
    examples = sorted(f for f in os.listdir(os.path.join(REPO, "examples")) if f.endswith(".yaml"))
    assert len(examples) >= 9
    for name in examples:
        path = os.path.join(REPO, "examples", name)
        stem = name.removesuffix(".yaml")
        if stem in trainers:
            validate_spec(trainers[stem], path)
        else:
            job = load_spec(path)
            assert job.labelers[0].name in (stem, "classical_grabcut")


def test_export_panoptic_with_labeler_filter(tmp_path, capsys):
    from test_export import write_two_labeler_run

    from pseudolabel.jobs.outputs.export import read_panoptic

    run = write_two_labeler_run(tmp_path / "run")
    path = str(tmp_path / "pan" / "panoptic.json")
    assert main(["export", run, "--format", "panoptic", "--out", path, "--labeler", "test"]) == 0
    info = _json_out(capsys)
    assert info["format"] == "panoptic" and info["images"] == 3 and info["labelers"] == ["test"]
    assert info["dropped_tokens"] == 0 and len(read_panoptic(path)) == 3
    assert main(["export", run, "--format", "panoptic", "--out", path]) == 0
    assert _json_out(capsys)["labelers"] == "all"
    gt = tmp_path / "gt.json"
    from labels_fixtures import gt_coco

    gt.write_text(json.dumps(gt_coco()))
    assert main(["evaluate", run, "--gt", str(gt), "--task", "tokens", "--labeler", "test"]) == 0
    scores = _json_out(capsys)
    assert scores["labelers"] == ["test"] and scores["asa"] == 1.0


def test_train_directsam_through_the_command_line(demo_root, tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    job = tmp_path / "train.yaml"
    job.write_text(yaml.safe_dump({"data": demo_root, "model_size": "tiny", "output": str(tmp_path / "ft"),
                                   "resolution": 32, "steps": 500, "batch_size": 2, "limit": 4}))
    assert main(["train-directsam", str(job), "--set", "steps=2"]) == 0
    text = capsys.readouterr().out  # progress lines ("step 1/2 loss ..."), then the result as JSON
    assert text.startswith("step 1/2 loss")
    result = json.loads(text[text.index("\n{") + 1:])
    assert result["steps"] == 2 and result["images"] == 4 and result["output"] == str(tmp_path / "ft")
    assert "loss_first" in result and "loss_last" in result
    assert os.path.exists(tmp_path / "ft" / "config.json")
    assert os.path.exists(tmp_path / "ft" / "preprocessor_config.json")


def test_version(capsys):
    import pytest

    from pseudolabel import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"pseudolabel {__version__}"
    from importlib.metadata import version

    assert __version__ == version("pseudolabel")  # one source of truth: the installed distribution


def test_read_commands_refuse_a_path_that_holds_no_run(tmp_path, capsys):
    missing = str(tmp_path / "typo")
    for argv in (["export", missing, "--out", str(tmp_path / "c.json")], ["evaluate", missing, "--gt", "gt.json"],
                 ["report", missing, "--out", str(tmp_path / "r")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {missing} holds no run (no labels/ folder): check the path"
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "r").exists()


def test_ctrl_c_prints_one_line_with_what_is_committed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from pseudolabel.jobs.demo.data import generate

    generate(str(tmp_path / "demo"), images=60, shards=2, seed=3, size=128, progress=False)
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "input": {"uri": str(tmp_path / "demo" / "images")}, "output": {"uri": str(out)},
        "labelers": [{"name": "classical_grabcut", "params": {"iterations": 10}}],
        "resources": {"decode_batch_size": 2}}))
    proc = subprocess.Popen([sys.executable, "-m", "pseudolabel.cli", "run", str(spec)],
                            env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    import pyarrow.parquet as pq

    def committed_rows() -> int:  # rows in complete labels files (one being written is skipped)
        rows = 0
        for p in (out / "labels").glob("*.parquet") if (out / "labels").is_dir() else []:
            try:
                rows += pq.ParquetFile(p).metadata.num_rows
            except Exception:
                pass
        return rows

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and committed_rows() == 0:
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "labelled: " in stderr and "img/s" in stderr  # our progress line
    assert "Token authentication" not in stderr and "Progress bars disabled" not in stderr  # Ray's notices: --verbose
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and last.endswith("run the same command again to resume")
    committed = int(last.split()[1])
    from pseudolabel.jobs.outputs.labels_io import read_labels

    assert 0 < committed == read_labels(str(out)).num_rows < 60
