"""Connect to Ray: a local cluster by default, ``--address`` / ``RAY_ADDRESS`` for a real one.

Joining a cluster is bounded in time: ``check_address`` opens a TCP connection to the address first
(an unreachable host fails in ``connect_timeout()`` seconds instead of Ray's retries of several
minutes), and ``bound_ray_connect`` caps Ray's own wait for the cluster's GCS. A local cluster started
here goes away with the driver, even one killed with ``kill -9`` (see ``pseudolabel.engine.reaper``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any, Iterator

from pseudolabel.engine.errors import ClusterError, one_line

#: environment variable: seconds to wait for a Ray cluster named by ``--address`` / ``RAY_ADDRESS``
CONNECT_TIMEOUT_ENV = "PSEUDOLABEL_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: ports Ray listens on when an address names none: the GCS, and Ray Client (``ray://``)
GCS_PORT, CLIENT_PORT = 6379, 10001

#: node id -> its reaper; holds the write end of each reaper's stdin while this process lives
_reapers: dict[str, subprocess.Popen] = {}


def connect_timeout() -> float:
    """Seconds to wait for a cluster: ``PSEUDOLABEL_CONNECT_TIMEOUT`` (``--connect-timeout``), default 10."""
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ClusterError(f"{CONNECT_TIMEOUT_ENV}={text!r}: expected a number of seconds above 0, e.g. 10")
    return value


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``; None (start a local one) for neither
    or ``local``."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    return None if address in ("", "local") else address


def _where(address: str | None) -> str:
    return "--address" if address else "RAY_ADDRESS"


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port``, ``[v6]:port`` or ``ray://host:port``; Ray's default port when none."""
    client = address.startswith("ray://")
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    default = CLIENT_PORT if client else GCS_PORT
    if rest.startswith("["):  # [v6]:port
        host, _, tail = rest[1:].partition("]")
        port_text = tail.removeprefix(":")
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host, port_text = rest, ""
    if not host:
        raise ValueError("no host")
    port = int(port_text) if port_text else default
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def check_address(address: str | None = None, timeout: float | None = None) -> None:
    """Before ``ray.init``: the cluster's port answers within ``timeout`` seconds, or one ClusterError
    line naming the address, what went wrong and the way out. No-op for a local cluster or ``auto``."""
    target = cluster_address(address)
    if target is None or target == "auto":
        return
    timeout = connect_timeout() if timeout is None else timeout
    where = _where(address)
    try:
        host, port = split_address(target)
    except ValueError as err:
        raise ClusterError(f"{where} {target!r} is not a cluster address ({err}): use host:port, "
                           f"e.g. 10.0.0.5:{GCS_PORT}, or leave it out to start a local cluster") from None
    host = _ray_host(host)
    fix = f"check {where}, or leave it out to start a local cluster"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror:
        raise ClusterError(f"{where} {target}: unknown host {host!r}; {fix}") from None
    except (socket.timeout, TimeoutError):
        raise ClusterError(f"cannot reach the Ray cluster at {target} ({where}): no answer within {timeout:g} s; "
                           f"{fix} ({CONNECT_TIMEOUT_ENV} or --connect-timeout sets the wait)") from None
    except ConnectionRefusedError:
        raise ClusterError(f"cannot reach the Ray cluster at {target} ({where}): connection refused (no Ray "
                           f"there? `ray start --head` starts one); {fix}") from None
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {target} ({where}): {err.strerror or err}; "
                           f"{fix}") from None


def _ray_host(host: str) -> str:
    """The host Ray itself will dial (it swaps localhost, 127.0.0.1 and ::1 for this node's address)."""
    try:
        from ray._private.services import resolve_ip_for_localhost

        return resolve_ip_for_localhost(host)
    except Exception:  # a private helper: when it moves, dial the host as given
        return host


def bound_ray_connect(timeout: float | None = None) -> None:
    """Cap Ray's own wait for a cluster's GCS (about 10 s + ``timeout``, not 20 tries of 40 s): one try,
    ``timeout`` seconds long. Ray reads the second setting when it is imported, so the CLI calls this
    before anything imports Ray; values already in the environment are kept."""
    timeout = connect_timeout() if timeout is None else timeout
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
    os.environ.setdefault("RAY_py_gcs_connect_timeout_s", str(max(1, round(timeout))))


def connect(address: str | None = None, min_cpus: float = 0, verbose: bool = False) -> None:
    """Start or join Ray once per process (a no-op when already connected).

    A local cluster advertises at least ``min_cpus`` logical CPUs (never fewer than the machine's cores),
    so a job sized for a small machine is scheduled instead of waiting forever for a free CPU; it is
    stopped with this process however this process ends. Unless ``verbose``, Ray's start-up notices
    (token authentication, progress-bar hints) stay quiet; warnings from workers and errors still show.
    Joining a cluster that cannot be reached is one ClusterError line within seconds.
    """
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        for name in ("ray._private.authentication", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    target = cluster_address(address)
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if target:
        check_address(address)
        bound_ray_connect()
        try:
            with _stderr_held_back(show_on_error=verbose):
                ray.init(address=target, **kwargs)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            first = (str(err).splitlines() or [type(err).__name__])[0]
            reason = ("it did not answer as a Ray cluster" if first.startswith("Failed to connect to Ray cluster")
                      else one_line(first))
            raise ClusterError(f"cannot join the Ray cluster at {target} ({_where(address)}): {reason}; check "
                               f"{_where(address)} (the head's GCS address, a cluster of Ray {ray.__version__}), "
                               f"or leave it out to start a local cluster") from None
        return
    import math

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus)), **kwargs)
    start_reaper()


@contextlib.contextmanager
def _stderr_held_back(show_on_error: bool = False) -> Iterator[None]:
    """Hold back what is written to file descriptor 2 (Ray's C++ warnings while it retries a cluster):
    passed on when the block succeeds (or ``show_on_error``), dropped when it fails, where our one line
    says what went wrong instead."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold back
        yield
        return
    ok = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if ok or show_on_error:
                held.seek(0)
                text = held.read().decode(errors="replace")
                if text:
                    sys.stderr.write(text)
                    sys.stderr.flush()


def start_reaper() -> None:
    """Start ``pseudolabel.engine.reaper`` for the local Ray node of this process (Linux; elsewhere Ray's
    own clean-up is all there is). Its stdin is a pipe only this process writes to, so it learns of
    this process's end, however it ends, and then stops the node's remaining processes. One reaper
    per local node: a process that shuts its Ray down and starts another gets a second one."""
    import ray

    if not sys.platform.startswith("linux"):
        return
    node_id = ray.get_runtime_context().get_node_id()
    if node_id in _reapers and _reapers[node_id].poll() is None:
        return
    argv = [sys.executable, "-m", "pseudolabel.engine.reaper", node_id]
    try:  # the raylet's pid (its workers carry RAY_RAYLET_PID, not RAY_NODE_ID) and the session directory
        node = ray._private.worker._global_node
        if node is not None:
            argv += ["--raylet", str(node.all_processes["raylet"][0].process.pid)]
            argv += ["--session", node.get_session_dir_path()]
    except Exception:  # a private structure: without it, only the node id tells its processes apart
        pass
    _reapers[node_id] = subprocess.Popen(argv,
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
