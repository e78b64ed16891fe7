"""EVF-SAM input/output transforms, as the reference inference script does them.

- BEiT-3 input: RGB uint8 -> float in [0, 1] -> 224² bicubic (antialiased) -> (x - 0.5) / 0.5, so the
  range is [-1, 1] (bicubic may overshoot by a few hundredths at sharp edges; the reference does not clip).
- SAM-H input: longest side resized to S (PIL bicubic on uint8, SAM's rounding), SAM mean/std on the
  0-255 scale, zero padding right/bottom to S×S.
- SAM-2 input: plain S×S bilinear resize (no aspect preservation), SAM mean/std.
- Output: low-res mask logits -> logits at the original image size (SAM-H: up to S², crop the unpadded
  part, resize; SAM-2: resize directly). A pixel is in the mask where the logit is > 0.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SEMANTIC_PREFIX = "[semantic] "


def beit3_pixels(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, size, size) float32, about [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    return (x - 0.5) / 0.5


def longest_side_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide target (h', w'): scale so max(h', w') == size, rounded half up."""
    scale = size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    return (x - mean) / std


def sam_pixels(image: np.ndarray, size: int, variant: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> ((3, size, size) float32 normalised, (h', w') the unpadded resized size).

    variant "sam": longest side + pad; "sam2": plain resize (then (h', w') == (size, size)).
    """
    h, w = image.shape[:2]
    if variant == "sam":
        nh, nw = longest_side_shape(h, w, size)
        resized = np.array(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
        x = _normalize(torch.from_numpy(resized).permute(2, 0, 1).float())
        return F.pad(x, (0, size - nw, 0, size - nh)), (nh, nw)
    if variant == "sam2":
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        return _normalize(x), (size, size)
    raise ValueError(f"unknown SAM variant {variant!r}")


def masks_to_original(low_res: torch.Tensor, variant: str, size: int, resized_hw: tuple[int, int],
                      original_hw: tuple[int, int]) -> torch.Tensor:
    """(P, h, w) low-res logits -> (P, H, W) float32 logits at the original image size."""
    x = low_res[:, None].float()
    if variant == "sam":
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x[..., :resized_hw[0], :resized_hw[1]]
    return F.interpolate(x, size=tuple(original_hw), mode="bilinear", align_corners=False)[:, 0]


def prompt_text(prompt: str, semantic: bool, multitask: bool) -> str:
    """The text fed to the tokenizer: multitask checkpoints take "[semantic] " for stuff/part prompts."""
    return SEMANTIC_PREFIX + prompt if (multitask and semantic) else prompt
