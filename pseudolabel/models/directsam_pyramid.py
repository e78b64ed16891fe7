"""DirectSAM boundary probabilities: the crop pyramid, batched in torch.

Pure tensor code: no model is loaded here. The network enters as a ``forward`` callable, so the
arithmetic can be checked with a stub that returns constant logits. The views themselves (crop
geometry, the checkpoint's image processor, the PIL resize) are made by ``directsam_views``, which
imports no torch.

The pyramid follows the reference implementation (ChenDelong1999/subobjects at commit
d3b1f701169e6cc71b1dbc78c96317587b45ec2a, ``DirectSAM/utils.py``: ``boundary_zero_padding``,
``inference_single_image``):

- every view (``directsam_views.image_views``) goes through the checkpoint's image processor
  (``Preprocessing``: resize to its size with its resample filter through PIL, rescale, normalise, each
  step as the checkpoint's ``preprocessor_config.json`` says); the network's logits (1/4 resolution)
  are upsampled bilinearly (align_corners=False) to the view's own size and passed through a sigmoid;
- a crop's probability map is multiplied by 0.5 in a border band of ``2 * (overlap // 3)`` px on each of
  its four sides (corners thus get 0.25) and set to 0 in a band of ``overlap // 3`` px (60 and 30 px for
  the default overlap of 90), then added into the image's map at the crop's place;
- the sum is divided by ``layers + 1``.

Unlike the reference, which runs one crop at a time, all views of all images of a batch go through the
network together, ``batch_size`` views per forward pass; views of equal crop size are normalised and
upsampled as one tensor.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pseudolabel.models.device import channel_lookup
from pseudolabel.models.directsam_views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCH_MODES,
    Preprocessing,
    crop_boxes,
    crop_hwc,
    hwc_uint8,
    image_views,
    per_channel,
)

#: pixel_values (N, 3, R, R) float32, normalised -> logits (N, 1, r, r) (any float dtype)
Forward = Callable[[torch.Tensor], torch.Tensor]


# 1. crop border weights ---------------------------------------------------------------------------------

def border_weights(height: int, width: int, overlap: int = 90, device: str | torch.device = "cpu") -> torch.Tensor:
    """Weight map a crop's probabilities are multiplied by before they are added in.

    0.5 in a band of ``2 * (overlap // 3)`` px along each side (applied once per side, so corners and
    bands of thin crops are halved twice), then 0 in a band of ``overlap // 3`` px.

    Returns:
        (height, width) float32 in {0, 0.25, 0.5, 1} (0.125/0.0625 only for crops thinner than the bands).
    """
    zero = overlap // 3
    half = 2 * zero
    w = torch.ones(height, width, dtype=torch.float32, device=device)
    if half > 0:
        w[:, :half] *= 0.5
        w[:, -half:] *= 0.5
        w[:half, :] *= 0.5
        w[-half:, :] *= 0.5
    if zero > 0:
        w[:, :zero] = 0
        w[:, -zero:] = 0
        w[:zero, :] = 0
        w[-zero:, :] = 0
    return w


# 2. preprocessing ---------------------------------------------------------------------------------

def resize_uint8(crops: torch.Tensor, resolution: int | tuple[int, int], uint8_kernel: bool | None = None,
                 mode: str = "bilinear") -> torch.Tensor:
    """Resize a stack of uint8 crops with torch's antialiased kernels (close to PIL, not equal).

    Args:
        crops: (N, 3, h, w) uint8.
        resolution: output side R, or (height, width).
        uint8_kernel: use torch's uint8 kernel (CPU only) or a float resize rounded to integers;
            None = uint8 on CPU for bilinear. Both differ from PIL by one grey level on some values
            (``Preprocessing`` with ``fast_resize=False`` is the exact path).
        mode: ``"bilinear"`` or ``"bicubic"``.

    Returns:
        (N, 3, H', W') float32 with integer values in [0, 255].
    """
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if uint8_kernel is None:
        uint8_kernel = crops.device.type == "cpu" and mode == "bilinear"
    if uint8_kernel:
        return F.interpolate(crops.contiguous(), size=size, mode=mode, antialias=True,
                             align_corners=False).float()
    out = F.interpolate(crops.float(), size=size, mode=mode, antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)


def normalize(pixels: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              rescale: float = 1 / 255) -> torch.Tensor:
    """(N, 3, R, R) float pixels in [0, 255] -> ``(x * rescale - mean) / std``, float32."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels * rescale - m) / s


