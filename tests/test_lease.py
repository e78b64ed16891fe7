"""One writer per output: the lease (local O_EXCL, S3 If-None-Match), its heartbeat and takeover, and
two real runs started together into one output."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from pseudolabel.engine.lease import LEASE, OutputBusyError, acquire, is_stale
from pseudolabel.errors import UsageError


def _write_lease(out, **record):
    os.makedirs(out, exist_ok=True)
    now = time.time()
    data = {"run_id": "otherrun0001", "host": "elsewhere", "pid": 4242, "since": now - 5, "heartbeat": now, **record}
    with open(os.path.join(out, LEASE), "w") as f:
        json.dump(data, f)
    return data


def test_second_holder_is_refused_with_the_holder_named_and_release_frees_it(tmp_path):
    out = str(tmp_path / "out")
    lease = acquire(out, None, "runA", timeout_s=30)
    held = json.loads((tmp_path / "out" / LEASE).read_text())
    assert held["run_id"] == "runA" and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(OutputBusyError) as err:
        acquire(out, None, "runB", timeout_s=30)
    assert isinstance(err.value, UsageError)  # the CLI prints it as one line, exit 2
    message = str(err.value)
    assert "\n" not in message
    for part in (f"host {socket.gethostname()}", f"pid {os.getpid()}", "run runA", "since 20"):
        assert part in message
    lease.release()
    assert not (tmp_path / "out" / LEASE).exists()
    acquire(out, None, "runB", timeout_s=30).release()


def test_verify_names_a_run_writing_the_output(tmp_path, capsys):
    from pseudolabel.cli import main

    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    with acquire(str(out), None, "runA", timeout_s=30):
        assert main(["verify", str(out)]) == 1  # listing not done yet
        text = capsys.readouterr().out
    assert text.startswith("FAILED: 0 images, 0 rows") and "; listing incomplete;" in text
    assert "\n  listing: incomplete (" in text
    assert f"lease: being written now by host {socket.gethostname()} pid {os.getpid()} run runA since" in text
    _write_lease(str(out), heartbeat=time.time() - 3600)
    main(["verify", str(out)])
    assert "lease: a stale lease of host elsewhere pid 4242 run otherrun0001" in capsys.readouterr().out


def test_an_output_that_cannot_hold_a_lease_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match=r"^output.uri .*afile/out: cannot write the lease .*_lease.json: "):
        acquire(str(tmp_path / "afile" / "out"), None, "runA", timeout_s=30)


def test_heartbeat_renews_and_a_stale_lease_is_taken_over(tmp_path, caplog):
    out = str(tmp_path / "out")
    # a live holder elsewhere: refused
    _write_lease(out)
    with pytest.raises(OutputBusyError, match="host elsewhere pid 4242 run otherrun0001"):
        acquire(out, None, "mine", timeout_s=30)
    # the same holder without heartbeat for longer than the timeout: taken over
    _write_lease(out, heartbeat=time.time() - 31)
    with acquire(out, None, "mine", timeout_s=30) as lease:
        assert json.loads((tmp_path / "out" / LEASE).read_text())["run_id"] == "mine"
        assert "taking over the stale lease of host elsewhere" in caplog.text
    # a holder on this host whose process is gone: taken over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)
    _write_lease(out, host=socket.gethostname(), pid=int(dead.stdout))
    assert is_stale(json.loads((tmp_path / "out" / LEASE).read_text()), timeout_s=30)
    lease = acquire(out, None, "mine2", timeout_s=0.6)
    first = json.loads((tmp_path / "out" / LEASE).read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / "out" / LEASE).read_text())["heartbeat"] > first  # renewed (every 0.2 s)
    # a run that lost its lease (taken over while it did not beat) notices and does not remove the new one
    lease._stop.set()
    lease._thread.join()
    lease._stop.clear()
    time.sleep(0.7)
    thief = acquire(out, None, "thief", timeout_s=0.6)
    lease.start()
    time.sleep(0.5)
    assert lease.lost
    lease.release()
    assert json.loads((tmp_path / "out" / LEASE).read_text())["run_id"] == "thief"
    thief.release()


def test_s3_lease_is_a_conditional_create_with_heartbeat_and_takeover(s3_bucket):
    from pseudolabel.storage import filesystem

    bucket, storage = s3_bucket
    out = f"{bucket}/out"
    fs, path = filesystem(f"{out}/{LEASE}", storage)
    lease = acquire(out, storage, "runA", timeout_s=1.2)
    assert lease.store.conditional  # moto's server honours If-None-Match: *
    with pytest.raises(OutputBusyError, match="run runA"):
        acquire(out, storage, "runB", timeout_s=1.2)
    first = json.loads(fs.cat_file(path))["heartbeat"]
    time.sleep(0.6)
    assert json.loads(fs.cat_file(path))["heartbeat"] > first
    # stop beating: stale after the timeout, taken over; the old holder's next beat fails its If-Match
    lease._stop.set()
    lease._thread.join()
    time.sleep(1.4)
    thief = acquire(out, storage, "runC", timeout_s=1.2)
    assert json.loads(fs.cat_file(path))["run_id"] == "runC"
    assert lease.store.renew(b"{}", "runA") is False
    thief.release()
    assert not fs.exists(path)


def test_s3_lease_without_conditional_writes_falls_back_to_create_then_verify(s3_bucket, monkeypatch):
    from pseudolabel.engine import lease as lease_module

    bucket, storage = s3_bucket
    monkeypatch.setattr(lease_module._S3Store, "conditional", False)  # as after a store refused If-None-Match
    monkeypatch.setattr(lease_module, "VERIFY_DELAY_S", 0.2)
    lease = acquire(f"{bucket}/out", storage, "runA", timeout_s=30)
    assert not lease.store.conditional
    with pytest.raises(OutputBusyError, match="run runA"):  # the look before the write sees the holder
        acquire(f"{bucket}/out", storage, "runB", timeout_s=30)
    lease.release()
    acquire(f"{bucket}/out", storage, "runB", timeout_s=30).release()


def test_lease_is_released_when_the_run_fails(ray_cluster, demo_root, tmp_path):
    import pseudolabel
    from pseudolabel.engine.errors import ResourceError

    out = tmp_path / "out"
    job = {"input": {"uri": f"{demo_root}/images"}, "output": {"uri": str(out)},
           "labelers": [{"name": "classical_tokens", "device": "cpu"}],
           "resources": {"actors": 8, "cpus_per_actor": 1, "host": "actor"}}
    with pytest.raises(ResourceError):  # raised after the lease was taken and Ray connected
        pseudolabel.run(job, progress=False)
    assert (out / "job.json").exists() and not (out / LEASE).exists()


def test_two_runs_started_together_one_is_refused_and_every_image_is_written_once(demo_root, tmp_path):
    from pseudolabel.jobs.outputs.labels_io import read_labels

    out = str(tmp_path / "out")
    job = {"input": {"uri": f"{demo_root}/images"}, "output": {"uri": out},
           "labelers": [{"name": "classical_tokens"}],
           "resources": {"actors": 1, "batch_size": 2, "decode_batch_size": 2}}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    cmd = [sys.executable, "-m", "pseudolabel.cli", "run", str(spec), "--quiet"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    refused = next(err for rc, _, err in results if rc == 2)
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in refused, refused
    assert lines[0].startswith(f"error: {out} is being written by another run (host {socket.gethostname()} pid ")
    assert " run " in lines[0] and " since " in lines[0]
    winner = json.loads(next(so for rc, so, _ in results if rc == 0))
    assert lines[0].count(winner["run_id"]) == 1  # the holder named is the run that completed
    ids = read_labels(out).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12 == winner["this_run"]
    assert not os.path.exists(os.path.join(out, LEASE))
    verify = subprocess.run([sys.executable, "-m", "pseudolabel.cli", "verify", out], check=False,
                            capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout.startswith("OK: 12 images"), verify.stdout + verify.stderr


def test_the_job_sets_how_long_a_silent_lease_blocks(ray_cluster, demo_root, tmp_path):
    """``output.lease_timeout_s``: a holder elsewhere silent for 8 s blocks a job at the 60 s default and
    is taken over by a job that sets 5 s."""
    import pseudolabel

    out = tmp_path / "out"
    _write_lease(str(out), heartbeat=time.time() - 8)
    job = {"input": {"uri": f"{demo_root}/images", "limit": 4}, "output": {"uri": str(out)},
           "labelers": [{"name": "classical_tokens"}]}
    with pytest.raises(OutputBusyError, match="host elsewhere"):
        pseudolabel.run(job, progress=False)
    job["output"]["lease_timeout_s"] = 5
    summary = pseudolabel.run(job, progress=False)
    assert summary["ok"] == 4 and not (out / LEASE).exists()
