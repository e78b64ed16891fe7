"""Synthetic demo dataset: textured shapes on textured backgrounds, with ground truth.

Every image shows 1-4 shapes of the categories in ``CATEGORIES`` on a textured background; some
shapes cast a shadow (a darkened, offset copy of their silhouette) and some images carry a
semi-transparent watermark (text or a logo). The ground truth covers instance masks, a semantic
label map, the clean image (no shadow, no watermark) and the shadow/watermark component masks.

Two layers:

1. Pure rendering functions that work in memory (``render_scene``, ``render_index``,
   ``render_background``, ``paint_shape``, ``add_shadow``, ``add_watermark``). Images are (H, W, 3)
   uint8 RGB; masks are (H, W) or (N, H, W) bool. Callers can paste the same component type on two
   different backgrounds (``add_shadow`` / ``add_watermark`` on any image).
2. ``generate`` writes a sharded dataset through ``pseudolabel.storage`` (local paths or s3://).

Written layout (``OUT`` = ``out_uri``; ``KEY`` = ``demo_<index:06d>``; ``REL`` = the image's
``file_name``, which is also the ``file_name`` the engine's input listing gives that image):

- images, one of three layouts:
  - ``folder``: ``OUT/images/REL`` with REL = ``<shard:05d>/KEY.png`` (path relative to OUT/images);
  - ``webdataset``: ``OUT/images/shard-<k:05d>.tar`` with members ``KEY.png`` and ``KEY.json``
    (``{"id", "image_id", "file_name", "width", "height"}``); REL = ``shard-<k:05d>.tar/KEY.png``;
  - ``parquet``: ``OUT/images/part-<k:05d>.parquet`` with columns ``image_id`` (string, the COCO id),
    ``image`` (struct ``{bytes: binary, path: string}``) and ``file_name`` (string, REL =
    ``<shard:05d>/KEY.png``);
- ``OUT/annotations/instances.json``: COCO instances with ``file_name`` = REL; image ``id`` =
  index + 1; annotation ``id`` = image id * 100 + k (k = 1..4); compressed RLE segmentations with
  str ``counts``;
- ``OUT/annotations/components.json``: per image the components present (``shadow``,
  ``watermark``) and their masks as RLE;
- ``OUT/clean/REL``: the clean image; ``OUT/semantic/REL``: (H, W) uint8 PNG, 0 = background,
  k = category id.

Determinism: image ``index`` of a dataset with seed ``seed`` is rendered from
``numpy.random.default_rng(SeedSequence([seed, index]))``, so any subset renders identically.
"""
from __future__ import annotations

import io
import json
import posixpath
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pseudolabel import storage as st
from pseudolabel.imageio import decode_png, encode_png  # noqa: F401  (re-exported for callers)
from pseudolabel.schemas.coco import mask_to_rle, masks_to_rles, rle_area, rle_bbox_xywh
from pseudolabel.schemas.spec import StorageSpec

CATEGORIES: tuple[dict, ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "star", "supercategory": "shape"},
    {"id": 5, "name": "ellipse", "supercategory": "shape"},
)
CATEGORY_NAMES: dict[int, str] = {c["id"]: c["name"] for c in CATEGORIES}
CATEGORY_IDS: dict[str, int] = {c["name"]: c["id"] for c in CATEGORIES}
COMPONENTS: tuple[str, ...] = ("shadow", "watermark")
LAYOUTS: tuple[str, ...] = ("folder", "webdataset", "parquet")
WATERMARK_TEXTS: tuple[str, ...] = ("SAMPLE", "PREVIEW", "DEMO", "STOCK", "DRAFT", "COPY")

# Every rendered pixel stays in [_LO, _HI] per channel before shadows and watermarks, so that
# darkening and blending always change a pixel they touch (the clean/component ground truth is exact).
_LO, _HI = 20, 235
# Alpha below this is dropped, so a component's mask is exactly where it changed the image.
_MIN_ALPHA = 0.12
MAX_OBJECTS = 4


