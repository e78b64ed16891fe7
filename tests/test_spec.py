"""Job spec validation: bad specs fail before any work starts, naming the field."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from pseudolabel.schemas.spec import SpecError, apply_override, load_spec

GOOD = {
    "input": {"uri": "/data/images"},
    "output": {"uri": "/tmp/out"},
    "labelers": [{"name": "classical_grabcut", "ontology": [{"category": "shape"}, {"category": "sky", "semantic": True}]}],
}


def test_good_spec_fills_defaults():
    job = load_spec(GOOD)
    assert job.resources.actors == 1
    lab = job.labelers[0]
    assert [e.id for e in lab.ontology] == [1, 2]
    assert lab.ontology[0].prompts == ["shape"]
    assert lab.params["working_size"] == 256  # labeler params validated and filled with defaults


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["input"].update(uri_typo="x"), "input.uri_typo"),
    (lambda d: d.update(labelerz=[]), "labelerz"),
    (lambda d: d["labelers"][0].update(name="nope"), "labelers.0.name"),
    (lambda d: d["labelers"][0].update(params={"bogus": 1}), "labelers.0.params.bogus"),
    (lambda d: d["labelers"][0].update(params={"iterations": "many"}), "labelers.0.params.iterations"),
    (lambda d: d.update(resources={"actors": 0}), "resources.actors"),
    (lambda d: d.update(resources={"host": "gpu"}), "resources.host"),
    (lambda d: d.update(resources={"host_cpus": 0}), "resources.host_cpus"),
    (lambda d: d["labelers"][0].update(compile="yes please"), "labelers.0.compile"),
    (lambda d: d["output"].pop("uri"), "output.uri"),
    (lambda d: d["input"].update(format="coco"), "input.coco_json"),
])
def test_bad_spec_names_the_field(mutate, field):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    mutate(data)
    with pytest.raises(SpecError) as err:
        load_spec(data)
    assert field in str(err.value)


def test_overrides_set_nested_fields_and_list_items():
    job = load_spec(GOOD, {"output.uri": "s3://b/o", "resources.actors": 3, "labelers.0.params.iterations": 2})
    assert job.output.uri == "s3://b/o"
    assert job.resources.actors == 3
    assert job.labelers[0].params["iterations"] == 2
    with pytest.raises(SpecError, match="labelers.5"):
        apply_override(yaml.safe_load(yaml.safe_dump(GOOD)), "labelers.5.name", "x")


def test_python_entry_point_takes_dotted_and_double_underscore_overrides(tmp_path):
    import pseudolabel

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "resources": {"actors": "lots"}}))
    with pytest.raises(SpecError, match="resources.actors"):
        pseudolabel.run(str(path))
    with pytest.raises(SpecError, match="labelers.0.params.bogus"):
        pseudolabel.run(str(path), resources__actors=1, **{"labelers.0.params.bogus": 1})


def test_cli_rejects_bad_spec_before_ray_starts(tmp_path):
    path = tmp_path / "job.yaml"
    bad = yaml.safe_load(yaml.safe_dump(GOOD))
    bad["resources"] = {"batchsize": 4}
    path.write_text(yaml.safe_dump(bad))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pseudolabel.cli", "run", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "resources.batchsize: unknown field" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()
    assert time.time() - t0 < 60


def test_cli_set_override_is_validated(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    proc = subprocess.run([sys.executable, "-m", "pseudolabel.cli", "run", str(path), "--set", "resources.gpus_per_actor=-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "resources.gpus_per_actor" in proc.stderr


def _two_labelers(first: list[dict], second: list[dict]) -> dict:
    return {**GOOD, "labelers": [{"name": "classical_grabcut", "ontology": first},
                                 {"name": "classical_grabcut", "ontology": second}]}


def test_category_ids_are_job_wide_across_labelers():
    job = load_spec(_two_labelers([{"category": "shape"}, {"category": "sky"}],
                                  [{"category": "dog"}, {"category": "shape"}]))
    ids = {e.category: e.id for lab in job.labelers for e in lab.ontology}
    assert ids == {"shape": 1, "sky": 2, "dog": 3}  # one name, one id; no id shared by two names
    assert [e.id for e in load_spec(job).labelers[1].ontology] == [3, 1]  # stable when validated again
    # explicit ids are kept and skipped by the automatic numbering
    job = load_spec(_two_labelers([{"category": "a"}], [{"category": "b", "id": 1}]))
    assert [lab.ontology[0].id for lab in job.labelers] == [2, 1]


@pytest.mark.parametrize("first, second, message", [
    ([{"category": "a", "id": 1}], [{"category": "b", "id": 1}], "labelers.1.ontology.0.id: id 1 is already category 'a'"),
    ([{"category": "a", "id": 1}], [{"category": "a", "id": 2}], "labelers.1.ontology.0.id: category 'a' already has id 1"),
])
def test_conflicting_category_ids_are_rejected(first, second, message):
    with pytest.raises(SpecError) as err:
        load_spec(_two_labelers(first, second))
    assert message in str(err.value)
