"""The ``foba`` segmentation network: a U-Net trained on the refined masks, which the method finally
labels with.

Architecture (the published method's, a standard U-Net): ``DoubleConv`` (conv3x3-BN-ReLU twice) at
``width``, four ``Down`` levels (max-pool 2 + DoubleConv) doubling the width up to 16 * ``width``, four
``Up`` levels (2x2 transposed conv halving the channels, pad to the skip, concat, DoubleConv), a 1x1
output conv and a sigmoid. ``width`` 64 is the published size; tests use a few channels.

Input (B, 3, H, W) float in [-1, 1]; output (B, 1, H, W) foreground probability in [0, 1]. Any H, W
work (odd sizes are padded at the skips). Trained at 128 px: see ``pseudolabel.jobs.training.foba``.

Checkpoint directory: ``config.json`` ({"kind": "foba-segmentation", "width": .., "resolution": ..})
and ``model.safetensors``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KIND = "foba-segmentation"


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class SegmentationUNet(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) probabilities."""

    def __init__(self, width: int = 64):
        super().__init__()
        c = [width * 2 ** i for i in range(5)]
        self.width = width
        self.inc = DoubleConv(3, c[0])
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), DoubleConv(c[i], c[i + 1])) for i in range(4))
        self.ups = nn.ModuleList(Up(c[i + 1], c[i]) for i in reversed(range(4)))
        self.outc = nn.Conv2d(c[0], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return torch.sigmoid(self.outc(y))


def save_segnet(model: SegmentationUNet, path: str, resolution: int) -> str:
    """Write ``config.json`` + ``model.safetensors`` under the local directory ``path``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump({"kind": KIND, "width": model.width, "resolution": int(resolution)}, f)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS_NAME))
    return path


def load_segnet(path: str, device: str = "cpu") -> tuple[SegmentationUNet, int]:
    """A local checkpoint directory -> (model in eval mode on ``device``, training resolution)."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no foba segmentation network under {path} (missing {CONFIG_NAME})")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("kind") != KIND:
        raise ValueError(f"{path} is not a foba segmentation network (kind {cfg.get('kind')!r})")
    model = SegmentationUNet(int(cfg["width"]))
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)))
    return model.to(device).eval(), int(cfg["resolution"])


def short_edge_size(hw: tuple[int, int], side: int) -> tuple[int, int]:
    """(H, W) -> size with the short edge ``side`` and the long edge ``int(side * long / short)``."""
    h, w = int(hw[0]), int(hw[1])
    if min(h, w) == side:
        return h, w
    return (side, int(side * w / h)) if h <= w else (int(side * h / w), side)


def segnet_input(image: np.ndarray, side: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, h, w) float in [-1, 1] with the short edge ``side`` (bilinear, no antialias)."""
    x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    size = short_edge_size(image.shape[:2], side)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x
