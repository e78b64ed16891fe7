"""``train-directsam``: fine-tune (or train from scratch) a DirectSAM boundary model.

The recipe of the reference trainer (ChenDelong1999/subobjects, ``DirectSAM/trainer.py``): every
segment of an image's annotation (each instance mask, and the background) contributes its outer
contours drawn 3 px thick; that binary map, resized (nearest) with the image to a
``resolution x resolution`` square, is the target of transformers' ``num_labels=1`` loss (per-pixel
BCE on the logits upsampled to the label size), which the model computes when given ``labels``.
A plain torch loop (AdamW) replaces the Hugging Face Trainer.

Data: a COCO instances JSON (polygons, RLE with str/bytes counts, or uncompressed RLE) and the image
root its ``file_name`` values are relative to; a demo-data directory (``pseudolabel demo-data OUT``)
works as is (``OUT/annotations/instances.json`` + ``OUT/images``). Local paths or s3:// URIs.

The result is saved with ``save_pretrained`` together with a Segformer image-processor config of the
training resolution, so ``directsam`` loads it as its ``weights`` and uses that resolution by default.

Usage::

    pseudolabel train-directsam JOB.yaml --set steps=500
    pseudolabel train-directsam JOB.yaml
    # JOB.yaml: {data: /data/demo, weights: chendelong/DirectSAM-1800px-0424, output: /tmp/directsam-ft,
    #            resolution: 512, steps: 2000, lr: 5.0e-5, batch_size: 4}

or ``train_directsam({...})`` from Python; it returns ``{"output", "steps", "losses", "seconds", "images"}``.
"""
from __future__ import annotations

import json
import posixpath
import time
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pseudolabel import storage as st
from pseudolabel.schemas.spec import StorageSpec, validate_spec


class TrainSpec(BaseModel):
    """What ``train_directsam`` trains, on which data, and where the checkpoint goes."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="image root (COCO file_name values are relative to it), or a demo-data directory")
    coco_json: str | None = Field(None, description="COCO instances JSON; default: DATA/annotations/instances.json "
                                                    "with images under DATA/images")
    weights: str | None = Field(None, description="initial weights: hub id, local dir or s3:// prefix "
                                                  "(a num_labels=1 Segformer, or any Segformer: the head is re-initialised)")
    revision: str | None = None
    model_size: Literal["tiny", "b0", "b1", "b2", "b3", "b4", "b5"] = Field(
        "b0", description="Segformer size of a randomly initialised model, when no weights are given")
    output: str = Field(description="checkpoint directory: local path or s3:// prefix")
    storage: StorageSpec = Field(default_factory=StorageSpec)
    resolution: int = Field(512, ge=32, description="images and labels are resized to a square of this side")
    line_thickness: int = Field(3, ge=1, description="contour thickness of the boundary labels in px")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    bf16: bool = Field(True, description="bfloat16 autocast on CUDA (ignored on CPU)")
    seed: int = 0
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    log_every: int = Field(25, ge=1)
    limit: int | None = Field(None, ge=1, description="use only the first N images of the JSON")

    @model_validator(mode="after")
    def _default_json(self):
        if self.coco_json is None:
            self.coco_json = st.join(self.data, "annotations", "instances.json")
            self.data = st.join(self.data, "images")
        return self


# ----------------------------------------------------------------------------------------------
# Labels (pure numpy / OpenCV)
# ----------------------------------------------------------------------------------------------

def masks_to_segments(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool instance masks -> (H, W) int32 segment map, 0 = background.

    Larger masks are painted first so a small object lying on a larger one stays its own segment.
    """
    n, h, w = masks.shape
    seg = np.zeros((h, w), np.int32)
    for k in np.argsort(-masks.reshape(n, -1).sum(1), kind="stable"):
        seg[masks[k]] = k + 1
    return seg


def boundary_label(segments: np.ndarray, thickness: int = 3) -> np.ndarray:
    """Training target: the outer contours of every segment drawn with ``cv2.drawContours`` at
    ``thickness`` (the reference's 3; OpenCV's thick lines cover a band of about ``thickness + 2`` px
    centred on the contour).

    Args:
        segments: (H, W) int segment map; every distinct value (0 included) is one segment.
        thickness: cv2 line thickness.

    Returns:
        (H, W) uint8 in {0, 1}, 1 = boundary. Segments touching the image edge have contours along it,
        so the image frame is labelled as boundary too (as in the reference).
    """
    canvas = np.zeros(segments.shape, np.uint8)
    for value in np.unique(segments):
        mask = (segments == value).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, 1, thickness)
    return canvas


