"""Tiny inputs for the foba tests: two random Stable Diffusion checkpoints (base and "fine-tuned"), a tiny
segmentation network, and a folder of shape images with foreground-mask PNGs.

Everything is written with the real writers (``save_pretrained``, safetensors, cv2.imwrite) so the tests
load it through the labeler's real loading path.
"""
from __future__ import annotations

import os

import numpy as np
from sd_tiny import build_tiny_sd


def build_tiny_foba(root: str) -> dict[str, str]:
    """Two tiny random SD checkpoints under ``root``: ``base`` (attention) and ``inpaint`` (another seed)."""
    return {"base": build_tiny_sd(os.path.join(root, "base"), seed=0),
            "inpaint": build_tiny_sd(os.path.join(root, "inpaint"), seed=1)}


def build_tiny_segnet(path: str, width: int = 2, resolution: int = 16, seed: int = 0) -> str:
    """A random ``SegmentationUNet`` of ``width`` saved with ``save_segnet`` under ``path``."""
    import torch

    from pseudolabel.models.foba_segnet import SegmentationUNet, save_segnet

    torch.manual_seed(seed)
    return save_segnet(SegmentationUNet(width).eval(), path, resolution)


def write_shapes(root: str, names=("a/img0.jpg", "a/img1.png", "b/img2.png"), size=(48, 64), seed: int = 0) -> str:
    """Images (a bright square on a flat background) under ``root/images`` and their foreground masks
    (0/255 PNG, same relative names with .png) under ``root/masks``; returns ``root``."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = size
    for i, rel in enumerate(names):
        img = np.full((h, w, 3), 30 + 40 * i, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        y, x = rng.integers(4, h // 2, 2)
        img[y:y + h // 3, x:x + h // 3] = (200, 60, 60)
        mask[y:y + h // 3, x:x + h // 3] = 255
        for sub, arr, name in (("images", img[..., ::-1], rel), ("masks", mask, os.path.splitext(rel)[0] + ".png")):
            path = os.path.join(root, sub, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            cv2.imwrite(path, np.ascontiguousarray(arr))
    return root
