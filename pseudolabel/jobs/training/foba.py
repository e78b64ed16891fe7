"""``train-foba``: the two training stages of the ``foba`` method.

``stage: finetune`` (default), concept distillation. Stable Diffusion's UNet is fine-tuned on the job's
images. Each example is, with probability ``foreground_probability`` (0.5), the foreground prompt
(``"a photo of a {category}"``) on the whole image, else the background prompt (``"a photo of a
background"``) on a random rectangle of background (at least 2/3 background, size limits on the latent
grid) taken from the image's foreground mask: the ``foba`` preliminary mask of the base model
(``masks: preliminary``) or a folder of PNGs. Images are placed on the labeler's canvas (long edge
``resolution``), then short edge resized to ``resolution`` (bicubic), randomly cropped and flipped. The
loss is the mean over all latent elements of ``(m * eps_pred - m * eps)^2``; AdamW at ``lr`` (times
``batch_size`` with ``scale_lr``, as the published launcher does on one device) after a one-step warm-up;
an EMA of the weights (decay ``min(0.9999, (1+n)/(10+n))``) is what the checkpoint holds.

The result is a diffusers-layout checkpoint (EMA ``unet``; ``vae``, ``text_encoder``, ``tokenizer``,
``scheduler`` copied) that the ``foba`` labeler inpaints with (``params: {inpaint_weights: ...}``), while
the attention keeps coming from the base model (``weights``).

``stage: segmentation``. The ``foba`` labeler (attention from ``weights``, inpainting with
``inpaint_weights``) computes each image's refined mask, or they are read from ``refined_masks`` (PNGs).
A U-Net (``pseudolabel.models.foba_segnet``) is trained on them at ``seg_resolution`` (128): image on the
canvas scale and mask resized together (short edge, bilinear), random crop, flip; binary cross-entropy;
Adam at ``seg_lr`` (2e-3), batches of ``seg_batch_size`` (32), ``seg_steps`` (12000) steps. The output
directory is what ``params: {segmentation_weights: ...}`` of the labeler loads.

Usage::

    pseudolabel train-foba JOB.yaml                       # fine-tuning
    pseudolabel train-foba JOB.yaml --set stage=segmentation --set inpaint_weights=/tmp/foba-ft
    # JOB.yaml: {weights: CompVis/stable-diffusion-v1-4, data: s3://bucket/birds/, output: /tmp/foba-ft,
    #            category: bird, steps: 2000}

or ``train_foba({...})`` from Python; it returns ``{"output", "stage", "steps", "losses", "seconds", "images"}``.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pseudolabel import storage as st
from pseudolabel.imageio import ImageError, decode_image, decode_png
from pseudolabel.jobs.training.common import start
from pseudolabel.models.foba_steps import (
    augment,
    ema_update,
    masked_eps_loss,
    pad_to_canvas,
    resize_long_edge,
    training_example,
    warmup_factor,
)
from pseudolabel.schemas.spec import InputSpec, StorageSpec

#: decompression-bomb cap of training images: the engine's default ``input.max_pixels``
MAX_PIXELS: int = InputSpec.model_fields["max_pixels"].default

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


class TrainSpec(BaseModel):
    """What ``train_foba`` trains, on which images, and where the result goes."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["finetune", "segmentation"] = Field(
        "finetune", description="'finetune': concept-distillation fine-tuning of SD; 'segmentation': the "
                                "segmentation network on the refined masks")
    weights: str = Field(description="base Stable Diffusion in diffusers layout: hub id, local directory or s3:// "
                                     "prefix (fine-tuned from; gives the attention)")
    revision: str | None = None
    data: str = Field(description="folder of images (searched recursively): local path or s3:// prefix")
    output: str = Field(description="output directory: local path or s3:// prefix")
    storage: StorageSpec = Field(default_factory=StorageSpec)
    category: str = Field("object", description="class text of the foreground prompt and the attention")
    resolution: int = Field(512, ge=64, multiple_of=64, description="canvas side (long edge) and training crop")
    seed: int = 0
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    log_every: int = Field(25, ge=1)
    limit: int | None = Field(None, ge=1, description="use only the first N images")
    # -- finetune
    masks: str = Field("preliminary", description="foreground masks of the background examples: 'preliminary' "
                                                  "(the foba preliminary masks of `weights`) or a folder of PNGs "
                                                  "(nonzero = foreground) with the images' relative names")
    prompt: str = Field("a photo of a background", description="background prompt (random background rectangles)")
    foreground_prompt: str = Field("a photo of a {}", description="foreground prompt ({} = category), whole images")
    foreground_probability: float = Field(0.5, ge=0.0, le=1.0, description="share of foreground-prompt examples")
    steps: int = Field(2000, ge=1, description="fine-tuning steps (the published run checkpoints every 2000)")
    batch_size: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0, description="base learning rate (AdamW)")
    scale_lr: bool = Field(True, description="multiply lr by batch_size (the published launcher's default)")
    warmup_steps: int = Field(1, ge=0, description="linear warm-up from 1e-6 * lr")
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0)
    preliminary_params: dict[str, Any] = Field(default_factory=dict,
                                               description="foba labeler params for 'preliminary' masks")
    # -- segmentation
    inpaint_weights: str | None = Field(None, description="fine-tuned checkpoint that inpaints (default: weights)")
    refined_masks: str | None = Field(None, description="folder of refined-mask PNGs instead of computing them")
    labeler_params: dict[str, Any] = Field(default_factory=dict,
                                           description="foba labeler params for the refined masks")
    seg_resolution: int = Field(128, ge=16, description="segmentation network input side")
    seg_steps: int = Field(12000, ge=1)
    seg_batch_size: int = Field(32, ge=1)
    seg_lr: float = Field(2e-3, gt=0, description="Adam learning rate of the segmentation network")
    seg_width: int = Field(64, ge=1, description="U-Net base width (64 = the published network)")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def _decode_rgb(data: bytes) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8 RGB after EXIF orientation (the engine's decode)."""
    return decode_image(data, max_pixels=MAX_PIXELS)


def list_images(uri: str, storage: StorageSpec | None = None) -> list[str]:
    """Relative paths (posix) of the images under ``uri``, sorted."""
    fs, root = st.filesystem(uri, storage)
    files = [p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(posixpath.relpath(p, root) for p in files)


def load_dataset(spec: TrainSpec) -> tuple[list[np.ndarray], list[str]]:
    """The training images ((H, W, 3) uint8, native sizes) with their relative names."""
    fs, root = st.filesystem(spec.data, spec.storage)
    names = list_images(spec.data, spec.storage)[: spec.limit]
    if not names:
        raise FileNotFoundError(f"no images under {spec.data}")
    images = []
    for name in names:
        with fs.open(posixpath.join(root, name), "rb") as f:
            try:
                images.append(_decode_rgb(f.read()))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
    return images, names


def load_mask_folder(uri: str, storage: StorageSpec | None, names: list[str],
                     sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Masks from PNGs named like the images (extension -> .png), nearest-resized to ``sizes`` (h', w')."""
    fs, root = st.filesystem(uri, storage)
    out = []
    for name, (h, w) in zip(names, sizes):
        path = posixpath.join(root, posixpath.splitext(name)[0] + ".png")
        with fs.open(path, "rb") as f:
            try:
                m = decode_png(f.read())
            except ImageError:
                raise ValueError(f"undecodable mask {path}") from None
        if m.ndim == 3:
            m = cv2.cvtColor(m[..., :3], cv2.COLOR_RGB2GRAY)
        out.append(cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) > 0)
    return out


def latent_grid_mask(mask: np.ndarray, side: int, factor: int = 8) -> np.ndarray:
    """(h', w') bool on the image part -> (side/f, side/f) bool on the canvas's latent grid (cell mean >= 0.5)."""
    canvas = pad_to_canvas(mask.astype(np.float32), side)
    cells = canvas.reshape(side // factor, factor, side // factor, factor).mean(axis=(1, 3))
    return cells >= 0.5


def _foba(spec: TrainSpec, weights: str, params: dict[str, Any]):
    from pseudolabel.models.foba import FoBa
    from pseudolabel.schemas.spec import LabelerSpec

    lab_spec = LabelerSpec.model_validate({"name": "foba", "weights": weights, "revision": spec.revision,
                                           "dtype": "float32", "params": {**params, "resolution": spec.resolution},
                                           "ontology": [{"category": spec.category}]})
    return FoBa(lab_spec, device=spec.device, storage=spec.storage)


def preliminary_masks(spec: TrainSpec, images: list[np.ndarray], batch: int = 4) -> list[np.ndarray]:
    """(side/8, side/8) bool per image: the foba preliminary masks of the base model on the canvas grid."""
    lab = _foba(spec, spec.weights, {**spec.preliminary_params, "refine": False})
    out: list[np.ndarray] = []
    for i in range(0, len(images), batch):
        out.extend(lab.canvas_preliminary(images[i:i + batch], spec.category)[1])
    return out


def refined_masks(spec: TrainSpec, images: list[np.ndarray], batch: int = 4) -> list[np.ndarray]:
    """(h', w') bool per image at the canvas scale: the foba labeler's refined masks."""
    params = {**spec.labeler_params, "refine": True, "inpaint_weights": spec.inpaint_weights or spec.weights}
    lab = _foba(spec, spec.weights, params)
    out: list[np.ndarray] = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        payloads = lab.forward(chunk, [None] * len(chunk))
        out.extend(lab.refined_from_payload(im, pl) for im, pl in zip(chunk, payloads))
    return out


def epoch_batches(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless index batches: shuffled epochs of ``n`` items, the last batch of an epoch may be short."""
    while True:
        perm = rng.permutation(n)
        for i in range(0, n, batch):
            yield perm[i:i + batch]


# ----------------------------------------------------------------------------------------------
# Checkpoint
# ----------------------------------------------------------------------------------------------

def save_checkpoint(unet, source_dir: str, output: str, storage: StorageSpec | None = None) -> str:
    """Write a diffusers-layout checkpoint: ``unet`` + the other components copied from ``source_dir``.
    ``output`` is a local directory or an s3:// prefix. Returns ``output``."""
    with st.staged_dir(output, storage) as local:
        unet.save_pretrained(os.path.join(local, "unet"))
        for name in COPIED_COMPONENTS:
            src = os.path.join(source_dir, name)
            dst = os.path.join(local, name)
            if os.path.isdir(src):
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif os.path.isfile(src):
                shutil.copy2(src, dst)
    return output


# ----------------------------------------------------------------------------------------------
# Stage 1: fine-tuning
# ----------------------------------------------------------------------------------------------

def finetune(spec: TrainSpec, images: list[np.ndarray], names: list[str]) -> dict[str, Any]:
    """Concept-distillation fine-tuning; saves the EMA UNet checkpoint to ``spec.output``."""
    from pseudolabel.models.attention import encode_text, load_sd_components
    from pseudolabel.models.weights import resolve_weights

    side = spec.resolution
    # 1. data on the canvas scale, foreground masks on the canvas's latent grid
    parts = [resize_long_edge(im, side) for im in images]
    if spec.masks == "preliminary":
        fg = preliminary_masks(spec, images)
    else:
        fg = [latent_grid_mask(m, side) for m in
              load_mask_folder(spec.masks, spec.storage, names, [p.shape[:2] for p in parts])]

    # 2. model (float32), frozen VAE/text encoder, prompt embeddings
    weights_dir = resolve_weights(spec.weights, spec.storage, spec.revision)
    sd = load_sd_components(weights_dir, dtype="float32", device=spec.device)
    with torch.inference_mode():
        emb_fg = encode_text(sd.tokenizer, sd.text_encoder, spec.foreground_prompt.format(spec.category))[0].clone()
        emb_bg = encode_text(sd.tokenizer, sd.text_encoder, spec.prompt)[0].clone()
    unet = sd.unet.float().train()
    for p in unet.parameters():
        p.requires_grad_(True)
    lr = spec.lr * (spec.batch_size if spec.scale_lr else 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    params = dict(unet.named_parameters())
    shadow = {k: v.detach().clone() for k, v in params.items()}
    n_updates = 0
    rng = np.random.default_rng(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    n_train = sd.scheduler.config.num_train_timesteps
    v_pred = getattr(sd.scheduler.config, "prediction_type", "epsilon") == "v_prediction"
    dev = next(unet.parameters()).device
    batches = epoch_batches(len(parts), spec.batch_size, rng)

    # 3. steps
    losses: list[float] = []
    n_fg = 0
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr * warmup_factor(step, spec.warmup_steps)
        examples = [training_example(parts[i], fg[i], rng, side, foreground_probability=spec.foreground_probability)
                    for i in next(batches)]
        n_fg += sum(e[0] for e in examples)
        x = torch.stack([e[1] for e in examples]).to(dev)
        mask = torch.stack([e[2] for e in examples]).to(dev)
        cond = torch.cat([emb_fg if e[0] else emb_bg for e in examples]).to(dev)
        with torch.no_grad():
            dist = sd.vae.encode(x).latent_dist
            z0 = ((dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dev))
                  * sd.vae.config.scaling_factor)
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, n_train, (z0.shape[0],), generator=gen).to(dev)
        pred = unet(sd.scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample
        target = sd.scheduler.get_velocity(z0, noise, t) if v_pred else noise
        loss = masked_eps_loss(pred, target, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_updates = ema_update(shadow, params, n_updates, spec.ema_decay)
        losses.append(float(loss.detach()))
        if (step + 1) % spec.log_every == 0 or step == 0:
            print(f"step {step + 1}/{spec.steps} loss {losses[-1]:.5f}", flush=True)

    # 4. the EMA weights are the checkpoint
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(shadow[k])
    unet.eval()
    save_checkpoint(unet, weights_dir, spec.output, spec.storage)
    return {"steps": spec.steps, "losses": losses, "foreground_examples": n_fg,
            "examples": spec.steps * spec.batch_size}


# ----------------------------------------------------------------------------------------------
# Stage 2: segmentation network
# ----------------------------------------------------------------------------------------------

def segmentation_example(part: np.ndarray, mask: np.ndarray, side: int, rng: np.random.Generator
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h', w', 3) uint8 image + (h', w') bool refined mask -> (3, s, s) float in [-1, 1], (1, s, s) float in
    [0, 1]: resized together (short edge ``side``, bilinear), random crop, flip."""
    x = torch.from_numpy(part.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    y = torch.from_numpy(mask.astype(np.float32))[None]
    both = augment(torch.cat([x, y]), side, rng, mode="bilinear")
    return both[:3], both[3:].clamp(0, 1)


def train_segmentation(spec: TrainSpec, images: list[np.ndarray], names: list[str]) -> dict[str, Any]:
    """Train the segmentation network on the refined masks; save it to ``spec.output``."""
    from pseudolabel.models.foba_segnet import SegmentationUNet, save_segnet

    side = spec.resolution
    parts = [resize_long_edge(im, side) for im in images]
    if spec.refined_masks:
        masks = load_mask_folder(spec.refined_masks, spec.storage, names, [p.shape[:2] for p in parts])
    else:
        masks = refined_masks(spec, images)
    torch.manual_seed(spec.seed)
    net = SegmentationUNet(spec.seg_width).to(spec.device).train()
    opt = torch.optim.Adam(net.parameters(), lr=spec.seg_lr)
    rng = np.random.default_rng(spec.seed)
    batches = epoch_batches(len(parts), spec.seg_batch_size, rng)
    losses: list[float] = []
    for step in range(spec.seg_steps):
        pairs = [segmentation_example(parts[i], masks[i], spec.seg_resolution, rng) for i in next(batches)]
        x = torch.stack([p[0] for p in pairs]).to(spec.device)
        y = torch.stack([p[1] for p in pairs]).to(spec.device)
        loss = F.binary_cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % spec.log_every == 0 or step == 0:
            print(f"step {step + 1}/{spec.seg_steps} loss {losses[-1]:.5f}", flush=True)
    net.eval()
    with st.staged_dir(spec.output, spec.storage) as local:
        save_segnet(net, local, spec.seg_resolution)
    return {"steps": spec.seg_steps, "losses": losses,
            "foreground_fraction": float(np.mean([m.mean() for m in masks]))}


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------

def train_foba(spec: TrainSpec | dict | str | Path, **overrides: Any) -> dict[str, Any]:
    """Run one training stage (``spec.stage``) and save its output.

    ``spec``: a TrainSpec, a dict, or a YAML path; ``overrides``: dotted keys (``**{"steps": 10}``).
    Returns ``{"output", "stage", "steps", "losses" (per step), "seconds", "images", ...}``.
    """
    run = start(TrainSpec, spec, overrides)
    spec, t_start = run.spec, run.started
    images, names = load_dataset(spec)
    stage_fn = finetune if spec.stage == "finetune" else train_segmentation
    result = stage_fn(spec, images, names)
    return {"output": spec.output, "stage": spec.stage, **result,
            "seconds": time.time() - t_start, "images": len(images)}
