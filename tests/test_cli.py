"""The command line end to end, as the README uses it: demo-data -> run (the quickstart spec) ->
export -> evaluate -> report, plus `models`."""
from __future__ import annotations

import json
import os

from pycocotools.coco import COCO

from pseudolabel.cli import main
from pseudolabel.schemas.spec import load_spec

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
    from pseudolabel.jobs import train_directsam, train_foba, train_incontext
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
