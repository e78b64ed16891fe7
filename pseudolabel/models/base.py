"""The labeler protocol shared by every model, and the records labelers return.

A labeler is built once per actor from its `LabelerSpec` and then called on batches:

    labeler = SomeLabeler(spec, device="cuda")
    outputs = labeler(images, prompts)      # one LabelOutput per image

- ``images``: list of (H, W, 3) uint8 RGB arrays, sizes may differ within a batch.
- ``prompts``: list (same length) of per-row hints or None, e.g. ``{"boxes_xyxy": [[x0, y0, x1, y1], ...],
  "points_xy": [[x, y], ...], "categories": [...]}`` from the input (COCO boxes, a Parquet column).

Two halves. A labeler may split its work so the GPU never waits for the host:

- ``prepare(image, prompt) -> prepared`` (optional): the host work that makes the network's input
  from one decoded image (resizing to the model's input size, cropping views), run by the engine in
  the CPU fetch+decode tasks on a ``host_half`` instance, so the actor's one host thread does not do
  it between forward passes. A ``dict[str, np.ndarray]`` (uint8 where that is enough) or None.
- ``forward(images, prompts, prepared=None) -> payloads``: the **device half**, run in the actor that
  holds the model. Only the network and what shrinks its output (GPU-side resize, threshold, top-k)
  belong here. ``prepared`` is one ``prepare`` result per image when the engine made them in its CPU
  tasks; None (in-process calls) means forward prepares the images itself, so both paths give the
  same numbers. (Only labelers that implement ``prepare`` are ever passed ``prepared``.)
  One payload per image: a ``dict[str, np.ndarray]`` of compact host arrays (uint8/uint16/float16
  where that is enough), which the engine ships between stages without pickling.
- ``postprocess(image, prompt, payload) -> LabelOutput``: the **host half**, one image at a time, run
  by the engine in parallel CPU tasks on an instance built by ``host_half`` (no weights loaded). It
  may use ``self.params``, ``self.ontology``, ``self.spec`` and what ``setup_host`` sets, nothing the
  model constructor made.

``label`` (and so ``__call__``) is their composition, so ``labeler(images)`` gives the same outputs
in-process as the two engine stages. A labeler without a network implements ``postprocess`` only
(its payloads are None and the engine runs it entirely in CPU tasks). A labeler that implements only
``label`` still works: the engine then runs it whole in its actor (single-call path).

The CPU tasks build their ``host_half`` instance from the labeler's class, or from a lighter base class
that defines ``Params``, ``setup_host``, ``prepare`` and ``postprocess`` without importing torch, when
``models.registry.HOST_HALVES`` names one (DirectSAM's ``DirectSAMHost``): their workers then never
load torch.

Labelers return masks as arrays; the engine encodes them (RLE, PNG) so every labeler shares one
encoder. A labeler raises for a failure that concerns the whole batch; the engine then retries image
by image and turns a failure of one image into an error row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

import numpy as np
from pydantic import BaseModel, ConfigDict

from pseudolabel.schemas.spec import LabelerSpec, OntologyEntry, StorageSpec

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only


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


def entry_id(entry: OntologyEntry) -> int:
    """The category id of an ontology entry of a validated ``LabelerSpec`` (its validator sets every id)."""
    if entry.id is None:
        raise ValueError(f"ontology entry {entry.category!r} has no id; build it through LabelerSpec")
    return int(entry.id)


def entry_index(ontology: list[OntologyEntry], value: Any) -> int | None:
    """Index of the ontology entry ``value`` names: its category name (str) or its category id (int);
    None when no entry matches."""
    for k, entry in enumerate(ontology):
        if value == entry.category or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                                       and int(value) == entry_id(entry)):
            return k
    return None


def row_entries(ontology: list[OntologyEntry], prompt: Any) -> list[int] | None:
    """Indices of the ontology entries a row's ``categories`` (image-level tags: names or ids) name, each
    once, in the row's order; names outside the ontology are skipped (so the list may be empty). None
    when the row gives no ``categories``."""
    wanted = prompt.get("categories") if isinstance(prompt, dict) else None
    if not wanted:
        return None
    out: list[int] = []
    for value in wanted:
        k = entry_index(ontology, value)
        if k is not None and k not in out:
            out.append(k)
    return out


#: what the device half hands the host half for one image: named host arrays, or None
Payload = dict[str, np.ndarray] | None

#: the payload type of one labeler: ``dict[str, np.ndarray]`` with a device half, ``None`` without
PayloadT = TypeVar("PayloadT", bound=Payload)


class Labeler(Generic[PayloadT]):
    """Base class of every labeler. Subclasses set ``name``, ``Params`` and implement either
    ``postprocess`` (with ``forward`` when there is a network), or ``label`` alone.

    The type parameter is the payload the two halves exchange: ``Labeler[dict[str, np.ndarray]]``
    for a labeler with a network, ``Labeler[None]`` for one without (a bare ``Labeler`` is either)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[LabelerParams]] = LabelerParams
    #: one-line description shown by ``pseudolabel models``
    summary: ClassVar[str] = ""
    #: weight-free classical method, not one of the research methods
    baseline: ClassVar[bool] = False
    #: labelers that need no weights leave this None; others name a default hub id or None
    default_weights: ClassVar[str | None] = None
    #: what the spec's ``dtype: auto`` means on CUDA (float32 on other devices; see ``models.device``)
    cuda_dtype: ClassVar[str] = "float16"

    def __init__(self, spec: LabelerSpec, *, device: str = "cpu", storage: StorageSpec | None = None):
        self.spec = spec
        self.params = self.Params.model_validate(spec.params)
        self.device = device
        self.storage = storage or StorageSpec()
        self.ontology: list[OntologyEntry] = list(spec.ontology)
        self.setup_host()

    def compute_dtype(self):
        """The torch dtype of this labeler's network: the spec's ``dtype`` as asked; ``auto`` =
        ``cuda_dtype`` on CUDA, float32 elsewhere (``models.device.resolve_dtype``)."""
        from pseudolabel.models.device import resolve_dtype

        return resolve_dtype(self.spec.dtype, self.device, self.cuda_dtype)

    # -- the two halves --------------------------------------------------------------------------------

    def setup_host(self) -> None:
        """Host-side state derived from the spec alone (category tables, ...); runs in every instance,
        before a subclass constructor loads its model, and in ``host_half`` instances."""

    def prepare(self, image: np.ndarray, prompt: Any) -> Payload:
        """Host preparation of one (H, W, 3) uint8 RGB image for ``forward`` (see the module docstring);
        runs without the model. The default prepares nothing (None)."""
        return None

    def prepared_inputs(self, images: list[np.ndarray], prompts: list[Any], prepared: list[Payload] | None
                        ) -> list[Payload]:
        """``prepared`` when the engine made it, else ``prepare`` of every image here (in-process calls)."""
        if prepared is None:
            return [self.prepare(im, pr) for im, pr in zip(images, prompts)]
        if len(prepared) != len(images):
            raise RuntimeError(f"{len(prepared)} prepared inputs for {len(images)} images")
        return prepared

    def forward(self, images: list[np.ndarray], prompts: list[Any],
                prepared: list[Payload] | None = None) -> list[PayloadT]:
        """Device half: N images (and their ``prepare`` results, or None) -> N payloads. The default
        (no network) gives None for each image."""
        return cast("list[PayloadT]", [None] * len(images))

    def postprocess(self, image: np.ndarray, prompt: Any, payload: PayloadT) -> LabelOutput:
        """Host half for one image: its (H, W, 3) uint8 RGB pixels, prompt and payload -> LabelOutput."""
        raise NotImplementedError

    def label(self, images: list[np.ndarray], prompts: list[Any]) -> list[LabelOutput]:
        """Both halves, in-process (the single-call path). Labelers that do not split override this."""
        if not self.splits():
            raise NotImplementedError(f"{type(self).__name__} implements neither label nor postprocess")
        payloads = self.forward(images, prompts)
        if len(payloads) != len(images):
            raise RuntimeError(f"forward returned {len(payloads)} payloads for {len(images)} images")
        return [self.postprocess(im, pr, pl) for im, pr, pl in zip(images, prompts, payloads)]

    @classmethod
    def splits(cls) -> bool:
        """True when the labeler has a host half the engine can run in CPU tasks."""
        return cls.postprocess is not Labeler.postprocess

    @classmethod
    def prepares(cls) -> bool:
        """True when the labeler has its own ``prepare`` (the engine runs it in the decode tasks)."""
        return cls.prepare is not Labeler.prepare

    @classmethod
    def has_device_half(cls) -> bool:
        """True when ``forward`` is the labeler's own (a model to hold in an actor)."""
        return cls.forward is not Labeler.forward

    @classmethod
    def host_half(cls, spec: LabelerSpec, storage: StorageSpec | None = None) -> Self:
        """An instance for ``postprocess`` only: the base constructor and ``setup_host``, no model."""
        obj = cls.__new__(cls)
        Labeler.__init__(obj, spec, device="cpu", storage=storage)
        return obj

    def __call__(self, images: list[np.ndarray], prompts: list[Any] | None = None) -> list[LabelOutput]:
        if prompts is None:
            prompts = [None] * len(images)
        return self.label(images, prompts)

    def weight_sources(self) -> list[str]:
        """Every checkpoint the labeler loads (hub ids, local directories, s3:// prefixes), checked on the
        driver before a job starts. Labelers with extra checkpoints (a backbone, an inpainter) add them."""
        return [self.weights_id] if self.weights_id else []

    @property
    def weights_id(self) -> str:
        return self.spec.weights or self.default_weights or ""