@dataclass
class Scene:
    """One rendered demo image and its ground truth.

    Attributes:
        image: (H, W, 3) uint8 RGB, with shadows and watermark.
        clean: (H, W, 3) uint8 RGB, the same scene without shadows and watermark.
        masks: (N, H, W) bool visible instance masks, in paint order (back to front).
        category_ids: (N,) int64, ids from ``CATEGORIES`` (1..K).
        category_names: N category names.
        shadow_mask: (H, W) bool, pixels darkened by a visible cast shadow.
        watermark_mask: (H, W) bool, pixels covered by the watermark.
        semantic: (H, W) uint8 label map, 0 = background, k = category id.
        casts_shadow: (N,) bool, which instances cast a shadow.
        watermark_text: the watermark's text ("" for a logo), None when there is no watermark.
    """

    image: np.ndarray
    clean: np.ndarray
    masks: np.ndarray
    category_ids: np.ndarray
    category_names: list[str]
    shadow_mask: np.ndarray
    watermark_mask: np.ndarray
    semantic: np.ndarray
    casts_shadow: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    watermark_text: str | None = None

    @property
    def components(self) -> list[str]:
        """Names of the components present in ``image`` (subset of ``COMPONENTS``)."""
        present = []
        if self.shadow_mask.any():
            present.append("shadow")
        if self.watermark_mask.any():
            present.append("watermark")
        return present


# ----------------------------------------------------------------------------------------------
# Colours and textures
# ----------------------------------------------------------------------------------------------

def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] -> RGB float32 (3,) in [0, 255]."""
    px = np.array([[[h * 179.0, s * 255.0, v * 255.0]]], np.float32).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 noise in about [-1, 1], smooth at a scale of size / cells pixels."""
    coarse = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(-1.0, 1.0)


def _finish(img: np.ndarray) -> np.ndarray:
    """Float RGB -> uint8 RGB clipped to [_LO, _HI]."""
    return np.clip(np.rint(img), _LO, _HI).astype(np.uint8)