def preprocess(images: Sequence[np.ndarray | torch.Tensor], resolution: int, device: str | torch.device = "cpu",
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Whole images -> a backbone's input: torch's antialiased bilinear resize (uint8 kernel), 1/255,
    ``mean``/``std``. Close to an image processor's output, not equal to it; the DirectSAM network's
    input is made by ``Preprocessing`` instead. Used for the token-embedding backbone.

    Args:
        images: N arrays (H, W, 3) uint8 RGB (or (3, H, W) uint8 tensors), sizes may differ.
        resolution: square side R.

    Returns:
        (N, 3, R, R) float32 normalised pixel values on ``device``.
    """
    out = []
    for img in images:
        t = as_chw_uint8(img, device)
        out.append(normalize(resize_uint8(t[None], resolution), mean, std))
    return torch.cat(out) if out else torch.zeros(0, 3, resolution, resolution, device=device)


def as_chw_uint8(image: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 numpy array or (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor on ``device``."""
    if isinstance(image, torch.Tensor):
        t = image
    else:
        t = torch.from_numpy(np.ascontiguousarray(hwc_uint8(image))).permute(2, 0, 1)
    return t.to(device, non_blocking=True)


def pixel_values(pre: Preprocessing, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 (or integer-valued float) views resized by ``pre`` -> float32 network input
    (``pre``'s rescale and normalise, as its per-channel table, on the pixels' device)."""
    return channel_lookup(pre.table(), pixels)


def device_views(pre: Preprocessing, crops: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) uint8 crops of one size, on their device -> (N, 3, H, W) float32 network input,
    resized by torch (the ``fast_resize`` path)."""
    return pixel_values(pre, resize_uint8(crops, pre.size, mode=TORCH_MODES[pre.resample]))


def as_hwc_numpy(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 numpy array or (3, H, W) uint8 tensor -> (H, W, 3) uint8 numpy array (host)."""
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().permute(1, 2, 0).numpy()
    return hwc_uint8(image)


# 3. the batched pyramid ---------------------------------------------------------------------------

def pyramid_probs(images: Sequence[np.ndarray | torch.Tensor], forward: Forward, resolution: int | Preprocessing,
                  layers: int = 0, overlap: int = 90, batch_size: int = 8, device: str | torch.device = "cpu",
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  resized: Sequence[np.ndarray] | None = None,
                  to_device: Callable[[np.ndarray, Any], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Boundary probability maps of a batch of images, pyramid included.

    Args:
        images: N images, (H, W, 3) uint8 RGB arrays or (3, H, W) uint8 tensors; sizes may differ.
        forward: the network, ``(B, 3, R, R) float32 normalised -> (B, 1, r, r) logits``.
        resolution: the checkpoint's ``Preprocessing``, or a square side R (then the Segformer
            processor's defaults: PIL bilinear, 1/255, ``mean``/``std``).
        layers: pyramid layers (0 = the whole image only).
        overlap: crop overlap in px (the border bands are derived from it).
        batch_size: views per forward pass (views of all images are mixed).
        device: where the network and the accumulation run (and the resize with ``fast_resize``).
        resized: per image, its views already resized on the host (``pyramid_views``: (V, R, R', 3)
            uint8 in ``image_views`` order), e.g. by the engine's CPU tasks; None: resized here.
            Ignored with ``fast_resize``.
        to_device: how a host uint8 array reaches ``device`` (default ``torch.from_numpy(...).to``;
            the labelers pass pinned, non-blocking copies).

    Returns:
        N tensors (H, W) float32 in [0, 1] on ``device``.
    """
    pre = resolution if isinstance(resolution, Preprocessing) else Preprocessing(
        size=(int(resolution), int(resolution)), mean=per_channel(mean, IMAGENET_MEAN),
        std=per_channel(std, IMAGENET_STD))
    # 1. every view of every image, sorted by crop size so equal sizes share upsample calls
    if pre.fast_resize:
        tensors = [as_chw_uint8(img, device) for img in images]
        shapes = [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
    else:
        hosts = [as_hwc_numpy(img) for img in images]
        shapes = [a.shape[:2] for a in hosts]
    move = to_device or (lambda array, dev: torch.from_numpy(np.ascontiguousarray(array)).to(dev))
    sums = [torch.zeros(h, w, dtype=torch.float32, device=device) for h, w in shapes]
    views = []  # (image, box, is_crop, position among the image's views)
    for i, (h, w) in enumerate(shapes):
        views += [(i, box, is_crop, k) for k, (box, is_crop) in enumerate(image_views(w, h, layers, overlap))]
    if resized is not None and not pre.fast_resize:
        if len(resized) != len(images):
            raise ValueError(f"{len(resized)} resized view stacks for {len(images)} images")
        for i, (h, w) in enumerate(shapes):
            want = (len(image_views(w, h, layers, overlap)), *pre.size, 3)
            if tuple(resized[i].shape) != want or resized[i].dtype != np.uint8:
                raise ValueError(f"image {i}: resized views {resized[i].shape} {resized[i].dtype}, expected "
                                 f"{want} uint8")
    views.sort(key=lambda v: (v[1][3] - v[1][1], v[1][2] - v[1][0]))
    weight_cache: dict[tuple[int, int], torch.Tensor] = {}

    for start in range(0, len(views), batch_size):
        chunk = views[start:start + batch_size]
        groups = _group_by_size(chunk)
        # 2. crop + resize + rescale/normalise, as the checkpoint's image processor does
        if pre.fast_resize:
            pixels = torch.cat([device_views(pre, torch.stack([_crop(tensors[i], box) for i, box, _, _ in members]))
                                for _, members in groups])
        else:
            if resized is not None:
                stack = np.stack([resized[i][k] for _, members in groups for i, _, _, k in members])
            else:
                stack = pre.resize_host([crop_hwc(hosts[i], box) for _, members in groups for i, box, _, _ in members])
            pixels = pixel_values(pre, move(stack, device).permute(0, 3, 1, 2))
        # 3. one forward pass for the whole chunk
        logits = forward(pixels).float()
        # 4. upsample per crop size, sigmoid, border weights, accumulate
        offset = 0
        for (h, w), members in groups:
            part = logits[offset:offset + len(members)]
            offset += len(members)
            probs = torch.sigmoid(F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False))[:, 0]
            for k, (i, (x0, y0, x1, y1), is_crop, _) in enumerate(members):
                p = probs[k]
                if is_crop:
                    if (h, w) not in weight_cache:
                        weight_cache[(h, w)] = border_weights(h, w, overlap, device)
                    p = p * weight_cache[(h, w)]
                sums[i][y0:y1, x0:x1] += p
    # 5. average over the layers
    return [s / (layers + 1) for s in sums]


def _crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    x0, y0, x1, y1 = box
    return image[:, y0:y1, x0:x1]


def _group_by_size(views: Sequence[Any]) -> list[tuple[tuple[int, int], list]]:
    """Views (each with its (x0, y0, x1, y1) crop box second) grouped by crop (height, width)."""
    groups: dict[tuple[int, int], list] = {}
    for v in views:
        x0, y0, x1, y1 = v[1]
        groups.setdefault((y1 - y0, x1 - x0), []).append(v)
    return list(groups.items())


# 4. the reference's one-view-at-a-time form (for checks and benchmarks) -----------------------------

def reference_pyramid_probs(image: np.ndarray, image_processor, model, resolution: int, layers: int = 0,
                            overlap: int = 90) -> np.ndarray:
    """One image, one crop per forward pass, preprocessing by ``image_processor`` (PIL), numpy accumulation.

    The unbatched formulation of the reference implementation, kept to check :func:`pyramid_probs`
    against and to benchmark the speed-up of batching.

    Args:
        image: (H, W, 3) uint8 RGB.
        image_processor: a Segformer image processor (its ``size`` is overridden by ``resolution``).
        model: SegformerForSemanticSegmentation with num_labels=1.

    Returns:
        (H, W) float32 in [0, 1].
    """
    from PIL import Image

    pil = Image.fromarray(image)
    size = {"height": resolution, "width": resolution}

    def run(view: Image.Image, crop: bool) -> np.ndarray:
        pixel_values = image_processor(view, size=size, return_tensors="pt").pixel_values
        with torch.inference_mode():
            logits = model(pixel_values=pixel_values.to(model.device, model.dtype)).logits.float().cpu()
        up = F.interpolate(logits, size=(view.size[1], view.size[0]), mode="bilinear", align_corners=False)
        probs = torch.sigmoid(up)[0, 0].numpy()
        if crop:
            probs = probs * border_weights(probs.shape[0], probs.shape[1], overlap).numpy()
        return probs

    total = run(pil, False)
    for layer in range(1, layers + 1):
        for x0, y0, x1, y1 in crop_boxes(pil.size[0], pil.size[1], layer, overlap):
            total[y0:y1, x0:x1] += run(pil.crop((x0, y0, x1, y1)), True)
    return total / (layers + 1)
