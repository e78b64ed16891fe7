"""Every labeler through Ray twice: host halves in parallel CPU tasks (the default) and whole in the
labeler's actor (``resources.host: actor``). Both give the same Parquet rows, byte for byte."""
from __future__ import annotations

import numpy as np

from directsam_tiny import save_tiny_segformer
from test_incontext_seggpt import save_tiny_seggpt, watermark_pair


def _rows(out: str) -> list[dict]:
    from pseudolabel.jobs.labels_io import read_labels

    rows = read_labels(out).to_pylist()
    for r in rows:
        r.pop("provenance")  # carries the run id
    return sorted(rows, key=lambda r: r["image_id"])


def test_every_labeler_gives_the_same_rows_split_or_whole(ray_cluster, tiny_sd, tmp_path, monkeypatch):
    import pseudolabel
    from pseudolabel.engine.pipeline import actor_stages
    from pseudolabel.jobs.demo_data import CATEGORIES, generate
    from pseudolabel.models.evf_sam.random_checkpoint import write_random_checkpoint
    from pseudolabel.schemas.spec import load_spec

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "demo"
    generate(str(data), images=4, shards=1, size=64, seed=1, progress=False)
    ontology = [{"category": c["name"], "id": c["id"]} for c in CATEGORIES]
    evf = tmp_path / "evf"
    write_random_checkpoint(evf, "sam2", seed=3)
    demo_in, demo_out = watermark_pair(tmp_path)
    labelers = [
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
        {"name": "incontext", "dtype": "float32",
         "params": {"backend": "sefm", "allow_untrained": True, "demo_in": demo_in, "demo_out": demo_out}},
        {"name": "classical_grabcut", "ontology": ontology},
        {"name": "classical_tokens"},
        {"name": "classical_inpaint", "ontology": ontology},
    ]
    job = {
        "input": {"uri": str(data / "images"), "format": "coco",
                  "coco_json": str(data / "annotations" / "instances.json")},
        "output": {"uri": str(tmp_path / "split")},
        "labelers": labelers,
        "resources": {"actors": 1, "cpus_per_actor": 0.1, "batch_size": 2, "decode_batch_size": 2},
    }
    # the default plan: an actor pool only for labelers with a network
    assert actor_stages(load_spec(job)) == [0, 1, 2, 3, 4, 5]
    whole_job = {**job, "output": {"uri": str(tmp_path / "whole")}, "resources": {**job["resources"], "host": "actor"}}
    assert actor_stages(load_spec(whole_job)) == list(range(len(labelers)))

    pseudolabel.run(job, progress=False)
    pseudolabel.run(whole_job, progress=False)
    split, whole = _rows(str(tmp_path / "split")), _rows(str(tmp_path / "whole"))
    assert len(split) == 4 and all(r["status"] == "ok" for r in split), [r["error"] for r in split]
    # every labeler contributed to the rows being compared
    seen = {a["labeler"] for r in split for a in r["annotations"] + r["subobjects"] + r["layers"]}
    assert seen == {lab["name"] for lab in labelers}
    assert np.all([len(r["layers"]) >= 5 for r in split])
    for a, b in zip(split, whole):
        assert a == b
