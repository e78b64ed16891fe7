"""Multi-semantic in-context training examples for SeFM, synthesised with the demo-data renderers.

Every example is a scene kind set S (two or more component kinds, by default) and one kind r in S to
remove. Two scenes A and B are rendered with every kind of S present:

- demonstration: (A with S, A with S − {r});
- query / target: (B with S, B with S − {r}).

The other kinds of S stay in the demonstration's output and in the target, so the query alone does not
say what goes: only the demonstration does. The label is the multi-hot vector of r over the
``NUM_COMPONENT_TYPES`` (20) type slots of the discriminator (``sefm_loss``); ``KINDS[i]`` has slot i,
the remaining slots are unused.

Component kinds (``KINDS``), all drawn with ``pseudolabel.jobs.demo.data``:

- ``shadow``: cast shadows of the scene's base objects (``add_shadow``, one light per scene);
- ``watermark``: a semi-transparent text watermark (``add_watermark`` with a word);
- ``logo``: a semi-transparent ring-and-cross logo (``add_watermark`` with ``text=""``);
- ``circle``, ``square``, ``triangle``, ``star``, ``ellipse``: one or two objects of that shape
  category (``shape_mask`` + ``paint_shape``), in front of the base objects; removing them shows
  what is behind.

A scene (``LayeredScene``) is a background (``render_background``) with one or two base objects of
shape categories not in S, and the layers of S. ``compose(kinds)`` paints any subset of them, always
in the same order (shadows and base objects, shape kinds, logo, watermark), from the same drawn
parameters: two compositions differ only by the layers that differ. Images are (S, S, 3) uint8 RGB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from pseudolabel.jobs.demo import data as dd
from pseudolabel.models.incontext import canvas as cv
from pseudolabel.models.incontext.sefm_loss import NUM_COMPONENT_TYPES

SHAPE_KINDS: tuple[str, ...] = tuple(c["name"] for c in dd.CATEGORIES)
#: a component kind: shadow, watermark, logo, then the demo data's shape categories
Kind = Literal["shadow", "watermark", "logo", "circle", "square", "triangle", "star", "ellipse"]
KINDS: tuple[Kind, ...] = get_args(Kind)
if KINDS != ("shadow", "watermark", "logo", *SHAPE_KINDS):
    raise RuntimeError(f"Kind {KINDS} does not list the demo data's categories {SHAPE_KINDS}")
assert len(KINDS) <= NUM_COMPONENT_TYPES
#: at most this many kinds in one scene (one base shape category must stay free to cast shadows)
MAX_SCENE_KINDS = 4


def type_index(kind: str) -> int:
    """The discriminator slot of a component kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {list(KINDS)}")
    return KINDS.index(kind)


def type_vector(kinds) -> np.ndarray:
    """(NUM_COMPONENT_TYPES,) float32 multi-hot of ``kinds``."""
    v = np.zeros(NUM_COMPONENT_TYPES, np.float32)
    for k in kinds:
        v[type_index(k)] = 1.0
    return v


@dataclass
class _Object:
    mask: np.ndarray  # (S, S) bool
    pixels: np.ndarray  # (mask.sum(), 3) uint8


class LayeredScene:
    """One scene with the layers of ``kinds``, composable in any subset (see the module docstring)."""

    def __init__(self, rng: np.random.Generator, size: int, kinds, background: np.ndarray | None = None):
        kinds = tuple(kinds)
        for k in kinds:
            type_index(k)
        if len(set(kinds)) != len(kinds) or len(kinds) > MAX_SCENE_KINDS:
            raise ValueError(f"a scene takes 1..{MAX_SCENE_KINDS} distinct kinds, got {list(kinds)}")
        self.size, self.kinds = size, kinds
        self.background = background.copy() if background is not None else dd.render_background(rng, size)
        # 1. base objects: shape categories not among the kinds (they cast the shadows)
        free = [c for c in SHAPE_KINDS if c not in kinds]
        self.base = [self._object(rng, str(rng.choice(free)), 0.12, 0.22) for _ in range(int(rng.integers(1, 3)))]
        # 2. one or two objects per shape kind
        self.shapes = {k: [self._object(rng, k, 0.08, 0.16) for _ in range(int(rng.integers(1, 3)))]
                       for k in kinds if k in SHAPE_KINDS}
        # 3. shadows: one light direction, per caster its darkness and softness
        ang, dist = rng.uniform(0, 2 * np.pi), size * rng.uniform(0.04, 0.08)
        self.offset = (int(round(dist * np.cos(ang))), int(round(dist * np.sin(ang))))
        self.shadow = [(float(rng.uniform(0.35, 0.6)), float(rng.uniform(0.0, 2.0))) for _ in self.base]
        # 4. overlays: seeds so that the same mark is drawn on any composition
        self.watermark = (int(rng.integers(2 ** 62)), str(rng.choice(dd.WATERMARK_TEXTS)))
        self.logo = int(rng.integers(2 ** 62))

    def _object(self, rng: np.random.Generator, category: str, rmin: float, rmax: float) -> _Object:
        s = self.size
        for _ in range(20):
            radius = s * rng.uniform(rmin, rmax)
            center = (rng.uniform(radius * 0.7, s - radius * 0.7), rng.uniform(radius * 0.7, s - radius * 0.7))
            mask = dd.shape_mask(category, s, center, radius, rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.7))
            if mask.sum() >= (s * 0.05) ** 2:
                break
        return _Object(mask, dd.paint_shape(self.background, mask, rng)[mask])

    def compose(self, kinds) -> np.ndarray:
        """The scene with the layers of ``kinds`` (a subset of ``self.kinds``): (S, S, 3) uint8 RGB."""
        kinds = set(kinds)
        if not kinds <= set(self.kinds):
            raise ValueError(f"{sorted(kinds - set(self.kinds))} not in this scene's kinds {list(self.kinds)}")
        img = self.background.copy()
        unused = np.random.default_rng(0)  # add_shadow draws nothing when every parameter is given
        for obj, (darkness, softness) in zip(self.base, self.shadow):
            if "shadow" in kinds:
                img = dd.add_shadow(img, obj.mask, unused, offset=self.offset, darkness=darkness,
                                    softness=softness)[0]
            img[obj.mask] = obj.pixels
        for kind, objects in self.shapes.items():
            if kind in kinds:
                for obj in objects:
                    img[obj.mask] = obj.pixels
        if "logo" in kinds:
            img = dd.add_watermark(img, np.random.default_rng(self.logo), text="")[0]
        if "watermark" in kinds:
            seed, text = self.watermark
            img = dd.add_watermark(img, np.random.default_rng(seed), text=text)[0]
        return img


