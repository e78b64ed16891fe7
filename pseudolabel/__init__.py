"""pseudolabel: a distributed data-labeling engine.

    import pseudolabel
    summary = pseudolabel.run("job.yaml", **{"output.uri": "/tmp/out", "resources.actors": 1})
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def run(spec: Any, address: str | None = None, progress: bool = True, verbose: bool = False, **overrides: Any) -> dict:
    """Validate a job spec (path, dict or JobSpec), apply dotted overrides, run it; returns the summary.

    Overrides use dotted keys (``**{"output.uri": "/tmp/out"}``); ``__`` also separates levels
    (``output__uri="/tmp/out"``).
    """
    from pseudolabel.engine.pipeline import run_job
    from pseudolabel.schemas.spec import load_spec

    flat = {k.replace("__", "."): v for k, v in overrides.items()}
    job = load_spec(spec, flat)
    return run_job(job, address=address, progress=progress, verbose=verbose)


__all__ = ["run", "__version__"]
