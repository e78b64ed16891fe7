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
  checkpoint trained with ``pseudolabel.jobs.train_incontext`` as ``weights`` (local dir or s3://).
  The answer cell's change is transferred to the full-resolution query (``canvas.transfer_residual``);
  with several pairs, the clean image is the mean of the per-pair clean images (each in [0, 1],
  rounded to uint8 once, after averaging). The mask is where clean and query differ by more than
  ``change_threshold`` (max over RGB), cleaned like the demo masks. The network runs in ``spec.dtype``
  (``auto``: float16 on CUDA, float32 on CPU); its change is measured against the query cell as the
  network saw it (in that dtype), so a network that changes nothing gives back the query exactly.
- ``seggpt+inpaint`` (public weights, default ``BAAI/seggpt-vit-large``): the demo mask is where the
  pair differs; SegGPT finds the same component in the query; OpenCV (or a diffusers pipeline given
  as ``inpaint_weights``) inpaints it.
"""
from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from pseudolabel import storage as st
from pseudolabel.models.base import Instance, LabelerParams, Labeler, LabelOutput
from pseudolabel.models.incontext import canvas as cv
from pseudolabel.models.incontext.component import clean_mask, difference_mask, dilate, encode_component
from pseudolabel.models.inpainting import inpaint_opencv
from pseudolabel.models.weights import resolve_weights

SEGGPT_DEFAULT = "BAAI/seggpt-vit-large"


class InContextParams(LabelerParams):
    backend: Literal["sefm", "seggpt+inpaint"] = Field(
        "seggpt+inpaint", description="sefm (needs a trained local checkpoint: no public weights) | "
                                      "seggpt+inpaint (public SegGPT weights + inpainting)")
    demo_in: list[str] = Field(description="URI(s) of demonstration image(s) WITH the component (local or s3://)")
    demo_out: list[str] = Field(description="URI(s) of the same image(s) WITHOUT the component, same order")
    # sefm
    cell: int | None = Field(None, ge=8, description="sefm canvas cell size (default: the checkpoint's)")
    layout: Literal["grid", "vertical"] | None = Field(None, description="sefm canvas layout (default: the checkpoint's)")
    change_threshold: int = Field(12, ge=0, le=255, description="sefm: |query − clean| (max over RGB) above this is the component mask")
    allow_untrained: bool = Field(False, description="sefm without weights: run an untrained network (identity; for tests)")
    # seggpt+inpaint
    demo_threshold: int = Field(12, ge=0, le=255, description="demo mask: |demo in − demo out| (max over RGB) above this")
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
    """Encoded image bytes -> (H, W, 3) uint8 RGB."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError("cannot decode demonstration image")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _torch_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: float16 on CUDA, float32 elsewhere; a name: that dtype (on any device, as asked)."""
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


class InContextSeparator(Labeler):
    name = "incontext"
    Params = InContextParams
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
        # 2. category of the separated component
        if self.ontology:
            self.category, self.category_id = self.ontology[0].category, int(self.ontology[0].id)
        else:
            self.category, self.category_id = "component", 1
        # 3. backend
        if p.backend == "sefm":
            self._init_sefm()
        else:
            self._init_seggpt()

    @property
    def weights_id(self) -> str:
        if self.spec.weights:
            return self.spec.weights
        return SEGGPT_DEFAULT if self.params.backend == "seggpt+inpaint" else ""

    # -------------------------------------------------------------------------------------------
    # sefm
    # -------------------------------------------------------------------------------------------

    def _init_sefm(self) -> None:
        from pseudolabel.models.incontext.sefm import SeFM

        p = self.params
        if self.spec.weights:
            self.net = SeFM.from_pretrained(resolve_weights(self.spec.weights, self.storage, self.spec.revision))
        elif p.allow_untrained:
            self.net = SeFM().eval()
        else:
            raise ValueError("incontext backend 'sefm' needs weights: SeFM has no public weights; train a "
                             "checkpoint with `pseudolabel train-incontext` and pass its directory as weights")
        self.dtype = _torch_dtype(self.spec.dtype, self.device)
        self.net.to(device=self.device, dtype=self.dtype).eval()
        self.cell = p.cell or self.net.config.cell
        self.layout = p.layout or self.net.config.layout
        expected = 3 if self.layout == "grid" else 6
        if self.net.config.in_channels != expected:
            raise ValueError(f"checkpoint takes {self.net.config.in_channels} channels; layout {self.layout!r} needs {expected}")

    @torch.inference_mode()
    def _sefm_clean(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) uint8 queries -> (H, W, 3) uint8 clean images."""
        # 1. one canvas per (query, pair), all the same size
        f = [im.astype(np.float32) / 255.0 for im in images]
        demos = [(a.astype(np.float32) / 255.0, b.astype(np.float32) / 255.0) for a, b in self.pairs]
        canvases = [cv.stitch(a, b, q, self.cell, self.layout) for q in f for a, b in demos]
        x = torch.from_numpy(np.stack(canvases)).permute(0, 3, 1, 2).to(self.device, self.dtype)
        # 2. SeFM; the answer cells, and the query cells as the network saw them (the last 3 input
        #    channels hold the query in the answer box, cast to the network's dtype)
        out = self.net(x).float().permute(0, 2, 3, 1).cpu().numpy()
        seen = x[:, -3:].float().permute(0, 2, 3, 1).cpu().numpy()
        # 3. transfer each answer's change to the full-resolution query, average over pairs
        results, k = [], 0
        for q in f:
            acc = np.zeros_like(q)
            for _ in self.pairs:
                acc += cv.transfer_residual(q, cv.crop_answer(seen[k], self.layout),
                                            cv.crop_answer(out[k], self.layout))
                k += 1
            results.append(np.clip(np.rint(acc / len(self.pairs) * 255.0), 0, 255).astype(np.uint8))
        return results

    # -------------------------------------------------------------------------------------------
    # seggpt+inpaint
    # -------------------------------------------------------------------------------------------

    def _init_seggpt(self) -> None:
        from pseudolabel.models.incontext.seggpt_inpaint import SegGptFinder

        p = self.params
        weights = resolve_weights(self.weights_id, self.storage, self.spec.revision)
        self.finder = SegGptFinder(weights, device=self.device, dtype=_torch_dtype(self.spec.dtype, self.device),
                                   embedding_type=p.embedding_type)
        self.demo_masks = [difference_mask(a, b, p.demo_threshold, p.mask_open_radius, p.mask_close_radius,
                                           p.min_area) for a, b in self.pairs]
        if not any(m.any() for m in self.demo_masks):
            raise ValueError("demonstration pair(s) do not differ: no component to separate "
                             f"(threshold {p.demo_threshold})")
        self.inpainter = None
        if p.inpaint_weights:
            from pseudolabel.models.inpainting import DiffusionInpainter

            self.inpainter = DiffusionInpainter(resolve_weights(p.inpaint_weights, self.storage), device=self.device,
                                                dtype=self.spec.dtype, prompt=p.inpaint_prompt, steps=p.inpaint_steps,
                                                resolution=p.inpaint_resolution)

    def _seggpt_masks(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[float]]:
        """Per query: (H, W) bool component mask and its mean foreground probability."""
        p = self.params
        acc = [np.zeros(im.shape[:2], np.float32) for im in images]
        used = [(a, m) for (a, _), m in zip(self.pairs, self.demo_masks) if m.any()]
        for demo_image, demo_mask in used:
            for i, prob in enumerate(self.finder.foreground(images, demo_image, demo_mask)):
                acc[i] += prob
        masks, scores = [], []
        for prob in acc:
            prob /= len(used)
            m = clean_mask(prob > p.fg_threshold, p.mask_open_radius, p.mask_close_radius, p.min_area)
            masks.append(m)
            scores.append(float(prob[m].mean()) if m.any() else 0.0)
        return masks, scores

    def _inpaint(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        p = self.params
        if self.inpainter is not None:
            return self.inpainter(image, mask)
        return inpaint_opencv(image, mask, p.inpaint_radius, p.inpaint_method)

    # -------------------------------------------------------------------------------------------

    def label(self, images: list[np.ndarray], prompts: list[Any]) -> list[LabelOutput]:
        p = self.params
        # 1. clean images and component masks
        if p.backend == "sefm":
            cleans = self._sefm_clean(images)
            masks = [clean_mask(np.abs(im.astype(np.int16) - c.astype(np.int16)).max(axis=2) > p.change_threshold,
                                p.mask_open_radius, p.mask_close_radius, p.min_area)
                     for im, c in zip(images, cleans)]
            scores = [1.0] * len(images)
        else:
            masks, scores = self._seggpt_masks(images)
            cleans = [self._inpaint(im, dilate(m, p.inpaint_dilate)) if m.any() else im.copy()
                      for im, m in zip(images, masks)]
        # 2. layers and the mask as an instance
        outputs = []
        for im, c, m, s in zip(images, cleans, masks, scores):
            instances = [Instance(mask=m, category_id=self.category_id, category=self.category, score=s,
                                  prompt="demonstration")] if m.any() else []
            outputs.append(LabelOutput(instances=instances,
                                       layers={"clean": c, "component": encode_component(im, c)}))
        return outputs
