"""The labeler stages Ray Data runs: a device stage per labeler (actors), one host stage (tasks).

    fetch+decode(+prepare) tasks ─▶ DeviceStage(labeler 1) ─▶ … ─▶ DeviceStage(labeler n) ─▶ host_stage tasks ─▶ write
    CPU: decode, then each        actor pool, model loaded once            postprocess + encode,
    labeler's ``prepare``         per actor: only ``forward``              all labelers, in job order

In-flight columns, one per labeler ``i`` that has an actor stage:

- ``_prepared_i`` (large_binary): the labeler's ``prepare`` result for the row (``engine.payload``),
  made in the decode tasks (``prepare_stage``) for labelers that implement ``prepare`` (e.g. DirectSAM's
  views resized to the network's input size), so the actor's host thread only feeds the device; the
  device stage hands it to ``forward`` and drops the column.
- ``_payload_i`` (large_binary): the device half's payload for the row (``engine.payload``), for
  labelers that split (``Labeler.splits()``); the host stage runs ``postprocess`` + ``encode_output``.
- ``_record_i`` (struct of the three list columns): the row's encoded records, for labelers that run
  whole in their actor (a custom labeler with only ``label``, or every labeler with
  ``resources.host: actor``).

Labelers with no device half (the classical baselines) have no actor stage: the host stage runs them
whole. The host stage assembles every labeler's records in job order (annotation ids 1..n per row),
drops the in-flight columns and casts to the `labels` schema. A failure of a whole device batch is
retried image by image; an image that still fails, or whose host half fails, becomes an error row
(``status: error``, no labels): a batch is never dropped.

Memory: ``resources.max_batch_pixels`` bounds the decoded pixels one labeler call sees. A device batch
is cut into consecutive sub-batches whose pixels sum to at most the budget (an image larger than the
budget runs alone) and their outputs are joined in order; a host task that decodes its own batch
decodes and labels it in such sub-batches too, so it never holds more than about one budget of pixels.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pseudolabel.engine.decode import fetch_decode, pixel_blocks, pixels_to_image
from pseudolabel.engine.encode import encode_output
from pseudolabel.engine.payload import pack_payload, unpack_payload
from pseudolabel.engine.run_stats import report_seconds
from pseudolabel.models.registry import host_class, labeler_class
from pseudolabel.schemas.spec import LabelerSpec, StorageSpec
from pseudolabel.schemas.tables import (
    ANNOTATION_TYPE,
    LABELS_SCHEMA,
    LAYER_TYPE,
    PROVENANCE_TYPE,
    STATUS_ERROR,
    STATUS_OK,
    SUBOBJECT_TYPE,
)

log = logging.getLogger(__name__)

LIST_COLUMNS = {"annotations": pa.list_(ANNOTATION_TYPE), "subobjects": pa.list_(SUBOBJECT_TYPE),
                "layers": pa.list_(LAYER_TYPE)}
RECORD_TYPE = pa.struct(list(LIST_COLUMNS.items()))


def payload_column(index: int) -> str:
    return f"_payload_{index}"


def record_column(index: int) -> str:
    return f"_record_{index}"


def prepared_column(index: int) -> str:
    return f"_prepared_{index}"


def resolve_device(requested: str, gpus_per_actor: float) -> str:
    """``auto`` -> ``cuda`` when this actor was given a GPU, else ``cpu``."""
    if requested != "auto":
        return requested
    if gpus_per_actor > 0:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def parse_prompts(text: str | None):
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {"text": text}


def error_message(labeler: str, err: BaseException) -> str:
    return f"{labeler}: {type(err).__name__}: {err}"


class _Rows:
    """The ok rows of a batch as images + prompts, and the batch's status/error columns to update."""

    def __init__(self, batch: pa.Table):
        n = batch.num_rows
        self.status = batch.column("status").to_pylist()
        self.errors = batch.column("error").to_pylist()
        self.ok = [i for i in range(n) if self.status[i] == STATUS_OK]
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        pixels = batch.column("pixels")
        prompt_col = batch.column("prompts").to_pylist() if "prompts" in batch.column_names else [None] * n
        self.images = {i: pixels_to_image(pixels[i].as_buffer(), heights[i], widths[i]) for i in self.ok}
        self.prompts = {i: parse_prompts(prompt_col[i]) for i in self.ok}

    def fail(self, i: int, labeler: str, err: BaseException) -> None:
        self.status[i], self.errors[i] = STATUS_ERROR, error_message(labeler, err)

    def with_status(self, table: pa.Table) -> pa.Table:
        table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(self.status, pa.string()))
        return table.set_column(table.schema.get_field_index("error"), "error", pa.array(self.errors, pa.string()))


