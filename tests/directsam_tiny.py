"""Tiny random-weight DirectSAM checkpoints and test images shared by the directsam tests."""
from __future__ import annotations

import os

import numpy as np
import torch


def tiny_segformer(seed: int = 0, classifier_std: float = 3.0, bias: float = 0.0):
    """A 4-stage Segformer (num_labels=1) small enough for CPU tests.

    The classifier weights are drawn with a large std so the random network's boundary map varies
    with the image (a default init gives an almost constant 0.5); ``bias`` (the classifier's bias)
    shifts every logit, e.g. ``log(0.03 / 0.97)`` centres the map near 0.03.
    """
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    cfg = SegformerConfig(num_labels=1, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64],
                          decoder_hidden_size=32, num_attention_heads=[1, 1, 2, 4])
    model = SegformerForSemanticSegmentation(cfg).eval()
    with torch.no_grad():
        model.decode_head.classifier.weight.normal_(0, classifier_std)
        model.decode_head.classifier.bias.fill_(bias)
    return model


def save_tiny_segformer(path: str, resolution: int = 64, seed: int = 0, bias: float = 0.0) -> str:
    """Save a tiny model plus a Segformer image processor config of size ``resolution`` to ``path``."""
    from transformers import SegformerImageProcessorPil

    os.makedirs(path, exist_ok=True)
    tiny_segformer(seed, bias=bias).save_pretrained(path)
    SegformerImageProcessorPil(size={"height": resolution, "width": resolution}).save_pretrained(path)
    return path


def blocks_image(height: int = 80, width: int = 112, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB: coloured rectangles on a background, light noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = (200, 180, 40)
    img[height // 8: height * 5 // 8, width // 6: width * 5 // 8] = (20, 60, 220)
    img[height // 2: height * 15 // 16, width // 2: width * 9 // 10] = (250, 250, 250)
    return np.clip(img.astype(np.int16) + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


def noise_image(height: int = 80, width: int = 112, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB uniform noise: gives the random network's boundary map plenty of structure."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def tiny_dinov2(path: str, hidden_size: int = 16, image_size: int = 56) -> str:
    """Save a tiny random DINOv2 backbone (2 layers, patch 14) to ``path``; returns ``path``."""
    from transformers import Dinov2Backbone, Dinov2Config

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=2 * hidden_size, patch_size=14, image_size=image_size,
                       out_features=["stage2"])
    Dinov2Backbone(cfg).save_pretrained(path)
    return path


def hub_cache_snapshot(cache_dir: str, repo_id: str, files_dir: str, revision: str,
                       commit: str = "0123456789abcdef0123456789abcdef01234567") -> str:
    """Lay out ``files_dir`` as the hub cache's snapshot of ``repo_id`` at ``revision`` (a branch or tag
    name pointing at ``commit``), so offline hub loading finds it; returns the snapshot folder."""
    import shutil

    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    shutil.copytree(files_dir, snapshot)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", revision), "w") as f:
        f.write(commit)
    return snapshot
