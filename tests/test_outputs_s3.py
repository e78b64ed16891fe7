"""A run whose input, output and ground truth all live in S3, read back through the command line the way
a user would: ``verify``, ``report`` (to a local folder and to S3), ``evaluate`` (instances and tokens)
and ``export``, each with ``--endpoint-url`` and the credentials in the environment."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import pseudolabel
from pseudolabel import storage as st
from pseudolabel.imageio import decode_png
from pseudolabel.jobs.demo.data import generate


def _cli(*argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pseudolabel.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Found credentials" not in proc.stderr  # botocore's notes stay quiet without --verbose
    return proc


@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3_server):
    """(bucket, storage, run summary): 12 demo images generated into a fresh bucket, labelled there by the
    GrabCut baseline (instances) and the edge-token baseline (subobjects)."""
    import uuid

    import boto3

    bucket = f"s3://test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=bucket[5:])
    generate(f"{bucket}/demo", images=12, shards=2, seed=4, size=96, storage=s3_server, progress=False)
    job = {"input": {"uri": f"{bucket}/demo/images"},
           "output": {"uri": f"{bucket}/out"},
           "storage": s3_server.model_dump(exclude_none=True),
           "labelers": [{"name": "classical_grabcut", "params": {"iterations": 3}}, {"name": "classical_tokens"}],
           "resources": {"actors": 1, "batch_size": 4, "decode_batch_size": 4}}
    summary = pseudolabel.run(job, progress=False)
    assert summary["labelled"] == 12
    return bucket, s3_server, summary


def test_verify_and_evaluate_an_s3_run(s3_run):
    bucket, storage, _ = s3_run
    endpoint = ["--endpoint-url", storage.endpoint_url]
    verified = _cli("verify", f"{bucket}/out", *endpoint)
    assert re.search(r"\b12\b", verified.stdout + verified.stderr)
    gt = f"{bucket}/demo/annotations/instances.json"
    inst = json.loads(_cli("evaluate", f"{bucket}/out", "--gt", gt, "--class-agnostic", *endpoint).stdout)
    assert inst["task"] == "instances" and inst["matched_images"] == 12 and inst["predictions"] > 0
    assert 0.0 <= inst["AP"] <= 1.0
    tok = json.loads(_cli("evaluate", f"{bucket}/out", "--gt", gt, "--task", "tokens", *endpoint).stdout)
    assert tok["mean_tokens"] > 1 and 0.0 < tok["asa"] <= 1.0


@pytest.mark.parametrize("where", ["local", "s3"])
def test_report_of_an_s3_run(s3_run, tmp_path, where):
    """The page and every PNG it shows land where asked (a local folder or an S3 prefix) and decode."""
    bucket, storage, _ = s3_run
    out_dir = str(tmp_path / "report") if where == "local" else f"{bucket}/report"
    index = _cli("report", f"{bucket}/out", "--out", out_dir, "--sample", "6",
                 "--endpoint-url", storage.endpoint_url).stdout.strip().splitlines()[-1]
    assert index == st.join(out_dir, "index.html")
    page = st.read_bytes(index, storage).decode()
    shown = re.findall(r"<img src=[\"']([^\"']+)[\"']", page)
    assert len(shown) >= 6
    for rel in set(shown):
        img = decode_png(st.read_bytes(st.join(out_dir, rel), storage))
        assert img.ndim == 3 and img.shape[2] in (3, 4) and int(np.ptp(img)) > 0  # overlays RGB, plots RGBA


def test_export_of_an_s3_run_to_s3(s3_run):
    bucket, storage, _ = s3_run
    _cli("export", f"{bucket}/out", "--format", "coco", "--out", f"{bucket}/exports/coco.json",
         "--endpoint-url", storage.endpoint_url)
    data = json.loads(st.read_bytes(f"{bucket}/exports/coco.json", storage))
    assert len(data["images"]) == 12 and data["annotations"]
    assert all(img["file_name"] for img in data["images"])
