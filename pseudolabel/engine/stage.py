"""The labeler stage: a callable class that Ray Data runs in an actor pool.

The model is built once per actor; each call maps one batch. A failure of the whole batch is retried
image by image, and an image that still fails becomes an error row: a batch is never dropped.
"""
from __future__ import annotations

import json
import logging
import traceback

import pyarrow as pa

from pseudolabel.engine.decode import pixels_to_image
from pseudolabel.engine.encode import encode_output
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.spec import LabelerSpec, StorageSpec
from pseudolabel.schemas.tables import (ANNOTATION_TYPE, LABELS_SCHEMA, LAYER_TYPE, PROVENANCE_TYPE, STATUS_ERROR,
                                        STATUS_OK, SUBOBJECT_TYPE)

log = logging.getLogger(__name__)

_LIST_COLUMNS = {"annotations": pa.list_(ANNOTATION_TYPE), "subobjects": pa.list_(SUBOBJECT_TYPE),
                 "layers": pa.list_(LAYER_TYPE)}


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


def _error_message(labeler: str, err: BaseException) -> str:
    return f"{labeler}: {type(err).__name__}: {err}"


class LabelerStage:
    """map_batches class: adds one labeler's records to each ok row.

    Args:
        spec: the labeler's spec (as a dict, so it pickles simply).
        storage: storage settings for weights on s3://.
        gpus_per_actor: GPUs Ray gave each actor (decides ``device: auto``).
        final: the last stage drops the pixels and casts to the `labels` schema.
        provenance: the struct written into every row (final stage only).
    """

    def __init__(self, spec: dict, storage: dict | None, gpus_per_actor: float, final: bool,
                 provenance: dict | None = None):
        self.spec = LabelerSpec.model_validate(spec)
        self.name = self.spec.name
        device = resolve_device(self.spec.device, gpus_per_actor)
        cls = labeler_class(self.name)
        self.labeler = cls(self.spec, device=device, storage=StorageSpec.model_validate(storage or {}))
        self.final = final
        self.provenance = provenance
        self.batch_failures = 0

    def _label(self, images, prompts) -> list:
        """Outputs or exceptions, one per image."""
        try:
            outputs = self.labeler(images, prompts)
            if len(outputs) != len(images):
                raise RuntimeError(f"returned {len(outputs)} outputs for {len(images)} images")
            return list(outputs)
        except Exception as err:  # retry one by one so one bad image costs only itself
            self.batch_failures += 1
            if self.batch_failures == 1:  # once per actor with the traceback, then one line each
                log.warning("labeler %s: a batch of %d image(s) failed; labelling them one at a time:\n%s",
                            self.name, len(images), traceback.format_exc())
            else:
                log.warning("labeler %s: batch failure %d (%s: %s); labelling one at a time",
                            self.name, self.batch_failures, type(err).__name__, err)
            results = []
            for image, prompt in zip(images, prompts):
                try:
                    results.append(self.labeler([image], [prompt])[0])
                except Exception as err:
                    results.append(err)
            return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        cols = {name: (batch.column(name).to_pylist() if name in batch.column_names else [[] for _ in range(n)])
                for name in _LIST_COLUMNS}
        ok = [i for i in range(n) if status[i] == STATUS_OK]
        if ok:
            widths = batch.column("width").to_pylist()
            heights = batch.column("height").to_pylist()
            pixels = batch.column("pixels")
            prompt_col = batch.column("prompts").to_pylist() if "prompts" in batch.column_names else [None] * n
            images = [pixels_to_image(pixels[i].as_buffer(), heights[i], widths[i]) for i in ok]
            prompts = [parse_prompts(prompt_col[i]) for i in ok]
            for i, result in zip(ok, self._label(images, prompts)):
                try:
                    if isinstance(result, BaseException):
                        raise result
                    rec = encode_output(result, self.name, heights[i], widths[i],
                                        first_id=len(cols["annotations"][i]) + 1)
                except Exception as err:
                    status[i], errors[i] = STATUS_ERROR, _error_message(self.name, err)
                    continue
                for name in _LIST_COLUMNS:
                    cols[name][i] = list(cols[name][i]) + rec[name]
        keep = [c for c in batch.column_names if c not in _LIST_COLUMNS and c not in ("status", "error")]
        table = batch.select(keep)
        table = table.append_column("status", pa.array(status, pa.string()))
        table = table.append_column("error", pa.array(errors, pa.string()))
        for name, typ in _LIST_COLUMNS.items():
            table = table.append_column(name, pa.array(cols[name], typ))
        if self.final:
            table = finalize(table, self.provenance)
        return table


def finalize(table: pa.Table, provenance: dict | None) -> pa.Table:
    """Drop in-flight columns, add provenance, cast to LABELS_SCHEMA (with its HF metadata)."""
    n = table.num_rows
    table = table.append_column("provenance", pa.array([provenance] * n, PROVENANCE_TYPE))
    return table.select(LABELS_SCHEMA.names).cast(LABELS_SCHEMA)
