"""iSeg: training-free segmentation from Stable Diffusion attention (linsun449/iseg.code).

One UNet pass on the VAE latent noised to ``timestep`` (seeded per image, no CFG) yields cross-attention
(class tokens -> pixels) and self-attention (pixel -> pixel). The self-attention is sharpened by the
entropy-reduction step and applied N times to the cross-attention; the refined per-class maps are
turned into a label map and per-class masks. Points, boxes and lines ("seeds") can replace the text.

Layers of this module:
1. text helpers: prompt template and token-index arithmetic (pure, tokenizer only);
2. map helpers: cross-attention fusion, KL k-means smoothing, entropy reduction, refinement, seeds,
   labels (pure torch/numpy, no model);
3. ``ISeg``: the labeler that loads SD, runs the pass and calls the helpers; its device half
   (``forward``) ends with the refined maps on the grid, its host half (``postprocess``) turns them
   into masks at the image size.

Conventions: a grid of (h, w) cells is flattened row-major to L = h * w; attention "maps" are
(L, C) float32 columns, one per class or seed; images are (H, W, 3) uint8 RGB; boxes are xyxy pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from pseudolabel.models.base import Instance, LabelOutput, Labeler, LabelerParams

PROMPT_PREFIX = "a photograph of"
PROMPT_JOIN = "and"
PROMPT_SUFFIX = "and other object and background,"
#: the reference's background context for COCO/VOC (the part of its string that takes effect)
DEFAULT_BACKGROUND_WORDS = ["ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water",
                            "river", "sea", "railway"]


# ---------------------------------------------------------------------------------------------------
# 1. Text: prompt template and token indices
# ---------------------------------------------------------------------------------------------------

def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


@dataclass
class PromptPlan:
    """One prompt and where each class's tokens sit in it.

    text: the prompt. token_ids: per planned class, the positions (in the padded token sequence,
    position 0 = start token) of all tokens of all its phrases. classes: indices into the caller's
    class list, aligned with ``token_ids``.
    """

    text: str
    token_ids: list[list[int]] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)


def plan_prompts(tokenizer, class_phrases: list[list[str]], background_words: list[str],
                 max_length: int | None = None) -> list[PromptPlan]:
    """Prompts "a photograph of {c1} and {c2} ... and other object and background, {words}".

    Token positions follow by arithmetic: the first class starts after the start token and the
    prefix; each phrase of n tokens is followed by one "and" (as many tokens as "and" has). Classes
    are packed greedily into as few prompts as fit in ``max_length`` (the tokenizer's by default);
    background words may be truncated, class tokens never are. Background words equal to a class
    phrase are dropped. With no classes a single empty-class prompt is returned.
    """
    max_length = max_length or tokenizer.model_max_length
    names = {p.strip().lower() for phrases in class_phrases for p in phrases}
    words = [w for w in background_words if w.strip().lower() not in names]
    n_prefix = _n_tokens(tokenizer, PROMPT_PREFIX)
    n_join = _n_tokens(tokenizer, PROMPT_JOIN)
    n_suffix = _n_tokens(tokenizer, PROMPT_SUFFIX)
    lengths = [[_n_tokens(tokenizer, p) for p in phrases] for phrases in class_phrases]

    plans: list[PromptPlan] = []
    current: list[int] = []
    used = 1 + n_prefix  # start token + prefix
    for k, lens in enumerate(lengths):
        need = sum(lens) + n_join * len(lens)
        if 1 + n_prefix + need + n_suffix + 1 > max_length:
            raise ValueError(f"class {class_phrases[k]!r} does not fit in a {max_length}-token prompt")
        if current and used + need + n_suffix + 1 > max_length:
            plans.append(_make_plan(current, class_phrases, lengths, n_prefix, n_join, words))
            current, used = [], 1 + n_prefix
        current.append(k)
        used += need
    plans.append(_make_plan(current, class_phrases, lengths, n_prefix, n_join, words))
    return plans


def _make_plan(classes, class_phrases, lengths, n_prefix, n_join, words) -> PromptPlan:
    phrases, token_ids = [], []
    start = 1 + n_prefix
    for k in classes:
        ids = []
        for phrase, n in zip(class_phrases[k], lengths[k]):
            ids.extend(range(start, start + n))
            start += n + n_join
            phrases.append(phrase)
        token_ids.append(ids)
    body = f" {PROMPT_JOIN} ".join(phrases)
    text = f"{PROMPT_PREFIX} {body} {PROMPT_SUFFIX} {', '.join(words)}" if phrases else \
        f"{PROMPT_PREFIX} {PROMPT_SUFFIX} {', '.join(words)}"
    return PromptPlan(text=" ".join(text.split()), token_ids=token_ids, classes=list(classes))


# ---------------------------------------------------------------------------------------------------
# 2. Maps
# ---------------------------------------------------------------------------------------------------

def fuse_cross_attention(per_factor: dict[int, torch.Tensor], grids: dict[int, tuple[int, int]],
                         weights: dict[int, float], target_hw: tuple[int, int]) -> torch.Tensor:
    """Weighted sum of per-resolution cross-attention, each token map normalised to unit mass.

    Args:
        per_factor: factor -> (B, Lq, T) head/layer-averaged cross-attention (rows sum to 1).
        grids: factor -> (h, w) of that Lq.
        weights: factor -> weight (factors missing from ``per_factor`` are skipped).
        target_hw: (h, w) grid to upsample to (bilinear).

    Returns:
        (B, h*w, T) float32: per token, sum_f weight_f * upsample(map / map.sum()).
    """
    out = None
    for factor, probs in per_factor.items():
        wgt = float(weights.get(factor, 0.0))
        if wgt == 0.0:
            continue
        b, lq, t = probs.shape
        h, w = grids[factor]
        maps = probs.float().permute(0, 2, 1).reshape(b, t, h, w)
        maps = maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        if (h, w) != tuple(target_hw):
            maps = F.interpolate(maps, size=tuple(target_hw), mode="bilinear", align_corners=False)
        maps = wgt * maps.flatten(-2).permute(0, 2, 1)
        out = maps if out is None else out + maps
    if out is None:
        raise ValueError(f"no cross-attention at the weighted factors {sorted(weights)}; got {sorted(per_factor)}")
    return out


def select_tokens(cross: torch.Tensor, token_ids: list[list[int]]) -> torch.Tensor:
    """(L, T) token maps -> (L, C): mean over each class's token positions."""
    return torch.stack([cross[:, ids].mean(-1) for ids in token_ids], dim=-1)


def _kl_terms(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x + eps, log(x + eps), sum_d (x + eps) log(x + eps)) for rows of x."""
    xe = x.float() + eps
    lx = torch.log(xe)
    return xe, lx, (xe * lx).sum(-1)


def _symmetric_kl_terms(a, b) -> torch.Tensor:
    (ae, la, sa), (be, lb, sb) = a, b
    return 0.5 * (sa[:, None] + sb[None, :] - ae @ lb.T - la @ be.T)


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(N, D), (M, D) non-negative rows -> (N, M) symmetric KL divergence (half each way).

    0.5 * sum_d (a_d - b_d) (log a_d - log b_d) with ``eps`` added to both, written as matrix products
    so no (N, M, D) tensor is built.
    """
    return _symmetric_kl_terms(_kl_terms(a, eps), _kl_terms(b, eps))


def kl_kmeans_smooth(maps: torch.Tensor, hw: tuple[int, int], clusters: int = 32, iters: int = 20,
                     eps: float = 1e-5) -> torch.Tensor:
    """Replace each pixel's token vector by the mean of its KL k-means cluster.

    maps: (L, T) non-negative per-pixel token vectors on an (h, w) grid. Centres start on a regular
    grid of about ``clusters`` cells (``ceil(sqrt(clusters))`` per side); each iteration assigns every
    pixel to the nearest centre by symmetric KL and moves centres to their members' mean (empty
    clusters are dropped). Returns (L, T), same dtype.
    """
    h, w = hw
    side = max(1, math.ceil(math.sqrt(clusters)))
    ys = torch.linspace(0, h - 1, min(side, h)).round().long()
    xs = torch.linspace(0, w - 1, min(side, w)).round().long()
    x = torch.where(maps == 0, torch.full_like(maps, 1e-6), maps).float()
    points = _kl_terms(x, eps)  # the pixels' logs, computed once
    centres = x[(ys[:, None] * w + xs[None, :]).flatten().to(x.device)]
    assign = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(max(1, iters)):
        assign = _symmetric_kl_terms(_kl_terms(centres, eps), points).argmin(0)
        used, assign = torch.unique(assign, return_inverse=True)
        onehot = F.one_hot(assign, len(used)).float()  # (L, K)
        centres = (onehot.T @ x) / onehot.sum(0)[:, None]
    return centres[assign].to(maps.dtype)


def entropy_reduce(self_attn: torch.Tensor, lam: float) -> torch.Tensor:
    """Entropy-reduced self-attention.

    self_attn: (..., L, L) row-stochastic (row = query pixel). Steps: divide each column by its max;
    add ``lam * log10(e * A)`` where A > 0 (small entries become negative); clamp at 0; divide each row
    by its sum. A row that the clamp empties falls back to its column-normalised values, so zeros stay
    zero and rows always sum to 1. Returns float32, same shape (a new tensor; the input is untouched).
    """
    a = self_attn.float() / self_attn.float().amax(dim=-2, keepdim=True).clamp_min(1e-12)
    if lam > 0:
        # log10(e * 0) = -inf, so zeros go to -inf and the clamp returns them to exactly 0
        reduced = torch.log10(a * math.e).mul_(lam).add_(a).clamp_min_(0)
    else:
        reduced = a.clone()
    sums = reduced.sum(-1, keepdim=True)
    empty = sums <= 0
    if bool(empty.any()):
        reduced = torch.where(empty, a, reduced)
        sums = reduced.sum(-1, keepdim=True)
    return reduced.div_(sums.clamp_min(1e-12))


def normalize_columns(maps: torch.Tensor) -> torch.Tensor:
    """(..., L, C): each column x -> (x - min) / sum; a constant column becomes uniform."""
    x = maps - maps.amin(dim=-2, keepdim=True)
    total = x.sum(dim=-2, keepdim=True)
    uniform = torch.full_like(x, 1.0 / x.shape[-2])
    return torch.where(total > 0, x / total.clamp_min(1e-30), uniform)


def refine(maps: torch.Tensor, affinity: torch.Tensor, iterations: int) -> torch.Tensor:
    """Iterative refinement: ``iterations`` times maps <- normalize_columns(affinity @ maps).

    maps: (L, C) or (B, L, C); affinity: (L, L) or (B, L, L) row-stochastic. The input is normalised
    first, so zero iterations return the normalised input.
    """
    x = normalize_columns(maps.float())
    for _ in range(iterations):
        x = normalize_columns(affinity @ x)
    return x


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> each map scaled to [0, 1] (a constant map becomes 0)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def labels_from_maps(maps: torch.Tensor, rule: str = "threshold", threshold: float = 0.45) -> torch.Tensor:
    """(C, H, W) maps in [0, 1] -> (H, W) int64 labels, 0 = background, k + 1 = map k.

    rule "power": a background channel (1 - max_k map_k)^2 joins the argmax. rule "threshold": values
    below ``threshold`` are zeroed, argmax, and pixels where every map is zero are background.
    """
    if maps.shape[0] == 0:
        return torch.zeros(maps.shape[-2:], dtype=torch.long, device=maps.device)
    if rule == "power":
        bg = (1 - maps.amax(0, keepdim=True)) ** 2
        return torch.cat([bg, maps], 0).argmax(0)
    if rule != "threshold":
        raise ValueError(f"unknown background rule {rule!r}")
    kept = torch.where(maps < threshold, torch.zeros_like(maps), maps)
    value, idx = kept.max(0)
    return torch.where(value > 0, idx + 1, torch.zeros_like(idx))


@dataclass
class Seed:
    """One interactive seed: its kind, grid cells (columns of the seed matrix) and category."""

    kind: str
    cells: list[int]
    category: Any = None
    box_xyxy: tuple[float, float, float, float] | None = None


def _cell(x: float, y: float, image_hw, grid_hw) -> tuple[int, int]:
    gy = min(grid_hw[0] - 1, max(0, int(y * grid_hw[0] // image_hw[0])))
    gx = min(grid_hw[1] - 1, max(0, int(x * grid_hw[1] // image_hw[1])))
    return gy, gx


def seeds_from_prompts(prompts: dict, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> list[Seed]:
    """Seeds from a row's prompts: ``points_xy`` [[x, y]], ``boxes_xyxy`` [[x0, y0, x1, y1]],
    ``lines_xy`` [[[x, y], ...]] in image pixels; ``categories`` aligns with points, then boxes, then lines.

    A point is its grid cell; a box every cell it overlaps (at least one); a line the cells of its
    polyline rasterised on the grid (each cell its own column, averaged after refinement).
    """
    import cv2

    h, w = grid_hw
    seeds: list[Seed] = []
    for x, y in prompts.get("points_xy") or []:
        gy, gx = _cell(x, y, image_hw, grid_hw)
        seeds.append(Seed("point", [gy * w + gx]))
    for box in prompts.get("boxes_xyxy") or []:
        x0, y0, x1, y1 = [float(v) for v in box]
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        gy0 = int(np.clip(math.floor(y0 * h / image_hw[0]), 0, h - 1))
        gx0 = int(np.clip(math.floor(x0 * w / image_hw[1]), 0, w - 1))
        gy1 = int(np.clip(math.ceil(y1 * h / image_hw[0]), gy0 + 1, h))
        gx1 = int(np.clip(math.ceil(x1 * w / image_hw[1]), gx0 + 1, w))
        cells = [yy * w + xx for yy in range(gy0, gy1) for xx in range(gx0, gx1)]
        seeds.append(Seed("box", cells, box_xyxy=(x0, y0, x1, y1)))
    for line in prompts.get("lines_xy") or []:
        canvas = np.zeros((h, w), np.uint8)
        pts = [_cell(x, y, image_hw, grid_hw) for x, y in line]
        if len(pts) == 1:
            canvas[pts[0]] = 1
        for (ya, xa), (yb, xb) in zip(pts[:-1], pts[1:]):
            cv2.line(canvas, (xa, ya), (xb, yb), 1, 1)
        seeds.append(Seed("line", [int(i) for i in np.flatnonzero(canvas)]))
    cats = list(prompts.get("categories") or [])
    for i, seed in enumerate(seeds):
        seed.category = cats[i] if i < len(cats) else None
    return seeds


def seed_matrix(seeds: list[Seed], length: int) -> tuple[torch.Tensor, list[list[int]]]:
    """(L, S') seed columns and, per seed, which columns are its own.

    A point or box is one column (ones on its cells); a line has one one-hot column per cell.
    """
    cols: list[np.ndarray] = []
    owner: list[list[int]] = []
    for seed in seeds:
        if seed.kind == "line":
            ids = []
            for c in seed.cells:
                col = np.zeros(length, np.float32)
                col[c] = 1
                ids.append(len(cols))
                cols.append(col)
            owner.append(ids)
        else:
            col = np.zeros(length, np.float32)
            col[seed.cells] = 1
            owner.append([len(cols)])
            cols.append(col)
    mat = np.stack(cols, 1) if cols else np.zeros((length, 0), np.float32)
    return torch.from_numpy(mat), owner


def combine_seed_columns(refined: torch.Tensor, owner: list[list[int]]) -> torch.Tensor:
    """(L, S') refined columns -> (L, S): per seed, columns scaled to max 1, averaged, scaled to max 1."""
    out = []
    for ids in owner:
        cols = refined[:, ids]
        cols = cols / cols.amax(0, keepdim=True).clamp_min(1e-12)
        m = cols.mean(-1)
        out.append(m / m.amax().clamp_min(1e-12))
    return torch.stack(out, -1) if out else refined[:, :0]


def grid_to_image(maps: torch.Tensor, grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
    """(L, C) grid maps -> (C, H, W) bilinear-upsampled to the image and min-max scaled per map."""
    c = maps.shape[-1]
    x = maps.T.reshape(1, c, *grid_hw).float()
    x = F.interpolate(x, size=tuple(image_hw), mode="bilinear", align_corners=False)[0]
    return minmax(x)


# ---------------------------------------------------------------------------------------------------
# 3. The labeler
# ---------------------------------------------------------------------------------------------------

class ISegParams(LabelerParams):
    timestep: int = Field(100, ge=0, lt=1000, description="noise level of the single UNet pass")
    iterations: int = Field(10, ge=0, description="refinement iterations N (5-10 in the paper)")
    lam: float = Field(0.1, ge=0, description="entropy-reduction weight lambda (0.015 VOC, 0.1 COCO)")
    text_scale: float = Field(1.6, gt=0, description="factor on the class tokens' text embeddings")
    res_weights: dict[int, float] = Field(
        default_factory=lambda: {4: 0.7, 2: 0.3},
        description="cross-attention weight per downsampling factor of the latent (SD at 512 px: 4 = 16x16, 2 = 32x32)")
    self_layers: list[str] = Field(default_factory=lambda: ["up_blocks.3.attentions.1"],
                                   description="self-attention module prefixes; the highest-resolution grid among them is used")
    self_heads: list[int] | None = Field(None, description="self-attention heads to average (None = all; the reference uses [1, 2])")
    kmeans: bool = Field(True, description="KL k-means smoothing of the cross-attention")
    kmeans_clusters: int = Field(32, ge=1, description="about this many k-means centres, seeded on a regular grid")
    kmeans_iters: int = Field(20, ge=1, description="k-means iterations")
    background: Literal["threshold", "power"] = Field(
        "threshold", description="threshold: maps below bg_threshold are background; power: a (1 - max)^2 background channel")
    bg_threshold: float = Field(0.45, ge=0, le=1, description="for background=threshold (0.45 COCO)")
    background_words: list[str] = Field(default_factory=lambda: list(DEFAULT_BACKGROUND_WORDS),
                                        description="words after 'background,' in the prompt")
    seed_threshold: float = Field(0.4, ge=0, le=1, description="background level for point/box/line seeds")
    clip_box_seeds: bool = Field(True, description="keep a box seed's mask inside its box")
    seed: int = Field(0, description="noise seed; every image gets the same noise whatever its batch")
    resolution: int = Field(512, ge=64, description="SD input size (square), multiple of 8")
    semantic_layer: bool = Field(False, description="add a 'semantic' layer: (H, W) category ids, 0 = background")
    min_area: int = Field(1, ge=1, description="drop masks with fewer pixels")


class ISeg(Labeler):
    """Open-vocabulary or seeded segmentation from one noisy Stable Diffusion pass.

    Device half (``forward``): VAE encode, the attention pass(es), KL k-means, entropy reduction and
    the refinement (N matrix products per row), giving each row's refined maps at the attention grid.
    Host half (``postprocess``): the maps brought to the image size, labels, masks, box clipping,
    scores, instances and the semantic layer.

    Payload (one per image):
        ``maps``    (L, C) float32: refined maps on the grid, one column per class (text rows, in the
                    order of ``classes``) or per seed (seeded rows, in ``seeds_from_prompts`` order);
        ``grid``    (2,) int32: the grid (h, w), L = h * w;
        ``seeded``  () bool: the row was seeded (points/boxes/lines), so its seeds are re-derived from
                    its prompt on the host;
        ``classes`` (C,) int32: text rows, indices into ``self.classes`` (empty for seeded rows).
    The maps stay float32 at the grid size: the labels threshold and argmax them, and image-size maps
    would be C x H x W floats to ship instead of C x L.
    """

    name = "iseg"
    Params = ISegParams
    summary = "training-free segmentation from Stable Diffusion attention (iSeg): text classes or point/box/line seeds"
    default_weights = "stabilityai/stable-diffusion-2-1-base"

    def __init__(self, spec, *, device: str = "cpu", storage=None):
        super().__init__(spec, device=device, storage=storage)
        from pseudolabel.models.attention import load_sd_components

        if self.params.resolution % 8:
            raise ValueError("iseg: resolution must be a multiple of 8")
        # no torch.compile here: the single UNet pass runs under attention-capture processors (python
        # side effects in every recorded layer, processors swapped per call), which compile poorly
        self.sd = load_sd_components(self.weights_id, self.storage, spec.revision, spec.dtype, device)

    def setup_host(self) -> None:
        #: (category, id, prompts) per ontology entry; rows and payloads index into this list
        self.classes = [(e.category, int(e.id), list(e.prompts)) for e in self.ontology]

    # -- per-row planning ---------------------------------------------------------------------------
    def _row_classes(self, prompts: dict | None) -> list[int]:
        """Indices into ``self.classes``: the row's ``categories`` when given (image-level tags), else all."""
        wanted = (prompts or {}).get("categories")
        if not wanted:
            return list(range(len(self.classes)))
        out = []
        for c in wanted:
            k = self._class_index(c)
            if k is not None and k not in out:
                out.append(k)
        return out

    def _class_index(self, value) -> int | None:
        for k, (name, cid, _) in enumerate(self.classes):
            if value == name or (isinstance(value, (int, np.integer)) and int(value) == cid):
                return k
        return None

    def _seed_category(self, value) -> tuple[int, str]:
        k = self._class_index(value) if value is not None else (0 if self.classes else None)
        if k is None:
            if value is not None:
                raise ValueError(f"iseg: seed category {value!r} is not in the job's ontology")
            return 1, "object"
        return self.classes[k][1], self.classes[k][0]

    @staticmethod
    def _is_seeded(prompt: Any) -> bool:
        prm = prompt if isinstance(prompt, dict) else {}
        return any(prm.get(k) for k in ("points_xy", "boxes_xyxy", "lines_xy"))

    # -- the pass ------------------------------------------------------------------------------------
    def _attention(self, latents: torch.Tensor, texts: list[str], token_ids: list[list[int]]):
        """One noisy pass on ``latents`` (B rows) with per-row ``texts``; returns
        (self-attention (B, L, L), grid (h, w), fused cross-attention (B, L, T))."""
        from pseudolabel.models.attention import (
            AttentionStore,
            capture_attention,
            encode_text,
            noisy_unet_pass,
            per_row_noise,
        )

        p = self.params
        emb, _ = encode_text(self.sd.tokenizer, self.sd.text_encoder, texts)
        emb = emb.clone()
        for i, ids in enumerate(token_ids):
            if ids:
                emb[i, ids] = emb[i, ids] * p.text_scale
        cross_store = AttentionStore(kind="cross", factors=[f for f, w in p.res_weights.items() if w])
        self_store = AttentionStore(layers=p.self_layers, kind="self", per_head=p.self_heads is not None)
        # every row gets the noise it would get alone, whatever the batch and its position in it
        noise = per_row_noise(latents.shape[0], latents.shape[1:], p.seed)[0]
        with capture_attention(self.sd.unet, cross_store), capture_attention(self.sd.unet, self_store):
            noisy_unet_pass(self.sd.unet, self.sd.scheduler, latents, p.timestep, emb, noise=noise)
        if not self_store.maps:
            raise ValueError(f"iseg: no self-attention layer matches {p.self_layers}")
        grid = max((r.hw for r in self_store.maps.values()), key=lambda hw: hw[0] * hw[1])
        recs = self_store.select(resolution=grid)
        maps = [r.probs[:, p.self_heads].mean(1) if p.self_heads is not None else r.probs for r in recs]
        self_attn = maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)
        per_factor, grids = {}, {}
        for factor in {r.factor for r in cross_store.maps.values()}:
            recs = cross_store.select(factor=factor)
            per_factor[factor] = torch.stack([r.probs for r in recs]).mean(0)
            grids[factor] = recs[0].hw
        cross = fuse_cross_attention(per_factor, grids, p.res_weights, grid)
        return self_attn, grid, cross

    # -- device half ---------------------------------------------------------------------------------
    def forward(self, images: list[np.ndarray], prompts: list[Any]) -> list[dict[str, np.ndarray]]:
        import cv2

        from pseudolabel.models.attention import encode_image
        from pseudolabel.models.device import to_host

        p = self.params
        if not images:
            return []
        # 1. resize to the SD input size and encode
        size = p.resolution
        resized = [cv2.resize(np.ascontiguousarray(im[..., :3]), (size, size),
                              interpolation=cv2.INTER_AREA if min(im.shape[:2]) > size else cv2.INTER_LINEAR)
                   for im in images]
        with torch.inference_mode():
            latents = encode_image(self.sd.vae, np.stack(resized))

            # 2. plan prompts: seeded rows use the bare template, text rows their classes
            rows = []
            for prm in prompts:
                prm = prm if isinstance(prm, dict) else {}
                seeded = self._is_seeded(prm)
                classes = [] if seeded else self._row_classes(prm)
                phrases = [self.classes[k][2] for k in classes]
                plans = plan_prompts(self.sd.tokenizer, phrases, p.background_words)
                rows.append((seeded, classes, plans))

            # 3. passes: pass g batches every row with a g-th prompt; self-attention from pass 0
            n_pass = max(len(r[2]) for r in rows)
            self_attn = grid = None
            class_maps: list[list[tuple[int, torch.Tensor]]] = [[] for _ in rows]
            for g in range(n_pass):
                idx = [i for i, r in enumerate(rows) if len(r[2]) > g]
                plans = [rows[i][2][g] for i in idx]
                flat_ids = [sorted({t for ids in pl.token_ids for t in ids}) for pl in plans]
                sa, grid_g, cross = self._attention(latents[idx], [pl.text for pl in plans], flat_ids)
                if g == 0:
                    self_attn, grid = sa, grid_g
                for j, (i, pl) in enumerate(zip(idx, plans)):
                    if not pl.token_ids:
                        continue
                    x = cross[j]
                    if p.kmeans:
                        x = kl_kmeans_smooth(x, grid, p.kmeans_clusters, p.kmeans_iters)
                    sel = select_tokens(x, pl.token_ids)
                    for c, k in enumerate(pl.classes):
                        class_maps[i].append((rows[i][1][k], sel[:, c]))

            # 4. per row: entropy reduction and refinement on the grid
            affinity = entropy_reduce(self_attn, p.lam)
            refined = [self._refine_row(images[i].shape[:2], prompts[i], rows[i][0], class_maps[i], affinity[i], grid)
                       for i in range(len(images))]
            hosts = to_host(refined)
        grid_np = np.asarray(grid, np.int32)
        return [{"maps": host,
                 "grid": grid_np.copy(),
                 "seeded": np.asarray(rows[i][0], bool),
                 "classes": np.asarray([k for k, _ in class_maps[i]], np.int32)}
                for i, host in enumerate(hosts)]

    def _refine_row(self, hw, prompt, seeded, class_maps, affinity, grid) -> torch.Tensor:
        """One row's refined (L, C) float32 maps on the grid, on the affinity's device."""
        p = self.params
        length = grid[0] * grid[1]
        if seeded:
            seeds = seeds_from_prompts(prompt, hw, grid)
            mat, owner = seed_matrix(seeds, length)
            return combine_seed_columns(refine(mat.to(affinity.device), affinity, p.iterations), owner).float()
        if not class_maps:
            return torch.zeros((length, 0), dtype=torch.float32, device=affinity.device)
        cols = torch.stack([m for _, m in class_maps], -1)
        return refine(cols, affinity, p.iterations).float()

    # -- host half -----------------------------------------------------------------------------------
    def postprocess(self, image: np.ndarray, prompt: Any, payload: dict[str, np.ndarray]) -> LabelOutput:
        p = self.params
        hw = image.shape[:2]
        grid = (int(payload["grid"][0]), int(payload["grid"][1]))
        refined = torch.from_numpy(np.array(payload["maps"], dtype=np.float32))  # a writable copy
        if bool(payload["seeded"]):
            seeds = seeds_from_prompts(prompt, hw, grid)
            if len(seeds) != refined.shape[-1]:
                raise RuntimeError(f"iseg: {refined.shape[-1]} seed maps for {len(seeds)} seeds")
            maps = grid_to_image(refined, grid, hw)
            labels = labels_from_maps(maps, "threshold", p.seed_threshold)
            cats = [self._seed_category(s.category) for s in seeds]
            prompts_txt = [s.kind for s in seeds]
            boxes = [s.box_xyxy if p.clip_box_seeds else None for s in seeds]
        else:
            classes = [int(k) for k in payload["classes"]]
            if len(classes) != refined.shape[-1]:
                raise RuntimeError(f"iseg: {refined.shape[-1]} class maps for {len(classes)} classes")
            if not classes:
                return LabelOutput(layers=self._semantic(np.zeros(hw, np.int64), []))
            maps = grid_to_image(refined, grid, hw)
            labels = labels_from_maps(maps, p.background, p.bg_threshold)
            cats = [(self.classes[k][1], self.classes[k][0]) for k in classes]
            prompts_txt = [", ".join(self.classes[k][2]) for k in classes]
            boxes = [None] * len(cats)

        labels_np = labels.numpy()
        maps_np = maps.numpy()
        instances = []
        sem_pairs = []
        for k, ((cid, cname), text, box) in enumerate(zip(cats, prompts_txt, boxes)):
            mask = labels_np == k + 1
            if box is not None:
                clip = np.zeros(hw, bool)
                x0, y0, x1, y1 = box
                clip[max(0, int(math.floor(y0))):int(math.ceil(y1)), max(0, int(math.floor(x0))):int(math.ceil(x1))] = True
                mask &= clip
            if mask.sum() < p.min_area:
                continue
            score = float(np.clip(maps_np[k][mask].mean(), 0, 1))
            instances.append(Instance(mask=mask, category_id=cid, category=cname, score=score, prompt=text))
            sem_pairs.append((mask, cid))
        return LabelOutput(instances=instances, layers=self._semantic(labels_np, sem_pairs))

    def _semantic(self, labels_np: np.ndarray, pairs) -> dict[str, np.ndarray]:
        if not self.params.semantic_layer:
            return {}
        ids = [cid for _, cid in pairs]
        dtype = np.uint8 if max(ids, default=0) <= 255 else np.uint16
        sem = np.zeros(labels_np.shape, dtype)
        for mask, cid in pairs:
            sem[mask] = cid
        return {"semantic": sem}
