"""The streaming pipeline: manifest -> fetch+decode -> labeler stage(s) -> Parquet, resumable.

Output layout under ``output.uri``::

    manifest/part-*.parquet  the input, listed once (re-runs reuse it, never re-list); several parts
                         so Ray reads it as several blocks and the stages run in parallel
    manifest/_SUCCESS    written last: the names and row counts of the parts (a listing without it
                         is incomplete and is done again from scratch)
    job.json             the validated job spec (credentials removed) and what identifies the job
    labels/*.parquet     the `labels` table, one row per image, each image exactly once
    _checkpoints/        Ray Data checkpoint of finished image ids (what makes re-runs resume)
    _lease.json          held by the run writing the output (one writer at a time; see ``lease``)
    summary.json         counts, timing and categories of the last run

Exactly-once comes from Ray Data's CheckpointConfig(id_column="image_id"): data files and checkpoint
entries are committed in two phases, a re-run drops files whose checkpoint never committed and skips
every image already committed. Before Ray starts, ``audit.repair`` makes labels files and checkpoint
agree (a lost labels file, duplicates, rows to label again: ``retry``, and ``error`` on request), and
the lease keeps a second run from writing the same output at the same time.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import uuid
import warnings

import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.engine.audit import repair
from pseudolabel.engine.cluster import connect
from pseudolabel.engine.decode import fetch_decode
from pseudolabel.engine.errors import OutputConflictError, ResourceError, WeightsError
from pseudolabel.engine.formats import check_format_name, manifest_format
from pseudolabel.engine.layout import CHECKPOINTS, LABELS, MANIFEST, MANIFEST_DONE
from pseudolabel.engine.lease import acquire, describe, holder
from pseudolabel.engine.manifest import ManifestDatasource
from pseudolabel.engine.progress import CommittedProgress
from pseudolabel.engine.run_stats import stats_actor, stats_totals
from pseudolabel.engine.sources import list_input
from pseudolabel.engine.stage import DeviceStage, decode_then_host, decode_then_prepare, host_stage
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.coco import category_table
from pseudolabel.schemas.spec import JobSpec, SpecError
from pseudolabel.schemas.tables import MANIFEST_SCHEMA, STATUS_ERROR, STATUS_RETRY
from pseudolabel.storage import (
    arrow_filesystem,
    exists,
    filesystem,
    join,
    read_bytes,
    to_uri,
    write_bytes,
)
from pseudolabel.version import __version__

log = logging.getLogger("pseudolabel")

#: the manifest is split into about this many parts (one read block each), within the bounds below;
#: part sizes depend on the number of images only (never on a resources setting)
MANIFEST_PARTS = 64
MANIFEST_PART_ROWS_MIN = 16
MANIFEST_PART_ROWS_MAX = 10_000


def labelers_fingerprint(job: JobSpec) -> str:
    """Hash of what decides the labels (labelers, weights, params, ontology): equal means resumable."""
    # where the labels are computed (device, compile) and how exports filter them (score thresholds) do not
    # change them
    data = [lab.model_dump(exclude={"device": True, "compile": True, "ontology": {"__all__": {"score_threshold"}}})
            for lab in job.labelers]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _public_spec(job: JobSpec) -> dict:
    data = job.model_dump(mode="json")
    data["storage"] = {k: ("***" if k in ("key", "secret") and v else v) for k, v in data["storage"].items()}
    return data


def _input_of(public_spec: dict) -> dict:
    """What of the input section decides which images a job labels (all but the demo-data recipe)."""
    return {k: v for k, v in public_spec.get("input", {}).items() if k != "demo"}


def categories_of(job: JobSpec) -> list[dict]:
    """The job's category table (``schemas.coco.category_table``) from its labelers' ontologies, in
    labeler order: summary.json's ``categories``."""
    declared = [{"id": e.id, "name": e.category, "labeler": lab.name, "semantic": e.semantic}
                for lab in job.labelers for e in lab.ontology]
    return category_table(declared)


