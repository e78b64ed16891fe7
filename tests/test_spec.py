"""Job spec validation: bad specs fail before any work starts, naming the field."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from pseudolabel.models.specs import load_spec
from pseudolabel.schemas.spec import SpecError, apply_override

GOOD = {
    "input": {"uri": "/data/images"},
    "output": {"uri": "/tmp/out"},
    "labelers": [{"name": "classical_grabcut",
                  "ontology": [{"category": "shape"}, {"category": "sky", "semantic": True}]}],
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
    proc = subprocess.run([sys.executable, "-m", "pseudolabel.cli", "run", str(path),
                           "--set", "resources.gpus_per_actor=-1"],
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
    ([{"category": "a", "id": 1}], [{"category": "b", "id": 1}],
     "labelers.1.ontology.0.id: id 1 is already category 'a'"),
    ([{"category": "a", "id": 1}], [{"category": "a", "id": 2}],
     "labelers.1.ontology.0.id: category 'a' already has id 1"),
])
def test_conflicting_category_ids_are_rejected(first, second, message):
    with pytest.raises(SpecError) as err:
        load_spec(_two_labelers(first, second))
    assert message in str(err.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_known_devices_are_accepted(device):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["labelers"][0]["device"] = device
    assert load_spec(data).labelers[0].device == device


@pytest.mark.parametrize("device", ["tpu:9", "gpu", "cuda:", "cuda:x", "CPU", "cuda:0,1", ""])
def test_unknown_devices_are_rejected_naming_the_field(device):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["labelers"][0]["device"] = device
    with pytest.raises(SpecError) as err:
        load_spec(data)
    message = str(err.value)
    assert f"labelers.0.device: {device!r} is not a device" in message and "cuda:N" in message


def test_min_actors_above_actors_is_rejected_in_the_spec():
    with pytest.raises(SpecError) as err:
        load_spec(GOOD, {"resources.actors": 2, "resources.min_actors": 3})
    assert str(err.value) == ("invalid job spec: resources.min_actors: 3 is more than resources.actors (2); "
                              "lower min_actors or raise actors")
    assert load_spec(GOOD, {"resources.actors": 3, "resources.min_actors": 3}).resources.min_actors == 3


def test_spec_errors_are_one_line_even_when_several():
    with pytest.raises(SpecError) as err:
        load_spec(GOOD, {"resources.actors": 0, "labelers.0.device": "tpu", "bogus": 1})
    message = str(err.value)
    assert "\n" not in message
    assert all(field in message for field in ("resources.actors", "labelers.0.device", "bogus: unknown field"))


@pytest.mark.parametrize("text, where, problem", [
    ("input:\n  uri: /d\noutput:\n  uri: [/o\nlabelers: []\n", ":5:", "line 4, column 8"),
    ("input:\n  uri: /d\n output: x\n", ":3:2:", "expected <block end>"),
    ('input: "unterminated\n', ":2:1:", "found unexpected end of stream"),
    ("input:\n\turi: /d\n", ":2:1:", "found character '\\t' that cannot start any token"),
])
def test_yaml_syntax_errors_say_file_line_and_column(tmp_path, text, where, problem):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}{where}") and "YAML syntax error" in message and problem in message
    assert "\n" not in message


def test_unreadable_spec_files_are_one_line(tmp_path):
    with pytest.raises(SpecError, match="is a folder"):
        load_spec(str(tmp_path))
    binary = tmp_path / "job.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match="not a text file"):
        load_spec(str(binary))
