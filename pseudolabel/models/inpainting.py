"""Inpainting shared by labelers: OpenCV (weight-free) and an optional diffusers pipeline.

Images are (H, W, 3) uint8 RGB; masks are (H, W) bool, True = pixels to fill.
"""
from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

Method = Literal["telea", "ns"]


def inpaint_opencv(image: np.ndarray, mask: np.ndarray, radius: int = 3, method: Method = "telea") -> np.ndarray:
    """Fill ``mask`` from its surroundings with OpenCV (Telea's fast marching or Navier-Stokes).

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool, True where to fill.
        radius: neighbourhood radius in pixels.
        method: ``telea`` or ``ns``.

    Returns:
        (H, W, 3) uint8 RGB; pixels outside ``mask`` are unchanged.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    if not mask.any():
        return image.copy()
    flag = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}[method]
    out = cv2.inpaint(np.ascontiguousarray(image), mask.astype(np.uint8) * 255, float(radius), flag)
    out[~mask] = image[~mask]
    return out


class DiffusionInpainter:
    """A diffusers inpainting pipeline (e.g. Stable Diffusion inpainting) loaded from a local directory.

    ``weights``: a local directory (resolve s3:// prefixes first with ``resolve_weights``) or a hub id.
    Call with (image (H, W, 3) uint8, mask (H, W) bool) -> (H, W, 3) uint8; only masked pixels change.
    """

    def __init__(self, weights: str, device: str = "cpu", dtype: str = "auto", prompt: str = "",
                 steps: int = 25, guidance_scale: float = 7.5, resolution: int = 512, seed: int = 0):
        from diffusers import AutoPipelineForInpainting

        from pseudolabel.models.device import resolve_dtype

        torch_dtype = resolve_dtype(dtype, device)  # auto: float16 on CUDA, float32 elsewhere
        self.pipe = AutoPipelineForInpainting.from_pretrained(weights, torch_dtype=torch_dtype,
                                                              use_safetensors=True)
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.prompt, self.steps = device, prompt, steps
        self.guidance_scale, self.resolution, self.seed = guidance_scale, resolution, seed

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch
        from PIL import Image

        if not mask.any():
            return image.copy()
        h, w = mask.shape
        r = self.resolution
        # 1. run at the pipeline's resolution (multiple of 8)
        src = Image.fromarray(image).resize((r, r), Image.Resampling.BICUBIC)
        msk = Image.fromarray(mask.astype(np.uint8) * 255).resize((r, r), Image.Resampling.NEAREST)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        result = self.pipe(prompt=self.prompt, image=src, mask_image=msk, height=r, width=r,
                           num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                           generator=gen).images[0]
        # 2. back to the input size; keep unmasked pixels exactly
        filled = np.asarray(result.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), dtype=np.uint8)
        out = image.copy()
        out[mask] = filled[mask]
        return out
