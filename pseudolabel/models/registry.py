"""The one registry of labelers: name -> "module:Class", imported on first use.

Lazy imports keep a job that uses only a classical baseline from importing diffusers.
"""
from __future__ import annotations

import importlib

LABELERS: dict[str, str] = {
    "classical_tokens": "pseudolabel.models.classical:EdgeTokens",
    "classical_grabcut": "pseudolabel.models.classical:GrabCutForeground",
    "classical_inpaint": "pseudolabel.models.classical:ClassicalInpaint",
    "incontext": "pseudolabel.models.incontext.labeler:InContextSeparator",
    "directsam": "pseudolabel.models.directsam:DirectSAM",
    "foba": "pseudolabel.models.foba:FoBa",
    "iseg": "pseudolabel.models.iseg:ISeg",
    "evf_sam": "pseudolabel.models.evf_sam.labeler:EvfSamLabeler",
}


def labeler_names() -> list[str]:
    return sorted(LABELERS)


def is_known(name: str) -> bool:
    """A registered name, or a ``"package.module:Class"`` path to a user's own Labeler subclass."""
    return name in LABELERS or (":" in name and not name.startswith(":"))


def labeler_class(name: str):
    """The labeler class registered as ``name`` (or imported from a ``"module:Class"`` path)."""
    if name in LABELERS:
        target = LABELERS[name]
    elif ":" in name:
        target = name
    else:
        raise KeyError(f"unknown labeler {name!r}; known: {', '.join(labeler_names())}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
