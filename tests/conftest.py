"""Shared fixtures: a real Ray cluster, a real S3 endpoint on 127.0.0.1, demo data."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ACCEPT_CLUSTER_ADDRESS_ENV", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 2 CPUs, shared by the whole session."""
    import ray

    if not ray.is_initialized():
        # tests/ on the workers' path, so test-only labelers ("fault_labelers:Flaky") import in actors
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONPATH": tests_dir}})
    yield ray


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; yields a StorageSpec pointing at it."""
    from moto.server import ThreadedMotoServer

    from pseudolabel.schemas.spec import StorageSpec

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield StorageSpec(endpoint_url=endpoint, key="testing", secret="testing", region="us-east-1")
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket; yields (bucket_uri, storage spec)."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
    yield f"s3://{name}", s3_server


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small demo dataset (folder layout): 12 images of 96 px in 3 shards; returns its root path."""
    from pseudolabel.jobs.demo.data import generate

    root = str(tmp_path_factory.mktemp("demo") / "demo")
    generate(root, images=12, shards=3, seed=7, size=96, progress=False)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one torch thread on a shared 2-core machine (use per module:
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable Diffusion in diffusers layout (see sd_tiny.py), built once per session."""
    from sd_tiny import build_tiny_sd

    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd") / "sd"))


# -- fault injection: the S3 proxy and the RELIABILITY.md table ------------------------------------------

from reliability_report import ReliabilityLog  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

_RELIABILITY = ReliabilityLog()


@pytest.fixture()
def fault_proxy(s3_server):
    """A fault-injecting proxy (tests/s3_fault_proxy.py) in front of the S3 server, no faults switched on;
    yields (proxy, StorageSpec pointing s3fs at the proxy)."""
    from s3_fault_proxy import S3FaultProxy

    proxy = S3FaultProxy(s3_server.endpoint_url, seed=1234).start()
    yield proxy, s3_server.model_copy(update={"endpoint_url": proxy.endpoint_url})
    proxy.stop()


@pytest.fixture(scope="session")
def reliability_log():
    """The session's reliability table: ``reliability_log.add(case, fault, injected, outcome, lost, duplicates)``."""
    return _RELIABILITY


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("reliability") is not None:
        _RELIABILITY.current = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("reliability") is None:
        return
    if hasattr(report, "wasxfail"):
        state = "xfail" if report.skipped else "xpass"
    elif report.failed:
        state = "failed" if report.when == "call" else f"error in {report.when}"
    elif report.skipped:
        state = "skipped"
    elif report.when == "call":
        state = "passed"
    else:
        return
    if item.nodeid not in _RELIABILITY.outcomes or state != "passed":
        _RELIABILITY.outcomes[item.nodeid] = state


_RELIABILITY_DESELECTED: set[str] = set()


def pytest_deselected(items):
    _RELIABILITY_DESELECTED.update(i.nodeid for i in items if i.get_closest_marker("reliability") is not None)


def _every_reliability_case_ran(config) -> bool:
    """True for ``pytest -m reliability`` or a whole-suite run; False when ``-k``, a deselection or a
    ``file::test`` argument ran only some cases (their rows would make a partial table)."""
    if config.option.keyword or _RELIABILITY_DESELECTED:
        return False
    return not any("::" in str(arg) for arg in config.args)


def pytest_sessionfinish(session, exitstatus):
    """Write RELIABILITY.md at the repository root when every reliability case ran and recorded its rows."""
    complete = _every_reliability_case_ran(session.config)
    if _RELIABILITY.rows and complete:
        _RELIABILITY.write(os.path.join(str(session.config.rootpath), "RELIABILITY.md"))
