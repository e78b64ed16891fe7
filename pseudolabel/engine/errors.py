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


UserError = (SpecError, SourceError, ResourceError, OutputConflictError, WeightsError, NoRunError, UsageError)
