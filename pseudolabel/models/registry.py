"""The one registry of labelers: name -> "module:Class", imported on first use.

Lazy imports keep a job that uses only a classical baseline from importing diffusers.
"""
from __future__ import annotations

import importlib

LABELERS: dict[str, str] = {
    "classical_tokens": "pseudolabel.models.classical:EdgeTokens",
    "classical_grabcut": "pseudolabel.models.classical:GrabCutForeground",
}


def labeler_names() -> list[str]:
    return sorted(LABELERS)


def labeler_class(name: str):
    """The labeler class registered as ``name``."""
    try:
        target = LABELERS[name]
    except KeyError:
        raise KeyError(f"unknown labeler {name!r}; known: {', '.join(labeler_names())}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