class DeviceStage:
    """map_batches class (actor pool) for labeler ``index``: loads the model once, runs ``forward``
    (or, for labelers that do not split or when ``whole`` is set, ``label`` + encoding).

    Args:
        spec: the labeler's spec (as a dict, so it pickles simply).
        index: the labeler's position in the job (names its in-flight column).
        storage: storage settings for weights on s3://.
        gpus_per_actor: GPUs Ray gave each actor (decides ``device: auto``).
        whole: run the whole labeler here (``resources.host: actor``) even when it splits.
        max_batch_pixels: memory budget of one forward call (``resources.max_batch_pixels``); None: no limit.
    """

    def __init__(self, spec: dict, index: int, storage: dict | None, gpus_per_actor: float, whole: bool = False,
                 stats: str | None = None, max_batch_pixels: int | None = None):
        self.index, self.stats, self.max_batch_pixels = index, stats, max_batch_pixels
        self.spec = LabelerSpec.model_validate(spec)
        self.name = self.spec.name
        device = resolve_device(self.spec.device, gpus_per_actor)
        cls = labeler_class(self.name)
        self.labeler = cls(self.spec, device=device, storage=StorageSpec.model_validate(storage or {}))
        self.whole = whole or not cls.splits()
        self.column = record_column(index) if self.whole else payload_column(index)
        #: ``prepare`` ran in the decode tasks: forward is handed its results
        self.prepared = not self.whole and cls.prepares()
        self.batch_failures = 0

    def _run(self, images: list, prompts: list, prepared: list | None) -> list:
        if self.whole:
            return self.labeler(images, prompts)
        if self.prepared:
            return self.labeler.forward(images, prompts, prepared=prepared)
        return self.labeler.forward(images, prompts)

    def _results(self, images: list, prompts: list, prepared: list | None = None) -> list:
        """Outputs (payloads or LabelOutputs) or exceptions, one per image."""
        try:
            outputs = list(self._run(images, prompts, prepared))
            if len(outputs) != len(images):
                raise RuntimeError(f"returned {len(outputs)} outputs for {len(images)} images")
            return outputs
        except Exception as err:  # retry one by one so one bad image costs only itself
            self.batch_failures += 1
            if self.batch_failures == 1:  # once per actor with the traceback, then one line each
                log.warning("labeler %s: a batch of %d image(s) failed; labelling them one at a time:\n%s",
                            self.name, len(images), traceback.format_exc())
            else:
                log.warning("labeler %s: batch failure %d (%s: %s); labelling one at a time",
                            self.name, self.batch_failures, type(err).__name__, err)
            results = []
            for k, (image, prompt) in enumerate(zip(images, prompts)):
                try:
                    results.append(self._run([image], [prompt], None if prepared is None else [prepared[k]])[0])
                except Exception as err:
                    results.append(err)
            return results

    def _results_within_budget(self, images: list, prompts: list, prepared: list | None) -> list:
        """``_results`` over sub-batches of at most ``max_batch_pixels`` decoded pixels, joined in order."""
        results: list = []
        for chunk in pixel_blocks([im.shape[0] * im.shape[1] for im in images], self.max_batch_pixels):
            results += self._results([images[j] for j in chunk], [prompts[j] for j in chunk],
                                     None if prepared is None else [prepared[j] for j in chunk])
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _Rows(batch)
        values: list[Any] = [None] * batch.num_rows
        prepared = None
        if self.prepared and prepared_column(self.index) in batch.column_names:
            column = batch.column(prepared_column(self.index))
            prepared = [unpack_payload(column[i].as_buffer()) for i in rows.ok]
            batch = batch.drop_columns([prepared_column(self.index)])
        if rows.ok:
            started = time.perf_counter()
            results = self._results_within_budget([rows.images[i] for i in rows.ok],
                                                  [rows.prompts[i] for i in rows.ok], prepared)
            report_seconds(self.stats, self.index, "actor" if self.whole else "device",
                           time.perf_counter() - started, len(rows.ok))
            for i, result in zip(rows.ok, results):
                try:
                    if isinstance(result, BaseException):
                        raise result
                    if self.whole:
                        h, w = rows.images[i].shape[:2]
                        values[i] = encode_output(result, self.name, h, w)
                    else:
                        values[i] = pack_payload(result)
                except Exception as err:
                    rows.fail(i, self.name, err)
                    values[i] = None
        column = pa.array(values, RECORD_TYPE if self.whole else pa.large_binary())
        return rows.with_status(batch).append_column(self.column, column)


