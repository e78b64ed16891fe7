"""A job on a multi-node Ray cluster reached through --address, and a worker node lost mid-run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from pseudolabel.jobs.labels_io import read_labels


def _write_job(tmp_path, images: str, out: str, **resources) -> str:
    job = {"input": {"uri": images}, "output": {"uri": out},
           # a host-only labeler (CPU tasks) and one with a device half (actors) before its host half
           "labelers": [{"name": "classical_grabcut", "ontology": [{"category": "shape"}],
                         "params": {"iterations": 6}},
                        {"name": "fault_labelers:SplitFlaky", "params": {"forward_fail_width": 1, "host_fail_width": 1}}],
           "resources": {"actors": 2, "cpus_per_actor": 0.5, "batch_size": 2, "decode_batch_size": 2, **resources}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def _start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    return cluster, worker


def test_job_on_a_two_node_cluster_survives_losing_a_worker_node(tmp_path, monkeypatch):
    from pseudolabel.jobs.demo_data import generate

    # nodes and the driver import the test-only labeler from tests/
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))

    images = str(tmp_path / "demo")
    generate(images, images=24, shards=3, seed=5, size=128, progress=False)
    out = str(tmp_path / "out")
    cluster, worker = _start_cluster()
    try:
        cluster.add_node(num_cpus=2)  # a spare: where the work goes once the first worker is gone
        cluster.wait_for_nodes()
        cmd = [sys.executable, "-m", "pseudolabel.cli", "run", _write_job(tmp_path, f"{images}/images", out),
               "--quiet", "--address", cluster.address]
        proc = subprocess.Popen(cmd, env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # 1. Wait until labels are being committed, then take a worker node away.
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not os.path.isdir(os.path.join(out, "labels")):
            time.sleep(0.2)
        removed_mid_run = proc.poll() is None
        if removed_mid_run:
            cluster.remove_node(worker, allow_graceful=False)
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        summary = json.loads(stdout[stdout.index("\n{") + 1:] if not stdout.startswith("{") else stdout)
        # 2. Every image exactly once, none lost with the node.
        table = read_labels(out)
        ids = table.column("image_id").to_pylist()
        assert len(ids) == len(set(ids)) == 24 == summary["labelled"] == summary["ok"]
        # the device-half labeler's label is in every row (its actors ran on the nodes too)
        assert all("fault_labelers:SplitFlaky" in {a["labeler"] for a in r["annotations"]} for r in table.to_pylist())
        assert removed_mid_run, "the job finished before the node could be removed"
    finally:
        cluster.shutdown()
