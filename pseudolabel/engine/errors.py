"""Errors that are the user's to fix; the CLI prints them without a traceback."""
from __future__ import annotations

from pseudolabel.engine.sources import SourceError
from pseudolabel.errors import UsageError
from pseudolabel.schemas.spec import SpecError


class ResourceError(RuntimeError):
    """The job's resources cannot be met by the cluster."""


class OutputConflictError(RuntimeError):
    """``output.uri`` holds the results of a different job."""


class WeightsError(RuntimeError):
    """A labeler's checkpoint cannot be found or reached."""


class NoRunError(RuntimeError):
    """A command that reads a run's output was pointed at a path that holds none."""


class OutputPathError(UsageError):
    """``output.uri`` cannot be written: a file, a read-only folder, a missing bucket."""


class StorageAccessError(UsageError):
    """An S3 endpoint, bucket or the credentials for it do not work (no, wrong or refused credentials,
    an endpoint that refuses connections)."""


class ClusterError(UsageError):
    """The Ray cluster named by ``--address`` / ``RAY_ADDRESS`` cannot be reached or joined."""


UserError = (SpecError, SourceError, ResourceError, OutputConflictError, WeightsError, NoRunError, UsageError)


def one_line(text: object, limit: int = 300) -> str:
    """``text`` as a single line of at most ``limit`` characters (whitespace runs become one space)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def environment_problem(err: BaseException) -> str | None:
    """One line for an error of the environment met mid-run (S3 credentials or endpoint, a read-only or
    full disk), looking through the chain of causes and Ray's task errors; None for anything else,
    which stays a traceback (a bug to report, not a mistake to fix)."""
    seen = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        line = _describe(e)
        if line:
            return line
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


def _describe(e: BaseException) -> str | None:
    import errno

    name = type(e).__name__
    if name == "NoCredentialsError":
        return ("no S3 credentials: set storage.key and storage.secret in the job spec, or AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY (storage.anon: true for a public bucket)")
    if name in ("EndpointConnectionError", "ConnectTimeoutError"):
        return (f"cannot reach the S3 endpoint ({one_line(e)}): check storage.endpoint_url or "
                f"AWS_ENDPOINT_URL")
    response = getattr(e, "response", None)
    code = response and response.get("Error", {}).get("Code")
    if code == "NoSuchBucket":
        return ("an S3 bucket of the job does not exist: create it first (buckets are never created for you) or "
                "fix the s3:// path")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AccessDenied"):
        return (f"S3 refused the request ({code}): check the credentials (storage.key/secret or AWS_*) "
                f"and their permissions")
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT):
        where = f": {e.filename}" if e.filename else ""
        return (f"{e.strerror}{where}; fix the permissions or free space there (output.uri must be a writable "
                f"folder, the input readable)")
    return None
