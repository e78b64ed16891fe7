"""Host halves in CPU tasks (the default) vs every labeler whole in its actor (``resources.host: actor``):
the same rows, for every built-in labeler in the engine's stages, and through Ray into Parquet."""
from __future__ import annotations

from directsam_tiny import save_tiny_segformer
from test_incontext_sefm import perturbed_checkpoint
from test_incontext_seggpt import save_tiny_seggpt, watermark_pair


def _rows(out: str) -> list[dict]:
    from pseudolabel.jobs.outputs.labels_io import read_labels

    rows = read_labels(out).to_pylist()
    for r in rows:
        r.pop("provenance")  # carries the run id
    return sorted(rows, key=lambda r: r["image_id"])


PROVENANCE = {"labelers": [], "weights": [], "revisions": [], "params_hash": "x", "engine_version": "0",
              "run_id": "r"}


def _labelers(tmp_path, tiny_sd) -> list[dict]:
    """Every built-in labeler on tiny random weights, ontologies from the demo categories."""
    from pseudolabel.jobs.demo.data import CATEGORIES
    from pseudolabel.models.evf_sam.random_checkpoint import write_random_checkpoint

    ontology = [{"category": c["name"], "id": c["id"]} for c in CATEGORIES]
    evf = tmp_path / "evf"
    write_random_checkpoint(evf, "sam2", seed=3)
    demo_in, demo_out = watermark_pair(tmp_path)
    return [
        {"name": "directsam", "weights": save_tiny_segformer(str(tmp_path / "segformer")), "dtype": "float32",
         "params": {"threshold": 0.5, "pyramid_layers": 1, "save_boundary": True}},
        {"name": "evf_sam", "weights": str(evf), "dtype": "float32", "ontology": ontology[:2],
         "params": {"score_threshold": 0.0}},
        {"name": "iseg", "weights": tiny_sd, "dtype": "float32", "ontology": ontology,
         "params": {"resolution": 64, "iterations": 3, "semantic_layer": True}},
        {"name": "foba", "weights": tiny_sd, "dtype": "float32", "ontology": ontology,
         "params": {"resolution": 64, "attention_steps": 2, "attention_stride": 300, "inpaint_steps": 2}},
        {"name": "incontext", "weights": save_tiny_seggpt(str(tmp_path / "seggpt")), "dtype": "float32",
         "params": {"backend": "seggpt+inpaint", "demo_in": demo_in, "demo_out": demo_out, "fg_threshold": 0.5,
                    "min_area": 4}},
        {"name": "incontext", "weights": perturbed_checkpoint(tmp_path / "sefm"), "dtype": "float32",
         "params": {"backend": "sefm", "demo_in": demo_in, "demo_out": demo_out}},
        {"name": "classical_grabcut", "ontology": ontology},
        {"name": "classical_tokens"},
        {"name": "classical_inpaint", "ontology": ontology},
    ]


