"""``train-foba``: the concept-distillation fine-tuning step of the ``foba`` method.

Stable Diffusion's UNet is fine-tuned on the job's images with the standard noise-prediction loss under
the background prompt (``"a photo of a background"``), restricted to background pixels: the per-pixel
loss is weighted by ``1 - foreground mask`` at latent resolution, so the prompt learns what the
dataset's backgrounds look like without ever seeing the foreground. Optionally the foreground prompt
(``"a photo of a bird"``) is trained on whole images as well. Foreground masks come from a folder of
PNGs (same relative names as the images), from the ``foba`` preliminary masks computed on the fly
(``masks: preliminary``), or are absent (the whole image counts as background).

The result is a diffusers-layout checkpoint (``unet`` saved with ``save_pretrained``; ``vae``,
``text_encoder``, ``tokenizer``, ``scheduler`` copied) that the ``foba`` labeler loads as its weights.

Usage::

    pseudolabel train-foba JOB.yaml --set steps=500
    pseudolabel train-foba JOB.yaml
    # JOB.yaml: {weights: CompVis/stable-diffusion-v1-4, data: s3://bucket/birds/, output: /tmp/foba-birds,
    #            masks: preliminary, category: bird, steps: 2000, lr: 1.0e-5}

or ``train_foba({...})`` from Python; it returns ``{"output": ..., "losses": [...], "steps": ...}``.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pseudolabel import storage as st
from pseudolabel.schemas.spec import StorageSpec, validate_spec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


class TrainSpec(BaseModel):
    """What ``train_foba`` fine-tunes, on which images, and where the checkpoint goes."""

    model_config = ConfigDict(extra="forbid")

    weights: str = Field(description="Stable Diffusion in diffusers layout: hub id, local directory or s3:// prefix")
    revision: str | None = None
    data: str = Field(description="folder of images (searched recursively): local path or s3:// prefix")
    masks: str | None = Field(None, description="folder of foreground-mask PNGs (nonzero = foreground) with the "
                                                "images' relative names, 'preliminary' to compute foba "
                                                "preliminary masks, or null (all background)")
    category: str = Field("object", description="class text for 'preliminary' masks and the foreground prompt")
    prompt: str = Field("a photo of a background", description="background prompt, trained on background pixels")
    foreground_prompt: str | None = Field(None, description="also train this prompt ({} = category) on whole images")
    output: str = Field(description="checkpoint directory: local path or s3:// prefix")
    storage: StorageSpec = Field(default_factory=StorageSpec)
    resolution: int = Field(512, ge=64, multiple_of=64, description="images are resized to a square of this side")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    preliminary_params: dict[str, Any] = Field(default_factory=dict,
                                               description="foba labeler params for 'preliminary' masks")
    seed: int = 0
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    log_every: int = Field(25, ge=1)
    limit: int | None = Field(None, ge=1, description="use only the first N images")


# ----------------------------------------------------------------------------------------------
# The loss (pure torch)
# ----------------------------------------------------------------------------------------------

def masked_diffusion_loss(unet, scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor,
                          weight: torch.Tensor | None, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Noise-prediction MSE averaged over the pixels where ``weight`` > 0.

    latents: (B, C, h, w) clean latents; text_embeddings: (B or 1, T, D); weight: (B, 1, h, w) in [0, 1]
    (1 = count this latent pixel; None = all); noise: (B, C, h, w); timesteps: (B,) int64.
    The target is ``noise`` for epsilon prediction, the velocity for v-prediction checkpoints.
    Returns a 0-d tensor: sum(w * (pred - target)^2) / (C * sum(w)).
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    cond = text_embeddings.expand(latents.shape[0], -1, -1) if text_embeddings.shape[0] == 1 else text_embeddings
    pred = unet(noisy, timesteps, encoder_hidden_states=cond).sample
    if getattr(scheduler.config, "prediction_type", "epsilon") == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    err = (pred.float() - target.float()) ** 2
    if weight is None:
        return err.mean()
    w = weight.to(err.dtype).expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(1e-8)


def latent_weight(fg_masks: np.ndarray, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool foreground masks -> (B, 1, h, w) float background weight = 1 - area-averaged foreground."""
    fg = torch.from_numpy(fg_masks.astype(np.float32))[:, None]
    return 1.0 - F.adaptive_avg_pool2d(fg, latent_hw) if fg.shape[-2:] != tuple(latent_hw) else 1.0 - fg


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def _decode_rgb(data: bytes) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError("undecodable image")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def list_images(uri: str, storage: StorageSpec | None = None) -> list[str]:
    """Relative paths (posix) of the images under ``uri``, sorted."""
    fs, root = st.filesystem(uri, storage)
    files = [p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(posixpath.relpath(p, root) for p in files)


def load_dataset(spec: TrainSpec) -> tuple[np.ndarray, list[str]]:
    """All training images resized to (N, R, R, 3) uint8, with their relative names."""
    fs, root = st.filesystem(spec.data, spec.storage)
    names = list_images(spec.data, spec.storage)[: spec.limit]
    if not names:
        raise FileNotFoundError(f"no images under {spec.data}")
    r = spec.resolution
    images = []
    for name in names:
        with fs.open(posixpath.join(root, name), "rb") as f:
            img = _decode_rgb(f.read())
        images.append(cv2.resize(img, (r, r), interpolation=cv2.INTER_AREA))
    return np.stack(images), names


def load_mask_folder(spec: TrainSpec, names: list[str]) -> np.ndarray:
    """(N, R, R) bool foreground masks from PNGs named like the images (extension -> .png)."""
    fs, root = st.filesystem(spec.masks, spec.storage)
    out = []
    for name in names:
        path = posixpath.join(root, posixpath.splitext(name)[0] + ".png")
        with fs.open(path, "rb") as f:
            m = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise ValueError(f"undecodable mask {path}")
        out.append(cv2.resize(m, (spec.resolution,) * 2, interpolation=cv2.INTER_NEAREST) > 0)
    return np.stack(out)


def preliminary_masks(spec: TrainSpec, images: np.ndarray, weights_dir: str) -> np.ndarray:
    """(N, R, R) bool: the foba labeler's preliminary (cross-attention) masks, upsampled to the images."""
    from pseudolabel.models.foba import FoBa, resize_mask
    from pseudolabel.models.attention import encode_image
    from pseudolabel.schemas.spec import LabelerSpec

    params = {**spec.preliminary_params, "resolution": spec.resolution, "refine": False}
    lab = FoBa(LabelerSpec(name="foba", weights=weights_dir, params=params,
                           ontology=[{"category": spec.category}]), device=spec.device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), spec.batch_size):
            lat = encode_image(lab.sd.vae, images[i:i + spec.batch_size])
            _, masks = lab.preliminary(lat.to(next(lab.sd.unet.parameters()).dtype), spec.category)
            out.extend(resize_mask(m, images.shape[1:3]) for m in masks)
    return np.stack(out)


