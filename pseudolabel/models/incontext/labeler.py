"""``incontext``: separate from every image whatever a demonstration pair shows (SeFM).

The job gives one or more demonstration pairs — an image with an unwanted component (shadow,
watermark, rain, a kind of object…) and the same image without it — as URIs in the params
(``demo_in``, ``demo_out``; local paths or s3://). For every query image the labeler writes

- layer ``clean``: (H, W, 3) uint8 RGB, the query without the component;
- layer ``component``: (H, W, 3) uint8 RGB, (query − clean + 128) mod 256, so that
  ``query == (clean + component − 128) mod 256`` exactly (see ``component.decode_query``);
- one instance: the component's mask, (H, W) bool, category = the ontology's first entry
  (default ``component``, id 1); none when nothing was separated.

Backends:

- ``sefm``: the SeFM network on the 2×2 in-context canvas. **No public SeFM weights exist**: pass a
  checkpoint trained with ``pseudolabel.jobs.training.incontext`` as ``weights`` (local dir or s3://).
  The answer cell's change is transferred to the full-resolution query (``canvas.transfer_residual``);
  with several pairs, the clean image is the mean of the per-pair clean images (each in [0, 1],
  rounded to uint8 once, after averaging). The mask is where clean and query differ by more than
  ``change_threshold`` (max over RGB), cleaned like the demo masks. The network runs in ``spec.dtype``
  (``auto``: float16 on CUDA, float32 on CPU); its change is measured against the query cell as the
  network saw it (in that dtype), so a network that changes nothing gives back the query exactly.
- ``seggpt+inpaint`` (public weights, default ``BAAI/seggpt-vit-large``): the demo mask is where the
  pair differs; SegGPT finds the same component in the query; OpenCV (or a diffusers pipeline given
  as ``inpaint_weights``) inpaints it.

Host preparation (``Labeler.prepare``, in the engine's decode tasks), per backend:

- ``sefm``: ``query_cell`` (cell, cell, 3) float32 in [0, 1], the query resized to the canvas cell
  (``canvas.to_cell`` of the float image, as ``canvas.stitch`` makes it; float32 because the resize is
  done in float). The demonstration cells are made once per labeler, in its constructor.
- ``seggpt+inpaint``: ``query`` (h, w, 3) uint8, the query resized by the checkpoint's SegGPT image
  processor to its input size (PIL on uint8, rescale and normalise left out), and ``size`` (2,) int64,
  the query's original (H, W), to which SegGPT's answer is resized back
  (``seggpt_inpaint.SegGptInput.prepare``). A host half reads the processor from the checkpoint's
  ``preprocessor_config.json`` alone, once. The device rescales and normalises with a 256-level table
  made by the same processor (bit for bit its ``pixel_values``); the SegGPT prompts (demo image and
  mask of each pair) are made once per labeler, in its constructor.

Two halves (``Labeler.forward`` / ``Labeler.postprocess``); the payload of one image is, per backend:

- ``sefm``: ``answer`` and ``query_cell``, both (P, cell, cell, 3) for the P demonstration pairs — the
  answer cells of the network's output canvases and the query cells of its input canvases as the
  network saw them, in [0, 1]; float16 when the network runs in float16, float32 otherwise (bfloat16 is
  widened to float32: exact). The host transfers each answer's change to the full-resolution query,
  averages over pairs, and derives the mask and layers from the clean image.
- ``seggpt+inpaint``: ``mask`` (H, ceil(W/8)) uint8, the component mask packed along rows
  (``np.packbits(mask, axis=1)``; W is the image's), ``score`` 0-d float64, and ``clean`` (H, W, 3)
  uint8 only when a diffusion inpainter (``inpaint_weights``) painted it in ``forward``; otherwise the
  host inpaints with OpenCV.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from pseudolabel import storage as st
from pseudolabel.models.base import Instance, Labeler, LabelerParams, LabelOutput, entry_id
from pseudolabel.models.device import compiled, to_device, to_host
from pseudolabel.models.incontext import canvas as cv
from pseudolabel.models.incontext.component import clean_mask, difference_mask, dilate, encode_component
from pseudolabel.models.inpainting import inpaint_opencv
from pseudolabel.models.weights import resolve_weights

if TYPE_CHECKING:
    from pseudolabel.models.incontext.seggpt_inpaint import SegGptInput

SEGGPT_DEFAULT = "BAAI/seggpt-vit-large"


class InContextParams(LabelerParams):
    backend: Literal["sefm", "seggpt+inpaint"] = Field(
        "seggpt+inpaint", description="sefm (needs a trained local checkpoint: no public weights) | "
                                      "seggpt+inpaint (public SegGPT weights + inpainting)")
    demo_in: list[str] = Field(description="URI(s) of demonstration image(s) WITH the component (local or s3://)")
    demo_out: list[str] = Field(description="URI(s) of the same image(s) WITHOUT the component, same order")
    # sefm
    cell: int | None = Field(None, ge=8, description="sefm canvas cell size (default: the checkpoint's)")
    layout: Literal["grid", "vertical"] | None = Field(None, description="sefm canvas layout (default: the "
                                                                      "checkpoint's)")
    change_threshold: int = Field(12, ge=0, le=255, description="sefm: |query − clean| (max over RGB) above this "
                                                                "is the component mask")
    allow_untrained: bool = Field(False, description="sefm without weights: run an untrained network (identity; "
                                                     "for tests)")
    # seggpt+inpaint
    demo_threshold: int = Field(12, ge=0, le=255, description="demo mask: |demo in − demo out| (max over RGB) "
                                                              "above this")
    mask_open_radius: int = Field(1, ge=0, description="opening radius (px) when cleaning masks")
    mask_close_radius: int = Field(2, ge=0, description="closing radius (px) when cleaning masks")
    min_area: int = Field(16, ge=0, description="drop mask components smaller than this (px)")
    fg_threshold: float = Field(0.5, ge=0, le=1, description="SegGPT foreground probability threshold")
    embedding_type: Literal["instance", "semantic"] = Field("semantic", description="SegGPT prompt type")
    inpaint_dilate: int = Field(2, ge=0, description="dilate the found mask by this many px before inpainting")
    inpaint_method: Literal["telea", "ns"] = Field("telea", description="OpenCV inpainting method")
    inpaint_radius: int = Field(3, ge=1, description="OpenCV inpainting radius (px)")
    inpaint_weights: str | None = Field(None, description="diffusers inpainting pipeline (dir, s3:// or hub id); "
                                                          "default: OpenCV inpainting, weight-free")
    inpaint_prompt: str = Field("", description="prompt for the diffusion inpainting pipeline")
    inpaint_steps: int = Field(25, ge=1, description="diffusion inpainting steps")
    inpaint_resolution: int = Field(512, ge=64, multiple_of=8,
                                    description="side (px) the diffusion inpainting pipeline runs at")

    @field_validator("demo_in", "demo_out", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _pairs(self):
        if not self.demo_in or len(self.demo_in) != len(self.demo_out):
            raise ValueError("demo_in and demo_out need the same number (>= 1) of URIs")
        return self


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB after EXIF orientation, decoded as the engine decodes
    its inputs (``pseudolabel.imageio``); ValueError for bytes that are not an image."""
    from pseudolabel.imageio import ImageError
    from pseudolabel.imageio import decode_image as decode

    try:
        return decode(data, max_pixels=89_478_485)
    except ImageError as err:
        raise ValueError(f"cannot decode demonstration image: {err}") from None


