"""Arrow schemas of every table the engine writes, in one place.

Plain Arrow types only (no extension types, no pickles), so pyarrow, DuckDB, Ray Data and
Hugging Face `datasets` read the files as they are.
"""
from __future__ import annotations

import json

import pyarrow as pa

#: COCO compressed RLE: ``size`` is [height, width], ``counts`` the compressed string.
RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

#: One COCO instance annotation. ``bbox`` is [x, y, w, h] in pixels (float32).
ANNOTATION_TYPE = pa.struct(
    [
        ("id", pa.int64()),
        ("category_id", pa.int32()),
        ("category", pa.string()),
        ("segmentation", RLE_TYPE),
        ("bbox", pa.list_(pa.float32())),
        ("area", pa.float64()),
        ("score", pa.float32()),
        ("iscrowd", pa.int8()),
        ("labeler", pa.string()),
        ("prompt", pa.string()),
    ]
)

#: One subobject token. ``boundary_score`` is the mean boundary probability along its edge.
SUBOBJECT_TYPE = pa.struct(
    [
        ("id", pa.int32()),
        ("segmentation", RLE_TYPE),
        ("bbox", pa.list_(pa.float32())),
        ("area", pa.float64()),
        ("boundary_score", pa.float32()),
        ("labeler", pa.string()),
        ("embedding", pa.list_(pa.float32())),
    ]
)

#: One separated image (``clean``, ``component``, ``background``, ``foreground_mask``...), PNG bytes.
LAYER_TYPE = pa.struct([("name", pa.string()), ("labeler", pa.string()), ("png", pa.binary())])

PROVENANCE_TYPE = pa.struct(
    [
        ("labelers", pa.list_(pa.string())),
        ("weights", pa.list_(pa.string())),
        ("revisions", pa.list_(pa.string())),
        ("params_hash", pa.string()),
        ("engine_version", pa.string()),
        ("run_id", pa.string()),
    ]
)

#: The manifest: the input listed once per job; the pipeline reads this, never the store again.
MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("member", pa.string()),
        ("shard", pa.int32()),
        ("size", pa.int64()),  # bytes of the image (file or tar member), null where unknown
        ("offset", pa.int64()),  # tar members: where the member's bytes start in the shard (ranged reads)
        ("file_name", pa.string()),
        ("prompts", pa.string()),  # JSON per-row hints (COCO boxes, points...), or null
        ("error", pa.string()),  # why the listing could not read this row (bad shard, path outside the root), or null
    ]
)

_LABEL_FIELDS = [
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("member", pa.string()),
    ("file_name", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("annotations", pa.list_(ANNOTATION_TYPE)),
    ("subobjects", pa.list_(SUBOBJECT_TYPE)),
    ("layers", pa.list_(LAYER_TYPE)),
    ("provenance", PROVENANCE_TYPE),
]


def _hf_features() -> dict:
    """The `datasets` Features of the labels table, as its Parquet metadata carries them."""
    rle = {"size": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
           "counts": {"dtype": "string", "_type": "Value"}}

    def value(dtype: str) -> dict:
        return {"dtype": dtype, "_type": "Value"}

    def seq(feature) -> dict:
        return {"feature": feature, "_type": "List"}

    box = seq(value("float32"))
    annotation = {
        "id": value("int64"), "category_id": value("int32"), "category": value("string"),
        "segmentation": rle, "bbox": box, "area": value("float64"), "score": value("float32"),
        "iscrowd": value("int8"), "labeler": value("string"), "prompt": value("string"),
    }
    subobject = {
        "id": value("int32"), "segmentation": rle, "bbox": box, "area": value("float64"),
        "boundary_score": value("float32"), "labeler": value("string"),
        "embedding": seq(value("float32")),
    }
    layer = {"name": value("string"), "labeler": value("string"), "png": value("binary")}
    provenance = {
        "labelers": seq(value("string")), "weights": seq(value("string")),
        "revisions": seq(value("string")), "params_hash": value("string"),
        "engine_version": value("string"), "run_id": value("string"),
    }
    return {
        "image_id": value("string"), "uri": value("string"), "member": value("string"),
        "file_name": value("string"), "width": value("int32"), "height": value("int32"),
        "status": value("string"), "error": value("string"),
        "annotations": seq(annotation), "subobjects": seq(subobject), "layers": seq(layer),
        "provenance": provenance,
    }


LABELS_SCHEMA = pa.schema(
    _LABEL_FIELDS,
    metadata={b"huggingface": json.dumps({"info": {"features": _hf_features()}}).encode()},
)

STATUS_OK = "ok"
STATUS_ERROR = "error"
#: a transient failure (network, throttling, 5xx) that outlived the retries: the next run labels it again
STATUS_RETRY = "retry"