#: host halves built in this worker process, by spec (Ray reuses task workers, so each labeler's host
#: half is set up once per process, not once per batch)
_HOST_HALVES: dict[str, Any] = {}


def _host_half(spec: dict, storage: dict | None):
    key = json.dumps([spec, storage], sort_keys=True, default=str)
    if key not in _HOST_HALVES:
        lab_spec = LabelerSpec.model_validate(spec)
        cls = host_class(lab_spec.name)  # no torch for labelers with a light host half (``HOST_HALVES``)
        _HOST_HALVES[key] = cls.host_half(lab_spec, StorageSpec.model_validate(storage or {}))
    return _HOST_HALVES[key]


def prepare_blocks(batch: pa.Table, labelers: list[dict], storage: dict | None, stats: str | None = None,
                   max_bytes: int | None = None) -> Iterator[pa.Table]:
    """The ``prepare`` of each labeler in ``labelers`` (``{"index": i, "spec": dict}``) for every ok row of
    a decoded batch, as ``_prepared_i`` columns, handed on in blocks of consecutive rows whose prepared
    arrays take at most ``max_bytes`` (a row over it is a block of its own; None: one block). A
    labeler's input can be much larger than the decoded image (DirectSAM's pyramid: every crop at the
    network's size), so the blocks keep a task's memory near one budget. An image whose preparation
    fails becomes an error row (the labeler named); the batch goes on."""
    rows = _Rows(batch)
    indices = [lab["index"] for lab in labelers]
    seconds = dict.fromkeys(indices, 0.0)
    start, held = 0, 0
    values: list[dict[int, bytes | None]] = []  # per row of the current block
    for i in range(batch.num_rows):
        row: dict[int, bytes | None] = dict.fromkeys(indices)
        if rows.status[i] == STATUS_OK:
            for lab in labelers:
                started = time.perf_counter()
                try:
                    half = _host_half(lab["spec"], storage)
                    row[lab["index"]] = pack_payload(half.prepare(rows.images[i], rows.prompts[i]))
                except Exception as err:
                    rows.fail(i, lab["spec"]["name"], err)
                    row = dict.fromkeys(indices)
                    break
                finally:
                    seconds[lab["index"]] += time.perf_counter() - started
        size = sum(len(v) for v in row.values() if v is not None)
        if max_bytes is not None and values and held + size > max_bytes:
            yield _prepared_block(batch, rows, start, values)
            start, held, values = i, 0, []
        values.append(row)
        held += size
    for index, sec in seconds.items():
        report_seconds(stats, index, "prepare", sec, len(rows.ok))
    if values or batch.num_rows == 0:
        yield _prepared_block(batch, rows, start, values)


def _prepared_block(batch: pa.Table, rows: _Rows, start: int, values: list[dict[int, bytes | None]]) -> pa.Table:
    """Rows ``start .. start + len(values)`` of ``batch`` with their status and ``_prepared_i`` columns."""
    table = rows.with_status(batch).slice(start, len(values))
    for index in (values[0] if values else {}):
        table = table.append_column(prepared_column(index), pa.array([v[index] for v in values], pa.large_binary()))
    return table


