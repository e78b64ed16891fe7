"""Audit and repair of a run's output: every committed image exactly once, in both the labels files
and Ray Data's checkpoint.

Two records say which images are done: the rows of ``labels/*.parquet`` and the committed
checkpoint files ``_checkpoints/<prefix>.parquet`` (one ``image_id`` column each; ``<prefix>`` is
the name prefix of the labels file(s) written with it). Ray Data skips every checkpointed id on a
re-run, so the two must agree:

- ``lost``: a checkpointed id without a labels row (a labels file went missing): never relabelled
  unless removed from the checkpoint;
- ``orphan``: a labels row whose id is not checkpointed (its checkpoint went missing): labelled
  again by the next run, a duplicate unless removed;
- ``duplicate``: an id with several rows, or in several checkpoint entries (two writers);
- ``stray``: a row of an image that is not in the manifest;
- ``uncommitted``: labels files of a write that never committed (a ``.pending`` checkpoint);
  Ray Data deletes them on the next run;
- ``damaged``: labels files that cannot be read;
- ``retry``: rows of transient failures, labelled again by the next run.

``inspect`` reads (never writes); ``repair`` makes the two records agree and removes the rows to be
labelled again, so that Ray Data's checkpoint filter lets exactly those images through.
Every rewrite replaces a whole file at once (local: temp file + rename; S3: one PUT).
"""
from __future__ import annotations

import logging
import os
import posixpath
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pseudolabel.engine.layout import (
    CHECKPOINTS,
    DAMAGED,
    LABELS,
    PENDING_SUFFIX,
    SCRATCH,
)
from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.schemas.tables import STATUS_ERROR, STATUS_OK, STATUS_RETRY
from pseudolabel.storage import filesystem

log = logging.getLogger("pseudolabel")

#: sample ids/files shown per problem
SHOW = 5
#: what each problem means, for ``verify``'s detail lines
MEANING = {
    "lost": "checkpointed, without a labels row (a labels file went missing)",
    "orphan": "labels rows without a checkpoint entry",
    "duplicate rows": "images with more than one labels row",
    "duplicate checkpoint ids": "images checkpointed more than once",
    "uncommitted files": "files of a write that never committed",
    "damaged files": "labels files that cannot be read",
    "retry": "rows of transient failures, to be labelled again",
    "stray": "rows of images that are not in the manifest",
    "not labelled": "images of the manifest without a labels row",
    "listing": "incomplete (manifest/_SUCCESS is missing)",
}


@dataclass
class Audit:
    """What ``inspect`` found. Row tables have columns ``image_id`` (string) and ``status``."""

    labels: dict[str, pa.Table] = field(default_factory=dict)  # committed labels file -> its (id, status) rows
    checkpoints: dict[str, list[str]] = field(default_factory=dict)  # committed checkpoint file -> ids
    pending: list[str] = field(default_factory=list)  # pending checkpoint files
    uncommitted: list[str] = field(default_factory=list)  # labels files of never-committed writes
    damaged: list[str] = field(default_factory=list)  # labels files that cannot be read
    manifest_ids: set[str] | None = None
    listed: bool = True  # False: the output has no complete listing (manifest/_SUCCESS)

    def row_ids(self) -> list[str]:
        return [i for t in self.labels.values() for i in t.column("image_id").to_pylist()]

    def checkpoint_ids(self) -> list[str]:
        return [i for ids in self.checkpoints.values() for i in ids]

    def problems(self) -> dict[str, list[str]]:
        """Problem name -> sample of the ids or files concerned (all of them counted in ``counts``)."""
        return {k: v for k, v in self._find().items() if v}

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._find().items()}

    def _find(self) -> dict[str, list[str]]:
        rows, ckpt = self.row_ids(), self.checkpoint_ids()
        row_set, ckpt_set = set(rows), set(ckpt)
        out = {
            "lost": sorted(ckpt_set - row_set),
            "orphan": sorted(row_set - ckpt_set),
            "duplicate rows": sorted(_repeated(rows)),
            "duplicate checkpoint ids": sorted(_repeated(ckpt)),
            "uncommitted files": self.uncommitted + self.pending,
            "damaged files": list(self.damaged),
            "retry": sorted({r["image_id"] for t in self.labels.values() for r in t.to_pylist()
                             if r["status"] == STATUS_RETRY}),
        }
        if self.manifest_ids is not None:
            out["stray"] = sorted(row_set - self.manifest_ids)
            out["not labelled"] = sorted(self.manifest_ids - row_set)
        out["listing"] = [] if self.listed else ["manifest/_SUCCESS"]
        return out


