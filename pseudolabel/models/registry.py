"""The registry of labelers: name -> "module:Class", imported on first use.

Lazy imports keep a job that uses only a classical baseline from importing diffusers.

``HOST_HALVES`` names, for labelers whose host half lives in a lighter module, the class the engine's
CPU tasks build for ``prepare`` and ``postprocess``: a base class of the labeler that defines its
name, parameters and both host methods and imports no torch, so decode and host workers do not load
torch (about 1 CPU-s and 200 MB each). Labelers not listed use their own class there.
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

HOST_HALVES: dict[str, str] = {
    "directsam": "pseudolabel.models.directsam_host:DirectSAMHost",
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
    return _import(target)


def host_class(name: str):
    """The class whose ``host_half`` runs ``prepare`` and ``postprocess`` for labeler ``name`` in CPU
    tasks: its ``HOST_HALVES`` entry, else the labeler class itself."""
    return _import(HOST_HALVES[name]) if name in HOST_HALVES else labeler_class(name)


def _import(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
