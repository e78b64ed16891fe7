"""The labeler batch memory budget (resources.max_batch_pixels): batches are cut into sub-batches of at
most that many decoded pixels (an oversized image alone), and the rows come out identical and in order."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from recording_labelers import calls

import pseudolabel
from pseudolabel.engine.decode import fetch_decode
from pseudolabel.engine.sources import list_input
from pseudolabel.engine.stage import DeviceStage, decode_then_host, host_stage
from pseudolabel.jobs.outputs.labels_io import read_labels
from pseudolabel.schemas.spec import InputSpec

PROVENANCE = {"labelers": ["recording"], "weights": [""], "revisions": [""], "params_hash": "x",
              "engine_version": "0", "run_id": "r"}
#: (height, width) of the test images, in file-name order: 120k, 120k, 360k, 60k, 120k pixels
SIZES = [(300, 400), (400, 300), (600, 600), (200, 300), (300, 400)]
BUDGET = 250_000


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "imgs"
    root.mkdir()
    for k, (h, w) in enumerate(SIZES):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / f"{k}.png")
    (root / "5_bad.png").write_bytes(b"not a png")  # an error row between good ones keeps its place
    return str(root)


def _within_budget(logged: list[list[list[int]]], budget: int) -> None:
    for call in logged:
        pixels = sum(h * w for h, w in call)
        assert pixels <= budget or len(call) == 1, call


def test_device_stage_splits_a_batch_and_keeps_rows_in_order(folder, tmp_path):
    batch = fetch_decode(list_input(InputSpec(uri=folder)), storage=None, max_pixels=10**7)
    outs = {}
    for budget in (None, BUDGET):
        log = str(tmp_path / f"calls-{budget}.jsonl")
        spec = {"name": "recording_labelers:RecordingWhole", "params": {"log": log}}
        stage = DeviceStage(spec, 0, None, 0, max_batch_pixels=budget)
        outs[budget] = host_stage(stage(batch), [{"spec": spec, "source": "record"}], None, PROVENANCE)
        logged = calls(log)
        if budget is None:
            assert logged == [[list(s) for s in SIZES]]  # one call with every good image
        else:
            assert logged == [[[300, 400], [400, 300]], [[600, 600]], [[200, 300], [300, 400]]]
            _within_budget(logged, budget)
    whole, split = outs[None].to_pylist(), outs[BUDGET].to_pylist()
    assert [r["file_name"] for r in split] == ["0.png", "1.png", "2.png", "3.png", "4.png", "5_bad.png"]
    assert split == whole
    assert [r["status"] for r in split] == ["ok"] * 5 + ["error"]
    assert all(len(r["annotations"]) == 1 for r in split[:5])


def test_host_task_decodes_and_labels_within_budget_in_order(folder, tmp_path):
    manifest = list_input(InputSpec(uri=folder))
    outs = {}
    for budget in (None, BUDGET):
        log = str(tmp_path / f"host-{budget}.jsonl")
        spec = {"name": "recording_labelers:RecordingHost", "params": {"log": log}}
        host = dict(labelers=[{"spec": spec, "source": "host"}], storage=None, provenance=PROVENANCE)
        outs[budget] = decode_then_host(manifest, dict(storage=None, max_pixels=10**7, max_batch_pixels=budget), host)
        assert calls(log) == [[list(s)] for s in SIZES]  # every good image once, in order
    assert outs[BUDGET].to_pylist() == outs[None].to_pylist()
    assert outs[BUDGET].column("file_name").to_pylist()[-1] == "5_bad.png"


PEAK_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    from pseudolabel.engine.sources import list_input
    from pseudolabel.engine.stage import decode_then_host
    from pseudolabel.schemas.spec import InputSpec
    folder, budget = sys.argv[1], json.loads(sys.argv[2])
    spec = {"name": "recording_labelers:RecordingHost"}
    host = dict(labelers=[{"spec": spec, "source": "host"}], storage=None,
                provenance={"labelers": ["r"], "weights": [""], "revisions": [""], "params_hash": "x",
                            "engine_version": "0", "run_id": "r"})
    manifest = list_input(InputSpec(uri=folder))
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    peak, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    before = rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    out = decode_then_host(manifest, dict(storage=None, max_pixels=10**9, max_batch_pixels=budget), host)
    done.set()
    sampler.join()
    assert out.num_rows == manifest.num_rows and set(out.column("status").to_pylist()) == {"ok"}
    print(json.dumps({"before_kb": before // 1024, "peak_kb": max(peak[0], rss()) // 1024}))
""")


def test_host_task_peak_memory_follows_the_budget_not_the_batch(tmp_path):
    """Six 2400x2400 single-colour PNGs (tiny files, 17 MB of pixels each) in one host task: with a
    one-image budget the process's peak grows by far less than with no budget."""
    root = tmp_path / "big"
    root.mkdir()
    for k in range(6):
        Image.new("RGB", (2400, 2400), (40 * k, 90, 200)).save(root / f"{k}.png")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    growth = {}
    for budget in (None, 2400 * 2400):
        done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(root), json.dumps(budget)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        growth[budget] = (figures["peak_kb"] - figures["before_kb"]) / 1024
    one_image_mb = 2400 * 2400 * 3 / 2**20
    # no budget holds all six images' pixels at once; the budget holds about one (plus its label's work)
    assert growth[None] > 5 * one_image_mb, growth
    assert growth[2400 * 2400] < 0.5 * growth[None], growth


def test_run_hands_the_labeler_actor_batches_within_budget(ray_cluster, folder, tmp_path):
    log = str(tmp_path / "actor-calls.jsonl")
    job = {"input": {"uri": folder}, "output": {"uri": str(tmp_path / "out")},
           "labelers": [{"name": "recording_labelers:RecordingWhole", "params": {"log": log}}],
           "resources": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 6, "decode_batch_size": 6,
                         "max_batch_pixels": BUDGET}}
    summary = pseudolabel.run(job, progress=False)
    assert summary["ok"] == 5 and summary["error"] == 1
    logged = calls(log)
    _within_budget(logged, BUDGET)
    assert sorted(tuple(s) for call in logged for s in call) == sorted(SIZES)  # each good image once
    assert any(len(call) > 1 for call in logged) or len(logged) >= 3
    table = read_labels(str(tmp_path / "out"))
    assert table.num_rows == 6 == len(set(table.column("image_id").to_pylist()))
