"""The pre-flight checks and their parts, one by one (the command-line view is in test_env_errors.py)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
import uuid

import pytest

from pseudolabel.engine.cluster import (
    CONNECT_TIMEOUT_ENV,
    check_address,
    cluster_address,
    connect_timeout,
    split_address,
)
from pseudolabel.engine.errors import ClusterError, OutputPathError, StorageAccessError, environment_problem
from pseudolabel.engine.preflight import check_bucket, check_output, preflight
from pseudolabel.models.specs import load_spec
from pseudolabel.storage import exists, read_bytes, write_bytes


def _job(input_uri: str, output_uri: str, storage=None):
    spec = {"input": {"uri": input_uri}, "output": {"uri": output_uri},
            "labelers": [{"name": "classical_grabcut"}]}
    if storage is not None:
        spec["storage"] = storage.model_dump()
    return load_spec(spec)


# ---- local output ----------------------------------------------------------------------------------

def test_writable_output_folders_pass_and_nothing_is_left_or_created(tmp_path):
    existing = tmp_path / "out"
    existing.mkdir()
    check_output(str(existing))
    assert os.listdir(existing) == []  # the write probe removed itself
    missing = tmp_path / "a" / "b" / "out"
    check_output(str(missing))
    check_output(f"file://{missing}")
    assert not (tmp_path / "a").exists()  # checked, not created: the run creates it


def test_output_below_a_file_names_the_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match=f"{tmp_path / 'f'} is a file"):
        check_output(str(tmp_path / "f" / "a" / "b"))


# ---- S3 ----------------------------------------------------------------------------------------------

def test_folders_inside_an_existing_bucket_are_fine(s3_bucket):
    bucket, st = s3_bucket
    check_bucket("output.uri", f"{bucket}/not/there/yet", st)
    job = _job(f"{bucket}/images", f"{bucket}/runs/one", st)
    preflight(job)  # S3 input and output in one bucket, no --address: one request


def test_bucket_errors_name_the_field(s3_bucket):
    _, st = s3_bucket
    with pytest.raises(OutputPathError, match="output.uri s3://nope-.*create it first"):
        check_bucket("output.uri", f"s3://nope-{uuid.uuid4().hex[:8]}/out", st)
    with pytest.raises(StorageAccessError, match="input.coco_json s3://nope-.*check input.coco_json"):
        check_bucket("input.coco_json", f"s3://nope-{uuid.uuid4().hex[:8]}/gt.json", st)
    with pytest.raises(StorageAccessError, match="names no bucket"):
        check_bucket("output.uri", "s3:///key", st)


def test_writes_never_create_a_bucket(s3_bucket):
    import boto3

    bucket, st = s3_bucket
    write_bytes(f"{bucket}/deep/folder/x.json", b"{}", st)  # folders inside a bucket need no creating
    assert read_bytes(f"{bucket}/deep/folder/x.json", st) == b"{}"
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(FileNotFoundError) as err:
        write_bytes(f"s3://{missing}/out/job.json", b"{}", st)
    assert "create it first" in environment_problem(err.value)  # one line, were it met mid-run
    client = boto3.client("s3", endpoint_url=st.endpoint_url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    assert missing not in {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert not exists(f"s3://{missing}/out/job.json", st)


# ---- errors met mid-run ------------------------------------------------------------------------------

def test_environment_problems_met_mid_run_become_one_line():
    import botocore.exceptions as be

    def chained(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as err:
                raise RuntimeError("while writing labels") from err
        except RuntimeError as outer:
            return outer

    cases = [
        (be.NoCredentialsError(), "no S3 credentials"),
        (be.ClientError({"Error": {"Code": "SignatureDoesNotMatch", "Message": "no"}}, "PutObject"),
         "S3 refused the request (SignatureDoesNotMatch)"),
        (be.ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no"}}, "GetObject"),
         "(InvalidAccessKeyId)"),
        (be.ClientError({"Error": {"Code": "ExpiredToken", "Message": "old"}}, "GetObject"), "(ExpiredToken)"),
        (be.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "cannot reach the S3 endpoint"),
        (OSError(errno.EROFS, "Read-only file system", "/out/labels"), "Read-only file system: /out/labels"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ]
    for err, words in cases:
        line = environment_problem(chained(err))
        assert line is not None and words in line and "\n" not in line, (err, line)
    # anything else is a bug, not the user's mistake: it keeps its traceback
    assert environment_problem(chained(ValueError("bad index"))) is None
    assert environment_problem(be.ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")) is None


# ---- cluster address ---------------------------------------------------------------------------------

@pytest.mark.parametrize("address, parsed", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)), ("head", ("head", 6379)), ("ray://head", ("head", 10001)),
    ("ray://head:1234", ("head", 1234)), ("[::1]:7000", ("::1", 7000)), ("[fe80::1]", ("fe80::1", 6379)),
])
def test_split_address(address, parsed):
    assert split_address(address) == parsed


def test_address_sources_and_bad_addresses(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert cluster_address(None) is None and cluster_address("local") is None
    monkeypatch.setenv("RAY_ADDRESS", "head:1")
    assert cluster_address(None) == "head:1" and cluster_address("other:2") == "other:2"
    check_address("auto")  # Ray finds that one itself: nothing to probe
    with pytest.raises(ClusterError, match="'head:99999' is not a cluster address"):
        check_address("head:99999")


def test_connect_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(CONNECT_TIMEOUT_ENV, raising=False)
    assert connect_timeout() == 10
    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, "2.5")
    assert connect_timeout() == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv(CONNECT_TIMEOUT_ENV, bad)
        with pytest.raises(ClusterError, match=CONNECT_TIMEOUT_ENV):
            connect_timeout()


# ---- the reaper of a killed driver's local Ray ---------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reaper_stops_only_the_processes_of_its_node():
    from pseudolabel.engine.reaper import node_processes, stop

    node = uuid.uuid4().hex
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    mine = subprocess.Popen(sleeper, env={**os.environ, "RAY_NODE_ID": node})
    other = subprocess.Popen(sleeper, env={**os.environ, "RAY_NODE_ID": uuid.uuid4().hex})
    try:
        assert node_processes(node) == [mine.pid]
        stop(node_processes(node), grace_s=5)
        assert mine.wait(timeout=10) is not None
        assert other.poll() is None
        assert node_processes(node) == []
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reaper_finds_the_writers_of_its_session_logs(tmp_path):
    """A Ray process that sets its title can lose its node id from /proc/PID/environ: the reaper also
    knows the node's processes by the log files under the session directory they hold open for writing
    (not a reader of them, nor a writer elsewhere)."""
    from pseudolabel.engine.reaper import node_processes

    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    (session / "logs" / "agent.log").write_text("")
    (tmp_path / "elsewhere.log").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}

    def holding(path: object, mode: str) -> subprocess.Popen:
        code = f"import sys, time; f = open({str(path)!r}, {mode!r}); print(1, flush=True); time.sleep(60)"
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline()  # the file is open now
        return proc

    writer = holding(session / "logs" / "agent.log", "a")
    reader = holding(session / "logs" / "agent.log", "r")
    other = holding(tmp_path / "elsewhere.log", "a")
    try:
        node = uuid.uuid4().hex
        assert node_processes(node, session_dir=str(session)) == [writer.pid]
        assert node_processes(node) == []  # the session is what finds it here
    finally:
        for p in (writer, reader, other):
            p.kill()
            p.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reaper_acts_when_its_driver_is_gone(tmp_path):
    """A driver process starts the reaper and closes its end of the pipe early (as the interpreter's
    clean-up at exit may) while it still writes the session's logs: nothing is stopped, the driver
    least of all, until the driver is gone (kill -9); then the node's processes are."""
    from pseudolabel.engine.reaper import _alive

    node = uuid.uuid4().hex
    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, "RAY_NODE_ID": node})
    driver_code = (
        "import subprocess, sys, time\n"
        f"log = open({str(session / 'logs' / 'driver.log')!r}, 'a')\n"
        "reaper = subprocess.Popen([sys.executable, '-m', 'pseudolabel.engine.reaper', sys.argv[1],"
        " '--session', sys.argv[2]], stdin=subprocess.PIPE)\n"
        "print(reaper.pid, flush=True)\n"
        "time.sleep(1.0)\n"
        "reaper.stdin.close()\n"
        "print('closed', flush=True)\n"
        "time.sleep(60)\n")
    driver = subprocess.Popen([sys.executable, "-c", driver_code, node, str(session)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert driver.stdout is not None
        reaper_pid = int(driver.stdout.readline())
        assert driver.stdout.readline().strip() == "closed"
        time.sleep(2.0)
        assert driver.poll() is None and victim.poll() is None and _alive(reaper_pid)  # the driver lives
        driver.kill()
        driver.wait()
        assert victim.wait(timeout=30) is not None
        deadline = time.time() + 30
        while _alive(reaper_pid) and time.time() < deadline:  # not a child of this process: poll
            time.sleep(0.1)
        assert not _alive(reaper_pid)
    finally:
        for p in (victim, driver):
            p.kill()
            p.wait()
