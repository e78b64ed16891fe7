"""``train-directsam``: fine-tune (or train from scratch) a DirectSAM boundary model.

The recipe of the reference trainer (ChenDelong1999/subobjects, ``DirectSAM/trainer.py``): every
segment of an image's annotation (each instance mask, and the background) contributes its outer
contours drawn 3 px thick; that binary map, resized (nearest) with the image to a
``resolution x resolution`` square, is the target of transformers' ``num_labels=1`` loss (per-pixel
BCE on the logits upsampled to the label size), which the model computes when given ``labels``.
A plain torch loop (AdamW) replaces the Hugging Face Trainer.

Data: a COCO instances JSON (polygons, RLE with str/bytes counts, or uncompressed RLE) and the image
root its ``file_name`` values are relative to; a demo-data directory (``pseudolabel demo-data OUT``)
works as is (``OUT/annotations/instances.json`` + ``OUT/images``). Local paths or s3:// URIs. Images are
read the way the engine reads them, so the COCO export of any run trains as is: a ``file_name`` of
``<shard>.tar/<member>`` is a member of a WebDataset shard, ``<file>.parquet/row:<i>`` a row of a Parquet
input, anything else a plain file. Examples are decoded when a batch needs them; at most
``cache_examples`` of them stay in memory (uint8 image and label, 4 R^2 bytes each).

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

import contextlib
import io
import json
import time
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Literal, cast

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pseudolabel import storage as st
from pseudolabel.engine.formats import PARQUET_ROW_PREFIX, confine
from pseudolabel.jobs.training.common import start
from pseudolabel.schemas.spec import StorageSpec


class TrainSpec(BaseModel):
    """What ``train_directsam`` trains, on which data, and where the checkpoint goes."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="image root (COCO file_name values are relative to it), or a demo-data directory")
    coco_json: str | None = Field(None, description="COCO instances JSON; default: DATA/annotations/instances.json "
                                                    "with images under DATA/images")
    weights: str | None = Field(None, description="initial weights: hub id, local dir or s3:// prefix "
                                                  "(a num_labels=1 Segformer, or any Segformer: the head is "
                                                  "re-initialised)")
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
    cache_examples: int = Field(64, ge=0, description="decoded examples kept in memory (least recently used "
                                                      "dropped first; 4 * resolution^2 bytes each); 0 = decode "
                                                      "every batch from the source")
    max_pixels: int = Field(89_478_485, gt=0, description="images with more pixels are refused (as input.max_pixels)")

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


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def split_file_name(file_name: str) -> tuple[str, str | None]:
    """(container path, member) of a COCO ``file_name``, as the engine's sources write them.

    ``a/shard-0.tar/x/000.png`` -> (``a/shard-0.tar``, ``x/000.png``); ``p.parquet/row:3`` ->
    (``p.parquet``, ``row:3``); a plain ``dir/img.png`` -> (``dir/img.png``, None). The first path
    component ending in ``.tar`` (or ``.parquet`` followed by ``row:<i>``) is the container.
    """
    parts = file_name.split("/")
    for i, part in enumerate(parts[:-1]):
        lower = part.lower()
        member = "/".join(parts[i + 1:])
        if lower.endswith(".tar") or (lower.endswith(".parquet") and member.startswith(PARQUET_ROW_PREFIX)):
            return "/".join(parts[: i + 1]), member
    return file_name, None


