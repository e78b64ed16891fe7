"""Mistakes in a job's environment, through the real command line: each is one line on stderr naming the
thing and the fix, exit status 2, no traceback, and (where the mistake can be seen before) no Ray.

S3 cases run against moto's server on 127.0.0.1. Wrong credentials need a server that checks them:
moto does so when started with ``INITIAL_NO_AUTH_ACTION_COUNT`` (an unknown access key is
``InvalidAccessKeyId``, a known key with a wrong secret ``SignatureDoesNotMatch``, a user without rights
``AccessDenied``). Expired session tokens and a bucket in another region are refusals moto does not
make; they are not tested here.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def images(tmp_path):
    """A folder with one small PNG."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / "a.png")
    return str(folder)


def _spec(tmp_path, images: str, output: str, storage: dict | None = None, **extra) -> str:
    spec = {"input": {"uri": images}, "output": {"uri": output},
            "labelers": [{"name": "classical_grabcut", "params": {"iterations": 1}}], **extra}
    if storage:
        spec["storage"] = storage
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def run_cli(*args: str, env: dict | None = None, prefix: list[str] | None = None, timeout: float = 120):
    """``pseudolabel run ...`` in a subprocess (its own local Ray, never the session's)."""
    full_env = {**os.environ, "RAY_ADDRESS": "", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    started = time.time()
    proc = subprocess.run([*(prefix or []), sys.executable, "-m", "pseudolabel.cli", "run", *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env)
    proc.seconds = time.time() - started
    return proc


def assert_one_line(proc, *words: str) -> str:
    """Exit 2, no traceback, stderr exactly one line ``error: ...`` holding every word; returns it."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for word in words:
        assert word in err, err
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    return err


# ---- local output paths ----------------------------------------------------------------------------

def test_output_path_that_is_a_file(tmp_path, images):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    err = assert_one_line(run_cli(_spec(tmp_path, images, str(out))), "output.uri", str(out), "is a file")
    assert "folder" in err and out.read_text() == "not a folder"
    # a path below a file cannot be created either
    assert_one_line(run_cli(_spec(tmp_path, images, str(out / "sub"))), "output.uri", "cannot be created",
                    f"{out} is a file")


def _read_only_prefix(folder: str) -> list[str] | None:
    """A command prefix under which ``folder`` is read-only: none needed for a user that permission
    bits stop (after chmod 555); for root, a private mount namespace with a read-only bind mount."""
    os.chmod(folder, 0o555)
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {folder} {folder}"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{folder}" "{folder}" && exec "$@"', "sh"]


def test_output_folder_that_is_read_only(tmp_path, images):
    out = tmp_path / "ro"
    out.mkdir()
    prefix = _read_only_prefix(str(out))
    if prefix is None:
        os.chmod(out, 0o755)
        pytest.skip("root without mount namespaces: no way to make a folder read-only here")
    try:
        spec = _spec(tmp_path, images, str(out))
        assert_one_line(run_cli(spec, prefix=prefix), "output.uri", str(out), "writ")
        # a missing output folder whose parent is read-only
        spec = _spec(tmp_path, images, str(out / "new"))
        assert_one_line(run_cli(spec, prefix=prefix), "output.uri", "cannot be created", str(out))
    finally:
        os.chmod(out, 0o755)
    assert os.listdir(out) == []


# ---- the job file ----------------------------------------------------------------------------------

def test_yaml_syntax_error_says_file_line_and_column(tmp_path, images):
    path = tmp_path / "job.yaml"
    path.write_text(f"input:\n  uri: {images}\noutput:\n  uri: {tmp_path / 'out'}\n  oops: [1, 2\n"
                    f"labelers:\n  - name: classical_grabcut\n")
    err = assert_one_line(run_cli(str(path)), f"{path}:6:", "YAML syntax error", "line 5")
    assert not (tmp_path / "out").exists(), err


@pytest.mark.parametrize("setting, field, words", [
    ("resources.min_actors=3", "resources.min_actors", ["more than resources.actors (2)"]),
    ("labelers.0.device=tpu:9", "labelers.0.device", ["'tpu:9'", "cuda:N", "mps"]),
])
def test_spec_mistakes_are_one_line_before_ray(tmp_path, images, setting, field, words):
    spec = _spec(tmp_path, images, str(tmp_path / "out"), resources={"actors": 2})
    proc = run_cli(spec, "--set", setting)
    assert_one_line(proc, "invalid job spec", field, *words)
    assert not (tmp_path / "out").exists()


# ---- S3 --------------------------------------------------------------------------------------------

def _no_aws_env(tmp_path) -> dict:
    """An environment with no AWS credentials anywhere (variables, files, instance metadata)."""
    return {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
            "AWS_PROFILE": None, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_DEFAULT_REGION": "us-east-1"}


def test_s3_output_without_credentials(tmp_path, images, s3_bucket):
    bucket, st = s3_bucket
    spec = _spec(tmp_path, images, f"{bucket}/out", storage={"endpoint_url": st.endpoint_url})
    proc = run_cli(spec, env=_no_aws_env(tmp_path))
    assert_one_line(proc, "output.uri", "no S3 credentials", "storage.key", "AWS_ACCESS_KEY_ID")


def test_s3_endpoint_that_refuses_connections(tmp_path, images):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    spec = _spec(tmp_path, images, "s3://some-bucket/out",
                 storage={"endpoint_url": endpoint, "key": "k", "secret": "s", "region": "us-east-1"})
    proc = run_cli(spec)
    assert_one_line(proc, "output.uri", "cannot reach the S3 endpoint", endpoint, "connection refused",
                    "storage.endpoint_url")
    assert proc.seconds < 60


def test_s3_input_that_cannot_be_reached(tmp_path, s3_bucket):
    bucket, st = s3_bucket
    storage = {"endpoint_url": st.endpoint_url, "key": "testing", "secret": "testing", "region": "us-east-1"}
    spec = _spec(tmp_path, "s3://no-such-input-bucket/images", str(tmp_path / "out"), storage=storage)
    assert_one_line(run_cli(spec), "input.uri", "'no-such-input-bucket' does not exist")
    assert not (tmp_path / "out").exists()


def test_missing_output_bucket_is_refused_not_created(tmp_path, images, s3_bucket):
    import boto3

    bucket, st = s3_bucket
    storage = {"endpoint_url": st.endpoint_url, "key": "testing", "secret": "testing", "region": "us-east-1"}
    spec = _spec(tmp_path, images, "s3://not-created-by-us/some/folder", storage=storage)
    assert_one_line(run_cli(spec), "output.uri", "'not-created-by-us' does not exist", "create it first")
    client = boto3.client("s3", endpoint_url=st.endpoint_url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    assert "not-created-by-us" not in {b["Name"] for b in client.list_buckets()["Buckets"]}


@pytest.fixture()
def checking_s3(tmp_path):
    """A second moto server, in its own process, that checks credentials and permissions on every request
    after the first two (which make an IAM user without rights, and its access key); yields (endpoint,
    key id, secret)."""
    import boto3

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "2"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                           region_name="us-east-1")
        iam.create_user(UserName="no-rights")
        key = iam.create_access_key(UserName="no-rights")["AccessKey"]
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("which, words", [
    ("unknown key", ["S3 refused the credentials (InvalidAccessKeyId)", "storage.key"]),
    ("wrong secret", ["S3 refused the credentials (SignatureDoesNotMatch)", "storage.key"]),
    ("no rights", ["access denied to bucket 'any-bucket'", "need list, read and write rights"]),
])
def test_s3_wrong_credentials(tmp_path, images, checking_s3, which, words):
    endpoint, key, secret = checking_s3
    key, secret = {"unknown key": ("AKIAWRONGKEY", "wrong"), "wrong secret": (key, "wrong"),
                   "no rights": (key, secret)}[which]
    spec = _spec(tmp_path, images, "s3://any-bucket/out",
                 storage={"endpoint_url": endpoint, "key": key, "secret": secret, "region": "us-east-1"})
    assert_one_line(run_cli(spec), "output.uri", *words)
