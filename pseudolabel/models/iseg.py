"""iSeg: training-free segmentation from Stable Diffusion attention (linsun449/iseg.code).

One UNet pass on the VAE latent noised to ``timestep`` (seeded per image, no CFG) yields cross-attention
(class tokens -> pixels) and self-attention (pixel -> pixel). The self-attention is sharpened by the
entropy-reduction step and applied N times to the cross-attention; the refined per-class maps are
turned into a label map and per-class masks. Points, boxes and lines ("seeds") can replace the text.

The defaults are the reference's (its weakly-supervised COCO run, ``wsss/``, for text; its interactive
tool, ``ui/``, for seeds); ``preset="voc"`` switches to its VOC settings. Where this module departs from
it, a parameter names the departure and is off by default, except where the reference has no answer
(rows with neither tags nor a tagger: ``untagged``).

Layers of this module:
1. text helpers: prompt template and token-index arithmetic (pure, tokenizer only; which tokens of a
   name carry the class is ``iseg_tokens``);
2. map helpers: cross-attention fusion, KL k-means smoothing, entropy reduction, refinement, seeds,
   labels (pure torch/numpy, no model);
3. ``ISeg``: the labeler that loads SD (and the optional CLIP tagger, ``iseg_tags``), runs the pass and
   calls the helpers; its device half (``forward``) ends with the refined maps on the grid, its host half
   (``postprocess``) turns them into masks at the image size.

Conventions: a grid of (h, w) cells is flattened row-major to L = h * w; attention "maps" are
(L, C) float32 columns, one per class or seed; images are (H, W, 3) uint8 RGB; boxes are xyxy pixels.

Departures that remain with the defaults (each where the reference has no answer, or fails):
- token positions come from the tokenizer, and a chosen word keeps all its tokens (the reference's
  table assumes one token per word); a class may have several prompts (their tokens are averaged);
- classes that overflow one 77-token prompt go to further prompts (the reference truncates);
- rows with no tags and no tagger prompt every class, attenuated by their raw attention (``untagged``);
- attention is averaged over heads in float32 and fused in float32 (the reference stays in float16
  until after token selection; the k-means keeps its float16 distances and rounding); the VAE runs
  in float32 unless bfloat16 is asked for;
- empty rows/columns/boxes that give NaN in the reference fall back (see ``entropy_reduce``,
  ``normalize_columns``, ``seeds_from_prompts``); several seeds in one row compete by argmax;
- noise is drawn per row on the UNet's device: the reference's numbers on CUDA, the CPU generator's
  on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from pseudolabel.models.attention import AttentionStore, CapturedAttention, head_mean
from pseudolabel.models.base import (
    Instance,
    Labeler,
    LabelerParams,
    LabelOutput,
    entry_id,
    entry_index,
    row_entries,
)
from pseudolabel.models.iseg_tags import TagParams
from pseudolabel.models.iseg_tokens import class_words, n_tokens, word_token_offsets

PROMPT_PREFIX = "a photograph of"
PROMPT_JOIN = "and"
PROMPT_SUFFIX = "and other object and background,"
#: the prompt of a seeded row (the reference's interactive tool encodes " " and scales its start token)
SEED_PROMPT = " "
#: the reference's background context for COCO (the part of its string that takes effect: it ends in ", ")
DEFAULT_BACKGROUND_WORDS = ["ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water",
                            "river", "sea", "railway"]
#: ... and for VOC (no trailing separator)
VOC_BACKGROUND_WORDS = ["ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water"]
#: the reference's cross-attention layers (SD 2.x names): 32x32 and 16x16 at 512 px
REFERENCE_CROSS_LAYERS = [
    "down_blocks.1.attentions.1",
    "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
]
#: the reference's VOC cross-attention heads, per latent factor (2 = 32x32, 4 = 16x16 at 512 px): indices
#: into the heads of ``REFERENCE_CROSS_LAYERS`` at that factor, concatenated in UNet order (SD 2.1: 30, 100)
VOC_CROSS_HEADS = {
    2: [22, 5, 21, 13, 8, 27, 28, 6, 25],
    4: [76, 1, 43, 17, 81, 6, 44, 27, 2, 8, 22, 20, 60, 78, 12, 83, 94, 47, 88, 96, 3, 33, 46, 52, 77, 93, 51,
        58, 0, 13, 14, 19, 34, 41, 59, 87, 16, 24, 28, 30, 32],
}
#: parameter values of each preset (the reference's per-dataset settings); explicit params win
PRESETS: dict[str, dict[str, Any]] = {
    "coco": {},
    "voc": {"lam": 0.015, "background": "power", "cross_heads": "voc",
            "background_words": VOC_BACKGROUND_WORDS, "background_end": ""},
}


# ---------------------------------------------------------------------------------------------------
# 1. Text: prompt template and token indices
# ---------------------------------------------------------------------------------------------------

@dataclass
class PromptPlan:
    """One prompt and where each class's tokens sit in it.

    text: the prompt. token_ids: per planned class, the positions (in the padded token sequence,
    position 0 = start token) of its class tokens in all its phrases. classes: indices into the
    caller's class list, aligned with ``token_ids``.
    """

    text: str
    token_ids: list[list[int]] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)


def plan_prompts(tokenizer, class_phrases: list[list[str]], background_words: list[str],
                 max_length: int | None = None, choices: list[list[list[int] | None]] | None = None,
                 end: str = "", drop_class_words: bool = False) -> list[PromptPlan]:
    """Prompts "a photograph of {c1} and {c2} ... and other object and background, {words}{end}".

    Token positions follow by arithmetic: the first class starts after the start token and the
    prefix; each phrase of n tokens is followed by one "and" (as many tokens as "and" has).
    ``choices[k][j]``: offsets within phrase j of class k of its class tokens (None = all of them;
    see ``iseg_tokens``). Classes are packed greedily into as few prompts as fit in ``max_length``
    (the tokenizer's by default); background words may be truncated, class tokens never are. With
    ``drop_class_words`` background words equal to a class phrase are left out (the reference keeps
    them). With no classes a single empty-class prompt is returned.
    """
    max_length = max_length or tokenizer.model_max_length
    words = list(background_words)
    if drop_class_words:
        names = {p.strip().lower() for phrases in class_phrases for p in phrases}
        words = [w for w in words if w.strip().lower() not in names]
    n_prefix = n_tokens(tokenizer, PROMPT_PREFIX)
    n_join = n_tokens(tokenizer, PROMPT_JOIN)
    n_suffix = n_tokens(tokenizer, PROMPT_SUFFIX)
    lengths = [[n_tokens(tokenizer, p) for p in phrases] for phrases in class_phrases]
    choices = choices if choices is not None else [[None] * len(phrases) for phrases in class_phrases]

    plans: list[PromptPlan] = []
    current: list[int] = []
    used = 1 + n_prefix  # start token + prefix

    def make(ks: list[int]) -> PromptPlan:
        return _make_plan(ks, class_phrases, lengths, choices, n_prefix, n_join, words, end)

    for k, lens in enumerate(lengths):
        need = sum(lens) + n_join * len(lens)
        if 1 + n_prefix + need + n_suffix + 1 > max_length:
            raise ValueError(f"class {class_phrases[k]!r} does not fit in a {max_length}-token prompt")
        if current and used + need + n_suffix + 1 > max_length:
            plans.append(make(current))
            current, used = [], 1 + n_prefix
        current.append(k)
        used += need
    plans.append(make(current))
    return plans


def _make_plan(classes, class_phrases, lengths, choices, n_prefix, n_join, words, end) -> PromptPlan:
    phrases, token_ids = [], []
    start = 1 + n_prefix
    for k in classes:
        ids: list[int] = []
        for phrase, n, chosen in zip(class_phrases[k], lengths[k], choices[k]):
            ids.extend(start + o for o in (chosen if chosen is not None else range(n)))
            start += n + n_join
            phrases.append(phrase)
        token_ids.append(ids)
    body = f" {PROMPT_JOIN} ".join(phrases)
    tail = f"{PROMPT_SUFFIX} {', '.join(words)}{end}"
    text = f"{PROMPT_PREFIX} {body} {tail}" if phrases else f"{PROMPT_PREFIX} {tail}"
    return PromptPlan(text=" ".join(text.split()), token_ids=token_ids, classes=list(classes))


# ---------------------------------------------------------------------------------------------------
# 2. Maps
# ---------------------------------------------------------------------------------------------------

def fuse_cross_attention(per_factor: dict[int, torch.Tensor], grids: dict[int, tuple[int, int]],
                         weights: dict[int, float], target_hw: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """Weighted sum of per-resolution cross-attention, each token map normalised to unit mass.

    Args:
        per_factor: factor -> (B, Lq, T) head/layer-averaged cross-attention (rows sum to 1).
        grids: factor -> (h, w) of that Lq.
        weights: factor -> weight (factors missing from ``per_factor`` are skipped).
        target_hw: (h, w) grid to upsample to (bilinear).
        normalize: False skips the unit-mass step (raw attention, for class strengths).

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
        if normalize:
            maps = maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        if (h, w) != tuple(target_hw):
            maps = F.interpolate(maps, size=tuple(target_hw), mode="bilinear", align_corners=False)
        maps = wgt * maps.flatten(-2).permute(0, 2, 1)
        out = maps if out is None else out + maps
    if out is None:
        raise ValueError(f"no cross-attention at the weighted factors {sorted(weights)}; got {sorted(per_factor)}")
    return out


def pick_heads(heads: torch.Tensor, index: list[int] | None, what: str) -> torch.Tensor:
    """(B, H, Lq, Lk) per-head attention -> (B, Lq, Lk) float32 mean over ``index`` (None = all heads).

    Raises ValueError naming ``what`` when an index is not a head.
    """
    if index is None:
        return head_mean(heads)
    n = heads.shape[1]
    if not index or min(index) < -n or max(index) >= n:
        raise ValueError(f"iseg: {what} heads {list(index)} out of range: there are {n} heads")
    return head_mean(heads[:, list(index)])


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
    """(N, D), (M, D) non-negative rows -> (N, M) symmetric KL divergence (half each way), float32.

    0.5 * sum_d (a_d - b_d) (log a_d - log b_d) with ``eps`` added to both, written as matrix products
    so no (N, M, D) tensor is built.
    """
    return _symmetric_kl_terms(_kl_terms(a, eps), _kl_terms(b, eps))


def symmetric_kl_half(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The reference's KL distance: (N, D), (M, D) -> (N, M) float16, computed elementwise in float16.

    a, b are cast to float16 and ``eps`` is added there; q = log a - log b per (n, m, d);
    0.5 * sum_d a q - 0.5 * sum_d b q. Builds (N, M, D) tensors (36 x 4096 x 77 at SD's 64x64 grid).
    """
    ah, bh = a.half() + eps, b.half() + eps
    q = torch.log(ah)[:, None, :] - torch.log(bh)[None, :, :]
    return (ah[:, None, :] * q).sum(-1) * 0.5 + (-(bh[None, :, :] * q).sum(-1) * 0.5)


def kmeans_start_cells(hw: tuple[int, int], clusters: int) -> torch.Tensor:
    """Row-major cells where the k-means centres start: rows and columns 0, s, 2s, ... below the side,
    s = floor(side / sqrt(clusters)) (at least 1). The reference's grid: 64x64 and 32 clusters give
    rows/columns 0, 11, ..., 55 (36 centres)."""
    h, w = hw
    root = math.sqrt(clusters)
    ys = torch.arange(0, h, max(1, int(h // root)))
    xs = torch.arange(0, w, max(1, int(w // root)))
    return (ys[:, None] * w + xs[None, :]).flatten()


def kl_kmeans_smooth(maps: torch.Tensor, hw: tuple[int, int], clusters: int = 32, iters: int = 20,
                     eps: float = 1e-5, precision: str = "float16") -> torch.Tensor:
    """Replace each pixel's token vector by the mean of its KL k-means cluster.

    maps: (L, T) non-negative per-pixel token vectors on an (h, w) grid. Zeros become 1e-6 for the
    clustering; centres start at ``kmeans_start_cells``; each iteration assigns every pixel to the
    nearest centre by symmetric KL (first centre on ties) and moves the centres to their members' mean
    (empty clusters are dropped). The output is the cluster mean of the unmodified ``maps``.

    precision "float16" (the reference): the clustering sees the maps in float16, distances are
    ``symmetric_kl_half`` and centres are rounded to float16; the output is rounded to float16 too.
    "float32": float32 throughout, distances by matrix products (no (K, L, T) tensor).
    Returns (L, T) in ``maps``' dtype.
    """
    if precision not in ("float16", "float32"):
        raise ValueError(f"kmeans precision must be float16 or float32, not {precision!r}")
    half = precision == "float16"
    raw = maps.float()
    x = torch.where(raw == 0, torch.full_like(raw, 1e-6), raw)
    if half:
        x = x.half().float()  # the values the reference clusters

        def distance(c: torch.Tensor) -> torch.Tensor:
            return symmetric_kl_half(c, x, eps).float()
    else:
        points = _kl_terms(x, eps)  # the pixels' logs, computed once

        def distance(c: torch.Tensor) -> torch.Tensor:
            return _symmetric_kl_terms(_kl_terms(c, eps), points)
    centres = x[kmeans_start_cells(hw, clusters).to(x.device)]
    assign = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(max(1, iters)):
        assign = distance(centres).argmin(0)
        used, assign = torch.unique(assign, return_inverse=True)
        onehot = F.one_hot(assign, len(used)).float()  # (L, K)
        centres = (onehot.T @ x) / onehot.sum(0)[:, None]
        if half:
            centres = centres.half().float()
    source = raw.half().float() if half else raw
    means = (onehot.T @ source) / onehot.sum(0)[:, None]
    if half:
        means = means.half().float()
    return means[assign].to(maps.dtype)


def entropy_reduce(self_attn: torch.Tensor, lam: float, clamp_max: float | None = None,
                   row_normalize: bool = False) -> torch.Tensor:
    """Entropy-reduced self-attention.

    self_attn: (..., L, L) row-stochastic (row = query pixel). Steps: (``row_normalize``: divide each
    row by its sum;) divide each column by its max; add ``lam * log10(e * A)`` where A > 0 (small
    entries become negative, entries above 1/e grow); clamp at 0 (and at ``clamp_max``); divide each
    row by its sum. The reference's text path uses neither option; its interactive tool (seeds) both,
    with ``clamp_max=1``. A row that the clamp empties falls back to its column-normalised values
    (the reference divides by zero there), so zeros stay zero and rows always sum to 1. Returns
    float32, same shape (a new tensor; the input is untouched).
    """
    a = self_attn.float()
    if row_normalize:
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    a = a / a.amax(dim=-2, keepdim=True).clamp_min(1e-12)
    if lam > 0:
        # log10(e * 0) = -inf, so zeros go to -inf and the clamp returns them to exactly 0
        reduced = torch.log10(a * math.e).mul_(lam).add_(a).clamp_(min=0, max=clamp_max)
    else:
        reduced = a.clamp(max=clamp_max) if clamp_max is not None else a.clone()
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


def minmax(maps: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """(C, H, W) -> each map (m - min) / (max - min + eps) (a constant map becomes 0)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / ((hi - lo) + eps).clamp_min(1e-12)


def attenuate(maps: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """(C, H, W) maps in [0, 1] times each class's strength relative to the strongest: a class whose
    raw cross-attention peaks at a fraction r of the strongest class's peak stays below r everywhere.
    ``strength``: (C,) non-negative; all zero leaves the maps unchanged."""
    s = strength.float().clamp_min(0)
    if s.numel() == 0 or float(s.max()) <= 0:
        return maps
    return maps * (s / s.max())[:, None, None]


def labels_from_maps(maps: torch.Tensor, rule: str = "threshold", threshold: float = 0.45) -> torch.Tensor:
    """(C, H, W) maps in [0, 1] -> (H, W) int64 labels, 0 = background, k + 1 = map k.

    rule "threshold" (the reference's text rule with a background threshold): values below
    ``threshold`` are zeroed, argmax, and pixels where every map is zero are background.
    rule "power" (its rule without one): a background channel (1 - max_k map_k)^2 joins the argmax.
    rule "level" (its seed rule): a constant background channel at ``threshold`` joins the argmax
    first, so a map must exceed the level strictly to win.
    """
    if maps.shape[0] == 0:
        return torch.zeros(maps.shape[-2:], dtype=torch.long, device=maps.device)
    if rule == "power":
        bg = (1 - maps.amax(0, keepdim=True)) ** 2
        return torch.cat([bg, maps], 0).argmax(0)
    if rule == "level":
        bg = torch.full_like(maps[:1], float(threshold))
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

    A point is its grid cell floor(y * h / H), floor(x * w / W); a box the cells [floor(y0 * h / H),
    floor(y1 * h / H)) x [floor(x0 * w / W), floor(x1 * w / W)) as in the reference (at least one cell:
    the reference's empty box gives NaN maps); a line the cells of its polyline rasterised on the grid
    (each cell its own column, averaged after refinement).
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
        gy1 = int(np.clip(math.floor(y1 * h / image_hw[0]), gy0 + 1, h))
        gx1 = int(np.clip(math.floor(x1 * w / image_hw[1]), gx0 + 1, w))
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


def grid_to_image(maps: torch.Tensor, grid_hw: tuple[int, int], image_hw: tuple[int, int],
                  mask_size: int | None = None, rescale: bool = True) -> torch.Tensor:
    """(L, C) grid maps -> (C, H, W) float32 at the image size (bilinear, align_corners=False).

    ``rescale`` with ``mask_size`` (the reference's text path): up to mask_size x mask_size, min-max,
    to the image size, min-max with 1e-6 added to the range. ``rescale`` without it: straight to the
    image size, min-max. No ``rescale`` (the reference's seed path): straight to the image size.
    """
    c = maps.shape[-1]
    x = maps.T.reshape(1, c, *grid_hw).float()
    if rescale and mask_size:
        x = minmax(F.interpolate(x, size=(mask_size, mask_size), mode="bilinear", align_corners=False))
        x = F.interpolate(x, size=tuple(image_hw), mode="bilinear", align_corners=False)[0]
        return minmax(x, eps=1e-6)
    x = F.interpolate(x, size=tuple(image_hw), mode="bilinear", align_corners=False)[0]
    return minmax(x) if rescale else x


class HeadSetStore(AttentionStore):
    """An ``AttentionStore`` that keeps, per recorded layer, the mean over each of several head subsets.

    ``head_sets``: name -> head indices (None = all heads). After a pass ``set_maps[name][layer]`` is
    (B, Lq, Lk) float32; ``maps`` holds the first set's (for ``select``). A head index the layer does
    not have raises ValueError during the pass.
    """

    def __init__(self, head_sets: dict[str, list[int] | None], **filters):
        super().__init__(per_head=False, **filters)
        self.head_sets = dict(head_sets)
        self.set_maps: dict[str, dict[str, torch.Tensor]] = {k: {} for k in self.head_sets}

    def record(self, name: str, kind: str, hw: tuple[int, int], factor: int, probs: torch.Tensor) -> None:
        for key, heads in self.head_sets.items():
            mean = pick_heads(probs, heads, f"{key} self-attention ({name})")
            self.set_maps[key][name] = mean.to(self.device) if self.device is not None else mean
        first = next(iter(self.set_maps.values()))[name]
        self.maps[name] = CapturedAttention(name, kind, (hw[0], hw[1]), factor, first)


# ---------------------------------------------------------------------------------------------------
# 3. The labeler
# ---------------------------------------------------------------------------------------------------

class ISegParams(LabelerParams):
    preset: Literal["coco", "voc"] = Field(
        "coco", description="the reference's per-dataset settings; voc: lam=0.015, background=power, "
                            "cross_heads=voc, its 9 VOC background words and no trailing ','. Explicit params win")
    timestep: int = Field(100, ge=0, lt=1000, description="noise level of the single UNet pass")
    iterations: int = Field(10, ge=0, description="refinement iterations N (the reference: 10)")
    lam: float = Field(0.1, ge=0, description="entropy-reduction weight lambda (the reference: 0.1 COCO, 0.015 VOC)")
    text_scale: float = Field(1.6, gt=0, description="factor on the class tokens' text embeddings")
    res_weights: dict[int, float] = Field(
        default_factory=lambda: {4: 0.7, 2: 0.3},
        description="cross-attention weight per downsampling factor of the latent (SD at 512 px: 4 = 16x16, 2 = 32x32)")
    cross_layers: list[str] | None = Field(
        default_factory=lambda: list(REFERENCE_CROSS_LAYERS),
        description="cross-attention module prefixes (the reference's 8 SD 2.x layers); None = every cross "
                    "layer at the weighted factors")
    cross_heads: Literal["all", "voc"] | dict[int, list[int]] = Field(
        "all", description="cross-attention heads per factor, indices into the layers' heads concatenated in "
                           "UNet order: all; voc (the reference's VOC subsets); or {factor: [heads]}")
    self_layers: list[str] = Field(default_factory=lambda: ["up_blocks.3.attentions.1"],
                                   description="self-attention module prefixes; the highest-resolution grid "
                                               "among them is used")
    self_heads: list[int] | None = Field(default_factory=lambda: [1, 2],
                                         description="self-attention heads averaged for text rows (the "
                                                     "reference: [1, 2]; None = all)")
    kmeans: bool = Field(True, description="KL k-means smoothing of the cross-attention")
    kmeans_clusters: int = Field(32, ge=1, description="k-means centres start every floor(side / sqrt(clusters)) "
                                                       "rows and columns")
    kmeans_iters: int = Field(20, ge=1, description="k-means iterations")
    kmeans_precision: Literal["float16", "float32"] = Field(
        "float16", description="float16: the reference's half-precision KL distances; float32: exact distances "
                               "by matrix products, no (centres x pixels x tokens) tensor (less memory)")
    background: Literal["threshold", "power"] = Field(
        "threshold", description="threshold: maps below bg_threshold are background; power: a (1 - max)^2 "
                                 "background channel")
    bg_threshold: float = Field(0.45, ge=0, le=1, description="for background=threshold (0.45 COCO)")
    background_words: list[str] = Field(default_factory=lambda: list(DEFAULT_BACKGROUND_WORDS),
                                        description="words after 'background,' in the prompt")
    background_end: str = Field(",", description="text after the last background word (the reference's COCO "
                                                 "context ends in ', ': one more ',' token)")
    drop_class_words: bool = Field(False, description="leave out background words equal to a class prompt, so a "
                                                      "class is not named twice (the reference keeps them)")
    tokens: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="category or prompt -> word(s) of its prompt whose tokens carry the class ([] = all); "
                    "default: the reference's choice for its COCO/VOC names ('traffic light' -> 'light', ...), "
                    "else all tokens")
    tags: TagParams | None = Field(
        None, description="CLIP zero-shot tags for rows without categories ({weights, threshold, templates, "
                          "background_words}): only tagged classes are prompted, as in the reference")
    untagged: Literal["attenuate", "all"] = Field(
        "attenuate", description="rows with neither categories nor a tagger prompt every class (the reference "
                                 "never does); attenuate: each class map is scaled by its raw cross-attention peak "
                                 "relative to the strongest class, so a weakly attended (absent) class cannot clear "
                                 "the background; all: every class min-max scaled to 1 as for tagged rows")
    mask_size: int | None = Field(512, ge=8, description="text maps go grid -> mask_size^2 -> min-max -> image "
                                                         "(the reference's 512); None: straight to the image")
    resize: Literal["bilinear", "area"] = Field(
        "bilinear", description="image -> resolution: bilinear on float pixels (the reference); area: "
                                "anti-aliased when shrinking (less aliasing on large images)")
    seed_lam: float = Field(0.1, ge=0, description="entropy-reduction lambda for point/box/line seeds (the "
                                                   "reference tool: 0.1)")
    seed_iterations: int = Field(50, ge=0, description="refinement iterations for seeds (the reference tool: 50)")
    seed_threshold: float = Field(0.5, ge=0, le=1, description="background level for point/box/line seeds")
    seed_self_heads: list[int] | None = Field(None, description="self-attention heads for seeded rows (the "
                                                                "reference tool: all)")
    clip_box_seeds: bool = Field(False, description="keep a box seed's mask inside its box (the reference does not)")
    seed: int = Field(1101, description="noise seed (the reference's 1101); every image gets the same noise "
                                        "whatever its batch, drawn on the UNet's device in its dtype")
    resolution: int = Field(512, ge=64, description="SD input size (square), multiple of 8")
    semantic_layer: bool = Field(False, description="add a 'semantic' layer: (H, W) category ids, 0 = background")
    min_area: int = Field(1, ge=1, description="drop masks with fewer pixels")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict):
            preset = data.get("preset", "coco")
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)}, not {preset!r}")
            data = {**PRESETS[preset], **data}
        return data

    def cross_head_index(self) -> dict[int, list[int]] | None:
        if self.cross_heads == "all":
            return None
        return VOC_CROSS_HEADS if self.cross_heads == "voc" else self.cross_heads


@dataclass
class RowPlan:
    """How one row is prompted: seeded, or its classes (indices into ``ISeg.classes``), whether they are
    image-level tags (row categories or the tagger) and its prompt(s)."""

    seeded: bool
    classes: list[int]
    tagged: bool
    plans: list[PromptPlan]


class ISeg(Labeler[dict[str, np.ndarray]]):
    """Open-vocabulary or seeded segmentation from one noisy Stable Diffusion pass.

    Host preparation (``prepare``, in the engine's decode tasks): the image resized to the SD input size.
    Device half (``forward``): tags (when a tagger is configured), VAE encode, the attention pass(es),
    KL k-means, entropy reduction and the refinement (N matrix products per row), giving each row's
    refined maps at the attention grid. Host half (``postprocess``): the maps brought to the image size,
    labels, masks, box clipping, scores, instances and the semantic layer.

    Payload (one per image):
        ``maps``     (L, C) float32: refined maps on the grid, one column per class (text rows, in the
                     order of ``classes``) or per seed (seeded rows, in ``seeds_from_prompts`` order);
        ``grid``     (2,) int32: the grid (h, w), L = h * w;
        ``seeded``   () bool: the row was seeded (points/boxes/lines), so its seeds are re-derived from
                     its prompt on the host;
        ``classes``  (C,) int32: text rows, indices into ``self.classes`` (empty for seeded rows);
        ``tagged``   () bool: the classes are image-level tags (row categories or the tagger);
        ``strength`` (C,) float32: each class's raw fused cross-attention peak (for ``untagged``).
    The maps stay float32 at the grid size: the labels threshold and argmax them, and image-size maps
    would be C x H x W floats to ship instead of C x L.
    """

    name = "iseg"
    Params = ISegParams
    params: ISegParams
    summary = ("training-free segmentation from Stable Diffusion attention (iSeg, reference defaults): text "
               "classes (row tags, CLIP tags or all) or point/box/line seeds")
    default_weights = "stabilityai/stable-diffusion-2-1-base"

    def __init__(self, spec, *, device: str = "cpu", storage=None):
        super().__init__(spec, device=device, storage=storage)
        from pseudolabel.models.attention import load_sd_components, resolve_dtype

        if self.params.resolution % 8:
            raise ValueError("iseg: resolution must be a multiple of 8")
        # no torch.compile here: the single UNet pass runs under attention-capture processors (python
        # side effects in every recorded layer, processors swapped per call), which compile poorly
        self.sd = load_sd_components(self.weights_id, self.storage, spec.revision, spec.dtype, device)
        self.tagger = None
        if self.params.tags is not None:
            from pseudolabel.models.iseg_tags import ClipTagger

            self.tagger = ClipTagger(self.params.tags, [c[2] for c in self.classes], self.storage, device,
                                     resolve_dtype(spec.dtype, device))
        self._choices: list[list[list[int] | None]] | None = None

    def setup_host(self) -> None:
        #: (category, id, prompts) per ontology entry; rows and payloads index into this list
        self.classes = [(e.category, entry_id(e), list(e.prompts)) for e in self.ontology]
        known = {c[0] for c in self.classes} | {p for c in self.classes for p in c[2]}
        unknown = sorted(set(self.params.tokens) - known)
        if unknown:
            raise ValueError(f"iseg: tokens names {unknown}, which are neither categories nor prompts of the ontology")
        # an ontology entry's own ``token`` wins over ``params.tokens`` for its category
        overrides = {**self.params.tokens, **{e.category: e.token for e in self.ontology if e.token is not None}}
        #: per class, per prompt: the words whose tokens carry the class (None = all)
        self.class_words = [class_words(name, prompts, overrides) for name, _, prompts in self.classes]

    def weight_sources(self) -> list[str]:
        extra = [self.params.tags.weights] if self.params.tags is not None else []
        return super().weight_sources() + extra

    # -- per-row planning ---------------------------------------------------------------------------
    def _row_classes(self, prompts: dict | None) -> list[int] | None:
        """Indices into ``self.classes`` of the row's ``categories`` (image-level tags); None without them."""
        return row_entries(self.ontology, prompts)

    def _class_index(self, value) -> int | None:
        return entry_index(self.ontology, value)

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

    def _token_choices(self) -> list[list[list[int] | None]]:
        """Per class, per prompt: offsets of its class tokens (None = all), from ``class_words``."""
        if self._choices is None:
            tok = self.sd.tokenizer
            self._choices = [[word_token_offsets(tok, phrase, words) for phrase, words in zip(c[2], ws)]
                             for c, ws in zip(self.classes, self.class_words)]
        return self._choices

    def plan_rows(self, images: list[np.ndarray], prompts: list[Any]) -> list[RowPlan]:
        """Each row's classes and prompts: row categories when given, else the tagger's tags when a
        tagger is configured, else every class (untagged); seeded rows get ``SEED_PROMPT``."""
        p = self.params
        prompts = [prm if isinstance(prm, dict) else {} for prm in prompts]
        seeded = [self._is_seeded(prm) for prm in prompts]
        given = [None if s else self._row_classes(prm) for s, prm in zip(seeded, prompts)]
        need = [i for i, (s, g) in enumerate(zip(seeded, given)) if not s and g is None]
        tags: dict[int, list[int]] = {}
        if self.tagger is not None and need:
            tags = dict(zip(need, self.tagger.tags([images[i] for i in need])))
        choices = self._token_choices()
        rows = []
        for i in range(len(prompts)):
            if seeded[i]:
                rows.append(RowPlan(True, [], False, [PromptPlan(SEED_PROMPT, [[0]], [])]))
                continue
            row_given = given[i]
            classes, tagged = (row_given, True) if row_given is not None else \
                (tags[i], True) if i in tags else (list(range(len(self.classes))), False)
            plans = plan_prompts(self.sd.tokenizer, [self.classes[k][2] for k in classes], p.background_words,
                                 choices=[choices[k] for k in classes], end=p.background_end,
                                 drop_class_words=p.drop_class_words)
            rows.append(RowPlan(False, classes, tagged, plans))
        return rows

    # -- the pass ------------------------------------------------------------------------------------
    def _attention(self, latents: torch.Tensor, texts: list[str], token_ids: list[list[int]], head_sets: dict):
        """One noisy pass on ``latents`` (B rows) with per-row ``texts``, ``token_ids`` scaled by
        ``text_scale``. Returns (self-attention {head set: (B, L, L)}, grid (h, w), fused cross-attention
        (B, L, T) with unit-mass token maps, the same fused without that normalisation (B, L, T))."""
        from pseudolabel.models.attention import (
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
        factors = [f for f, w in p.res_weights.items() if w]
        cross_store = AttentionStore(layers=p.cross_layers, kind="cross", factors=factors, per_head=True)
        self_store = HeadSetStore(head_sets, layers=p.self_layers, kind="self")
        param = next(self.sd.unet.parameters())
        # every row gets the noise it would get alone, whatever the batch and its position in it
        noise = per_row_noise(latents.shape[0], latents.shape[1:], p.seed, device=param.device, dtype=param.dtype)[0]
        with capture_attention(self.sd.unet, cross_store), capture_attention(self.sd.unet, self_store):
            noisy_unet_pass(self.sd.unet, self.sd.scheduler, latents, p.timestep, emb, noise=noise)
        if not self_store.maps:
            raise ValueError(f"iseg: no self-attention layer matches {p.self_layers}")
        grid = max((r.hw for r in self_store.maps.values()), key=lambda hw: hw[0] * hw[1])
        names = [r.name for r in self_store.select(resolution=grid)]
        self_attn = {k: torch.stack([m[n] for n in names]).mean(0) for k, m in self_store.set_maps.items()}
        heads = p.cross_head_index()
        per_factor, grids = {}, {}
        for factor in sorted({r.factor for r in cross_store.maps.values()}):
            recs = cross_store.select(factor=factor)  # UNet order: heads concatenate as in the reference
            stacked = torch.cat([r.probs for r in recs], dim=1)
            per_factor[factor] = pick_heads(stacked, None if heads is None else heads.get(factor),
                                            f"cross-attention (factor {factor})")
            grids[factor] = recs[0].hw
        cross = fuse_cross_attention(per_factor, grids, p.res_weights, grid)
        raw = fuse_cross_attention(per_factor, grids, p.res_weights, grid, normalize=False)
        return self_attn, grid, cross, raw

    # -- host preparation ----------------------------------------------------------------------------
    def prepare(self, image: np.ndarray, prompt: Any) -> dict[str, np.ndarray]:
        """Host preparation of one (H, W, 3) uint8 RGB image: ``pixels`` (S, S, 3) float32 in [0, 255],
        the image at the SD input size S = ``resolution``: float32 bilinear (the reference's
        ``cv2.resize`` of its float image) or uint8 area interpolation (``resize="area"``, when it
        shrinks). Float32 because the reference resizes the float image. Prompts and tags stay in
        ``forward`` (they only affect the device side)."""
        import cv2

        size = self.params.resolution
        im = np.ascontiguousarray(image[..., :3])
        pixels: np.ndarray
        if self.params.resize == "area" and min(im.shape[:2]) > size:
            pixels = cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
        else:
            pixels = cv2.resize(im.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        return {"pixels": pixels}

    # -- device half ---------------------------------------------------------------------------------
    def forward(self, images: list[np.ndarray], prompts: list[Any],
                prepared: list[dict[str, np.ndarray] | None] | None = None) -> list[dict[str, np.ndarray]]:
        """Device half. ``prepared``: ``prepare``'s ``pixels`` per image (made here when None)."""
        from pseudolabel.models.attention import encode_image
        from pseudolabel.models.device import to_host

        p = self.params
        if not images:
            return []
        ready = self.prepared_inputs(images, prompts, prepared)
        with torch.inference_mode():
            # 1. plan the rows (tags first), encode the images at the SD input size
            rows = self.plan_rows(images, prompts)
            # (the [-1, 1] scaling stays on the host: CUDA divides by a scalar as a product with its
            # reciprocal, which can differ from the division in the last bit)
            latents = encode_image(self.sd.vae, np.stack([r["pixels"] for r in ready]))  # type: ignore[index]
            head_sets = {}
            if any(not r.seeded for r in rows):
                head_sets["text"] = p.self_heads
            if any(r.seeded for r in rows):
                head_sets["seed"] = p.seed_self_heads

            # 2. passes: pass g batches every row with a g-th prompt; self-attention from pass 0
            n_pass = max(len(r.plans) for r in rows)
            self_attn = grid = None
            class_maps: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in rows]
            for g in range(n_pass):
                idx = [i for i, r in enumerate(rows) if len(r.plans) > g]
                plans = [rows[i].plans[g] for i in idx]
                flat_ids = [sorted({t for ids in pl.token_ids for t in ids}) for pl in plans]
                sa, grid_g, cross, raw = self._attention(latents[idx], [pl.text for pl in plans], flat_ids, head_sets)
                if g == 0:
                    self_attn, grid = sa, grid_g
                assert grid is not None  # set by pass 0
                for j, (i, pl) in enumerate(zip(idx, plans)):
                    if rows[i].seeded or not pl.token_ids:
                        continue
                    x = cross[j]
                    if p.kmeans:
                        x = kl_kmeans_smooth(x, grid, p.kmeans_clusters, p.kmeans_iters, precision=p.kmeans_precision)
                    sel = select_tokens(x, pl.token_ids)
                    strength = select_tokens(raw[j], pl.token_ids).amax(0)
                    for c, k in enumerate(pl.classes):
                        class_maps[i].append((rows[i].classes[k], sel[:, c], strength[c]))

            # 3. per row: entropy reduction and refinement on the grid
            assert self_attn is not None  # every row has at least one prompt, so pass 0 ran
            refined = [self._refine_row(images[i].shape[:2], prompts[i], rows[i].seeded, class_maps[i],
                                        self_attn["seed" if rows[i].seeded else "text"][i], grid)
                       for i in range(len(images))]
            strengths = [torch.stack([s for _, _, s in m]) if m else torch.zeros(0) for m in class_maps]
            hosts = to_host(refined)
            strengths_np = [s.float().cpu().numpy() for s in strengths]
        grid_np = np.asarray(grid, np.int32)
        return [{"maps": host,
                 "grid": grid_np.copy(),
                 "seeded": np.asarray(rows[i].seeded, bool),
                 "classes": np.asarray([k for k, _, _ in class_maps[i]], np.int32),
                 "tagged": np.asarray(rows[i].tagged, bool),
                 "strength": strengths_np[i].astype(np.float32)}
                for i, host in enumerate(hosts)]

    def _refine_row(self, hw, prompt, seeded, class_maps, self_attn, grid) -> torch.Tensor:
        """One row's refined (L, C) float32 maps on the grid, on the self-attention's device."""
        p = self.params
        length = grid[0] * grid[1]
        if seeded:
            affinity = entropy_reduce(self_attn, p.seed_lam, clamp_max=1.0, row_normalize=True)
            seeds = seeds_from_prompts(prompt, hw, grid)
            mat, owner = seed_matrix(seeds, length)
            return combine_seed_columns(refine(mat.to(affinity.device), affinity, p.seed_iterations), owner).float()
        if not class_maps:
            return torch.zeros((length, 0), dtype=torch.float32, device=self_attn.device)
        affinity = entropy_reduce(self_attn, p.lam)
        cols = torch.stack([m for _, m, _ in class_maps], -1)
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
            maps = grid_to_image(refined, grid, hw, rescale=False)
            labels = labels_from_maps(maps, "level", p.seed_threshold)
            cats = [self._seed_category(s.category) for s in seeds]
            prompts_txt = [s.kind for s in seeds]
            boxes = [s.box_xyxy if p.clip_box_seeds else None for s in seeds]
        else:
            classes = [int(k) for k in payload["classes"]]
            if len(classes) != refined.shape[-1]:
                raise RuntimeError(f"iseg: {refined.shape[-1]} class maps for {len(classes)} classes")
            if not classes:
                return LabelOutput(layers=self._semantic(np.zeros(hw, np.int64), []))
            maps = grid_to_image(refined, grid, hw, mask_size=p.mask_size)
            if not bool(payload["tagged"]) and p.untagged == "attenuate":
                maps = attenuate(maps, torch.from_numpy(np.asarray(payload["strength"], np.float32)))
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
                ys = slice(max(0, int(math.floor(y0))), int(math.ceil(y1)))
                clip[ys, max(0, int(math.floor(x0))):int(math.ceil(x1))] = True
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
