"""One writer per output: a lease object ``{output}/_lease.json`` held for the whole of a run.

The lease is a small JSON document::

    {"run_id": "3f9c0a1b2c4d", "host": "node-1", "pid": 4242,
     "since": 1764470000.0, "heartbeat": 1764470030.0}

(``since`` and ``heartbeat`` are Unix times in seconds.) It is created exclusively, so of two runs
started together into one output exactly one gets it:

- local folders: ``open(O_CREAT | O_EXCL)``;
- S3: a look (GET), then a conditional ``PutObject`` with ``If-None-Match: *``; a store that
  rejects the header (501 NotImplemented / 400) gets a create-then-verify fallback (look, write,
  wait ``VERIFY_DELAY_S``, read back: the run whose ``run_id`` is in the object holds it). Every
  create is read back.

A heartbeat thread rewrites ``heartbeat`` every ``timeout / 6`` seconds (on S3 conditionally on
the ETag it last wrote). A lease whose heartbeat is older than the timeout
(``PSEUDOLABEL_LEASE_TIMEOUT_S``, default ``LEASE_TIMEOUT_S``), or whose holder is a process of
this host that no longer exists, is stale and is taken over. Hosts are assumed to have roughly
synchronised clocks (NTP); the timeout is far above any usual skew.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from pseudolabel.errors import UsageError
from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.storage import filesystem, join, protocol_of

log = logging.getLogger("pseudolabel")

LEASE = "_lease.json"
#: seconds without a heartbeat after which a lease is stale and another run may take it over
LEASE_TIMEOUT_S = 60.0
#: create-then-verify fallback (stores without conditional writes): wait this long before reading back
VERIFY_DELAY_S = 1.0


class OutputBusyError(UsageError):
    """Another run holds the output's lease."""


def lease_timeout_s() -> float:
    """The stale-lease timeout in seconds: ``PSEUDOLABEL_LEASE_TIMEOUT_S`` or ``LEASE_TIMEOUT_S``."""
    raw = os.environ.get("PSEUDOLABEL_LEASE_TIMEOUT_S")
    try:
        return float(raw) if raw else LEASE_TIMEOUT_S
    except ValueError:
        raise UsageError(f"PSEUDOLABEL_LEASE_TIMEOUT_S={raw!r}: expected a number of seconds") from None


def _alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(record: dict) -> str:
    """``host h pid 12 run abc since 2026-11-30 04:00:00 UTC``."""
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record.get("since", 0))))
    return f"host {record.get('host')} pid {record.get('pid')} run {record.get('run_id')} since {since}"


def is_stale(record: dict, timeout_s: float, now: float | None = None) -> bool:
    """No heartbeat for ``timeout_s`` seconds, or a holder on this host whose process is gone."""
    now = time.time() if now is None else now
    if now - float(record.get("heartbeat", 0)) > timeout_s:
        return True
    return record.get("host") == socket.gethostname() and not _alive_here(int(record.get("pid", -1)))


