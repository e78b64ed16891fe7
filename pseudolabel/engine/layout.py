"""Names of the folders and files of a run's output (see ``pipeline`` for what each holds)."""
from __future__ import annotations

MANIFEST = "manifest"
#: written last by the listing: JSON ``{"parts": [names], "rows": [ints], "images": int}``
MANIFEST_DONE = "_SUCCESS"
LABELS = "labels"
CHECKPOINTS = "_checkpoints"
#: where labels files that cannot be read are moved (their images are labelled again)
DAMAGED = "_damaged"
#: scratch space of atomic rewrites (local outputs)
SCRATCH = "_scratch"
#: Ray Data's suffix of a checkpoint file whose data file is not committed yet
PENDING_SUFFIX = ".pending.parquet"
