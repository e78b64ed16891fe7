"""pseudolabel: a distributed data-labeling engine.

    import pseudolabel
    summary = pseudolabel.run("job.yaml", **{"output.uri": "/tmp/out", "resources.actors": 1})
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("pseudolabel")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"


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


def read_labels(output: str, columns: list[str] | None = None, storage: Any = None, filter: Any = None):
    """The ``labels`` table of a run (``output``: its folder, local or s3://) as a pyarrow Table.

    Masks are COCO compressed RLE: ``pseudolabel.schemas.coco.rle_to_mask(annotation["segmentation"])``
    gives the (H, W) uint8 mask; layers are PNG bytes (``pseudolabel.engine.encode.decode_png``).
    ``storage``: a ``StorageSpec`` (or its dict) for s3:// endpoints and credentials.
    """
    from pseudolabel.jobs.labels_io import read_labels as _read
    from pseudolabel.schemas.spec import StorageSpec

    if isinstance(storage, dict):
        storage = StorageSpec.model_validate(storage)
    return _read(output, storage, columns=columns, filter=filter)


__all__ = ["run", "read_labels", "__version__"]