class _LocalStore:
    """The lease file in a local folder."""

    def __init__(self, path: str):
        self.path = path

    def create(self, data: bytes) -> bool:
        """Exclusive create; False when a lease file exists."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def read(self) -> dict | None:
        for _ in range(5):  # a reader may catch the file between create and write
            try:
                with open(self.path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                time.sleep(0.05)
        return {}

    def renew(self, data: bytes, run_id: str) -> bool:
        """Rewrite our lease (atomically: temp file + rename); False when it is not ours any more."""
        current = self.read()
        if not current or current.get("run_id") != run_id:
            return False
        tmp = f"{self.path}.{run_id}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)
        return True

    def remove_if(self, record: dict) -> bool:
        """Remove the lease if it still is ``record`` (same run and heartbeat): move it aside under a
        name of our own, check what was moved, put it back when it changed meanwhile."""
        aside = f"{self.path}.{os.getpid()}.{time.time_ns()}.old"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read() or b"{}")
        except ValueError:
            moved = {}
        same = (moved.get("run_id"), moved.get("heartbeat")) == (record.get("run_id"), record.get("heartbeat"))
        if not same:
            try:
                os.link(aside, self.path)  # back in place unless a new lease was created meanwhile
            except FileExistsError:
                pass
        os.remove(aside)
        return same


class _S3Store:
    """The lease object on S3: conditional writes where the store has them."""

    #: False once the store refused a conditional write (then: create-then-verify)
    conditional = True

    def __init__(self, uri: str, storage: StorageSpec | None):
        self.fs, path = filesystem(uri, storage)
        self.bucket, _, self.key = path.partition("/")
        self.etag: str | None = None

    def _put(self, data: bytes, **cond) -> str:
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **cond)
        return out.get("ETag", "")

    def create(self, data: bytes) -> bool:
        if self.read() is not None:  # look first: also guards against stores that ignore the condition
            return False
        if self.conditional:
            try:
                self.etag = self._put(data, IfNoneMatch="*")
                return True
            except FileExistsError:
                return False
            except OSError as err:
                if err.errno not in (errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning("the store refused a conditional write (%s): lease by create-then-verify", err)
                self.conditional = False
        self.etag = self._put(data)
        time.sleep(VERIFY_DELAY_S)
        return True

    def read(self) -> dict | None:
        try:
            raw = self.fs.cat_file(f"{self.bucket}/{self.key}")
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {}

    def renew(self, data: bytes, run_id: str) -> bool:
        if self.conditional and self.etag:
            try:
                self.etag = self._put(data, IfMatch=self.etag)
                return True
            except FileNotFoundError:
                return False
            except OSError as err:
                if err.errno == errno.EINVAL:  # 412 Precondition Failed: another run rewrote it
                    return False
                raise
        current = self.read()
        if not current or current.get("run_id") != run_id:
            return False
        self.etag = self._put(data)
        return True

    def remove_if(self, record: dict) -> bool:
        current = self.read()
        if current is None:
            return True
        same = (current.get("run_id"), current.get("heartbeat")) == (record.get("run_id"), record.get("heartbeat"))
        if same:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        return same


@dataclass
class Lease:
    """A held lease; ``release()`` (or leaving the ``with`` block) gives it back."""

    store: _LocalStore | _S3Store
    record: dict
    interval_s: float
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            record = {**self.record, "heartbeat": time.time()}
            try:
                ok = self.store.renew(json.dumps(record).encode(), self.record["run_id"])
            except Exception as err:  # a transient store error: try again at the next beat
                log.warning("lease heartbeat failed (%s); retrying", err)
                continue
            if not ok:
                self.lost = True
                log.error("the output's lease was taken over by another run (this run's heartbeat lapsed); "
                          "the next run of the job removes any image labelled twice")
                return
            self.record = record

    def start(self) -> Lease:
        self._thread = threading.Thread(target=self._beat, name="pseudolabel-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.lost:
            try:
                self.store.remove_if(self.record)
            except Exception as err:
                log.warning("could not remove the lease (%s); the next run takes it over once stale", err)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(output_uri: str, storage: StorageSpec | None = None) -> dict | None:
    """The lease record of ``output_uri`` (None when no run holds it), with ``stale`` added."""
    uri = join(output_uri, LEASE)
    store = _S3Store(uri, storage) if protocol_of(uri) in ("s3", "s3a") else _LocalStore(filesystem(uri)[1])
    record = store.read()
    return None if record is None else {**record, "stale": is_stale(record, lease_timeout_s())}


def acquire(output_uri: str, storage: StorageSpec | None, run_id: str, timeout_s: float | None = None) -> Lease:
    """Take the output's lease for run ``run_id`` (heartbeat running) or raise ``OutputBusyError``
    naming the holder. A stale lease is taken over (logged)."""
    timeout_s = lease_timeout_s() if timeout_s is None else timeout_s
    uri = join(output_uri, LEASE)
    store = _S3Store(uri, storage) if protocol_of(uri) in ("s3", "s3a") else _LocalStore(filesystem(uri)[1])
    now = time.time()
    mine = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": now, "heartbeat": now}
    for _ in range(3):  # create; when stale, remove and create again (another run may win the race)
        try:
            created = store.create(json.dumps(mine).encode())
            held = store.read() if created else None
        except (PermissionError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
            raise UsageError(f"output.uri {output_uri}: cannot write the lease {uri}: {err}") from None
        if held and held.get("run_id") == run_id:
            return Lease(store, mine, interval_s=max(timeout_s / 6, 0.2)).start()
        holder = store.read()
        if holder is None:
            continue  # released meanwhile: try again
        if holder and not is_stale(holder, timeout_s):
            raise OutputBusyError(
                f"{output_uri} is being written by another run ({describe(holder)}); wait for it to finish, "
                f"or remove {uri} if that run is gone (a lease without heartbeat for {timeout_s:g} s is taken over)")
        log.warning("output %s: taking over the stale lease of %s", output_uri, describe(holder or {}))
        store.remove_if(holder or {})
    raise OutputBusyError(f"{output_uri}: could not take the lease {uri} (other runs keep taking it); try again")