def test_every_labeler_gives_the_same_rows_split_or_whole(tiny_sd, tmp_path, monkeypatch):
    """The engine's stages in-process on a decoded demo batch with COCO box prompts: device stages then
    the host stage, vs every labeler whole in its stage; the rows the writer gets are identical."""
    from pseudolabel.engine.decode import fetch_decode
    from pseudolabel.engine.sources import list_input
    from pseudolabel.engine.stage import DeviceStage, host_stage, prepare_stage
    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.models.registry import labeler_class
    from pseudolabel.models.specs import load_spec
    from pseudolabel.schemas.spec import InputSpec

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "demo"
    generate(str(data), images=3, shards=1, size=64, seed=1, progress=False)
    labelers = _labelers(tmp_path, tiny_sd)
    job = load_spec({"input": {"uri": str(data / "images")}, "output": {"uri": str(tmp_path / "out")},
                     "labelers": labelers})
    specs = [lab.model_dump(mode="json") for lab in job.labelers]
    manifest = list_input(InputSpec(uri=str(data / "images"), format="coco",
                                    coco_json=str(data / "annotations" / "instances.json")))
    batch = fetch_decode(manifest, storage=None, max_pixels=10**8)
    assert all(p for p in batch.column("prompts").to_pylist())  # the COCO boxes travel as prompts

    # the decode tasks' step: each labeler's input preparation, on host halves (no weights)
    preparing = [{"index": i, "spec": spec} for i, spec in enumerate(specs) if labeler_class(spec["name"]).prepares()]
    assert "directsam" in {p["spec"]["name"] for p in preparing}
    split, whole = prepare_stage(batch, preparing, None), batch
    sources = []
    for i, spec in enumerate(specs):
        whole = DeviceStage(spec, i, None, 0, whole=True)(whole)
        if labeler_class(spec["name"]).has_device_half():
            split = DeviceStage(spec, i, None, 0)(split)
            sources.append("payload")
        else:
            sources.append("host")
    assert sources == ["payload"] * 6 + ["host"] * 3
    split_rows = host_stage(split, [{"spec": s, "source": src} for s, src in zip(specs, sources)], None,
                            PROVENANCE).to_pylist()
    whole_rows = host_stage(whole, [{"spec": s, "source": "record"} for s in specs], None, PROVENANCE).to_pylist()
    assert len(split_rows) == 3 and all(r["status"] == "ok" for r in split_rows), [r["error"] for r in split_rows]
    # every labeler contributed to the rows being compared
    seen = {a["labeler"] for r in split_rows for a in r["annotations"] + r["subobjects"] + r["layers"]}
    assert seen == {lab["name"] for lab in labelers}
    assert all(len(r["layers"]) >= 5 for r in split_rows)
    for a, b in zip(split_rows, whole_rows):
        assert a == b


def test_through_ray_both_plans_write_the_same_parquet_rows(ray_cluster, tmp_path, monkeypatch):
    """A labeler with a device half and a host-only one, through Ray: host halves in CPU tasks (default)
    and whole in the actors (``resources.host: actor``) write the same rows."""
    import pseudolabel
    from pseudolabel.engine.pipeline import actor_stages
    from pseudolabel.jobs.demo.data import CATEGORIES, generate
    from pseudolabel.models.specs import load_spec

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "demo"
    generate(str(data), images=4, shards=1, size=64, seed=1, progress=False)
    labelers = [
        {"name": "directsam", "weights": save_tiny_segformer(str(tmp_path / "segformer")), "dtype": "float32",
         "params": {"threshold": 0.5, "save_boundary": True}},
        {"name": "classical_grabcut", "ontology": [{"category": c["name"], "id": c["id"]} for c in CATEGORIES]},
    ]
    job = {"input": {"uri": str(data / "images"), "format": "coco",
                     "coco_json": str(data / "annotations" / "instances.json")},
           "output": {"uri": str(tmp_path / "split")}, "labelers": labelers,
           "resources": {"actors": 1, "cpus_per_actor": 0.25, "batch_size": 2, "decode_batch_size": 2}}
    whole_job = {**job, "output": {"uri": str(tmp_path / "whole")}, "resources": {**job["resources"], "host": "actor"}}
    assert actor_stages(load_spec(job)) == [0] and actor_stages(load_spec(whole_job)) == [0, 1]
    split_summary = pseudolabel.run(job, progress=False)
    whole_summary = pseudolabel.run(whole_job, progress=False)
    # where each labeler's time went: forward in the actor, the rest in host tasks, or all in the actor
    assert [sorted(t) for t in split_summary["labeler_seconds"]] == [["device", "host", "labeler", "prepare"],
                                                                      ["host", "labeler"]]
    assert [sorted(t) for t in whole_summary["labeler_seconds"]] == [["actor", "labeler"], ["actor", "labeler"]]
    split, whole = _rows(str(tmp_path / "split")), _rows(str(tmp_path / "whole"))
    assert len(split) == 4 and all(r["status"] == "ok" for r in split), [r["error"] for r in split]
    assert all(r["subobjects"] and r["annotations"] and r["layers"] for r in split)
    assert split == whole
