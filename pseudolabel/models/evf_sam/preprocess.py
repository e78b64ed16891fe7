"""EVF-SAM input/output transforms, as the reference inference script does them.

- BEiT-3 input: RGB uint8 -> float in [0, 1] -> 224² bicubic (no antialiasing: torchvision's tensor
  resize with ``antialias=None``) -> (x - 0.5) / 0.5, so the range is about [-1, 1] (bicubic may
  overshoot a little at sharp edges; the reference does not clip).
- SAM-H input: longest side resized to S (PIL bilinear on uint8, as torchvision's ``resize`` of a PIL
  image with its default interpolation; SAM's rounding), SAM mean/std on the 0-255 scale, zero padding
  right/bottom to S×S.
- SAM-2 input, two reference revisions (the README pairs the multitask checkpoints with the newer one):
  multitask checkpoints (inference.py from 9d00853 on): the uint8 image resized straight to S×S (torch
  bilinear on the uint8 tensor), then SAM mean/std; the original EVF-SAM2 checkpoints (inference.py at
  781bee0): the SAM-H longest-side resize, SAM mean/std, then a float bilinear stretch to S×S. Neither
  keeps the aspect ratio.
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


def _chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def beit3_pixels(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, size, size) float32, about [-1, 1]."""
    x = _chw(image).float().div_(255.0)
    x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=False)[0]
    return (x - 0.5) / 0.5


def longest_side_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide target (h', w'): scale so max(h', w') == size, rounded half up."""
    scale = size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """(3, h, w) on the 0-255 scale (any dtype) -> float32 with SAM's mean/std."""
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    return (x.float() - mean) / std


def resize_longest_side(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h', w', 3) uint8 with max(h', w') == size: PIL bilinear (SAM's ResizeLongestSide)."""
    h, w = image.shape[:2]
    nh, nw = longest_side_shape(h, w, size)
    return np.array(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))


def _bilinear_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, h, w) -> (3, size, size), torch bilinear (align_corners=False) in the input's dtype."""
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def sam_pixels(image: np.ndarray, size: int, variant: str,
               multitask: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> ((3, size, size) float32 normalised, (h', w') the unpadded resized size).

    variant "sam": longest side + pad. "sam2" (then (h', w') == (size, size)): ``multitask`` checkpoints
    resize the uint8 image straight to size², the original ones go through the longest-side resize first.
    """
    if variant == "sam":
        resized = resize_longest_side(image, size)
        nh, nw = resized.shape[:2]
        return F.pad(_normalize(_chw(resized)), (0, size - nw, 0, size - nh)), (nh, nw)
    if variant == "sam2":
        if multitask:
            return _normalize(_bilinear_square(_chw(image), size)), (size, size)
        return _bilinear_square(_normalize(_chw(resize_longest_side(image, size))), size), (size, size)
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
