"""Kill the driver midway, run again: every image exactly once, no error row lost."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import yaml

from pseudolabel.engine.audit import inspect
from pseudolabel.jobs.outputs.labels_io import read_labels


def _committed(out):
    """Committed checkpoint files: each stands for labels files written whole."""
    d = os.path.join(out, "_checkpoints")
    return [f for f in os.listdir(d) if f.endswith(".parquet") and not f.endswith(".pending.parquet")] \
        if os.path.isdir(d) else []


def test_killed_driver_resumes_exactly_once(tmp_path):
    from pseudolabel.jobs.demo.data import generate

    root = tmp_path / "demo"
    generate(str(root), images=40, shards=4, seed=11, size=128, progress=False)
    (root / "images" / "00000" / "zero.png").write_bytes(b"")
    (root / "images" / "00003" / "junk.jpg").write_bytes(b"junk")
    out = str(tmp_path / "out")
    job = {
        "input": {"uri": str(root / "images")},
        "output": {"uri": out},
        # a host-only labeler (CPU tasks) and one with all three stages: prepare (decode tasks), a device
        # half (actor), a host half (CPU tasks)
        "labelers": [{"name": "classical_grabcut", "ontology": [{"category": "shape"}],
                      "params": {"iterations": 8}},
                     {"name": "fault_labelers:PreparingFlaky",
                      "params": {"forward_fail_width": 1, "host_fail_width": 1, "prepare_fail_width": 1}}],
        "resources": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2, "decode_batch_size": 2},
    }
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    cmd = [sys.executable, "-m", "pseudolabel.cli", "run", str(spec), "--quiet"]
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "RAY_ADDRESS": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}

    # 1. Start the job in its own process group (its own local Ray cluster) and kill it all once
    #    some, but not all, labels are committed (a labels file being written may be cut short).
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not _committed(out):
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(inspect(out).row_ids())  # committed rows (files of an uncommitted write are skipped)
    assert 0 < partial < 42
    assert os.path.exists(os.path.join(out, "_lease.json"))  # the killed run's lease: its process is gone

    # 2. Run the same command again: it resumes from the manifest and the checkpoint.
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_labels(out)
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 42
    errors = sorted(r["file_name"] for r in table.to_pylist() if r["status"] == "error")
    assert errors == ["00000/zero.png", "00003/junk.jpg"]
    assert all("fault_labelers:PreparingFlaky" in {a["labeler"] for a in r["annotations"]}
               for r in table.to_pylist() if r["status"] == "ok")
    summary = json.loads(done.stdout)
    assert sorted(summary["labeler_seconds"][1]) == ["device", "host", "labeler", "prepare"]
    assert summary["resumed"] and summary["labelled"] == summary["distinct"] == 42
    # images committed before the kill were skipped, not labelled again
    runs = [r["provenance"]["run_id"] for r in table.to_pylist()]
    assert runs.count(summary["run_id"]) == summary["this_run"] < 42
    assert len(set(runs)) == 2
    assert not os.path.exists(os.path.join(out, "_lease.json"))  # taken over at once, released at the end
    verify = subprocess.run([sys.executable, "-m", "pseudolabel.cli", "verify", out], env=env, check=False,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and verify.stdout.startswith("OK: 42 images, 42 rows (40 ok, 2 error"), verify.stdout
    shutil.rmtree(tmp_path / "demo")
