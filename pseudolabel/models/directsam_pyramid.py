"""DirectSAM boundary probabilities: preprocessing and the crop pyramid, batched in torch.

Pure tensor code: no model is loaded here. The network enters as a ``forward`` callable, so the
arithmetic can be checked with a stub that returns constant logits.

The pyramid follows the reference implementation (ChenDelong1999/subobjects at commit
d3b1f701169e6cc71b1dbc78c96317587b45ec2a, ``DirectSAM/utils.py``: ``generate_crop_boxes``,
``boundary_zero_padding``, ``inference_single_image``):

- view 0 is the whole image; pyramid layer L = 1..n adds ``2^L x 2^L`` crops with ``overlap`` px
  overlap: per side ``k = 2^L`` crops of length ``ceil((overlap * (k - 1) + size) / k)``, crop i starting
  at ``i * (length - overlap)``, clipped to the image (crop boxes are listed x-major, as the reference's
  ``product(x0s, y0s)``);
- every view goes through the checkpoint's image processor (``Preprocessing``: resize to its size with
  its resample filter through PIL, rescale, normalise, each step as the checkpoint's
  ``preprocessor_config.json`` says); the network's logits (1/4 resolution) are upsampled bilinearly
  (align_corners=False) to the view's own size and passed through a sigmoid;
- a crop's probability map is multiplied by 0.5 in a border band of ``2 * (overlap // 3)`` px on each of
  its four sides (corners thus get 0.25) and set to 0 in a band of ``overlap // 3`` px (60 and 30 px for
  the default overlap of 90), then added into the image's map at the crop's place;
- the sum is divided by ``layers + 1``.

Unlike the reference, which runs one crop at a time, all views of all images of a batch go through the
network together, ``batch_size`` views per forward pass; views of equal crop size are normalised and
upsampled as one tensor. Crop starts are clipped at 0 (the reference would produce negative starts
for images smaller than the overlap).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pseudolabel.models.device import channel_lookup

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


def image_views(width: int, height: int, layers: int,
                overlap: int = 90) -> list[tuple[tuple[int, int, int, int], bool]]:
    """All views of one image: the whole image, then every crop of layers 1..``layers``.

    Returns:
        list of ``(box_xyxy, is_crop)``; the first entry is ``((0, 0, width, height), False)``.
    """
    views = [((0, 0, width, height), False)]
    for layer in range(1, layers + 1):
        views += [(box, True) for box in crop_boxes(width, height, layer, overlap)]
    return views


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
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {arr.shape} {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return t.to(device, non_blocking=True)


#: PIL resampling filters by the numbers image-processor configs store (``PIL.Image.Resampling``)
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
#: the filters torch has an antialiased kernel for (the ``fast_resize`` path)
TORCH_MODES = {2: "bilinear", 3: "bicubic"}
BILINEAR = 2


def parse_resample(value: Any) -> int:
    """A config's ``resample`` (PIL filter number or name, None = bilinear) -> the PIL filter number."""
    if value is None:
        return BILINEAR
    if isinstance(value, str):
        names = {v: k for k, v in PIL_FILTERS.items()}
        key = value.strip().lower().rsplit(".", 1)[-1]
        if key in names:
            return names[key]
    elif isinstance(value, (int, np.integer)) and int(value) in PIL_FILTERS:
        return int(value)
    raise ValueError(f"unknown resample filter {value!r}; known: "
                     + ", ".join(f"{k} ({v})" for k, v in PIL_FILTERS.items()))