def render_background(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A textured, mostly desaturated background.

    One of: smooth colour noise, stripes (two colours, random angle and period), a linear gradient,
    or a checkerboard, each with fine grain on top.

    Returns:
        (size, size, 3) uint8 RGB, values in [20, 235].
    """
    kind = rng.choice(["noise", "stripes", "gradient", "checker"])
    hue = rng.uniform()
    c1 = _hsv_to_rgb(hue, rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.8))
    c2 = _hsv_to_rgb((hue + rng.uniform(-0.15, 0.15)) % 1.0, rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.8))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, np.pi)
    proj = np.cos(theta) * xx + np.sin(theta) * yy
    if kind == "noise":
        t = 0.5 + 0.5 * _smooth_noise(rng, size, int(rng.integers(3, 9)))
    elif kind == "stripes":
        period = rng.uniform(0.04, 0.15)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period)
    elif kind == "gradient":
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    else:
        cell = rng.uniform(0.06, 0.2)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
        t = 0.25 + 0.5 * t  # softer contrast than the objects' edges
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    img += rng.normal(0, 4.0, (size, size, 1)).astype(np.float32)  # grain
    return _finish(img)


def _object_texture(rng: np.random.Generator, shape: tuple[int, int], scale: int, bg_mean: np.ndarray) -> np.ndarray:
    """(h, w, 3) float32 texture for one object: saturated colour far from ``bg_mean``.

    ``shape`` is (h, w); ``scale`` (pixels) sets the size of the pattern's features.
    """
    h, w = shape
    for _ in range(20):
        color = _hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 0.95))
        if np.linalg.norm(color - bg_mean) > 90:
            break
    kind = rng.choice(["grain", "stripes", "dots", "shade"])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / scale
    if kind == "stripes":
        theta = rng.uniform(0, np.pi)
        mod = 0.12 * np.sin(2 * np.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / rng.uniform(0.02, 0.06))
    elif kind == "dots":
        period = rng.uniform(0.03, 0.07)
        mod = 0.12 * np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)
    elif kind == "shade":
        mod = 0.15 * _smooth_noise(rng, max(h, w), 3)[:h, :w]
    else:
        n = max(h, w)
        mod = 0.08 * _smooth_noise(rng, n, max(2, int(rng.integers(12, 24)) * n // scale))[:h, :w]
    tex = color[None, None] * (1.0 + mod[..., None])
    tex += rng.normal(0, 3.0, (h, w, 1)).astype(np.float32)
    return tex


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------

def shape_polygon(category: str, center: tuple[float, float], radius: float, angle: float,
                  aspect: float = 0.55) -> np.ndarray:
    """Outline of a shape as an (P, 2) float32 polygon of (x, y) pixel coordinates.

    Args:
        category: one of the names in ``CATEGORIES``.
        center: (x, y) in pixels; radius: circumradius in pixels; angle: rotation in radians.
        aspect: minor/major axis ratio for ``ellipse`` (kept <= 0.7 so it is unlike a circle).
    """
    if category == "circle":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        r = np.full_like(t, radius)
    elif category == "ellipse":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        a, b = radius, radius * min(aspect, 0.7)
        r = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    elif category == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        r = np.full_like(t, radius)
    elif category == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        r = np.full_like(t, radius)
    elif category == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    else:
        raise ValueError(f"unknown shape category {category!r}; expected one of {list(CATEGORY_IDS)}")
    pts = np.stack([center[0] + r * np.cos(t + angle), center[1] + r * np.sin(t + angle)], axis=1)
    return pts.astype(np.float32)


def shape_mask(category: str, size: int | tuple[int, int], center: tuple[float, float], radius: float,
               angle: float, aspect: float = 0.55) -> np.ndarray:
    """(H, W) bool filled mask of a shape (hard edges, so the mask is exact)."""
    h, w = (size, size) if isinstance(size, int) else size
    canvas = np.zeros((h, w), np.uint8)
    pts = np.rint(shape_polygon(category, center, radius, angle, aspect)).astype(np.int32)
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def paint_shape(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint a textured, saturated object into ``image`` where ``mask`` is set.

    Args:
        image: (H, W, 3) uint8 RGB; mask: (H, W) bool.

    Returns:
        a new (H, W, 3) uint8 RGB image; pixels outside ``mask`` are unchanged.
    """
    h, w = mask.shape
    bg_mean = image[mask].mean(axis=0).astype(np.float32) if mask.any() else image.reshape(-1, 3).mean(0)
    if not mask.any():
        return image.copy()
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    tex = _finish(_object_texture(rng, (y1 - y0, x1 - x0), max(h, w), bg_mean))
    out = image.copy()
    crop = mask[y0:y1, x0:x1]
    out[y0:y1, x0:x1][crop] = tex[crop]
    return out


# ----------------------------------------------------------------------------------------------
# Components: shadows and watermarks
# ----------------------------------------------------------------------------------------------

def add_shadow(image: np.ndarray, mask_of_caster: np.ndarray, rng: np.random.Generator,
               offset: tuple[int, int] | None = None, darkness: float | None = None,
               softness: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cast a shadow: darken an offset copy of the caster's silhouette (not the caster itself).

    Args:
        image: (H, W, 3) uint8 RGB.
        mask_of_caster: (H, W) bool silhouette of the object casting the shadow.
        rng: draws offset/darkness/softness when not given.
        offset: (dx, dy) in pixels (default: 4-10 % of the image size in a random direction).
        darkness: fraction of light removed in the shadow's core, in (0, 1) (default 0.35-0.6).
        softness: Gaussian blur sigma of the shadow edge in pixels (default 0-2).

    Returns:
        (shadowed image (H, W, 3) uint8 RGB, shadow mask (H, W) bool). The mask is exactly the set of
        darkened pixels: outside it the image is unchanged.
    """
    h, w = mask_of_caster.shape
    if offset is None:
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.04, 0.10) * min(h, w)
        offset = (int(round(dist * np.cos(ang))), int(round(dist * np.sin(ang))))
    darkness = float(rng.uniform(0.35, 0.6)) if darkness is None else float(darkness)
    softness = float(rng.uniform(0.0, 2.0)) if softness is None else float(softness)
    # 1. shift the silhouette
    shift = np.array([[1, 0, offset[0]], [0, 1, offset[1]]], np.float32)
    alpha: np.ndarray = cv2.warpAffine(mask_of_caster.astype(np.float32), shift, (w, h), flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # 2. soften its edge, scale to the shadow's darkness, drop faint fringes and the caster itself
    if softness > 0.3:
        alpha = cv2.GaussianBlur(alpha, (0, 0), softness)
    alpha *= darkness
    alpha[(alpha < _MIN_ALPHA) | mask_of_caster] = 0.0
    # 3. darken
    out = image.astype(np.float32) * (1.0 - alpha[..., None])
    out = np.clip(np.floor(out), 0, 255).astype(np.uint8)
    return out, alpha > 0


def _text_layer(h: int, w: int, rng: np.random.Generator, text: str) -> np.ndarray:
    """(H, W) float32 coverage in [0, 1] of a large rotated text line."""
    font = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX][int(rng.integers(3))]
    thickness = max(1, int(round(min(h, w) * rng.uniform(0.012, 0.025))))
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, thickness)
    scale = rng.uniform(0.5, 0.85) * w / max(tw, 1)
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    layer: np.ndarray = np.zeros((h, w), np.uint8)
    org = (int((w - tw) / 2), int((h + th) / 2))
    cv2.putText(layer, text, org, font, scale, 255, thickness, cv2.LINE_AA)
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-35, 35)), 1.0)
    rot[:, 2] += rng.uniform(-0.2, 0.2, 2) * np.array([w, h])
    layer = cv2.warpAffine(layer, rot, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    return layer.astype(np.float32) / 255.0


def _logo_layer(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 coverage in [0, 1] of a ring-and-cross logo."""
    layer = np.zeros((h, w), np.uint8)
    r = int(min(h, w) * rng.uniform(0.15, 0.3))
    cx = int(rng.uniform(r + 2, w - r - 2))
    cy = int(rng.uniform(r + 2, h - r - 2))
    t = max(2, r // 6)
    cv2.circle(layer, (cx, cy), r, 255, t, cv2.LINE_AA)
    k = int(r * 0.6)
    cv2.line(layer, (cx - k, cy), (cx + k, cy), 255, t, cv2.LINE_AA)
    cv2.line(layer, (cx, cy - k), (cx, cy + k), 255, t, cv2.LINE_AA)
    return layer.astype(np.float32) / 255.0


def add_watermark(image: np.ndarray, rng: np.random.Generator, text: str | None = None,
                  opacity: float | None = None, color: tuple[int, int, int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Overlay a semi-transparent watermark: rotated text, or a logo pattern.

    Args:
        image: (H, W, 3) uint8 RGB.
        rng: draws the placement, font, opacity and colour.
        text: the text to write; None picks a word from ``WATERMARK_TEXTS`` or, one time in four, a
            logo; "" forces the logo.
        opacity: peak alpha in (0, 1] (default 0.35-0.6).
        color: RGB of the mark (default white, one time in four near-black).

    Returns:
        (watermarked image (H, W, 3) uint8 RGB, watermark mask (H, W) bool). The mask is exactly the
        set of blended pixels.
    """
    h, w = image.shape[:2]
    if text is None:
        text = "" if rng.uniform() < 0.25 else str(rng.choice(WATERMARK_TEXTS))
    cover = _text_layer(h, w, rng, text) if text else _logo_layer(h, w, rng)
    opacity = float(rng.uniform(0.35, 0.6)) if opacity is None else float(opacity)
    if color is None:
        color = (255, 255, 255) if rng.uniform() < 0.75 else (0, 0, 0)
    alpha = cover * opacity
    alpha[alpha < _MIN_ALPHA] = 0.0
    out = image.astype(np.float32) * (1 - alpha[..., None]) + np.array(color, np.float32)[None, None] * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), alpha > 0


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------

def _covers(amodal: list[np.ndarray]) -> list[np.ndarray]:
    """For each mask, the union of the masks painted after it (same order as ``amodal``)."""
    if not amodal:
        return []
    out, acc = [], np.zeros_like(amodal[0])
    for m in reversed(amodal):
        out.append(acc.copy())
        acc |= m
    return out[::-1]


def render_scene(rng: np.random.Generator, size: int = 256, max_objects: int = MAX_OBJECTS,
                 shadow_prob: float = 0.5, watermark_prob: float = 0.5) -> Scene:
    """Render one demo image with its ground truth.

    Steps: 1. textured background; 2. place 1..max_objects shapes (random category, size, rotation),
    rejecting placements that would leave less than 60 % of an earlier shape visible; 3. paint back to
    front, casting each caster's shadow onto the canvas just before the caster is painted (so a
    shadow falls on what is behind it); 4. optionally overlay a watermark on top of everything.

    Args:
        rng: the only source of randomness (same state -> same scene).
        size: image side in pixels (>= 32).
        shadow_prob: chance that the image has shadows (then each object casts one with p = 0.7,
            at least one does); watermark_prob: chance of a watermark.
    """
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    # 1. background and scene-level choices
    bg = render_background(rng, size)
    n_target = int(rng.integers(1, max_objects + 1))
    with_shadows = bool(rng.uniform() < shadow_prob)
    with_watermark = bool(rng.uniform() < watermark_prob)
    light = rng.uniform(0, 2 * np.pi)  # one light direction per image

    # 2. place shapes (amodal masks), back to front
    amodal: list[np.ndarray] = []
    cats: list[str] = []
    for _ in range(n_target * 8):
        if len(amodal) == n_target:
            break
        cat = str(rng.choice([c["name"] for c in CATEGORIES]))
        radius = size * rng.uniform(0.12, 0.24)
        center = (rng.uniform(radius * 0.7, size - radius * 0.7), rng.uniform(radius * 0.7, size - radius * 0.7))
        m = shape_mask(cat, size, center, radius, rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.7))
        if m.sum() < (size * 0.06) ** 2:
            continue
        if any((a & (m | covered)).sum() > 0.4 * a.sum() for a, covered in zip(amodal, _covers(amodal))):
            continue
        amodal.append(m)
        cats.append(cat)

    # 3. paint; shadows only on the shadowed canvas
    casts = np.array([with_shadows and rng.uniform() < 0.7 for _ in amodal], bool)
    if with_shadows and len(casts) and not casts.any():
        casts[int(rng.integers(len(casts)))] = True
    clean, shadowed = bg.copy(), bg.copy()
    shadow_mask = np.zeros((size, size), bool)
    dist = size * rng.uniform(0.04, 0.08)
    offset = (int(round(dist * np.cos(light))), int(round(dist * np.sin(light))))
    for m, cast in zip(amodal, casts):
        if cast:
            shadowed, s = add_shadow(shadowed, m, rng, offset=offset)
            shadow_mask |= s
        ys, xs = np.nonzero(m)
        box = np.s_[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        crop = m[box]
        tex = _finish(_object_texture(rng, crop.shape, size, clean[m].mean(axis=0).astype(np.float32)))
        clean[box][crop] = tex[crop]  # the same texture on both canvases
        shadowed[box][crop] = tex[crop]
        shadow_mask &= ~m
    visible = []
    for k, m in enumerate(amodal):
        v = m.copy()
        for later in amodal[k + 1:]:
            v &= ~later
        visible.append(v)
    masks = np.stack(visible) if visible else np.zeros((0, size, size), bool)

    # 4. watermark on top
    image = shadowed
    watermark_mask = np.zeros((size, size), bool)
    text = None
    if with_watermark:
        text = "" if rng.uniform() < 0.25 else str(rng.choice(WATERMARK_TEXTS))
        image, watermark_mask = add_watermark(image, rng, text=text)

    cat_ids = np.array([CATEGORY_IDS[c] for c in cats], np.int64)
    semantic = np.zeros((size, size), np.uint8)
    for m, cid in zip(masks, cat_ids):
        semantic[m] = cid
    return Scene(image=image, clean=clean, masks=masks, category_ids=cat_ids, category_names=cats,
                 shadow_mask=shadow_mask, watermark_mask=watermark_mask, semantic=semantic,
                 casts_shadow=casts, watermark_text=text)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for image ``index`` of a dataset with seed ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def render_index(seed: int, index: int, size: int = 256) -> Scene:
    """Image ``index`` of the dataset with seed ``seed``, exactly as ``generate`` writes it."""
    return render_scene(scene_rng(seed, index), size=size)


def image_name(index: int) -> str:
    """File stem of image ``index`` (also the WebDataset key)."""
    return f"demo_{index:06d}"


def shard_of(index: int, images: int, shards: int) -> int:
    """Shard of image ``index``: contiguous blocks of about images / shards images."""
    return index * shards // max(images, 1)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

class _ShardWriter:
    """Writes the images of one shard in the chosen layout through an fsspec filesystem."""

    def __init__(self, fs, root: str, layout: str, shard: int):
        self.fs, self.root, self.layout, self.shard = fs, root, layout, shard
        self.pending: dict[str, bytes] = {}
        self.rows: list[dict] = []
        self._file: Any = None  # the tar file's byte stream on ``fs``
        self._tar: tarfile.TarFile | None = None
        if layout == "webdataset":
            path = posixpath.join(root, "images", f"shard-{shard:05d}.tar")
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self._file = fs.open(path, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def add_file(self, rel: str, data: bytes) -> None:
        self.pending[posixpath.join(self.root, rel)] = data
        if len(self.pending) >= 96:
            self.flush_files()

    def flush_files(self) -> None:
        if not self.pending:
            return
        for parent in sorted({posixpath.dirname(p) for p in self.pending}):
            self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe(self.pending)  # concurrent uploads on object stores
        self.pending = {}

    def add_image(self, key: str, rel: str, png: bytes, meta: dict) -> None:
        if self.layout == "folder":
            self.add_file(posixpath.join("images", rel), png)
        elif self.layout == "webdataset":
            assert self._tar is not None, "a webdataset shard opens its tar file"
            for member, data in ((f"{key}.png", png), (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                self._tar.addfile(info, io.BytesIO(data))
        else:
            self.rows.append({"image_id": str(meta["id"]), "image": {"bytes": png, "path": rel}, "file_name": rel})

    def close(self) -> None:
        self.flush_files()
        if self._tar is not None:
            self._tar.close()
            self._file.close()
        if self.layout == "parquet" and self.rows:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([
                ("image_id", pa.string()),
                ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                ("file_name", pa.string()),
            ])
            table = pa.Table.from_pylist(self.rows, schema=schema)
            path = posixpath.join(self.root, "images", f"part-{self.shard:05d}.parquet")
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as f:
                pq.write_table(table, f, row_group_size=64, compression="none")


def _coco_annotations(scene: Scene, image_id: int) -> list[dict]:
    """COCO instance annotations of one scene; ids image_id * 100 + k, k = 1..N."""
    rles = masks_to_rles(scene.masks)
    areas, boxes = rle_area(rles), rle_bbox_xywh(rles)
    return [
        {"id": image_id * 100 + k + 1, "image_id": image_id, "category_id": int(cid), "segmentation": rle,
         "area": float(area), "bbox": [float(v) for v in box], "iscrowd": 0}
        for k, (cid, rle, area, box) in enumerate(zip(scene.category_ids, rles, areas, boxes))
    ]


def generate(out_uri: str, images: int = 64, shards: int = 4, seed: int = 0, size: int = 256,
             storage: StorageSpec | None = None, layout: str = "folder", progress: bool = True) -> dict:
    """Write a synthetic sharded dataset with ground truth to ``out_uri`` (local path or s3://).

    See the module docstring for the layout. Image ``i`` is ``render_index(seed, i, size)``.

    Returns:
        summary dict: uri, layout, images, shards (non-empty), instances, images_with_shadow,
        images_with_watermark, instances_json, components_json, seconds.
    """
    if images < 0 or shards < 1:
        raise ValueError(f"need images >= 0 and shards >= 1, got images={images}, shards={shards}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
    t0 = time.time()
    fs, root = st.filesystem(out_uri, storage)
    coco_images: list[dict] = []
    coco_anns: list[dict] = []
    comp_images: list[dict] = []
    used_shards: list[int] = []
    writer: _ShardWriter | None = None
    bar = tqdm(total=images, desc="demo-data", unit="img", file=sys.stderr, disable=not progress)
    try:
        for i in range(images):
            # 1. render
            scene = render_index(seed, i, size)
            shard, key, image_id = shard_of(i, images, shards), image_name(i), i + 1
            rel = f"shard-{shard:05d}.tar/{key}.png" if layout == "webdataset" else f"{shard:05d}/{key}.png"
            if writer is None or writer.shard != shard:
                if writer is not None:
                    writer.close()
                writer = _ShardWriter(fs, root, layout, shard)
                used_shards.append(shard)
            # 2. images, clean images and semantic maps
            meta = {"id": image_id, "image_id": str(image_id), "file_name": rel, "width": size, "height": size}
            writer.add_image(key, rel, encode_png(scene.image), meta)
            writer.add_file(posixpath.join("clean", rel), encode_png(scene.clean))
            writer.add_file(posixpath.join("semantic", rel), encode_png(scene.semantic))
            # 3. ground truth records
            coco_images.append({"id": image_id, "file_name": rel, "width": size, "height": size})
            coco_anns.extend(_coco_annotations(scene, image_id))
            comps = []
            for name, mask in (("shadow", scene.shadow_mask), ("watermark", scene.watermark_mask)):
                if mask.any():
                    rle = mask_to_rle(mask)
                    comps.append({"type": name, "segmentation": rle, "area": float(mask.sum())})
            comp_images.append({"id": image_id, "file_name": rel, "components": [c["type"] for c in comps],
                                "masks": comps, "watermark_text": scene.watermark_text})
            bar.update()
        if writer is not None:
            writer.close()
    finally:
        bar.close()

    # 4. annotation files
    instances = {
        "info": {"description": f"pseudolabel synthetic demo data (seed {seed}, {size}px)", "version": "1"},
        "licenses": [],
        "images": coco_images,
        "annotations": coco_anns,
        "categories": [dict(c) for c in CATEGORIES],
    }
    components = {"component_types": list(COMPONENTS), "images": comp_images,
                  "categories": [dict(c) for c in CATEGORIES]}
    instances_uri = st.join(out_uri, "annotations", "instances.json")
    components_uri = st.join(out_uri, "annotations", "components.json")
    st.write_bytes(instances_uri, json.dumps(instances).encode(), storage)
    st.write_bytes(components_uri, json.dumps(components).encode(), storage)
    return {
        "uri": out_uri,
        "layout": layout,
        "images": images,
        "shards": len(used_shards),
        "instances": len(coco_anns),
        "images_with_shadow": sum("shadow" in c["components"] for c in comp_images),
        "images_with_watermark": sum("watermark" in c["components"] for c in comp_images),
        "instances_json": instances_uri,
        "components_json": components_uri,
        "seconds": round(time.time() - t0, 3),
    }


def ensure_demo_input(job) -> dict | None:
    """Write the synthetic dataset a job asks for (``input.demo``) when its input does not exist yet.

    The dataset goes to the parent of ``input.uri`` (which ends in ``/images``); returns ``generate``'s
    info, or None when there is nothing to write. Called by ``pseudolabel run`` and ``pseudolabel.run``
    before the engine starts, so the engine itself only ever reads an input.
    """
    demo = job.input.demo
    if demo is None or st.exists(job.input.uri, job.storage):
        return None
    root = job.input.uri.rstrip("/").rsplit("/", 1)[0]
    print(f"input {job.input.uri} is missing: writing demo data to {root}", file=sys.stderr)
    return generate(root, images=demo.images, shards=demo.shards, seed=demo.seed, size=demo.size,
                    storage=job.storage, layout=demo.layout)
