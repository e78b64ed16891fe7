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

Where each step runs. The reference prepares both inputs on the host; so does ``prepare_inputs`` (the
labeler's ``prepare``), with every resize done exactly as above. What it leaves to the device
(``device_sam_pixels``) is exact there too: SAM's mean/std (an IEEE float32 subtract and divide per
element, the same bits on any device) and the zero padding. So the host ships the resized uint8 image
wherever the reference resizes uint8 (SAM-H, multitask SAM-2), and float32 where it resizes in float:
the BEiT-3 input, and the original SAM-2 stretch, which comes after the normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pseudolabel.models.device import to_device

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SEMANTIC_PREFIX = "[semantic] "


@dataclass(frozen=True)
class InputShape:
    """What decides a checkpoint's network inputs (from its config.json, and multitask or not).

    variant: "sam" (SAM-H) or "sam2"; sam_size: S, the side of the square SAM input; beit_size: the
    BEiT-3 input side (224); multitask: which SAM-2 input (straight resize, or longest side then a
    stretch); SAM-H inputs do not depend on it.
    """

    variant: str
    sam_size: int
    beit_size: int
    multitask: bool


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
    """(3, h, w) on the 0-255 scale (any dtype, any device) -> float32 with SAM's mean/std, on x's device
    (elementwise IEEE float32: the same bits on every device)."""
    mean = torch.tensor(SAM_PIXEL_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=x.device).view(3, 1, 1)
    return (x.float() - mean) / std


def resize_longest_side(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h', w', 3) uint8 with max(h', w') == size: PIL bilinear (SAM's ResizeLongestSide)."""
    h, w = image.shape[:2]
    nh, nw = longest_side_shape(h, w, size)
    return np.array(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))


def _bilinear_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, h, w) -> (3, size, size), torch bilinear (align_corners=False) in the input's dtype."""
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def sam_prepare(image: np.ndarray, size: int, variant: str, multitask: bool = True) -> dict[str, np.ndarray]:
    """Host half of the SAM input: (H, W, 3) uint8 RGB -> the arrays ``device_sam_pixels`` finishes.

    Returns ``hw``: (2,) int64, (h', w') the unpadded resized size ((S, S) for SAM-2), and either
    ``sam_image``: (h', w', 3) uint8, the resized image still to normalise (SAM-H: longest side to S,
    PIL; multitask SAM-2: straight to S×S, torch bilinear on uint8), or ``sam_pixels``: (3, S, S)
    float32, normalised and stretched (original SAM-2: its stretch follows the normalisation, in float).
    """
    if variant == "sam":
        resized = resize_longest_side(image, size)
        return {"sam_image": resized, "hw": np.asarray(resized.shape[:2], np.int64)}
    if variant != "sam2":
        raise ValueError(f"unknown SAM variant {variant!r}")
    hw = np.asarray((size, size), np.int64)
    if multitask:
        straight = _bilinear_square(_chw(image), size).permute(1, 2, 0).contiguous()
        return {"sam_image": straight.numpy(), "hw": hw}
    stretched = _bilinear_square(_normalize(_chw(resize_longest_side(image, size))), size)
    return {"sam_pixels": stretched.numpy(), "hw": hw}


def device_sam_pixels(prepared: dict[str, np.ndarray], size: int, device: str | torch.device) -> torch.Tensor:
    """Device half of the SAM input: ``sam_prepare``'s arrays -> (3, size, size) float32 on ``device``.

    ``sam_image`` is copied as uint8, normalised with SAM's mean/std and zero-padded right/bottom to
    size² (nothing to pad for SAM-2); ``sam_pixels`` is copied as it is.
    """
    if "sam_pixels" in prepared:
        return to_device(prepared["sam_pixels"], device)
    x = _normalize(to_device(prepared["sam_image"], device).permute(2, 0, 1))
    h, w = x.shape[-2:]
    return F.pad(x, (0, size - w, 0, size - h))


def sam_pixels(image: np.ndarray, size: int, variant: str,
               multitask: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> ((3, size, size) float32 normalised, (h', w') the unpadded resized size),
    both halves on the CPU.

    variant "sam": longest side + pad. "sam2" (then (h', w') == (size, size)): ``multitask`` checkpoints
    resize the uint8 image straight to size², the original ones go through the longest-side resize first.
    """
    prepared = sam_prepare(image, size, variant, multitask)
    h, w = (int(v) for v in prepared["hw"])
    return device_sam_pixels(prepared, size, "cpu"), (h, w)


def prepare_inputs(image: np.ndarray, shape: InputShape) -> dict[str, np.ndarray]:
    """Both network inputs of one (H, W, 3) uint8 RGB image, made on the host (the labeler's ``prepare``).

    Returns ``sam_prepare``'s arrays (``hw`` and ``sam_image`` or ``sam_pixels``) and ``beit``:
    (3, b, b) float32, ``beit3_pixels`` (b = ``shape.beit_size``).
    """
    out = sam_prepare(image, shape.sam_size, shape.variant, shape.multitask)
    out["beit"] = beit3_pixels(image, shape.beit_size).numpy()
    return out


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