# ----------------------------------------------------------------------------------------------
# Checkpoint
# ----------------------------------------------------------------------------------------------

def save_checkpoint(unet, source_dir: str, output: str, storage: StorageSpec | None = None) -> str:
    """Write a diffusers-layout checkpoint: the trained ``unet`` + the other components copied from
    ``source_dir``. ``output`` is a local directory or an s3:// prefix. Returns ``output``."""
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
# The job
# ----------------------------------------------------------------------------------------------

def train_foba(spec: "TrainSpec | dict | str | Path", **overrides: Any) -> dict[str, Any]:
    """Fine-tune the UNet with the background-restricted loss and save a checkpoint the labeler loads.

    ``spec``: a TrainSpec, a dict, or a YAML path; ``overrides``: dotted keys (``**{"steps": 10}``).
    Returns ``{"output", "steps", "losses" (per step), "seconds", "images"}``.
    """
    from pseudolabel.models.attention import encode_image, encode_text, load_sd_components
    from pseudolabel.models.weights import resolve_weights

    spec = validate_spec(TrainSpec, spec, overrides)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t_start = time.time()

    # 1. model (float32 for training) and data
    weights_dir = resolve_weights(spec.weights, spec.storage, spec.revision)
    sd = load_sd_components(weights_dir, dtype="float32", device=spec.device)
    images, names = load_dataset(spec)
    if spec.masks == "preliminary":
        fg = preliminary_masks(spec, images, weights_dir)
    elif spec.masks:
        fg = load_mask_folder(spec, names)
    else:
        fg = np.zeros(images.shape[:3], bool)

    # 2. frozen parts: latents and prompt embeddings computed once
    with torch.inference_mode():
        latents = torch.cat([encode_image(sd.vae, images[i:i + 8]) for i in range(0, len(images), 8)]).float().cpu()
        bg_emb = encode_text(sd.tokenizer, sd.text_encoder, spec.prompt)[0].float().clone()
        fg_emb = (encode_text(sd.tokenizer, sd.text_encoder, spec.foreground_prompt.format(spec.category))[0]
                  .float().clone() if spec.foreground_prompt else None)
    weights = latent_weight(fg, tuple(latents.shape[-2:]))
    unet = sd.unet.float().train()
    for p in unet.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    n_train = sd.scheduler.config.num_train_timesteps
    dev = next(unet.parameters()).device

    # 3. steps: random batch, noise and timesteps; masked background loss (+ optional foreground loss)
    losses: list[float] = []
    for step in range(spec.steps):
        idx = torch.randint(0, len(latents), (min(spec.batch_size, len(latents)),), generator=gen)
        z0 = latents[idx].to(dev)
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, n_train, (z0.shape[0],), generator=gen).to(dev)
        loss = masked_diffusion_loss(unet, sd.scheduler, z0, bg_emb, weights[idx].to(dev), noise, t)
        if fg_emb is not None:
            loss = loss + masked_diffusion_loss(unet, sd.scheduler, z0, fg_emb, None, noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), spec.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % spec.log_every == 0 or step == 0:
            print(f"step {step + 1}/{spec.steps} loss {losses[-1]:.5f}", flush=True)

    # 4. checkpoint
    unet.eval()
    save_checkpoint(unet, weights_dir, spec.output, spec.storage)
    return {"output": spec.output, "steps": spec.steps, "losses": losses,
            "seconds": time.time() - t_start, "images": len(images)}
