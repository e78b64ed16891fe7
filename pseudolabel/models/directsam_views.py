"""DirectSAM's views on the host: crop pyramid geometry and the checkpoint's image processor.

The part of DirectSAM's input preparation that needs no torch (numpy and PIL only), so the engine's
CPU tasks can make the network's input (``pyramid_views``) without importing torch; the batched
network side (``directsam_pyramid``) builds on it.

The pyramid follows the reference implementation (ChenDelong1999/subobjects at commit
d3b1f701169e6cc71b1dbc78c96317587b45ec2a, ``DirectSAM/utils.py``: ``generate_crop_boxes``): view 0 is
the whole image; pyramid layer L = 1..n adds ``2^L x 2^L`` crops with ``overlap`` px overlap: per side
``k = 2^L`` crops of length ``ceil((overlap * (k - 1) + size) / k)``, crop i starting at
``i * (length - overlap)``, clipped to the image (crop boxes are listed x-major, as the reference's
``product(x0s, y0s)``). Crop starts are clipped at 0 (the reference would produce negative starts for
images smaller than the overlap).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


# 2. the checkpoint's image processor ----------------------------------------------------------------

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


def per_channel(value: Any, default: Sequence[float]) -> tuple[float, float, float]:
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
    table of 256 float32 values computed with exactly the processor's numpy arithmetic (``table``; the
    device applies it: ``directsam_pyramid.pixel_values``).

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
                   mean=per_channel(config.get("image_mean"), IMAGENET_MEAN),
                   std=per_channel(config.get("image_std"), IMAGENET_STD), fast_resize=fast_resize)

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

    def resize_host(self, views: Sequence[np.ndarray]) -> np.ndarray:
        """N (h, w, 3) uint8 views -> (N, H, W, 3) uint8 resized by PIL with ``resample``."""
        from PIL import Image

        height, width = self.size
        out = np.empty((len(views), height, width, 3), np.uint8)
        for k, view in enumerate(views):
            pil = Image.fromarray(np.ascontiguousarray(view))
            out[k] = np.asarray(pil.resize((width, height), resample=self.resample))
        return out


# 3. every view of one image, resized --------------------------------------------------------------------

def hwc_uint8(image: np.ndarray) -> np.ndarray:
    """``image`` as an (H, W, 3) uint8 numpy array; ValueError for anything else."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {arr.shape} {arr.dtype}")
    return arr


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
    host = hwc_uint8(image)
    h, w = host.shape[:2]
    return pre.resize_host([crop_hwc(host, box) for box, _ in image_views(w, h, layers, overlap)])


def crop_hwc(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The (y1 - y0, x1 - x0, 3) view of an (H, W, 3) image inside box ``(x0, y0, x1, y1)`` (x1, y1
    exclusive); no copy."""
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1]
