"""DirectSAM boundary probabilities: preprocessing and the crop pyramid, batched in torch.

Pure tensor code: no model is loaded here. The network enters as a ``forward`` callable, so the
arithmetic can be checked with a stub that returns constant logits.

The pyramid follows the reference implementation (ChenDelong1999/subobjects, ``inference_single_image``):

- view 0 is the whole image; pyramid layer L = 1..n adds ``2^L x 2^L`` crops with ``overlap`` px
  overlap: per side ``k = 2^L`` crops of length ``ceil((overlap * (k - 1) + size) / k)``, crop i starting
  at ``i * (length - overlap)``, clipped to the image (crop boxes are listed x-major, as the reference's
  ``product(x0s, y0s)``);
- every view is resized to a ``resolution x resolution`` square (bilinear, antialiased like PIL),
  scaled to [0, 1] and ImageNet-normalised; the network's logits (1/4 resolution) are upsampled bilinearly
  (align_corners=False) to the view's own size and passed through a sigmoid;
- a crop's probability map is multiplied by 0.5 in a border band of ``2 * (overlap // 3)`` px on each of
  its four sides (corners thus get 0.25) and set to 0 in a band of ``overlap // 3`` px (60 and 30 px for
  the default overlap of 90), then added into the image's map at the crop's place;
- the sum is divided by ``layers + 1``.

Unlike the reference, which runs one crop at a time, all views of all images of a batch go through the
network together, ``batch_size`` views per forward pass; views of equal crop size are resized and
upsampled as one tensor.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: pixel_values (N, 3, R, R) float32, normalised -> logits (N, 1, r, r) (any float dtype)
Forward = Callable[[torch.Tensor], torch.Tensor]


# 1. crop geometry ---------------------------------------------------------------------------------

def crop_length(size: int, n_crops: int, overlap: int) -> int:
    """Length of each of ``n_crops`` crops covering ``size`` px with ``overlap`` px overlap."""
    return int(math.ceil((overlap * (n_crops - 1) + size) / n_crops))


def crop_boxes(width: int, height: int, layer: int, overlap: int = 90) -> list[tuple[int, int, int, int]]:
    """The ``4^layer`` crop boxes of one pyramid layer.

    Args:
        width, height: image size in px.
        layer: pyramid layer L >= 1 (``2^L`` crops per side).
        overlap: overlap between neighbouring crops in px.

    Returns:
        Boxes ``(x0, y0, x1, y1)`` in px (x1, y1 exclusive), x-major order: all y positions of the first
        column, then the next column. Starts are clipped at 0 (only matters for images smaller than
        the overlap, where the reference would produce negative starts).
    """
    if layer < 1:
        raise ValueError("pyramid layer must be >= 1")
    n = 2 ** layer
    cw, ch = crop_length(width, n, overlap), crop_length(height, n, overlap)
    x0s = [max(0, (cw - overlap) * i) for i in range(n)]
    y0s = [max(0, (ch - overlap) * i) for i in range(n)]
    return [(x0, y0, min(x0 + cw, width), min(y0 + ch, height)) for x0, y0 in product(x0s, y0s)]


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


def image_views(width: int, height: int, layers: int, overlap: int = 90) -> list[tuple[tuple[int, int, int, int], bool]]:
    """All views of one image: the whole image, then every crop of layers 1..``layers``.

    Returns:
        list of ``(box_xyxy, is_crop)``; the first entry is ``((0, 0, width, height), False)``.
    """
    views = [((0, 0, width, height), False)]
    for layer in range(1, layers + 1):
        views += [(box, True) for box in crop_boxes(width, height, layer, overlap)]
    return views


# 2. preprocessing ---------------------------------------------------------------------------------

def resize_uint8(crops: torch.Tensor, resolution: int, uint8_kernel: bool | None = None) -> torch.Tensor:
    """Resize a stack of uint8 crops to a square like PIL's antialiased bilinear resize.

    Args:
        crops: (N, 3, h, w) uint8.
        resolution: output side R.
        uint8_kernel: use torch's uint8 kernel (which follows PIL's fixed-point arithmetic; CPU only)
            or a float resize rounded to integers (at most one grey level off PIL); None = uint8 on CPU.

    Returns:
        (N, 3, R, R) float32 with integer values in [0, 255] (as PIL would round them).
    """
    size = (resolution, resolution)
    if uint8_kernel is None:
        uint8_kernel = crops.device.type == "cpu"
    if uint8_kernel:
        return F.interpolate(crops.contiguous(), size=size, mode="bilinear", antialias=True,
                             align_corners=False).float()
    out = F.interpolate(crops.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)


def normalize(pixels: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              rescale: float = 1 / 255) -> torch.Tensor:
    """(N, 3, R, R) float pixels in [0, 255] -> ``(x * rescale - mean) / std``, float32."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels * rescale - m) / s


def preprocess(images: Sequence[np.ndarray | torch.Tensor], resolution: int, device: str | torch.device = "cpu",
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Whole images -> the network's input, as the Segformer image processor makes it.

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
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {arr.shape} {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return t.to(device, non_blocking=True)


# 3. the batched pyramid ---------------------------------------------------------------------------

def pyramid_probs(images: Sequence[np.ndarray | torch.Tensor], forward: Forward, resolution: int, layers: int = 0,
                  overlap: int = 90, batch_size: int = 8, device: str | torch.device = "cpu",
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> list[torch.Tensor]:
    """Boundary probability maps of a batch of images, pyramid included.

    Args:
        images: N images, (H, W, 3) uint8 RGB arrays or (3, H, W) uint8 tensors; sizes may differ.
        forward: the network, ``(B, 3, R, R) float32 normalised -> (B, 1, r, r) logits``.
        resolution: square side R every view is resized to.
        layers: pyramid layers (0 = the whole image only).
        overlap: crop overlap in px (the border bands are derived from it).
        batch_size: views per forward pass (views of all images are mixed).
        device: where preprocessing, the network and the accumulation run.

    Returns:
        N tensors (H, W) float32 in [0, 1] on ``device``.
    """
    # 1. every view of every image, sorted by crop size so equal sizes share resize/upsample calls
    tensors = [as_chw_uint8(img, device) for img in images]
    sums = [torch.zeros(t.shape[1], t.shape[2], dtype=torch.float32, device=device) for t in tensors]
    views = []
    for i, t in enumerate(tensors):
        h, w = int(t.shape[1]), int(t.shape[2])
        views += [(i, box, is_crop) for box, is_crop in image_views(w, h, layers, overlap)]
    views.sort(key=lambda v: (v[1][3] - v[1][1], v[1][2] - v[1][0]))
    weight_cache: dict[tuple[int, int], torch.Tensor] = {}

    for start in range(0, len(views), batch_size):
        chunk = views[start:start + batch_size]
        groups = _group_by_size(chunk)
        # 2. crop + resize + normalise, one call per crop size
        pixels = torch.cat([
            normalize(resize_uint8(torch.stack([_crop(tensors[i], box) for i, box, _ in members]), resolution),
                      mean, std)
            for (_, _), members in groups])
        # 3. one forward pass for the whole chunk
        logits = forward(pixels).float()
        # 4. upsample per crop size, sigmoid, border weights, accumulate
        offset = 0
        for (h, w), members in groups:
            part = logits[offset:offset + len(members)]
            offset += len(members)
            probs = torch.sigmoid(F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False))[:, 0]
            for k, (i, (x0, y0, x1, y1), is_crop) in enumerate(members):
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


def _group_by_size(views):
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
