"""pseudolabel: a distributed data-labeling engine.

    import pseudolabel
    summary = pseudolabel.run("job.yaml", **{"output.uri": "/tmp/out", "resources.actors": 1})
"""
from __future__ import annotations

from typing import Any

from pseudolabel.version import __version__


def run(spec: Any, address: str | None = None, progress: bool = True, verbose: bool = False,
        retry_errors: bool = False, **overrides: Any) -> dict:
    """Validate a job spec (path, dict or JobSpec), apply dotted overrides, run it; returns the summary.

    Writes the job's demo data first when it asks for it (``input.demo``) and its input is missing.
    ``retry_errors``: label the images of ``error`` rows again (``retry`` rows always are).

    Overrides use dotted keys (``**{"output.uri": "/tmp/out"}``); ``__`` also separates levels
    (``output__uri="/tmp/out"``).
    """
    from pseudolabel.engine.pipeline import run_job
    from pseudolabel.jobs.demo.data import ensure_demo_input
    from pseudolabel.models.specs import load_spec

    flat = {k.replace("__", "."): v for k, v in overrides.items()}
    job = load_spec(spec, flat)
    ensure_demo_input(job)
    return run_job(job, address=address, progress=progress, verbose=verbose, retry_errors=retry_errors)


def read_labels(output: str, columns: list[str] | None = None, storage: Any = None, filter: Any = None):
    """The ``labels`` table of a run (``output``: its folder, local or s3://) as a pyarrow Table.

    Masks are COCO compressed RLE: ``pseudolabel.schemas.coco.rle_to_mask(annotation["segmentation"])``
    gives the (H, W) uint8 mask; layers are PNG bytes (``pseudolabel.imageio.decode_png``).
    ``storage``: a ``StorageSpec`` (or its dict) for s3:// endpoints and credentials.
    """
    from pseudolabel.jobs.outputs.labels_io import read_labels as _read
    from pseudolabel.schemas.spec import StorageSpec

    if isinstance(storage, dict):
        storage = StorageSpec.model_validate(storage)
    return _read(output, storage, columns=columns, filter=filter)


__all__ = ["run", "read_labels", "__version__"]
