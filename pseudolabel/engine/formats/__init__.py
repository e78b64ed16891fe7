"""Input formats: one class per layout, in one registry.

    FORMATS = {"folder": FolderFormat, "webdataset": WebDatasetFormat, "parquet": ParquetFormat,
               "coco": CocoFormat}

``input.format`` is one of these names, ``auto`` (COCO when ``coco_json`` is set, else WebDataset when
there are ``.tar`` files, else Parquet when there are ``.parquet`` files and no images, else folder),
or ``package.module:Class`` naming a user's own ``InputFormat`` subclass (importable on every Ray
worker). ``register_format(name, cls)`` adds a name in this process (tests, notebooks); a registered
class is written into the manifest as its ``module:Class`` so workers import it the same way.

Every reader of input bytes goes through here: the engine's listing (``engine.sources``) and
fetch+decode (``engine.decode``), reading a run's source images back (``jobs.labels_io``, the report)
and the trainers.
"""
from __future__ import annotations

import importlib

from pseudolabel.engine.formats.base import FetchRow, InputFormat, SourceError, confine, stable_image_id
from pseudolabel.engine.formats.coco import CocoFormat
from pseudolabel.engine.formats.folder import FolderFormat
from pseudolabel.engine.formats.parquet import PARQUET_ROW_PREFIX, ParquetFormat, image_column_of
from pseudolabel.engine.formats.webdataset import WebDatasetFormat, tar_members

#: format name -> class; ``auto`` tries the built-ins in this order (folder is the fallback)
FORMATS: dict[str, type[InputFormat]] = {
    "coco": CocoFormat,
    "webdataset": WebDatasetFormat,
    "parquet": ParquetFormat,
    "folder": FolderFormat,
}
_BUILTIN = tuple(FORMATS)

#: key of the manifest's schema metadata that holds the format it was listed with (read back by readers)
MANIFEST_FORMAT_KEY = b"pseudolabel.format"

__all__ = [
    "FORMATS",
    "MANIFEST_FORMAT_KEY",
    "PARQUET_ROW_PREFIX",
    "FetchRow",
    "InputFormat",
    "SourceError",
    "check_format_name",
    "confine",
    "detect_format",
    "format_class",
    "format_names",
    "format_of_row",
    "format_ref",
    "image_column_of",
    "manifest_format",
    "register_format",
    "stable_image_id",
    "tar_members",
]


def register_format(name: str, cls: type[InputFormat]) -> None:
    """Make ``input.format: name`` list and fetch with ``cls`` (an InputFormat subclass) in this process."""
    if not (isinstance(cls, type) and issubclass(cls, InputFormat)):
        raise TypeError(f"register_format({name!r}): {cls!r} is not an InputFormat subclass")
    if name == "auto" or ":" in name:
        raise ValueError(f"register_format: {name!r} is reserved")
    FORMATS[name] = cls


def format_names() -> list[str]:
    """The names ``input.format`` takes, ``auto`` first."""
    return ["auto", *FORMATS]


def format_class(name: str) -> type[InputFormat]:
    """The class of a registered name or a ``package.module:Class`` reference; SourceError otherwise."""
    if name in FORMATS:
        return FORMATS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise SourceError(f"input.format: cannot import {name!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, InputFormat)):
            raise SourceError(f"input.format: {name!r} is not an InputFormat subclass")
        return cls
    raise SourceError(f"input.format: unknown format {name!r}; known: {', '.join(format_names())} "
                      f"(or 'package.module:Class' for your own)")


def check_format_name(name: str) -> None:
    """SourceError (naming ``input.format`` and the known names) unless ``name`` resolves; run on the
    driver before Ray starts."""
    if name != "auto":
        format_class(name)


def format_ref(name: str) -> str:
    """What to record for ``name`` so another process resolves the same class: a built-in's name, else
    ``module:Class``."""
    if name in _BUILTIN or ":" in name:
        return name
    cls = format_class(name)
    return f"{cls.__module__}:{cls.__qualname__}"


def detect_format(spec, files: list[str]) -> str:
    """The format name ``input.format`` stands for (``auto`` resolved from the listed files)."""
    if spec.format != "auto":
        return spec.format
    for name in _BUILTIN:
        if FORMATS[name].claims(spec, files):
            return name
    return "folder"


def format_of_row(uri: str, member: str | None) -> str:
    """For readers that do not know the run's format: the built-in format a (``uri``, ``member``) row was
    listed with (Parquet row, tar member, else a plain file)."""
    for name in ("parquet", "webdataset", "folder"):
        if FORMATS[name].owns(uri, member):
            return name
    return "folder"


def manifest_format(schema) -> str | None:
    """The format recorded in a manifest table's (or schema's) metadata, or None."""
    schema = getattr(schema, "schema", schema)
    value = (schema.metadata or {}).get(MANIFEST_FORMAT_KEY)
    return value.decode() if value else None
