"""Job specs checked against the labeler registry: the part of spec validation that needs the labelers.

``schemas.spec`` validates a job's shape with pydantic and imports nothing of the package; this module
adds what only the registry knows (which labeler names exist, each labeler's own ``Params``), so a bad
labeler name or parameter is still rejected, naming its field, before any work starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pseudolabel.models.registry import is_known, labeler_class, labeler_names
from pseudolabel.schemas.spec import JobSpec, SpecError, spec_problems, validate_spec


def load_spec(spec: str | Path | dict | JobSpec, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Load and validate a job spec from a YAML path, a dict or a JobSpec, with dotted overrides.

    Labeler ``params`` are validated against the labeler's own parameter model here too, so a bad
    parameter fails before any work starts.
    """
    job = validate_spec(JobSpec, spec, overrides)
    unknown = [f"labelers.{i}.name: unknown labeler {lab.name!r}; known: {', '.join(labeler_names())} "
               f"(or 'package.module:Class' for your own)"
               for i, lab in enumerate(job.labelers) if not is_known(lab.name)]
    if unknown:
        raise SpecError(spec_problems(unknown))
    for i, lab in enumerate(job.labelers):
        try:
            params_model = labeler_class(lab.name).Params
        except (ImportError, AttributeError) as err:
            raise SpecError(spec_problems([f"labelers.{i}.name: cannot import {lab.name!r}: {err}"])) from None
        try:
            lab.params = params_model.model_validate(lab.params).model_dump()
        except ValidationError as err:
            lines = [f"labelers.{i}.params.{'.'.join(str(p) for p in e['loc'])}: "
                     f"{'unknown parameter' if e['type'] == 'extra_forbidden' else e['msg']}" for e in err.errors()]
            raise SpecError(spec_problems(lines)) from None
    return job
