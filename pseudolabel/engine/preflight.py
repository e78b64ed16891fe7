"""Pre-flight: the mistakes of a job's environment, found in seconds before Ray starts.

A run would otherwise meet them deep inside (a traceback from the first write, minutes of retries
against an endpoint that refuses connections, a bucket created silently). Each check raises one
``UsageError`` line naming the thing (``output.uri``, ``input.uri``, ``--address``) and the fix; the
CLI prints it and exits with status 2.

- ``check_output``: a local ``output.uri`` is a folder (or can become one) that this process can
  write; an s3:// one lies in an existing bucket (never created here).
- ``check_s3``: every s3:// location the job reads or writes (input, COCO JSON, output) is reachable
  with the job's credentials: one listing request per bucket, one try, a few seconds at most.
- ``check_address``: the Ray cluster named by ``--address`` / ``RAY_ADDRESS`` answers, then the
  job joins it, in bounded time (see ``pseudolabel.engine.cluster``).

Checks that cannot apply (no S3 location, a local cluster) cost nothing.
"""
from __future__ import annotations

import os
import tempfile

from pseudolabel.engine.cluster import check_address, cluster_address, connect, connect_timeout
from pseudolabel.engine.errors import OutputPathError, StorageAccessError, one_line
from pseudolabel.schemas.spec import JobSpec, StorageSpec
from pseudolabel.storage import bucket_and_key, protocol_of, s3_client, storage_options, strip_protocol

#: seconds for each S3 request of the pre-flight (connect and read)
S3_TIMEOUT_S = 5.0


def preflight(job: JobSpec, address: str | None = None, verbose: bool = False) -> None:
    """Every check below, cheapest first; returns when the job's environment looks right (and, given a
    cluster address, with this process joined to that cluster: ``verbose`` as for ``connect``)."""
    check_output(job.output.uri)
    check_s3(job)
    if cluster_address(address):  # join now, before anything is listed or written (a local one starts later)
        check_address(address, connect_timeout())
        connect(address, verbose=verbose)


def check_output(uri: str) -> None:
    """A local ``output.uri`` is, or can be created as, a folder this process can write into."""
    if protocol_of(uri) != "file":
        return  # object stores: check_s3
    path = strip_protocol(uri)
    fix = "point output.uri at a folder you can write"
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"output.uri {uri} is a file, not a folder: {fix} (it is created when missing)")
    if os.path.isdir(path):
        _probe_write(uri, path, fix)
        return
    # 1. A missing folder: the nearest existing ancestor must be a folder we can create it in.
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    parent = parent or os.sep
    if not os.path.isdir(parent):
        raise OutputPathError(f"output.uri {uri} cannot be created: {parent} is a file; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(parent) else "is not writable"
        raise OutputPathError(f"output.uri {uri} cannot be created: {parent} {why}; {fix}")


def _probe_write(uri: str, path: str, fix: str) -> None:
    """Create and remove a small file in ``path`` (permission bits do not tell a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".pseudolabel-write-check-", dir=path)
    except OSError as err:
        why = "is on a read-only file system" if _read_only(path) else f"is not writable ({err.strerror})"
        raise OutputPathError(f"output.uri {uri} {why}; {fix}") from None
    os.close(fd)
    os.unlink(probe)


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def s3_locations(job: JobSpec) -> list[tuple[str, str]]:
    """(field, uri) of every s3:// location the job reads or writes."""
    fields = [("input.uri", job.input.uri), ("input.coco_json", job.input.coco_json), ("output.uri", job.output.uri)]
    return [(name, uri) for name, uri in fields if uri and protocol_of(uri) in ("s3", "s3a")]


def check_s3(job: JobSpec) -> None:
    """One listing request per bucket of the job's s3:// locations: the endpoint answers, the credentials
    are accepted and the bucket exists (an output bucket is never created: the user creates it)."""
    checked: set[str] = set()
    for field, uri in s3_locations(job):
        bucket, key = bucket_and_key(uri)
        if bucket in checked:
            continue
        checked.add(bucket)
        check_bucket(field, uri, job.storage)


def check_bucket(field: str, uri: str, storage: StorageSpec | None = None, timeout_s: float = S3_TIMEOUT_S) -> None:
    """List at most one key under ``uri``; any failure is one StorageAccessError/OutputPathError line."""
    import botocore.exceptions as be

    bucket, key = bucket_and_key(uri)
    if not bucket:
        raise StorageAccessError(f"{field} {uri} names no bucket: use s3://bucket/folder")
    endpoint = storage_options(uri, storage).get("endpoint_url") or "the AWS default endpoint"
    creds = "storage.key/storage.secret in the job spec or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    try:
        s3_client(uri, storage, timeout_s).list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except be.NoCredentialsError:
        raise StorageAccessError(f"{field} {uri}: no S3 credentials found; set {creds} "
                                 f"(or storage.anon: true for a public bucket)") from None
    except (be.EndpointConnectionError, be.ConnectTimeoutError, be.ReadTimeoutError) as err:
        raise StorageAccessError(f"{field} {uri}: cannot reach the S3 endpoint {endpoint} ({_reason(err)}); "
                                 f"check storage.endpoint_url or AWS_ENDPOINT_URL") from None
    except be.ClientError as err:
        info = err.response.get("Error", {})
        code = str(info.get("Code") or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
        if code in ("NoSuchBucket", "404"):
            if field == "output.uri":
                raise OutputPathError(f"output.uri {uri}: bucket {bucket!r} does not exist at {endpoint}; create "
                                      f"it first (buckets are never created for you) or fix output.uri") from None
            raise StorageAccessError(f"{field} {uri}: bucket {bucket!r} does not exist at {endpoint}; "
                                     f"check {field}") from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "AuthorizationHeaderMalformed", "InvalidClientTokenId"):
            raise StorageAccessError(f"{field} {uri}: S3 refused the credentials ({code}); check {creds}") from None
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            raise StorageAccessError(f"{field} {uri}: access denied to bucket {bucket!r}; the credentials "
                                     f"({creds}) need list, read and write rights on it") from None
        if code in ("PermanentRedirect", "301", "IllegalLocationConstraintException"):
            raise StorageAccessError(f"{field} {uri}: bucket {bucket!r} is in another region; set "
                                     f"storage.region (or AWS_DEFAULT_REGION) to its region") from None
        raise StorageAccessError(f"{field} {uri}: S3 error {code}: {one_line(info.get('Message', err), 160)}") from None
    except be.ParamValidationError as err:
        raise StorageAccessError(f"{field} {uri}: not a valid S3 location ({one_line(err, 160)})") from None
    except be.BotoCoreError as err:
        raise StorageAccessError(f"{field} {uri}: {one_line(err, 200)}; check storage.endpoint_url and the "
                                 f"credentials") from None


def _reason(err: Exception) -> str:
    """What botocore's connection error hides in its causes: refused, timed out, unknown host..."""
    causes = [err, getattr(err, "kwargs", {}).get("error"), err.__cause__, err.__context__]
    text = " ".join(str(c) for c in causes if c is not None).lower()
    for words, said in (("refused", "connection refused"), ("timed out", "timed out"),
                        ("name or service not known", "unknown host"), ("nodename nor servname", "unknown host"),
                        ("temporary failure in name resolution", "unknown host"),
                        ("no route to host", "no route to host"), ("network is unreachable", "network unreachable")):
        if words in text:
            return said
    return "no connection"