def _repeated(ids: list[str]) -> set[str]:
    seen: set[str] = set()
    twice: set[str] = set()
    for i in ids:
        (twice if i in seen else seen).add(i)
    return twice


def _parquet_files(fs, root: str) -> list[str]:
    try:
        paths = fs.find(root)
    except FileNotFoundError:
        return []
    return sorted(p for p in paths if p.endswith(".parquet")
                  and not posixpath.basename(p).startswith((".", "_")))


def _read(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def inspect(output_uri: str, storage: StorageSpec | None = None, manifest_ids: set[str] | None = None) -> Audit:
    """Read the labels files' ``image_id``/``status`` and the checkpoint files of ``output_uri``."""
    fs, root = filesystem(output_uri, storage)
    audit = Audit(manifest_ids=manifest_ids)
    # 1. Checkpoint files: committed ones and pending ones (their data files are not committed).
    prefixes = []
    for path in _parquet_files(fs, f"{root}/{CHECKPOINTS}"):
        name = posixpath.basename(path)
        if name.endswith(PENDING_SUFFIX):
            audit.pending.append(path)
            prefixes.append(name[: -len(PENDING_SUFFIX)])
        else:
            ids = _read(fs, path).column(0).cast(pa.string())
            audit.checkpoints[path] = ids.to_pylist()
    # 2. Labels files: skip those of an uncommitted write, note those that cannot be read.
    for path in _parquet_files(fs, f"{root}/{LABELS}"):
        if any(posixpath.basename(path).startswith(p) for p in prefixes):
            audit.uncommitted.append(path)
            continue
        try:
            table = _read(fs, path, ["image_id", "status"])
        except (OSError, pa.ArrowException, KeyError) as err:
            log.warning("labels file %s cannot be read: %s", path, err)
            audit.damaged.append(path)
            continue
        audit.labels[path] = table.cast(pa.schema([("image_id", pa.string()), ("status", pa.string())]))
    return audit


def verdict(audit: Audit) -> tuple[bool, str, list[str]]:
    """(every image exactly once?, one-line verdict, one detail line per problem)."""
    counts, problems = audit.counts(), audit.problems()
    rows = audit.row_ids()
    statuses = pc.value_counts(pa.chunked_array([t.column("status") for t in audit.labels.values()],
                                                type=pa.string())).to_pylist() if audit.labels else []
    by_status = {s["values"]: s["counts"] for s in statuses}
    images = len(audit.manifest_ids) if audit.manifest_ids is not None else len(set(rows))
    summary = (f"{images} images, {len(rows)} rows ({by_status.get(STATUS_OK, 0)} ok, "
               f"{by_status.get(STATUS_ERROR, 0)} error, {by_status.get(STATUS_RETRY, 0)} retry), "
               f"{len(audit.checkpoint_ids())} checkpointed ids")
    if not problems:
        return True, f"OK: {summary}; every image exactly once", []
    details = [f"{name}: {MEANING[name]}" if name == "listing" else
               f"{name}: {counts[name]} ({', '.join(map(str, sample[:SHOW]))}{', ...' if len(sample) > SHOW else ''})"
               f": {MEANING[name]}" for name, sample in problems.items()]
    found = ", ".join("listing incomplete" if n == "listing" else f"{counts[n]} {n}" for n in problems)
    return False, f"FAILED: {summary}; {found}; running the job again repairs the output", details


def _is_local(fs) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def _replace(fs, path: str, table: pa.Table, scratch: str) -> None:
    """Write ``table`` over ``path`` at once: local via a temp file and rename, S3 as one PUT."""
    if _is_local(fs):
        os.makedirs(scratch, exist_ok=True)
        tmp = os.path.join(scratch, f"{uuid.uuid4().hex}.parquet")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            pq.write_table(table, f)


def repair(output_uri: str, storage: StorageSpec | None = None, manifest_ids: set[str] | None = None,
           relabel: tuple[str, ...] = (STATUS_RETRY,)) -> dict[str, int]:
    """Make labels files and checkpoint agree, each image at most once, and drop the rows whose status
    is in ``relabel`` (so the next pipeline labels those images again). Returns what was found
    (``Audit.counts``) plus ``rows_removed``, ``files_rewritten`` and ``relabel`` (rows dropped for
    their status). Run it only while holding the output's lease."""
    fs, root = filesystem(output_uri, storage)
    scratch = os.path.join(root, SCRATCH)
    # 1. Finish what Ray Data would: drop the files of writes that never committed.
    audit = inspect(output_uri, storage, manifest_ids)
    found = audit.counts()
    for path in audit.uncommitted + audit.pending:
        fs.rm(path)
    # 2. Labels files that cannot be read are moved aside: their images are labelled again.
    for path in audit.damaged:
        if _is_local(fs):  # (an object store has no folders)
            os.makedirs(f"{root}/{DAMAGED}", exist_ok=True)
        fs.mv(path, f"{root}/{DAMAGED}/{posixpath.basename(path)}")
    # 3. Decide which row of each image stays: checkpointed, in the manifest, not to be relabelled;
    #    among several, an ok row before an error row, then the first file in name order.
    committed = set(audit.checkpoint_ids())
    candidates = []
    for path, table in audit.labels.items():
        for k, (image_id, status) in enumerate(zip(table.column("image_id").to_pylist(),
                                                    table.column("status").to_pylist())):
            if image_id in committed and status not in relabel and (manifest_ids is None or image_id in manifest_ids):
                candidates.append((status != STATUS_OK, path, k, image_id))
    keep_rows, kept = set(), set()
    for _, path, k, image_id in sorted(candidates):
        if image_id not in kept:
            kept.add(image_id)
            keep_rows.add((path, k))
    # 4. The checkpoint first: each kept id exactly once, nothing else (a crash after this step
    #    leaves rows without checkpoint, which the next repair removes).
    seen, rewritten = set(), 0
    for path, ids in audit.checkpoints.items():
        mask = []
        for i in ids:
            mask.append(i in kept and i not in seen)
            seen.add(i)
        if all(mask):
            continue
        rewritten += 1
        if not any(mask):
            fs.rm(path)
        else:
            _replace(fs, path, _read(fs, path).filter(pa.array(mask)), scratch)
    # 5. Then the labels files: only the kept rows.
    removed = 0
    for path, table in audit.labels.items():
        mask = [(path, k) in keep_rows for k in range(table.num_rows)]
        if all(mask):
            continue
        rewritten += 1
        removed += mask.count(False)
        if not any(mask):
            fs.rm(path)
        else:
            _replace(fs, path, _read(fs, path).filter(pa.array(mask)), scratch)
    relabelled = sum(1 for t in audit.labels.values() for s in t.column("status").to_pylist() if s in relabel)
    if _is_local(fs) and os.path.isdir(scratch) and not os.listdir(scratch):
        os.rmdir(scratch)
    result = {**found, "rows_removed": removed, "files_rewritten": rewritten, "relabel": relabelled}
    if removed or rewritten or audit.uncommitted or audit.damaged:
        log.info("output %s repaired: %s", output_uri, {k: v for k, v in result.items() if v})
    return result
