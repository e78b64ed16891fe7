"""Transient store faults: which errors are worth another try, the retry loop, S3 client settings.

Two layers: botocore's own retries inside each S3 request (``s3_retry_options``: standard mode,
connect/read timeouts), then ``with_retries`` around whole fetches and listings: up to ``attempts``
tries with exponential backoff ``backoff_s * 2**k`` (capped at ``MAX_BACKOFF_S``). With the defaults
(``input.fetch_retries: 7``, ``input.fetch_backoff_s: 1``) the waits are 1+2+4+8+16+16 = 47 s (plus
botocore's own tries), so an outage of 40 s is ridden out. What is still failing transiently after that
is a ``retry`` row (the next run labels it again); permanent failures (missing key, access denied, bad
bytes) are ``error`` rows.
"""
from __future__ import annotations

import asyncio
import errno
import re
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec

from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.storage import protocol_of, storage_options, strip_protocol

T = TypeVar("T")

MAX_BACKOFF_S = 16.0
#: tries of s3fs's own retry loop per call (botocore's per request come on top)
S3FS_RETRIES = 2
#: HTTP codes and S3 error codes of faults that pass
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                    "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "TooManyRequests",
                    "RequestLimitExceeded", "BandwidthLimitExceeded", "429"}
_TRANSIENT_TEXT = re.compile(r"\b(50[0-4]|429)\b|slow ?down|throttl|timed? ?out|timeout|connection (reset|refused|"
                             r"aborted|closed)|service unavailable|internal ?error|temporar|try again|"
                             r"server disconnected|could not connect|endpoint", re.IGNORECASE)
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN}


def _chain(err: BaseException | None):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _botocore_classes() -> tuple[tuple, type | None]:
    """(botocore's network error classes, ClientError); credentials or parameter errors are not network."""
    try:
        import botocore.exceptions as be
    except ImportError:  # pragma: no cover - s3fs brings botocore
        return (), None
    names = ("ConnectionError", "HTTPClientError", "IncompleteReadError", "ResponseStreamingError")
    return tuple(getattr(be, n) for n in names if hasattr(be, n)), be.ClientError


def is_transient(err: BaseException) -> bool:
    """True for network faults, throttling, 5xx and timeouts (anywhere in the exception's cause chain);
    False for missing objects, refused access, bad data and everything else."""
    network, ClientError = _botocore_classes()
    for e in _chain(err):
        if isinstance(e, _PERMANENT):
            return False
        if ClientError and isinstance(e, ClientError):
            response = getattr(e, "response", None) or {}
            info = response.get("Error", {})
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return str(info.get("Code", "")) in _TRANSIENT_CODES or status.startswith("5") or status == "429"
        if network and isinstance(e, network):
            return True
        if isinstance(e, (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError)):
            return True
        if type(e).__module__.startswith("aiohttp"):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
    return any(isinstance(e, OSError) and _TRANSIENT_TEXT.search(str(e)) for e in _chain(err))


def backoff_delays(attempts: int, backoff_s: float) -> list[float]:
    """The waits before tries 2..attempts: ``backoff_s * 2**k`` capped at MAX_BACKOFF_S."""
    return [min(MAX_BACKOFF_S, backoff_s * 2 ** k) for k in range(max(0, attempts - 1))]


def with_retries(fn: Callable[[], T], attempts: int, backoff_s: float, sleep=time.sleep) -> T:
    """``fn()``, tried again after a transient error up to ``attempts`` tries in all; the last error
    (or any permanent one) is raised."""
    delays = backoff_delays(attempts, backoff_s)
    for k in range(len(delays) + 1):
        try:
            return fn()
        except Exception as e:
            if k == len(delays) or not is_transient(e):
                raise
            sleep(delays[k])
    raise AssertionError("unreachable")


def s3_retry_options(connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0, attempts: int = 3) -> dict:
    """s3fs keyword arguments for botocore's own retries and timeouts (per request)."""
    return {"config_kwargs": {"retries": {"max_attempts": attempts, "mode": "standard"},
                              "connect_timeout": connect_timeout_s, "read_timeout": read_timeout_s}}


def input_filesystem(uri: str, storage: StorageSpec | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for reading input: ``storage.filesystem`` plus, on S3, the retry settings above."""
    proto = protocol_of(uri)
    opts = storage_options(uri, storage)
    if proto in ("s3", "s3a"):
        opts.update(s3_retry_options())
    fs = fsspec.filesystem("file" if proto == "file" else proto, **opts)
    if proto in ("s3", "s3a"):
        fs.retries = S3FS_RETRIES  # s3fs's own loop sits on top of botocore's; ours sits on top of both
    return fs, strip_protocol(uri).rstrip("/") or "/"
