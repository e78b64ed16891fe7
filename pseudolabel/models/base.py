"""The labeler protocol shared by every model, and the records labelers return.

A labeler is built once per actor from its `LabelerSpec` and then called on batches:

    labeler = SomeLabeler(spec, device="cuda")
    outputs = labeler(images, prompts)      # one LabelOutput per image

- ``images``: list of (H, W, 3) uint8 RGB arrays, sizes may differ within a batch.
- ``prompts``: list (same length) of per-row hints or None, e.g. ``{"boxes_xyxy": [[x0, y0, x1, y1], ...],
  "points_xy": [[x, y], ...], "categories": [...]}`` from the input (COCO boxes, a Parquet column).

Labelers return masks as arrays; the engine encodes them (RLE, PNG) so every labeler shares one
encoder. A labeler raises for a failure that concerns the whole batch; the engine then retries image
by image and turns a failure of one image into an error row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from pseudolabel.schemas.spec import LabelerSpec, OntologyEntry, StorageSpec


class LabelerParams(BaseModel):
    """Base of every labeler's parameter model; unknown parameters are rejected."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Instance:
    """One instance mask.

    mask: (H, W) bool at the input image's size. score in [0, 1]. category_id/category come from the
    job's ontology, never invented by the labeler. prompt: the text or seed that produced it.
    """

    mask: np.ndarray
    category_id: int
    category: str
    score: float = 1.0
    prompt: str | None = None


@dataclass
class Tokens:
    """Subobject tokens as one label map.

    label_map: (H, W) int32, 0 = unassigned (boundary), 1..K = token k.
    boundary_score: (K,) float32, mean boundary probability along each token's edge (or None).
    embeddings: (K, D) float32 per-token features (or None).
    """

    label_map: np.ndarray
    boundary_score: np.ndarray | None = None
    embeddings: np.ndarray | None = None


@dataclass
class LabelOutput:
    """What a labeler returns for one image.

    layers: name -> image; (H, W, 3) uint8 RGB, or (H, W) uint8 (masks: 0/255), or (H, W) uint16.
    """

    instances: list[Instance] = field(default_factory=list)
    tokens: Tokens | None = None
    layers: dict[str, np.ndarray] = field(default_factory=dict)


class Labeler:
    """Base class of every labeler. Subclasses set ``name``, ``Params`` and implement ``label``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[LabelerParams]] = LabelerParams
    #: one-line description shown by ``pseudolabel models``
    summary: ClassVar[str] = ""
    #: weight-free classical method, not one of the research methods
    baseline: ClassVar[bool] = False
    #: labelers that need no weights leave this None; others name a default hub id or None
    default_weights: ClassVar[str | None] = None

    def __init__(self, spec: LabelerSpec, *, device: str = "cpu", storage: StorageSpec | None = None):
        self.spec = spec
        self.params = self.Params.model_validate(spec.params)
        self.device = device
        self.storage = storage or StorageSpec()
        self.ontology: list[OntologyEntry] = list(spec.ontology)

    def label(self, images: list[np.ndarray], prompts: list[Any]) -> list[LabelOutput]:
        raise NotImplementedError

    def __call__(self, images: list[np.ndarray], prompts: list[Any] | None = None) -> list[LabelOutput]:
        if prompts is None:
            prompts = [None] * len(images)
        return self.label(images, prompts)

    @property
    def weights_id(self) -> str:
        return self.spec.weights or self.default_weights or ""