def prepare_stage(batch: pa.Table, labelers: list[dict], storage: dict | None, stats: str | None = None) -> pa.Table:
    """``prepare_blocks`` as one table (in-process use and tests)."""
    return pa.concat_tables(list(prepare_blocks(batch, labelers, storage, stats)))


def decode_then_prepare(batch: pa.Table, decode: dict, prepare: dict) -> Iterator[pa.Table]:
    """map_batches task ahead of the device stages: fetch+decode, then each labeler's ``prepare``, block
    by block: decoded blocks hold at most ``decode["max_batch_pixels"]`` pixels, prepared blocks at most
    three bytes per pixel of it (an RGB image's worth)."""
    decoded = fetch_decode(batch, **decode)
    budget = decode.get("max_batch_pixels")
    max_bytes = 3 * budget if budget else None
    for block in [decoded] if isinstance(decoded, pa.Table) else decoded:
        yield from prepare_blocks(block, **prepare, max_bytes=max_bytes)


def host_stage(batch: pa.Table, labelers: list[dict], storage: dict | None, provenance: dict,
               stats: str | None = None) -> pa.Table:
    """map_batches task: every labeler's records for every ok row, in job order -> the `labels` table.

    ``labelers``: per labeler in job order, ``{"spec": dict, "source": "payload" | "record" | "host"}``:
    where its records come from (its ``_payload_i`` column through ``postprocess``, its ``_record_i``
    column, or ``postprocess`` with no payload for labelers without a device half).
    """
    rows = _Rows(batch)
    n = batch.num_rows
    in_flight = {}
    for k, lab in enumerate(labelers):
        if lab["source"] == "payload":
            in_flight[k] = batch.column(payload_column(k))
        elif lab["source"] == "record":
            in_flight[k] = batch.column(record_column(k))
    cols: dict[str, list] = {name: [[] for _ in range(n)] for name in LIST_COLUMNS}
    seconds = [0.0] * len(labelers)
    for i in rows.ok:
        image, prompt = rows.images[i], rows.prompts[i]
        h, w = image.shape[:2]
        records = []
        for k, lab in enumerate(labelers):
            name = lab["spec"]["name"]
            try:
                if lab["source"] == "record":
                    records.append(in_flight[k][i].as_py())
                    continue
                started = time.perf_counter()
                payload = unpack_payload(in_flight[k][i].as_buffer()) if lab["source"] == "payload" else None
                output = _host_half(lab["spec"], storage).postprocess(image, prompt, payload)
                records.append(encode_output(output, name, h, w))
                seconds[k] += time.perf_counter() - started
            except Exception as err:
                rows.fail(i, name, err)
                break
        else:
            next_id = 1
            for rec in records:
                for ann in rec["annotations"]:
                    ann["id"] = next_id
                    next_id += 1
                for name in LIST_COLUMNS:
                    cols[name][i] += rec[name]
    for k, lab in enumerate(labelers):
        if lab["source"] != "record":
            report_seconds(stats, k, "host", seconds[k], len(rows.ok))
    table = rows.with_status(batch)
    for name, typ in LIST_COLUMNS.items():
        table = table.append_column(name, pa.array(cols[name], typ))
    return finalize(table, provenance)


def decode_then_host(batch: pa.Table, decode: dict, host: dict) -> pa.Table:
    """map_batches task for plans with no device stage: fetch+decode, then ``host_stage``.

    ``fetch_decode`` hands the batch back in blocks of at most ``decode["max_batch_pixels"]`` decoded
    pixels (one block when it is None); each block is labelled before the next is decoded, so the task
    holds about one budget of pixels whatever the images' sizes. Rows come out in the batch's order.
    """
    decoded = fetch_decode(batch, **decode)
    if isinstance(decoded, pa.Table):
        return host_stage(decoded, **host)
    return pa.concat_tables([host_stage(block, **host) for block in decoded])


def finalize(table: pa.Table, provenance: dict | None) -> pa.Table:
    """Drop in-flight columns, add provenance, cast to LABELS_SCHEMA (with its HF metadata)."""
    n = table.num_rows
    table = table.append_column("provenance", pa.array([provenance] * n, PROVENANCE_TYPE))
    return table.select(LABELS_SCHEMA.names).cast(LABELS_SCHEMA)