def _three(value: Any, default: Sequence[float]) -> tuple[float, float, float]:
    """Per-channel values: a config's scalar or 3-sequence, or ``default`` when it is None."""
    if value is None:
        value = default
    if isinstance(value, (int, float)):
        return float(value), float(value), float(value)
    values = [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel values, got {list(value)}")
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class Preprocessing:
    """How a view becomes the network's input: the checkpoint's image processor, step by step.

    Equal, value for value, to transformers' ``SegformerImageProcessorPil`` with the same settings (the
    PIL-based Segformer processor; the reference preprocesses every view with the checkpoint's image
    processor, which resized with PIL):

    1. resize to ``size`` (height, width) with PIL's ``resample`` filter on the uint8 RGB view
       (``Image.resize``, no reducing gap);
    2. ``do_rescale``: ``float32(float64(x) * rescale_factor)``;
    3. ``do_normalize``: ``(x - mean) / std`` in float32.

    Steps 2 and 3 depend on the uint8 value and the channel only, so they are applied as a per-channel
    table of 256 float32 values computed with exactly the processor's numpy arithmetic.

    ``fast_resize`` replaces step 1 with torch's antialiased kernel on the device (bilinear or bicubic
    only): no host resize, but not equal to PIL (one grey level apart on some values).
    """

    size: tuple[int, int]
    resample: int = BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fast_resize: bool = False

    def __post_init__(self):
        if self.resample not in PIL_FILTERS:
            raise ValueError(f"unknown resample filter {self.resample!r}")
        if self.fast_resize and self.resample not in TORCH_MODES:
            raise ValueError(f"fast_resize has no torch kernel for the checkpoint's resample filter "
                             f"{self.resample} ({PIL_FILTERS[self.resample]}); only bilinear and bicubic")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], resolution: int | None = None, default_resolution: int = 512,
                    fast_resize: bool = False) -> "Preprocessing":
        """From a ``preprocessor_config.json`` dict; settings it lacks take the Segformer processor's
        defaults (bilinear, rescale by 1/255, ImageNet mean/std).

        Args:
            config: the checkpoint's processor config ({} = all defaults).
            resolution: square side that overrides the config's size (as the reference's
                ``resolution`` argument sets ``size["height"]`` and ``size["width"]``); None = the config's.
            default_resolution: square side when neither gives one.
            fast_resize: see the class docstring.

        Raises:
            ValueError: ``do_resize: false`` (every view would reach the network at its own size, which
                the batched pyramid does not do) or an unknown resample filter.
        """
        if config.get("do_resize", True) is False:
            raise ValueError("the checkpoint's image processor has do_resize: false (views at their own size); "
                             "the pyramid feeds the network one input size: set do_resize: true")
        cfg_size = config.get("size") or {}
        if resolution:
            size = (int(resolution), int(resolution))
        elif isinstance(cfg_size, Mapping) and cfg_size.get("height") and cfg_size.get("width"):
            size = (int(cfg_size["height"]), int(cfg_size["width"]))
        elif isinstance(cfg_size, int):
            size = (cfg_size, cfg_size)
        else:
            size = (int(default_resolution), int(default_resolution))
        factor = config.get("rescale_factor")
        return cls(size=size, resample=parse_resample(config.get("resample")),
                   do_rescale=config.get("do_rescale") is not False,
                   rescale_factor=float(1 / 255 if factor is None else factor),
                   do_normalize=config.get("do_normalize") is not False,
                   mean=_three(config.get("image_mean"), IMAGENET_MEAN),
                   std=_three(config.get("image_std"), IMAGENET_STD), fast_resize=fast_resize)

    def table(self) -> np.ndarray:
        """(3, 256) float32: the network input for each uint8 value of each channel (steps 2 and 3)."""
        out = []
        for c in range(3):
            x: np.ndarray = np.arange(256, dtype=np.uint8)
            if self.do_rescale:
                x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
            x = x.astype(np.float32)
            if self.do_normalize:
                x = (x - np.array(self.mean[c], np.float32)) / np.array(self.std[c], np.float32)
            out.append(x.astype(np.float32))
        return np.stack(out)

    def values(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 (or integer-valued float) resized views -> float32 network input."""
        return channel_lookup(self.table(), pixels)

    def resize_host(self, views: Sequence[np.ndarray]) -> np.ndarray:
        """N (h, w, 3) uint8 views -> (N, H, W, 3) uint8 resized by PIL with ``resample``."""
        from PIL import Image

        height, width = self.size
        out = np.empty((len(views), height, width, 3), np.uint8)
        for k, view in enumerate(views):
            pil = Image.fromarray(np.ascontiguousarray(view))
            out[k] = np.asarray(pil.resize((width, height), resample=self.resample))
        return out

    def host_views(self, views: Sequence[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
        """N (h, w, 3) uint8 views (sizes may differ) -> (N, 3, H, W) float32 network input on ``device``
        (PIL resize on the host, the uint8 result moved, the table applied there)."""
        resized = torch.from_numpy(self.resize_host(views)).to(device)
        return self.values(resized.permute(0, 3, 1, 2))

    def device_views(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) uint8 crops of one size, on their device -> (N, 3, H, W) float32 network input,
        resized by torch (the ``fast_resize`` path)."""
        return self.values(resize_uint8(crops, self.size, mode=TORCH_MODES[self.resample]))

    def __call__(self, images: Sequence[np.ndarray | torch.Tensor], device: str | torch.device = "cpu") -> torch.Tensor:
        """Whole images, (H, W, 3) uint8 arrays or (3, H, W) uint8 tensors -> (N, 3, H', W') float32."""
        if not images:
            return torch.zeros(0, 3, *self.size, device=device)
        if self.fast_resize:
            return torch.cat([self.device_views(as_chw_uint8(img, device)[None]) for img in images])
        return self.host_views([as_hwc_numpy(img) for img in images], device)


def as_hwc_numpy(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 numpy array or (3, H, W) uint8 tensor -> (H, W, 3) uint8 numpy array (host)."""
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {arr.shape} {arr.dtype}")
    return arr


# 3. the batched pyramid ---------------------------------------------------------------------------

def pyramid_views(image: np.ndarray, pre: Preprocessing, layers: int = 0, overlap: int = 90) -> np.ndarray:
    """Every view of one image resized by the image processor, on the host (what ``pyramid_probs`` feeds
    the network when it is handed them as ``resized``).

    Args:
        image: (H, W, 3) uint8 RGB.
        pre: the checkpoint's ``Preprocessing`` (its PIL resize; ``fast_resize`` is not used here).

    Returns:
        (V, R, R', 3) uint8: the whole image, then each crop of layers 1..``layers``, in ``image_views``
        order, resized to ``pre.size`` (height R, width R').
    """
    host = as_hwc_numpy(image)
    h, w = host.shape[:2]
    return pre.resize_host([_crop_hwc(host, box) for box, _ in image_views(w, h, layers, overlap)])


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
        size=(int(resolution), int(resolution)), mean=_three(mean, IMAGENET_MEAN), std=_three(std, IMAGENET_STD))
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
            pixels = torch.cat([pre.device_views(torch.stack([_crop(tensors[i], box) for i, box, _, _ in members]))
                                for _, members in groups])
        else:
            if resized is not None:
                stack = np.stack([resized[i][k] for _, members in groups for i, _, _, k in members])
            else:
                stack = pre.resize_host([_crop_hwc(hosts[i], box) for _, members in groups for i, box, _, _ in members])
            pixels = pre.values(move(stack, device).permute(0, 3, 1, 2))
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


def _crop_hwc(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1]


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