def manifest_part_rows(images: int) -> int:
    """Rows per manifest part for ``images`` images (the last part may hold fewer)."""
    return max(MANIFEST_PART_ROWS_MIN, min(MANIFEST_PART_ROWS_MAX, -(-images // MANIFEST_PARTS)))


def _write_listing(manifest: pa.Table, manifest_uri: str, st) -> dict:
    """Write the manifest's parts, then ``_SUCCESS`` naming them; returns that listing record.

    What an interrupted listing left is removed first, and readers take only the parts that
    ``_SUCCESS`` names, so a crash at any point followed by a re-run lists every image once.
    """
    fs, root = filesystem(manifest_uri, st)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    part_rows = manifest_part_rows(manifest.num_rows)
    names, rows = [], []
    for k, start in enumerate(range(0, manifest.num_rows, part_rows)):
        part = manifest.slice(start, part_rows)
        buf = io.BytesIO()
        pq.write_table(part, buf)
        names.append(f"part-{k:05d}.parquet")
        rows.append(part.num_rows)
        write_bytes(join(manifest_uri, names[-1]), buf.getvalue(), st)
    listing = {"images": manifest.num_rows, "part_rows": part_rows, "parts": names, "rows": rows}
    write_bytes(join(manifest_uri, MANIFEST_DONE), json.dumps(listing).encode(), st)
    return listing


def _read_listing(manifest_uri: str, st) -> tuple[list[str], list[int]]:
    """URIs and row counts of the parts a complete listing named (outputs of older versions, whose
    ``_SUCCESS`` is empty: every part in the folder)."""
    raw = read_bytes(join(manifest_uri, MANIFEST_DONE), st)
    if raw.strip():
        listing = json.loads(raw)
        return [join(manifest_uri, n) for n in listing["parts"]], list(listing["rows"])
    fs, path = filesystem(manifest_uri, st)
    uris, rows = [], []
    for p in sorted(fs.glob(path.rstrip("/") + "/part-*.parquet")):
        with fs.open(p, "rb") as f:
            rows.append(pq.ParquetFile(f).metadata.num_rows)
        uris.append(to_uri(fs, p))
    return uris, rows


def read_manifest(output_uri: str, storage=None) -> pa.Table:
    """The manifest of the complete listing in ``output_uri``, parts in order."""
    uris, _ = _read_listing(join(output_uri, MANIFEST), storage)
    tables = []
    for uri in uris:
        fs, path = filesystem(uri, storage)
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, schema=MANIFEST_SCHEMA))
    return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()


def prepare_output(job: JobSpec) -> tuple[pa.Table, bool]:
    """Write or reuse the manifest and job.json; returns (manifest, resumed).

    ``job.json`` records what identifies the job: the labelers' fingerprint and the input section
    (what decides the images, their ids and their labels), and the listing (images, parts). Settings
    of how the work is done (resources, devices) may change between runs.
    """
    out, st = job.output.uri, job.storage
    fingerprint = labelers_fingerprint(job)
    job_uri = join(out, "job.json")
    manifest_uri = join(out, MANIFEST)
    done_uri = join(manifest_uri, MANIFEST_DONE)
    resumed = exists(done_uri, st)
    if exists(job_uri, st):
        previous = json.loads(read_bytes(job_uri, st))
        differ = [what for what, same in (
            ("labelers (names, weights, params, ontology)", previous.get("fingerprint") == fingerprint),
            ("input", _input_of(previous.get("spec", {})) == _input_of(_public_spec(job)))) if not same]
        if differ and count_labels(job)["rows"]:
            raise OutputConflictError(
                f"output.uri {out} already holds labels of a different job ({' and '.join(differ)} differ); "
                f"use a new output.uri to start over")
        if differ:  # an earlier run that committed nothing: its record does not bind this one
            log.info("output.uri %s: replacing the record of an earlier run that committed no labels", out)
            fs, root = filesystem(out, st)
            for name in (MANIFEST, LABELS, CHECKPOINTS):
                if fs.exists(f"{root.rstrip('/')}/{name}"):
                    fs.rm(f"{root.rstrip('/')}/{name}", recursive=True)
            resumed = False
    if resumed:
        manifest = read_manifest(out, st)
        uris, rows = _read_listing(manifest_uri, st)
        listing = {"images": manifest.num_rows, "parts": [u.rsplit("/", 1)[-1] for u in uris], "rows": rows}
    else:
        manifest = list_input(job.input, st)
        listing = _write_listing(manifest, manifest_uri, st)  # complete: later runs reuse it
    record = {"fingerprint": fingerprint, "spec": _public_spec(job),
              "identity": {"labelers": fingerprint, "input": _input_of(_public_spec(job)),
                           "listing": {k: listing[k] for k in ("images", "parts", "rows")}}}
    write_bytes(job_uri, json.dumps(record, indent=2).encode(), st)
    return manifest, resumed


def manifest_parts(job: JobSpec) -> tuple[list[str], list[int]]:
    """URIs and row counts of the manifest's parts, in order (only those the listing completed)."""
    return _read_listing(join(job.output.uri, MANIFEST), job.storage)


def verify_output(output_uri: str, storage=None) -> tuple[bool, str, list[str]]:
    """Audit a run's output (read only): (every image exactly once?, one-line verdict, detail lines)."""
    from pseudolabel.engine.audit import inspect, verdict
    from pseudolabel.engine.errors import NoRunError

    if not exists(join(output_uri, "job.json"), storage) and not exists(join(output_uri, LABELS), storage):
        raise NoRunError(f"{output_uri} holds no run (no job.json, no {LABELS}/ folder): check the path")
    listed = exists(join(output_uri, MANIFEST, MANIFEST_DONE), storage)
    ids = set(read_manifest(output_uri, storage).column("image_id").to_pylist()) if listed else None
    audit = inspect(output_uri, storage, ids)
    audit.listed = listed
    ok, line, details = verdict(audit)
    lease = holder(output_uri, storage)
    if lease is not None:
        details.append(f"lease: {'a stale lease of' if lease['stale'] else 'being written now by'} {describe(lease)}")
    return ok, line, details


def count_labels(job: JobSpec, run_id: str | None = None) -> dict:
    """Rows, ok/error rows and distinct image ids in ``labels/``; ``this_run``: rows written by ``run_id``."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = arrow_filesystem(join(job.output.uri, LABELS), job.storage)
    try:
        ds = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True)
        table = ds.to_table(columns={"image_id": pads.field("image_id"), "status": pads.field("status"),
                                     "run_id": pads.field("provenance", "run_id")})
    except (FileNotFoundError, pa.ArrowInvalid):
        return {"rows": 0, "ok": 0, "error": 0, "distinct": 0, "this_run": 0}
    status = table.column("status")
    return {"rows": table.num_rows, "ok": pc.sum(pc.equal(status, "ok")).as_py() or 0,
            "error": pc.sum(pc.equal(status, "error")).as_py() or 0,
            "distinct": pc.count_distinct(table.column("image_id")).as_py(),
            "this_run": pc.sum(pc.equal(table.column("run_id"), run_id)).as_py() or 0 if run_id else 0}


def category_stats(job: JobSpec) -> list[dict]:
    """Per category (and labeler) of the labels table: annotation count and score quantiles (p10, p50, p90).

    Reads only the annotations' category, labeler and score leaves of each file (no masks).
    """
    import numpy as np
    import pyarrow.compute as pc

    fs, root = filesystem(join(job.output.uri, LABELS), job.storage)
    try:
        files = [p for p in fs.find(root) if p.endswith(".parquet")]
    except FileNotFoundError:
        files = []
    leaves = [f"annotations.list.element.{k}" for k in ("category", "labeler", "score")]
    parts = []
    for path in files:
        with fs.open(path, "rb") as f:
            anns = pc.list_flatten(pq.ParquetFile(f).read(columns=leaves).column("annotations"))
        parts.append(pa.table({k: pc.struct_field(anns, k) for k in ("category", "labeler", "score")}))
    if not parts:
        return []
    table = pa.concat_tables(parts)
    out = []
    keys = sorted(set(zip(table.column("labeler").to_pylist(), table.column("category").to_pylist())),
                  key=lambda k: (str(k[0]), str(k[1])))
    labelers = np.array(table.column("labeler").to_pylist(), dtype=object)
    categories = np.array(table.column("category").to_pylist(), dtype=object)
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    for labeler, category in keys:
        sel = scores[(labelers == labeler) & (categories == category)]
        p10, p50, p90 = (round(float(v), 4) for v in np.quantile(sel, [0.1, 0.5, 0.9]))
        out.append({"labeler": labeler, "category": category, "annotations": int(len(sel)),
                    "score_p10": p10, "score_p50": p50, "score_p90": p90})
    return out


#: Ray Data's checkpoint filter (present when resuming) runs in one actor that reserves 1 CPU.
CHECKPOINT_FILTER_CPUS = 1.0


def actor_stages(job: JobSpec) -> list[int]:
    """Indices of the labelers that get an actor pool: those with a device half, those that only
    implement ``label``, and every labeler when ``resources.host`` is ``actor``."""
    from pseudolabel.models.registry import labeler_class

    out = []
    for i, lab in enumerate(job.labelers):
        cls = labeler_class(lab.name)
        if job.resources.host == "actor" or not cls.splits() or cls.has_device_half():
            out.append(i)
    return out


def cpus_needed(job: JobSpec, resuming: bool) -> float:
    """CPUs the plan reserves at once: labeler actors, one read/decode and one host task, the resume filter."""
    res = job.resources
    return (res.actors * res.cpus_per_actor * len(actor_stages(job)) + res.decode_cpus + res.host_cpus
            + (CHECKPOINT_FILTER_CPUS if resuming else 0))


def check_capacity(job: JobSpec, resuming: bool) -> None:
    """Refuse a plan whose actors would take every CPU: read/decode and host tasks would never run."""
    import ray

    res = job.resources
    cpus = ray.cluster_resources().get("CPU", 0)
    gpus = ray.cluster_resources().get("GPU", 0)
    need = cpus_needed(job, resuming)
    if need > cpus:
        raise ResourceError(
            f"resources: {len(actor_stages(job))} labeler actor pool(s) x actors {res.actors} x cpus_per_actor "
            f"{res.cpus_per_actor:g} + decode_cpus {res.decode_cpus:g} + host_cpus {res.host_cpus:g}"
            + (" + 1 for the resume filter" if resuming else "")
            + f" = {need:g} CPUs, more than the cluster's {cpus:g}; lower resources.actors or resources.cpus_per_actor")
    if actor_stages(job) and res.gpus_per_actor and res.gpus_per_actor * (res.min_actors or 1) > gpus:
        raise ResourceError(f"resources.gpus_per_actor: {res.gpus_per_actor:g} GPUs per actor asked for, "
                            f"the cluster has {gpus:g}")


def check_weights(job: JobSpec) -> None:
    """Every labeler's checkpoints exist (or are reachable), checked on the driver before any work starts:
    one line naming the labeler, the weights and the way out."""
    from pseudolabel.models.weights import weights_problem

    problems = []
    for i, lab in enumerate(job.labelers):
        try:
            host = labeler_class(lab.name).host_half(lab, job.storage)
        except ValueError as err:  # e.g. a labeler that needs an ontology was given none
            raise SpecError(f"invalid job spec:\n  labelers.{i} ({lab.name}): {err}") from None
        for source in host.weight_sources():
            problem = weights_problem(source, job.storage, lab.revision)
            if problem:
                problems.append(f"labelers.{i} ({lab.name}) weights: {problem}")
    if problems:
        raise WeightsError("; ".join(problems))


def run_job(job: JobSpec, address: str | None = None, progress: bool = True, verbose: bool = False,
            retry_errors: bool = False) -> dict:
    """Run a validated job to completion (or resume it); returns the summary dict.

    ``progress``: our progress line (images labelled / to label, rate, ETA, errors) on stderr;
    ``verbose``: Ray Data's own operator bars and logs too; ``retry_errors``: label the images of
    ``error`` rows again (``retry`` rows always are).
    """
    started = time.time()
    run_id = uuid.uuid4().hex[:12]
    from pseudolabel.engine.preflight import preflight

    check_format_name(job.input.format)  # a resumed run does not list again: check the name here too
    preflight(job, address, verbose)  # output writable, S3 reachable, --address joined: one line each, before listing
    check_weights(job)
    # One writer per output: a second run is refused here, before anything is written or Ray starts.
    with acquire(job.output.uri, job.storage, run_id, timeout_s=job.output.lease_timeout_s):
        return _run_job_holding_lease(job, address, progress, verbose, retry_errors, run_id, started)


def _run_job_holding_lease(job: JobSpec, address: str | None, progress: bool, verbose: bool, retry_errors: bool,
                           run_id: str, started: float) -> dict:
    # 1. List the input once (or reuse the manifest of an earlier run of this job).
    manifest, resumed = prepare_output(job)
    # 2. Labels files and checkpoint agree, each image at most once; rows to label again are dropped.
    relabel = (STATUS_RETRY, STATUS_ERROR) if retry_errors else (STATUS_RETRY,)
    repaired = repair(job.output.uri, job.storage, set(manifest.column("image_id").to_pylist()), relabel)
    before = count_labels(job)
    total = manifest.num_rows
    log.info("%s %d images; %d already labelled", "resuming:" if resumed else "listed", total, before["rows"])

    # 3-5. Label what is left (nothing to start when an earlier run finished every image).
    timings: dict = {}
    if not before["rows"] == before["distinct"] == total:
        timings = _run_pipeline(job, address, progress, verbose, run_id, before_rows=before["rows"], total=total,
                                input_format=manifest_format(manifest))

    # 6. Summary.
    after = count_labels(job, run_id)
    seconds = time.time() - started
    new_rows = after["this_run"]  # (files a crashed run left uncommitted are dropped, so not rows - before)
    summary = {
        "run_id": run_id, "name": job.name, "output_uri": job.output.uri, "images": total,
        "labelled": after["rows"], "ok": after["ok"], "error": after["error"],
        "distinct": after["distinct"], "this_run": new_rows, "resumed": resumed,
        "repaired": {k: v for k, v in repaired.items() if v and k != "not labelled"},
        "seconds": round(seconds, 2), "images_per_s": round(new_rows / seconds, 3) if seconds > 0 else None,
        "labelers": [lab.name for lab in job.labelers], "categories": categories_of(job),
        "category_stats": category_stats(job),
        "labeler_seconds": [{"labeler": lab.name, **{phase: round(sec, 2) for (k, phase), (sec, _) in timings.items()
                                                      if k == i}}
                            for i, lab in enumerate(job.labelers)],
        "engine_version": __version__,
    }
    write_bytes(join(job.output.uri, "summary.json"), json.dumps(summary, indent=2).encode(), job.storage)
    return summary


def device_stage_class(index: int, labeler: str) -> type:
    """``DeviceStage`` under a name that says which labeler it runs (``Forward_1_directsam``), so Ray's
    operator names and logs tell the stages of several labelers apart."""
    return type(f"Forward_{index}_{re.sub(r'[^0-9A-Za-z]+', '_', labeler)}", (DeviceStage,), {})


def _run_pipeline(job: JobSpec, address: str | None, progress: bool, verbose: bool, run_id: str,
                  before_rows: int, total: int, input_format: str | None = None) -> dict:
    """Ray, the streaming plan and the checkpointed write; returns this run's seconds and images per
    (labeler index, phase): ``prepare`` (input preparation in the decode tasks), ``device`` (forward in
    actors), ``host`` (postprocess + encoding in tasks), ``actor`` (a labeler run whole in its actor),
    summed over workers."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from ray.data.checkpoint import CheckpointConfig

    out, st, res = job.output.uri, job.storage, job.resources
    # 3. Ray, checkpointing and progress reporting.
    resuming = before_rows > 0
    connect(address, min_cpus=cpus_needed(job, resuming), verbose=verbose)
    check_capacity(job, resuming)
    stats_name = f"pseudolabel-stats-{run_id}"
    stats = stats_actor(stats_name)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = False
    bar = None
    ckpt_fs, ckpt_path = arrow_filesystem(join(out, CHECKPOINTS), st)
    ctx.checkpoint_config = CheckpointConfig(id_column="image_id", checkpoint_path=ckpt_path,
                                             override_filesystem=ckpt_fs, delete_checkpoint_on_success=False)
    try:
        # 4. Build the streaming plan: read manifest -> fetch+decode tasks -> device halves -> host tasks.
        parts, rows = manifest_parts(job)
        ds = ray.data.read_datasource(ManifestDatasource(parts, rows, st, res.decode_batch_size),
                                      num_cpus=res.decode_cpus)
        decode_kwargs = dict(storage=st, max_pixels=job.input.max_pixels, image_column=job.input.image_column,
                             max_batch_pixels=res.max_batch_pixels, input_format=input_format,
                             fetch_retries=job.input.fetch_retries, fetch_backoff_s=job.input.fetch_backoff_s)
        provenance = {
            "labelers": [lab.name for lab in job.labelers],
            "weights": [lab.weights or "" for lab in job.labelers],
            "revisions": [lab.revision or "" for lab in job.labelers],
            "params_hash": labelers_fingerprint(job), "engine_version": __version__, "run_id": run_id,
        }
        # device halves: one actor pool per labeler with a model (only its forward pass runs there)
        on_actors = actor_stages(job)
        classes = [labeler_class(lab.name) for lab in job.labelers]
        # run whole in their actor: every labeler with ``resources.host: actor``, else those with no host half
        whole = [i in on_actors and (res.host == "actor" or not cls.splits()) for i, cls in enumerate(classes)]
        # decoding (and each labeler's ``prepare``: its input resized to the network's size) in light CPU
        # tasks ahead of the actors, never fused into them
        preparing = [{"index": i, "spec": job.labelers[i].model_dump(mode="json")} for i in on_actors
                     if not whole[i] and classes[i].prepares()]
        if preparing:
            ds = ds.map_batches(decode_then_prepare, batch_format="pyarrow", batch_size=res.decode_batch_size,
                                fn_kwargs=dict(decode=decode_kwargs,
                                               prepare=dict(labelers=preparing, storage=st.model_dump(),
                                                            stats=stats_name)),
                                num_cpus=res.decode_cpus)
        elif on_actors:
            ds = ds.map_batches(fetch_decode, batch_format="pyarrow", batch_size=res.decode_batch_size,
                                fn_kwargs=decode_kwargs, num_cpus=res.decode_cpus)
        for i in on_actors:
            with warnings.catch_warnings():  # Ray 2.60-2.63 flag max_restarts as a deprecated keyword
                warnings.simplefilter("ignore", DeprecationWarning)
                ds = ds.map_batches(
                    device_stage_class(i, job.labelers[i].name), batch_format="pyarrow", batch_size=res.batch_size,
                    compute=ActorPoolStrategy(min_size=res.min_actors or 1, max_size=res.actors),
                    num_gpus=res.gpus_per_actor, num_cpus=res.cpus_per_actor,
                    # Ray Data's own default for actor pools, stated: actors restart after a crash (the
                    # engine relies on it), and remote args that differ from the decode tasks' keep Ray
                    # from fusing decoding into the labeler actors
                    max_restarts=-1,
                    fn_constructor_kwargs=dict(spec=job.labelers[i].model_dump(mode="json"), index=i,
                                               storage=st.model_dump(), gpus_per_actor=res.gpus_per_actor,
                                               whole=res.host == "actor", stats=stats_name,
                                               max_batch_pixels=res.max_batch_pixels),
                )
        # host halves of every labeler + encoding, in CPU tasks (as many at once as the CPUs allow)
        sources = [{"spec": lab.model_dump(mode="json"),
                    "source": "record" if whole[i] else "payload" if i in on_actors else "host"}
                   for i, lab in enumerate(job.labelers)]
        host_kwargs = dict(labelers=sources, storage=st.model_dump(), provenance=provenance, stats=stats_name)
        if on_actors:
            ds = ds.map_batches(host_stage, batch_format="pyarrow", batch_size=None, num_cpus=res.host_cpus,
                                fn_kwargs=host_kwargs)
        else:  # no network anywhere: each host task decodes its own batch (no extra hop, fewer workers)
            ds = ds.map_batches(decode_then_host, batch_format="pyarrow", batch_size=res.decode_batch_size,
                                num_cpus=res.host_cpus, fn_kwargs=dict(decode=decode_kwargs, host=host_kwargs))
        # 5. Write; the checkpoint makes this exactly-once across re-runs. Write tasks reserve what host
        # tasks do, so each host task writes its own rows (labels are committed from the first batch on).
        lab_fs, lab_path = arrow_filesystem(join(out, LABELS), st)
        bar = CommittedProgress(join(out, LABELS), st, total, before_rows, enabled=progress)
        bar.start()
        ds.write_parquet(lab_path, filesystem=lab_fs, max_rows_per_file=res.rows_per_file,
                         ray_remote_args={"num_cpus": res.host_cpus})
    finally:
        ctx.checkpoint_config = None
        if bar is not None:
            bar.stop()
    return stats_totals(stats)