def annotation_masks(anns: list[dict], height: int, width: int) -> np.ndarray:
    """(N, H, W) bool masks of COCO annotations (polygons, compressed or uncompressed RLE)."""
    masks = []
    for ann in anns:
        seg = ann.get("segmentation")
        if not seg:
            continue
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            counts = seg["counts"]
            rle = {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        masks.append(mask_utils.decode(rle).astype(bool))
    return np.stack(masks) if masks else np.zeros((0, height, width), bool)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

class CocoBoundaryData:
    """Images of a COCO JSON with their boundary labels, at the training resolution.

    ``example(i)`` -> (pixels (3, R, R) uint8 tensor, label (R, R) int64 tensor in {0, 1}); decoded
    examples are kept in memory after first use.
    """

    def __init__(self, spec: TrainSpec):
        self.spec = spec
        coco = json.loads(st.read_bytes(spec.coco_json, spec.storage))
        self.images = sorted(coco["images"], key=lambda im: im["id"])[: spec.limit]
        self.anns: dict[Any, list[dict]] = {}
        for ann in coco.get("annotations", []):
            self.anns.setdefault(ann["image_id"], []).append(ann)
        if not self.images:
            raise FileNotFoundError(f"no images in {spec.coco_json}")
        self.fs, self.root = st.filesystem(spec.data, spec.storage)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._cache:
            self._cache[i] = self._load(i)
        return self._cache[i]

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from pseudolabel.models.directsam_pyramid import resize_uint8

        info = self.images[i]
        # 1. decode
        with self.fs.open(posixpath.join(self.root, info["file_name"]), "rb") as f:
            bgr = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"undecodable image {info['file_name']}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        h, w = rgb.shape[:2]
        # 2. label at the original size, then nearest-resized (like the image processor does)
        segments = masks_to_segments(annotation_masks(self.anns.get(info["id"], []), h, w))
        label = boundary_label(segments, self.spec.line_thickness)
        r = self.spec.resolution
        label = cv2.resize(label, (r, r), interpolation=cv2.INTER_NEAREST)
        # 3. image resized like the labeler's preprocessing (kept uint8, normalised per batch)
        pixels = resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1)[None], r)[0].to(torch.uint8)
        return pixels, torch.from_numpy(label.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Model in / model out
# ----------------------------------------------------------------------------------------------

def init_model(spec: TrainSpec):
    """(model, preprocessor dict) from ``spec.weights`` or a random ``spec.model_size`` Segformer."""
    from transformers import SegformerForSemanticSegmentation

    from pseudolabel.models.directsam import read_preprocessor, segformer_config
    from pseudolabel.models.weights import resolve_weights

    torch.manual_seed(spec.seed)
    if spec.weights:
        local = resolve_weights(spec.weights, spec.storage, spec.revision)
        model = SegformerForSemanticSegmentation.from_pretrained(
            local, revision=spec.revision, num_labels=1, ignore_mismatched_sizes=True)
        return model, read_preprocessor(local)
    return SegformerForSemanticSegmentation(segformer_config(spec.model_size)), {}


def save_checkpoint(model, preprocessor: dict, resolution: int, output: str,
                    storage: StorageSpec | None = None) -> str:
    """``save_pretrained`` the model and a Segformer image-processor config of ``resolution`` to ``output``."""
    from transformers import SegformerImageProcessorPil

    from pseudolabel.models.directsam_pyramid import IMAGENET_MEAN, IMAGENET_STD

    proc = SegformerImageProcessorPil(size={"height": resolution, "width": resolution},
                                      image_mean=list(preprocessor.get("image_mean") or IMAGENET_MEAN),
                                      image_std=list(preprocessor.get("image_std") or IMAGENET_STD))
    with st.staged_dir(output, storage) as local:
        model.save_pretrained(local)
        proc.save_pretrained(local)
    return output


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------

def train_directsam(spec: "TrainSpec | dict | str | Path", **overrides: Any) -> dict[str, Any]:
    """Train with the boundary BCE loss and save a checkpoint the ``directsam`` labeler loads.

    ``spec``: a TrainSpec, a dict, or a YAML path; ``overrides``: dotted keys (``**{"steps": 10}``).
    Returns ``{"output", "steps", "losses" (per step), "seconds", "images"}``.
    """
    from pseudolabel.models.directsam_pyramid import IMAGENET_MEAN, IMAGENET_STD, normalize

    spec = validate_spec(TrainSpec, spec, overrides)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t_start = time.time()

    # 1. model, data, optimiser
    model, preprocessor = init_model(spec)
    mean = preprocessor.get("image_mean") or IMAGENET_MEAN
    std = preprocessor.get("image_std") or IMAGENET_STD
    model = model.to(spec.device).train()
    data = CocoBoundaryData(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    autocast = spec.bf16 and spec.device.startswith("cuda")

    # 2. steps: a random batch, loss computed by the model from its labels
    losses: list[float] = []
    for step in range(spec.steps):
        idx = torch.randint(0, len(data), (min(spec.batch_size, len(data)),), generator=gen).tolist()
        batch = [data.example(i) for i in idx]
        pixels = torch.stack([b[0] for b in batch]).to(spec.device).float()
        pixels = normalize(pixels, mean, std)
        labels = torch.stack([b[1] for b in batch]).to(spec.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(pixel_values=pixels, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % spec.log_every == 0 or step == 0:
            print(f"step {step + 1}/{spec.steps} loss {losses[-1]:.5f}", flush=True)

    # 3. checkpoint
    model.eval()
    save_checkpoint(model, preprocessor, spec.resolution, spec.output, spec.storage)
    return {"output": spec.output, "steps": spec.steps, "losses": losses,
            "seconds": time.time() - t_start, "images": len(data)}