@dataclass
class Example:
    """One in-context example; images (S, S, 3) uint8 RGB."""

    demo_in: np.ndarray
    demo_out: np.ndarray
    query: np.ndarray
    target: np.ndarray
    mask: np.ndarray  # (S, S) bool: the removed component's pixels in the query
    types: np.ndarray  # (NUM_COMPONENT_TYPES,) float32 multi-hot of the removed kind
    kinds: tuple[str, ...]  # every kind in the scenes
    removed: str
    scenes: tuple[LayeredScene, LayeredScene]  # (demonstration scene A, query scene B)


def draw_kinds(rng: np.random.Generator, components, scene_components: int, kept=None) -> tuple[tuple[str, ...], str]:
    """(scene kinds, removed kind): the removed kind from ``components``, ``scene_components − 1``
    other kinds from ``kept`` (default: every kind)."""
    removed = str(components[int(rng.integers(len(components)))])
    pool = [k for k in (kept or KINDS) if k != removed]
    n = min(scene_components - 1, len(pool))
    others = [str(k) for k in rng.choice(pool, n, replace=False)] if n > 0 else []
    return (removed, *others), removed


def synthesize_example(rng: np.random.Generator, kinds, removed: str, size: int,
                       backgrounds: list[np.ndarray] | None = None, attempts: int = 10) -> Example:
    """Scenes A (demonstration) and B (query) with every kind of ``kinds``; ``removed`` goes.

    A draw where the removed component leaves no visible pixel in either scene is drawn again (up to
    ``attempts`` times).
    """
    kinds = tuple(kinds)
    if removed not in kinds:
        raise ValueError(f"removed kind {removed!r} is not among the scene kinds {list(kinds)}")
    kept = [k for k in kinds if k != removed]
    for _ in range(attempts):
        a, b = (LayeredScene(rng, size, kinds, None if not backgrounds else
                             backgrounds[int(rng.integers(len(backgrounds)))]) for _ in range(2))
        demo_in, demo_out = a.compose(kinds), a.compose(kept)
        query, target = b.compose(kinds), b.compose(kept)
        mask = (query != target).any(axis=2)
        if mask.any() and (demo_in != demo_out).any():
            break
    return Example(demo_in, demo_out, query, target, mask, type_vector([removed]), kinds, removed, (a, b))


def make_batch(rng: np.random.Generator, components, n: int, cell: int, layout: cv.Layout, size: int,
               scene_components: int = 2, kept=None, backgrounds: list[np.ndarray] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n examples stitched into canvases.

    Returns:
        canvases (n, C, H, W) float32 in [0, 1]; targets (n, 3, cell, cell) float32 in [0, 1];
        component masks (n, 1, cell, cell) float32 in [0, 1]; types (n, NUM_COMPONENT_TYPES) float32.
    """
    xs, ys, ms, ts = [], [], [], []
    for _ in range(n):
        kinds, removed = draw_kinds(rng, components, scene_components, kept)
        ex = synthesize_example(rng, kinds, removed, size, backgrounds)
        xs.append(cv.stitch(ex.demo_in, ex.demo_out, ex.query, cell, layout).astype(np.float32) / 255.0)
        ys.append(cv.to_cell(ex.target, cell).astype(np.float32) / 255.0)
        ms.append(cv.to_cell(ex.mask.astype(np.float32)[..., None], cell))
        ts.append(ex.types)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack(ys)).permute(0, 3, 1, 2).contiguous()
    m = torch.from_numpy(np.stack(ms)).permute(0, 3, 1, 2).contiguous()
    return x, y, m, torch.from_numpy(np.stack(ts))
