"""A job on a multi-node Ray cluster reached through --address, and a worker node lost mid-run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from pseudolabel.jobs.outputs.labels_io import read_labels


def _write_job(tmp_path, images: str, out: str, **resources) -> str:
    job = {"input": {"uri": images}, "output": {"uri": out},
           # a host-only labeler (CPU tasks) and one with a device half (actors) before its host half
           "labelers": [{"name": "classical_grabcut", "ontology": [{"category": "shape"}],
                         "params": {"iterations": 6}},
                        {"name": "fault_labelers:SplitFlaky",
                         "params": {"forward_fail_width": 1, "host_fail_width": 1}}],
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
    from pseudolabel.jobs.demo.data import generate

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


# ---- --address that cannot be joined, and the local Ray of a killed driver ------------------------------

def _cli(*args: str, env: dict | None = None, timeout: float = 180):
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pseudolabel.cli", "run", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_ADDRESS": "", **(env or {})})
    return proc, time.time() - started


def _one_line(proc, *words: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def _tiny_job(tmp_path) -> str:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"input": {"uri": str(tmp_path / "images")},
                                    "output": {"uri": str(tmp_path / "out")},
                                    "labelers": [{"name": "classical_grabcut"}]}))
    return str(path)


def test_address_that_refuses_is_one_line_in_seconds(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, seconds = _cli(_tiny_job(tmp_path), "--address", f"127.0.0.1:{port}")
    _one_line(proc, f"127.0.0.1:{port}", "--address", "connection refused", "leave it out")
    assert seconds < 60 and not (tmp_path / "out").exists()
    # RAY_ADDRESS is checked the same way, and named
    proc, _ = _cli(str(tmp_path / "tiny.yaml"), env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    _one_line(proc, "RAY_ADDRESS", "connection refused")


def test_address_that_accepts_but_never_answers_times_out(tmp_path):
    """A port that takes the connection and then says nothing (a firewall's proxy, a hung head): Ray would
    retry for minutes; the join is bounded by --connect-timeout (plus Ray's two 5 s connection waits)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.2", 0))  # loopback, and not one Ray swaps for this node's address
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(16)], daemon=True).start()
    address = f"127.0.0.2:{server.getsockname()[1]}"
    try:
        proc, seconds = _cli(_tiny_job(tmp_path), "--address", address, "--connect-timeout", "2")
    finally:
        server.close()
    _one_line(proc, address, "cannot join the Ray cluster", "did not answer as a Ray cluster")
    assert seconds < 60, seconds
    assert not (tmp_path / "out").exists()  # refused before anything was listed or written


def test_bad_connect_timeout_is_one_line(tmp_path):
    proc, _ = _cli(_tiny_job(tmp_path), env={"PSEUDOLABEL_CONNECT_TIMEOUT": "soon"})
    _one_line(proc, "PSEUDOLABEL_CONNECT_TIMEOUT", "'soon'")


def _session_pids(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (the RAY_TMPDIR of one driver's local Ray)."""
    needle = marker.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        with open(f"/proc/{entry}/stat", "rb") as s:
                            if s.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                                pids.append(int(entry))
            except OSError:
                pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_ray_goes_away_with_a_killed_driver(tmp_path):
    """kill -9 of `pseudolabel run` leaves no process of the local Ray it started (Ray's agents used to
    linger). The driver runs with its own RAY_TMPDIR, which every process of its Ray inherits: that tells
    them apart from the test session's cluster and from anyone else's."""
    import signal
    import tempfile

    from pseudolabel.jobs.demo.data import generate

    generate(str(tmp_path / "demo"), images=150, shards=3, seed=1, size=64, progress=False)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "input": {"uri": str(tmp_path / "demo" / "images")}, "output": {"uri": str(tmp_path / "out")},
        "labelers": [{"name": "classical_grabcut", "params": {"iterations": 10}}],
        "resources": {"decode_batch_size": 2}}))
    ray_tmp = tempfile.mkdtemp(prefix="plr", dir="/tmp")  # short: Ray's socket paths live under it
    marker = f"RAY_TMPDIR={ray_tmp}"
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pseudolabel.cli", "run", str(spec), "--quiet"],
                            env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp}, stdout=log, stderr=log)
    try:
        # 1. Wait for the local Ray (its agents) and the watcher started with it.
        deadline = time.time() + 240
        ready, seen = False, []
        while time.time() < deadline and proc.poll() is None and not ready:
            names = [_cmdline(pid) for pid in _session_pids(marker)]
            seen.append(sorted(n[:60] for n in names))
            # the two agents, by title (ray::DashboardAgent) or, before they set it, by script path
            ready = (any("pseudolabel.engine.reaper" in n for n in names)
                     and sum("agent" in n.lower() for n in names) >= 2)
            time.sleep(0.2)
        assert proc.poll() is None, (f"the job ended before its driver could be killed: "
                                     f"{sorted(set(n for names in seen for n in names))} "
                                     f"{(tmp_path / 'driver.log').read_text()[-2000:]}")
        assert ready, [_cmdline(pid) for pid in _session_pids(marker)]
        # 2. kill -9 the driver: nothing of its Ray may remain.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 60  # the watcher's rounds: SIGTERM, 2 s grace, SIGKILL (slower on a loaded machine)
        while time.time() < deadline and _session_pids(marker):
            time.sleep(0.5)
        left = {pid: _cmdline(pid) for pid in _session_pids(marker)}
        assert not left, left
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
        for pid in _session_pids(marker):  # only this driver's processes (the marker is unique to it)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