class CocoBoundaryData:
    """Images of a COCO JSON with their boundary labels, at the training resolution, read on demand.

    ``batch(indices)`` -> (pixels (B, 3, R, R) uint8, labels (B, R, R) uint8 in {0, 1}). The bytes come
    from the same sources the engine reads, with its fetch and decode helpers
    (``pseudolabel.engine.decode``): plain files, members of ``.tar`` shards (fetched by ranged reads once
    a shard's member offsets are indexed) and rows of Parquet files; all examples of one file in a batch
    are fetched with one call. At most ``spec.cache_examples`` decoded examples are kept (least recently
    used dropped first).
    """

    def __init__(self, spec: TrainSpec):
        self.spec = spec
        assert spec.coco_json is not None  # TrainSpec's validator fills in the default
        coco = json.loads(st.read_bytes(spec.coco_json, spec.storage))
        self.images = sorted(coco["images"], key=lambda im: im["id"])[: spec.limit]
        self.coco = COCO()  # pycocotools' index: annToMask reads polygons, RLE and uncompressed RLE
        self.coco.dataset = coco
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints its progress
            self.coco.createIndex()
        if not self.images:
            raise FileNotFoundError(f"no images in {spec.coco_json}")
        self.fs, self.root = st.filesystem(spec.data, spec.storage)
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._is_container: dict[str, bool] = {}
        self._tar_index: dict[str, dict[str, tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels (3, R, R) uint8, label (R, R) uint8) of image ``i``."""
        pixels, labels = self.batch([i])
        return pixels[0], labels[0]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (pixels (B, 3, R, R) uint8, labels (B, R, R) uint8) of images ``indices``."""
        missing = sorted({i for i in indices if i not in self._cache})
        fresh = dict(zip(missing, self._load_many(missing))) if missing else {}
        out = []
        for i in indices:
            ex = fresh.get(i)
            if ex is None:
                ex = self._cache[i]
                self._cache.move_to_end(i)
            out.append(ex)
        for i, ex in fresh.items():
            self._remember(i, ex)
        return torch.stack([p for p, _ in out]), torch.stack([lab for _, lab in out])

    def _remember(self, i: int, example: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.spec.cache_examples <= 0:
            return
        self._cache[i] = example
        self._cache.move_to_end(i)
        while len(self._cache) > self.spec.cache_examples:
            self._cache.popitem(last=False)

    # 1. fetch ------------------------------------------------------------------------------

    def _locate(self, file_name: str) -> tuple[str, str | None]:
        """(path in ``self.fs``, member) of a ``file_name``; a ``x.tar`` that is a folder stays a folder."""
        container, member = split_file_name(file_name)
        if member is not None:
            path = confine(self.root, container)
            if path not in self._is_container:
                self._is_container[path] = self.fs.isfile(path)
            if self._is_container[path]:
                return path, member
        return confine(self.root, file_name), None

    def _spans(self, path: str, members: list[str]) -> list[tuple[int, int] | None]:
        """(offset, size) of tar members, from an index of the shard's headers built once per shard."""
        if not path.lower().endswith(".tar"):
            return [None] * len(members)
        if path not in self._tar_index:
            from pseudolabel.engine.sources import tar_members

            self._tar_index[path] = {i.name: (i.offset_data, i.size) for i in tar_members(self.fs, path)}
        return [self._tar_index[path].get(m) for m in members]

    def _fetch(self, indices: list[int]) -> list[bytes]:
        """Encoded bytes of images ``indices``: one fetch per source file, through the input formats
        (``pseudolabel.engine.formats``); a ``file_name`` that leaves ``spec.data`` is refused."""
        from pseudolabel.engine.formats import FetchRow, confine, format_class, format_of_row

        groups: dict[str, list[tuple[int, str | None]]] = defaultdict(list)
        for i in indices:
            confine(self.root, self.images[i]["file_name"])  # raises for ../x, /abs, s3://other
            path, member = self._locate(self.images[i]["file_name"])
            groups[path].append((i, member))
        got: dict[int, bytes] = {}
        for path, items in groups.items():
            members = [m for _, m in items]
            # one file's members are all tar members (names) or all None
            spans = self._spans(path, cast("list[str]", members)) if members[0] is not None else [None] * len(members)
            rows = [FetchRow(m, *(span or (None, None))) for m, span in zip(members, spans)]
            fetched = format_class(format_of_row(path, members[0]))().fetch(self.fs, path, rows)
            for (i, _), data in zip(items, fetched):
                if isinstance(data, Exception):
                    raise ValueError(f"cannot read image {self.images[i]['file_name']!r} under {self.spec.data}: "
                                     f"{type(data).__name__}: {data}") from data
                got[i] = data
        return [got[i] for i in indices]

    # 2. decode and label ------------------------------------------------------------------

    def _load_many(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from pseudolabel.engine.decode import ImageError, decode_image

        out = []
        for i, data in zip(indices, self._fetch(indices)):
            try:
                rgb = decode_image(data, self.spec.max_pixels)
            except ImageError as err:
                raise ValueError(f"image {self.images[i]['file_name']!r}: {err}") from None
            out.append(self._example(i, rgb))
        return out

    def _example(self, i: int, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from pseudolabel.models.directsam_pyramid import resize_uint8

        info = self.images[i]
        h, w = rgb.shape[:2]
        # 1. label at the original size, then nearest-resized (like the image processor does)
        self.coco.imgs[info["id"]].update(height=h, width=w)  # annToMask rasterises at the decoded size
        anns = [a for a in self.coco.imgToAnns.get(info["id"], []) if a.get("segmentation")]
        masks = np.stack([self.coco.annToMask(a).astype(bool) for a in anns]) if anns else np.zeros((0, h, w), bool)
        segments = masks_to_segments(masks)
        label = boundary_label(segments, self.spec.line_thickness)
        r = self.spec.resolution
        label = cv2.resize(label, (r, r), interpolation=cv2.INTER_NEAREST)
        # 2. image resized like the labeler's preprocessing (kept uint8, normalised per batch)
        pixels = resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1)[None], r)[0].to(torch.uint8)
        return pixels, torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8))


# ----------------------------------------------------------------------------------------------
# Model in / model out
# ----------------------------------------------------------------------------------------------

def init_model(spec: TrainSpec):
    """(model, preprocessor dict) from ``spec.weights`` or a random ``spec.model_size`` Segformer."""
    from transformers import SegformerForSemanticSegmentation

    from pseudolabel.models.directsam import segformer_config
    from pseudolabel.models.directsam_host import load_preprocessor
    from pseudolabel.models.weights import resolve_weights

    torch.manual_seed(spec.seed)
    if spec.weights:
        local = resolve_weights(spec.weights, spec.storage, spec.revision)
        model = SegformerForSemanticSegmentation.from_pretrained(
            local, revision=spec.revision,  # type: ignore[arg-type]  # None: the default revision
            num_labels=1, ignore_mismatched_sizes=True)
        return model, load_preprocessor(local, spec.revision, needed=False)
    return SegformerForSemanticSegmentation(segformer_config(spec.model_size)), {}


def save_checkpoint(model, preprocessor: dict, resolution: int, output: str,
                    storage: StorageSpec | None = None) -> str:
    """``save_pretrained`` the model and a Segformer image-processor config of ``resolution`` to ``output``."""
    from transformers import SegformerImageProcessorPil

    from pseudolabel.models.directsam_views import IMAGENET_MEAN, IMAGENET_STD

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
    from pseudolabel.models.directsam_pyramid import normalize
    from pseudolabel.models.directsam_views import IMAGENET_MEAN, IMAGENET_STD

    run = start(TrainSpec, spec, overrides)
    spec, t_start = run.spec, run.started

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
        pixels, labels = data.batch(idx)
        pixels = normalize(pixels.to(spec.device).float(), mean, std)
        labels = labels.to(spec.device).long()
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