class InContextSeparator(Labeler[dict[str, np.ndarray]]):
    name = "incontext"
    Params = InContextParams
    params: InContextParams  # the validated Params of this labeler
    summary = ("separate what a demonstration pair shows (SeFM; no public SeFM weights: train one with "
               "train-incontext) or SegGPT + inpainting with public weights; layers clean/component + mask")
    default_weights = None

    def __init__(self, spec, *, device: str = "cpu", storage=None):
        super().__init__(spec, device=device, storage=storage)
        p: InContextParams = self.params
        # 1. demonstration pairs (demo out resized to demo in when they differ)
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        for uri_in, uri_out in zip(p.demo_in, p.demo_out):
            a = decode_image(st.read_bytes(uri_in, self.storage))
            b = decode_image(st.read_bytes(uri_out, self.storage))
            self.pairs.append((a, cv.resize(b, *a.shape[:2])))
        # 2. backend
        if p.backend == "sefm":
            self._init_sefm()
        else:
            self._init_seggpt()

    def setup_host(self) -> None:
        """The category of the separated component: the ontology's first entry, else ``component`` (1)."""
        if self.ontology:
            self.category, self.category_id = self.ontology[0].category, entry_id(self.ontology[0])
        else:
            self.category, self.category_id = "component", 1
        self._cell_side: int | None = None
        self._seggpt_input: SegGptInput | None = None

    def cell_side(self) -> int:
        """The sefm canvas cell (px): ``params.cell``, else the checkpoint's. A host half (no weights
        loaded) reads the checkpoint's ``config.json`` alone, once."""
        if self._cell_side is None:
            self._cell_side = self.params.cell or self._checkpoint_cell()
        return self._cell_side

    def seggpt_input(self) -> SegGptInput:
        """The host part of SegGPT's input (the checkpoint's image processor). A host half (no weights
        loaded) reads the checkpoint's ``preprocessor_config.json`` alone, once."""
        if self._seggpt_input is None:
            from pseudolabel.models.incontext.seggpt_inpaint import SegGptInput

            self._seggpt_input = SegGptInput.from_checkpoint(self.weights_id, self.storage, self.spec.revision)
        return self._seggpt_input

    def _checkpoint_cell(self) -> int:
        """The ``cell`` of the sefm checkpoint's config (an untrained network's default without weights)."""
        import json

        from pseudolabel.models.incontext.sefm import CONFIG_NAME, LEGACY_ARCH, SeFMConfig
        from pseudolabel.models.weights import read_checkpoint_file

        if not self.spec.weights:
            return SeFMConfig(arch="sefm-small").cell
        data = read_checkpoint_file(self.spec.weights, CONFIG_NAME, self.storage, self.spec.revision)
        if data is None:
            raise FileNotFoundError(f"{self.spec.weights}: no {CONFIG_NAME}; SeFM has no public weights, "
                                    "train a checkpoint with pseudolabel.jobs.training.incontext")
        raw = json.loads(data)
        raw.pop("model_type", None)
        raw.setdefault("arch", LEGACY_ARCH)
        return SeFMConfig.model_validate(raw).cell

    def weight_sources(self) -> list[str]:
        p = self.params
        extra = [p.inpaint_weights] if p.backend == "seggpt+inpaint" and p.inpaint_weights else []
        return super().weight_sources() + extra

    @property
    def weights_id(self) -> str:
        if self.spec.weights:
            return self.spec.weights
        return SEGGPT_DEFAULT if self.params.backend == "seggpt+inpaint" else ""

    # -------------------------------------------------------------------------------------------
    # the two halves
    # -------------------------------------------------------------------------------------------

    def prepare(self, image: np.ndarray, prompt: Any) -> dict[str, np.ndarray] | None:
        """Host preparation of one (H, W, 3) uint8 RGB query: ``query_cell`` (cell, cell, 3) float32 in
        [0, 1] for ``sefm``; ``query`` (h, w, 3) uint8 (SegGPT's input size) and ``size`` (2,) int64
        (H, W) for ``seggpt+inpaint`` (see the module docstring)."""
        if self.params.backend == "sefm":
            return {"query_cell": cv.to_cell(image.astype(np.float32) / 255.0, self.cell_side())}
        return self.seggpt_input().prepare(image)

    def forward(self, images: list[np.ndarray], prompts: list[Any],
                prepared: list[dict[str, np.ndarray] | None] | None = None) -> list[dict[str, np.ndarray]]:
        """Device half: the network(s) of the backend; see the module docstring for the payloads.
        ``prepared``: ``prepare``'s output per image (query cells for ``sefm``, resized queries and
        their sizes for ``seggpt+inpaint``; made here when None)."""
        ready = cast("list[dict[str, np.ndarray]]", self.prepared_inputs(images, prompts, prepared))
        if self.params.backend == "sefm":
            return self._sefm_forward([r["query_cell"] for r in ready])
        return self._seggpt_forward(images, ready)

    def postprocess(self, image: np.ndarray, prompt: Any, payload: dict[str, np.ndarray]) -> LabelOutput:
        """Host half for one image: the clean image and mask from the payload, then the layers and the
        instance."""
        p = self.params
        # 1. clean image, component mask, score
        if p.backend == "sefm":
            clean = self._sefm_clean(image, payload["query_cell"], payload["answer"])
            mask = clean_mask(np.abs(image.astype(np.int16) - clean.astype(np.int16)).max(axis=2) > p.change_threshold,
                              p.mask_open_radius, p.mask_close_radius, p.min_area)
            score = 1.0
        else:
            mask = np.unpackbits(payload["mask"], axis=1, count=image.shape[1]).astype(bool)
            score = float(payload["score"])
            if "clean" in payload:
                clean = payload["clean"]
            elif mask.any():
                clean = inpaint_opencv(image, dilate(mask, p.inpaint_dilate), p.inpaint_radius, p.inpaint_method)
            else:
                clean = image.copy()
        # 2. layers and the mask as an instance
        instances = [Instance(mask=mask, category_id=self.category_id, category=self.category, score=score,
                              prompt="demonstration")] if mask.any() else []
        return LabelOutput(instances=instances, layers={"clean": clean, "component": encode_component(image, clean)})

    # -------------------------------------------------------------------------------------------
    # sefm
    # -------------------------------------------------------------------------------------------

    def _init_sefm(self) -> None:
        from pseudolabel.models.incontext.sefm import SeFM, SeFMConfig

        p = self.params
        if self.spec.weights:
            # the checkpoint's config.json names its architecture (sefm or sefm-small)
            self.net = SeFM.from_pretrained(resolve_weights(self.spec.weights, self.storage, self.spec.revision))
        elif p.allow_untrained:
            # an untrained sefm-small: its zero-initialised output makes it the identity
            self.net = SeFM(SeFMConfig(arch="sefm-small")).eval()
        else:
            raise ValueError("incontext backend 'sefm' needs weights: SeFM has no public weights; train a "
                             "checkpoint with `pseudolabel train-incontext` and pass its directory as weights")
        self.dtype = self.compute_dtype()
        self.net.to(device=self.device, dtype=self.dtype).eval()
        self.run_net = compiled(self.net, self.spec.compile, "incontext")
        self.cell = self._cell_side = p.cell or self.net.config.cell
        self.layout = p.layout or self.net.config.layout
        expected = 3 if self.layout == "grid" else 6
        if self.net.config.in_channels != expected:
            raise ValueError(f"checkpoint takes {self.net.config.in_channels} channels; "
                             f"layout {self.layout!r} needs {expected}")
        #: the demonstration pairs at the cell, (cell, cell, 3) float32 in [0, 1] each (made once)
        self.demo_cells = [(cv.to_cell(a.astype(np.float32) / 255.0, self.cell),
                            cv.to_cell(b.astype(np.float32) / 255.0, self.cell)) for a, b in self.pairs]

    @torch.inference_mode()
    def _sefm_forward(self, query_cells: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """N query cells (cell, cell, 3) float32 in [0, 1] (``prepare``) -> N payloads {answer,
        query_cell}: (P, cell, cell, 3) each."""
        # 1. one canvas per (query, pair), all the same size (every piece is already at the cell)
        canvases = [cv.stitch(a, b, q, self.cell, self.layout) for q in query_cells for a, b in self.demo_cells]
        x = to_device(np.stack(canvases), self.device).permute(0, 3, 1, 2).to(self.dtype)
        # 2. SeFM; the answer cells, and the query cells as the network saw them (the last 3 input
        #    channels hold the query in the answer box, cast to the network's dtype), cropped on the device
        y0, y1, x0, x1 = cv.answer_box(self.cell, self.layout)
        kept = self.dtype if self.dtype in (torch.float16, torch.float32) else torch.float32
        answer = self.run_net(x)[:, :, y0:y1, x0:x1].to(kept).permute(0, 2, 3, 1).contiguous()
        seen = x[:, -3:, y0:y1, x0:x1].to(kept).permute(0, 2, 3, 1).contiguous()
        answer_np, seen_np = to_host([answer, seen])
        pairs = len(self.pairs)
        return [{"answer": answer_np[i * pairs:(i + 1) * pairs], "query_cell": seen_np[i * pairs:(i + 1) * pairs]}
                for i in range(len(query_cells))]

    @staticmethod
    def _sefm_clean(image: np.ndarray, query_cells: np.ndarray, answers: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 query + its (P, cell, cell, 3) query cells and answers -> (H, W, 3) uint8 clean:
        each answer's change transferred to the full-resolution query, averaged over the P pairs."""
        q = image.astype(np.float32) / 255.0
        acc = np.zeros_like(q)
        for seen, answer in zip(query_cells, answers):
            acc += cv.transfer_residual(q, seen, answer)
        return np.clip(np.rint(acc / len(answers) * 255.0), 0, 255).astype(np.uint8)

    # -------------------------------------------------------------------------------------------
    # seggpt+inpaint
    # -------------------------------------------------------------------------------------------

    def _init_seggpt(self) -> None:
        from pseudolabel.models.incontext.seggpt_inpaint import SegGptFinder

        p = self.params
        weights = resolve_weights(self.weights_id, self.storage, self.spec.revision)
        self.finder = SegGptFinder(weights, device=self.device, dtype=self.compute_dtype(),
                                   embedding_type=p.embedding_type, compile=self.spec.compile)
        self._seggpt_input = self.finder.input
        self.demo_masks = [difference_mask(a, b, p.demo_threshold, p.mask_open_radius, p.mask_close_radius,
                                           p.min_area) for a, b in self.pairs]
        if not any(m.any() for m in self.demo_masks):
            raise ValueError("demonstration pair(s) do not differ: no component to separate "
                             f"(threshold {p.demo_threshold})")
        #: SegGPT's prompt of every pair whose demo mask is not empty (on the device, made once)
        self.prompts = [self.finder.prompt(a, m) for (a, _), m in zip(self.pairs, self.demo_masks) if m.any()]
        self.inpainter = None
        if p.inpaint_weights:
            from pseudolabel.models.inpainting import DiffusionInpainter

            self.inpainter = DiffusionInpainter(resolve_weights(p.inpaint_weights, self.storage), device=self.device,
                                                dtype=self.spec.dtype, prompt=p.inpaint_prompt, steps=p.inpaint_steps,
                                                resolution=p.inpaint_resolution)

    def _seggpt_forward(self, images: list[np.ndarray], ready: list[dict[str, np.ndarray]]
                        ) -> list[dict[str, np.ndarray]]:
        """N (H, W, 3) uint8 queries and their ``prepare`` outputs (``query`` (h, w, 3) uint8, ``size``
        (2,) int64) -> N payloads {mask (packed rows), score[, clean]}."""
        p = self.params
        # 1. the network input of the N queries, once for every pair (rescale and normalise on the device)
        pixel_values = self.finder.pixel_values([r["query"] for r in ready])
        sizes = [(int(r["size"][0]), int(r["size"][1])) for r in ready]
        # 2. SegGPT foreground probabilities, averaged over the pairs whose demo mask is not empty
        acc: list[torch.Tensor] | None = None
        for prompt in self.prompts:
            # host=False: device tensors
            probs = cast("list[torch.Tensor]", self.finder.probabilities(pixel_values, prompt, sizes, host=False))
            acc = probs if acc is None else [s + t for s, t in zip(acc, probs)]
        assert acc is not None  # setup rejects pairs whose demo masks are all empty
        acc_np = to_host([s / len(self.prompts) for s in acc])
        # 3. the thresholded, cleaned mask; the diffusion inpainting (device) when there is one
        payloads = []
        for im, prob in zip(images, acc_np):
            m = clean_mask(prob > p.fg_threshold, p.mask_open_radius, p.mask_close_radius, p.min_area)
            payload: dict[str, np.ndarray] = {
                "mask": np.packbits(m, axis=1),
                "score": np.asarray(float(prob[m].mean()) if m.any() else 0.0, np.float64)}
            if self.inpainter is not None and m.any():
                payload["clean"] = self.inpainter(im, dilate(m, p.inpaint_dilate))
            payloads.append(payload)
        return payloads
