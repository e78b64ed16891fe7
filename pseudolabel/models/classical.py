"""Weight-free classical baselines, so a job produces meaningful labels on any machine.

These are baselines, not the research methods: ``classical_tokens`` (EdgeTokens) turns an
edge-strength map into subobject tokens with the same post-processing as ``directsam``;
``classical_grabcut`` (GrabCutForeground) segments foreground objects with OpenCV's GrabCut;
``classical_inpaint`` (ClassicalInpaint) removes that foreground with OpenCV inpainting.

Layout: pure image helpers first (edge map, border-contrast saliency, GrabCut runs, GMM posterior),
then the two thin labeler classes that call them. Images are (H, W, 3) uint8 RGB throughout.
Every OpenCV call that draws random numbers (k-means, GrabCut's GMM initialisation) is preceded by a
fixed ``cv2.setRNGSeed`` so the same image always gives the same labels.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field

from pseudolabel.models.base import Instance, Labeler, LabelerParams, LabelOutput, Tokens, entry_id
from pseudolabel.models.tokens import boundary_to_tokens

RNG_SEED = 12345

# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def resize_longest(image: np.ndarray, longest: int | None) -> tuple[np.ndarray, float]:
    """Downscale so the longest side is at most ``longest`` (never upscale).

    Returns (resized image, scale = new / old); ``longest=None`` returns the input and 1.0.
    """
    h, w = image.shape[:2]
    if longest is None or max(h, w) <= longest:
        return image, 1.0
    scale = longest / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def upsample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) bool -> (H, W) bool by bilinear interpolation of the 0/1 mask and a 0.5 cut."""
    if mask.shape == tuple(shape):
        return mask.astype(bool, copy=False)
    up = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return up > 0.5


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float32 CIE Lab (L in [0, 100], a/b about [-127, 127])."""
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def edge_boundary_map(image: np.ndarray, median: int = 5, blur_sigma: float = 1.5, percentile: float = 98.0,
                      norm_floor: float = 15.0, canny: bool = False, max_side: int | None = 1024) -> np.ndarray:
    """Edge strength of an RGB image as a boundary probability map.

    Steps: 1. downscale to ``max_side``; 2. median filter (removes fine texture and grain while
    keeping object edges sharp) and Gaussian blur; 3. Scharr gradient of each Lab channel, magnitude
    = sqrt of the summed squares; 4. divide by max(``percentile``-th percentile, ``norm_floor``) and
    clip to [0, 1] (the floor keeps a flat, low-contrast image from having its noise stretched into
    edges); 5. optionally take the max with Canny edges of the smoothed grey image; 6. bilinear
    upsampling back to the input size.

    Args:
        image: (H, W, 3) uint8 RGB.
        median: median filter aperture (odd, 0 or 1 = off).
        blur_sigma: Gaussian sigma in pixels of the working image (0 = off).
        percentile: gradient percentile that maps to 1.0.
        norm_floor: lower bound of the normaliser, in Lab units per pixel.
        canny: union with OpenCV Canny edges (set to 1.0 there).
        max_side: working size (longest side) or None for full size.

    Returns:
        (H, W) float32 in [0, 1], high on edges.
    """
    h, w = image.shape[:2]
    # 1-2. working size and smoothing
    work, _ = resize_longest(np.ascontiguousarray(image), max_side)
    if median and median > 1:
        work = cv2.medianBlur(work, int(median) | 1)
    lab = rgb_to_lab(work)
    if blur_sigma > 0:
        lab = cv2.GaussianBlur(lab, (0, 0), float(blur_sigma))
    # 3. colour gradient magnitude (Scharr kernels sum to 32 per unit step)
    gx = cv2.Scharr(lab, cv2.CV_32F, 1, 0) / 32.0
    gy = cv2.Scharr(lab, cv2.CV_32F, 0, 1) / 32.0
    mag = np.sqrt((gx * gx + gy * gy).sum(axis=-1))
    # 4. robust normalisation
    norm = max(float(np.percentile(mag, percentile)), float(norm_floor), 1e-6)
    prob = np.clip(mag / norm, 0.0, 1.0)
    # 5. optional Canny union
    if canny:
        grey = cv2.cvtColor(work, cv2.COLOR_RGB2GRAY)
        prob = np.maximum(prob, (cv2.Canny(grey, 50, 150) > 0).astype(np.float32))
    # 6. back to the input size
    if prob.shape != (h, w):
        prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    return prob.astype(np.float32, copy=False)


def border_contrast_saliency(image: np.ndarray, band: float = 0.06, clusters: int = 4,
                             min_cluster_fraction: float = 0.1) -> np.ndarray:
    """How unlike the image border each pixel is: a weight-free foreground prior.

    Steps: 1. Lab colour of the slightly blurred image; 2. k-means (``clusters``) of the pixels in a
    border band ``band`` × the shorter side wide; clusters with less than ``min_cluster_fraction`` of
    the band are dropped (objects touching the border); 3. each pixel's distance to the nearest kept
    centre; 4. divided by the 75th percentile of that distance inside the band plus 2 Lab units.

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W) float32 >= 0; about 1 on typical background, several times that on salient objects.
    """
    # 1. colour
    lab = rgb_to_lab(cv2.GaussianBlur(image, (0, 0), 1.5))
    h, w = lab.shape[:2]
    b = max(2, int(round(band * min(h, w))))
    ring = np.ones((h, w), bool)
    ring[b:h - b, b:w - b] = False
    samples = lab[ring].reshape(-1, 3)
    samples = np.ascontiguousarray(samples[:: max(1, len(samples) // 4000)], dtype=np.float32)
    # 2. border colour clusters
    k = max(1, min(int(clusters), len(samples)))
    cv2.setRNGSeed(RNG_SEED)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    # OpenCV accepts bestLabels=None; its stubs require an array
    _, assign, centres = cv2.kmeans(samples, k, None, criteria, 2, cv2.KMEANS_PP_CENTERS)  # type: ignore[call-overload]
    frac = np.bincount(assign.ravel(), minlength=k) / len(samples)
    keep = frac >= min(min_cluster_fraction, frac.max())
    centres = centres[keep]
    # 3. distance to the nearest border colour
    dist = np.full((h, w), np.inf, np.float32)
    for c in centres:
        dist = np.minimum(dist, np.sqrt(((lab - c) ** 2).sum(axis=-1)))
    # 4. relative to the border's own spread
    ref = float(np.percentile(dist[ring], 75)) + 2.0
    return (dist / ref).astype(np.float32)


def gmm_log_likelihood(pixels: np.ndarray, model: np.ndarray) -> np.ndarray:
    """Log-likelihood of colours under one of OpenCV GrabCut's 5-component GMMs.

    Args:
        pixels: (N, 3) float64 colours in the channel order GrabCut saw (BGR, 0-255).
        model: (1, 65) float64 as filled by ``cv2.grabCut``: 5 weights, 5×3 means, 5×3×3 covariances.

    Returns:
        (N,) float64 log p(pixel).
    """
    m = np.asarray(model, np.float64).ravel()
    n_comp = len(m) // 13
    weights = m[:n_comp]
    means = m[n_comp:4 * n_comp].reshape(n_comp, 3)
    covs = m[4 * n_comp:].reshape(n_comp, 3, 3)
    logs = np.full((len(pixels), n_comp), -np.inf)
    for k in range(n_comp):
        if weights[k] <= 0:
            continue
        cov = covs[k] + np.eye(3) * 1e-6
        sign, logdet = np.linalg.slogdet(cov)
        if sign <= 0:
            continue
        diff = pixels - means[k]
        maha = np.einsum("ni,ni->n", diff @ np.linalg.inv(cov), diff)
        logs[:, k] = np.log(weights[k]) - 0.5 * (maha + logdet + 3 * np.log(2 * np.pi))
    top = logs.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return (top + np.log(np.exp(logs - top).sum(axis=1, keepdims=True) + 1e-300))[:, 0]


def foreground_posterior(pixels: np.ndarray, fgd_model: np.ndarray, bgd_model: np.ndarray) -> np.ndarray:
    """(N,) float32 p(foreground | colour) in [0, 1] of (N, 3) BGR colours from GrabCut's two GMMs
    (equal priors)."""
    px = pixels.reshape(-1, 3).astype(np.float64)
    diff = np.clip(gmm_log_likelihood(px, bgd_model) - gmm_log_likelihood(px, fgd_model), -50, 50)
    return (1.0 / (1.0 + np.exp(diff))).astype(np.float32)


def run_grabcut(bgr: np.ndarray, mask: np.ndarray, rect: tuple[int, int, int, int] | None,
                iterations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One seeded ``cv2.grabCut`` call.

    Args:
        bgr: (h, w, 3) uint8 BGR.
        mask: (h, w) uint8 of GC_* labels (initial labels with ``rect=None``; overwritten).
        rect: (x, y, w, h) initial rectangle, or None to initialise from ``mask``.
        iterations: GrabCut iterations.

    Returns:
        (foreground (h, w) bool, foreground GMM (1, 65) float64, background GMM (1, 65) float64).
    """
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(RNG_SEED)
    mode = cv2.GC_INIT_WITH_MASK if rect is None else cv2.GC_INIT_WITH_RECT
    # OpenCV accepts rect=None with GC_INIT_WITH_MASK; its stubs require a sequence
    cv2.grabCut(bgr, mask, rect, bgd, fgd, int(iterations), mode)  # type: ignore[arg-type]
    fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    return fg, fgd, bgd


def margin_score(bgr: np.ndarray, component: np.ndarray, fgd_model: np.ndarray, bgd_model: np.ndarray,
                 ring: int = 3) -> float:
    """Confidence of one foreground component: the foreground-probability margin across its edge.

    Mean p(foreground | colour) inside the (h, w) bool ``component`` minus the mean in a ``ring``-pixel
    band just outside it, clipped to [0, 1]: 1 when the colour models separate the object cleanly from
    its surroundings, near 0 when they cannot tell them apart. With no outside band (the component
    covers the image) the inside mean alone.
    """
    size = 2 * ring + 1
    band = cv2.dilate(component.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    band = band.astype(bool) & ~component
    inside = float(foreground_posterior(bgr[component], fgd_model, bgd_model).mean())
    if not band.any():
        return inside
    outside = float(foreground_posterior(bgr[band], fgd_model, bgd_model).mean())
    return float(np.clip(inside - outside, 0.0, 1.0))


def saliency_init_mask(saliency: np.ndarray, background_below: float, probable_above: float,
                       sure_above: float) -> np.ndarray:
    """GrabCut labels from a saliency map: sure/probable background and foreground.

    saliency: (h, w) float32 from ``border_contrast_saliency``. Returns (h, w) uint8 GC_* labels.
    """
    mask = np.full(saliency.shape, cv2.GC_PR_BGD, np.uint8)
    mask[saliency > probable_above] = cv2.GC_PR_FGD
    mask[saliency < background_below] = cv2.GC_BGD
    mask[saliency > sure_above] = cv2.GC_FGD
    return mask


def components_above(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """8-connected components of an (h, w) bool mask with at least ``min_area`` pixels, largest first."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas, kind="stable")
    return [labels == (i + 1) for i in order if areas[i] >= max(1, min_area)]


# ----------------------------------------------------------------------------------------------
# Labelers
# ----------------------------------------------------------------------------------------------


class EdgeTokensParams(LabelerParams):
    threshold: float = Field(0.35, ge=0.0, le=1.0, description="boundary threshold on the normalised edge map")
    mode: Literal["simple", "partition"] = Field(
        "partition", description="simple: components of the interiors, edges unassigned; partition: watershed tiling")
    max_tokens: int | None = Field(256, ge=1, description="keep at most this many tokens (largest first); null = all")
    min_area: int = Field(20, ge=0, description="drop token seeds smaller than this many pixels")
    median: int = Field(5, ge=0, le=31, description="median filter aperture against texture (0 = off)")
    blur_sigma: float = Field(1.5, ge=0.0, description="Gaussian blur sigma in pixels before the gradient")
    percentile: float = Field(98.0, gt=0.0, le=100.0, description="gradient percentile mapped to 1.0")
    norm_floor: float = Field(15.0, ge=0.0, description="lower bound of the normaliser (Lab units per pixel)")
    canny: bool = Field(False, description="union the edge map with Canny edges")
    max_side: int | None = Field(1024, ge=16, description="compute the edge map at most at this longest side")


class EdgeTokens(Labeler[None]):
    """Baseline subobject tokens: an edge-strength map (median + Gaussian smoothing, Lab Scharr gradient,
    percentile normalisation) through the same boundary -> tokens post-processing as ``directsam``.

    A weight-free classical baseline, not DirectSAM: edges come from colour gradients only.
    """

    name: ClassVar[str] = "classical_tokens"
    Params = EdgeTokensParams
    params: EdgeTokensParams  # the validated Params of this labeler
    summary: ClassVar[str] = "baseline: edge-gradient boundary map -> subobject tokens (no weights)"
    baseline: ClassVar[bool] = True

    def boundary_map(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) float32 edge probability in [0, 1]."""
        p = self.params
        return edge_boundary_map(image, median=p.median, blur_sigma=p.blur_sigma, percentile=p.percentile,
                                 norm_floor=p.norm_floor, canny=p.canny, max_side=p.max_side)

    def postprocess(self, image: np.ndarray, prompt: Any, payload: None) -> LabelOutput:
        """Host only (no network): edge map -> tokens."""
        p = self.params
        tokens: Tokens = boundary_to_tokens(self.boundary_map(image), p.threshold, p.mode,
                                            max_tokens=p.max_tokens, min_area=p.min_area)
        return LabelOutput(tokens=tokens)


class GrabCutParams(LabelerParams):
    working_size: int = Field(256, ge=32, description="GrabCut runs at this longest side; masks are upsampled back")
    iterations: int = Field(5, ge=1, le=50, description="GrabCut iterations")
    init: Literal["saliency", "rect"] = Field(
        "saliency", description="without box prompts: border-contrast saliency, or a centred rectangle")
    rect_margin: float = Field(0.1, ge=0.0, lt=0.5, description="init=rect: margin on each side, fraction of the side")
    background_below: float = Field(2.0, ge=0.0, description="init=saliency: saliency below this is sure background")
    probable_above: float = Field(4.0, ge=0.0, description="init=saliency: saliency above this is probable foreground")
    sure_above: float = Field(8.0, ge=0.0, description="init=saliency: saliency above this is sure foreground")
    box_margin: float = Field(0.15, ge=0.0, le=2.0,
                              description="box prompts: context around each box, fraction of its size")
    min_area_fraction: float = Field(0.002, ge=0.0, lt=1.0,
                                     description="drop components smaller than this fraction of the image")
    max_instances: int = Field(20, ge=1, description="without prompts: keep at most this many components")


class GrabCutForeground(Labeler[None]):
    """Baseline foreground masks with OpenCV GrabCut (no weights).

    - With box prompts (``prompts["boxes_xyxy"]``, pixels [x0, y0, x1, y1]): one GrabCut per box on a
      crop with ``box_margin`` context, initialised with the box as the rectangle; the largest
      foreground component inside the box is that box's instance. Its category is
      ``prompts["categories"][i]`` looked up in the ontology (by category name or one of its prompts);
      a box whose category is not in a non-empty ontology is skipped, so ids always come from the job.
    - Without prompts: GrabCut on the whole image initialised from border-contrast saliency (``init=
      saliency``: colours unlike the image border are probable foreground) or a centred rectangle
      (``init=rect``); every foreground component above ``min_area_fraction`` becomes an instance of
      the ontology's first entry.
    - Category when the ontology is empty: ``foreground`` with id 1.
    - Score: ``margin_score``: mean p(foreground | colour) from GrabCut's own colour models (equal
      priors) inside the instance minus the mean in a 3 px band outside it, in [0, 1].

    A weight-free classical baseline, not one of the research methods.
    """

    name: ClassVar[str] = "classical_grabcut"
    Params = GrabCutParams
    params: GrabCutParams  # the validated Params of this labeler
    summary: ClassVar[str] = "baseline: GrabCut foreground masks from box prompts or a saliency init (no weights)"
    baseline: ClassVar[bool] = True
    DEFAULT_CATEGORY: ClassVar[tuple[int, str]] = (1, "foreground")

    # -- categories ---------------------------------------------------------------------------
    def default_category(self) -> tuple[int, str]:
        """(id, category) of instances without a category name: the ontology's first entry."""
        if not self.ontology:
            return self.DEFAULT_CATEGORY
        entry = self.ontology[0]
        return entry_id(entry), entry.category

    def resolve_category(self, name: str | None) -> tuple[int, str] | None:
        """(id, category) for a prompt's category name, or None when the ontology has no such entry."""
        if not self.ontology or name is None:
            return self.default_category()
        for entry in self.ontology:
            if name == entry.category or name in entry.prompts:
                return entry_id(entry), entry.category
        return None

    # -- one image ----------------------------------------------------------------------------
    def label_whole_image(self, image: np.ndarray) -> list[Instance]:
        """Foreground components of an (H, W, 3) uint8 RGB image without prompts."""
        p = self.params
        h, w = image.shape[:2]
        # 1. working size, BGR for OpenCV
        small, _ = resize_longest(image, p.working_size)
        bgr = np.ascontiguousarray(small[:, :, ::-1])
        sh, sw = small.shape[:2]
        # 2. initialisation
        if p.init == "rect":
            mx, my = int(round(p.rect_margin * sw)), int(round(p.rect_margin * sh))
            rect = (mx, my, max(1, sw - 2 * mx), max(1, sh - 2 * my))
            mask = np.zeros((sh, sw), np.uint8)
        else:
            rect = None
            mask = saliency_init_mask(border_contrast_saliency(small), p.background_below,
                                      p.probable_above, p.sure_above)
            is_fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
            if not is_fg.any() or is_fg.all():
                return []  # nothing stands out from the border (or everything does)
        # 3. segment, split into components
        fg, fgd, bgd = run_grabcut(bgr, mask, rect, p.iterations)
        min_area = int(np.ceil(p.min_area_fraction * sh * sw))
        category = self.default_category()
        instances = []
        for comp in components_above(fg, min_area)[: p.max_instances]:
            instances.append(Instance(mask=upsample_mask(comp, (h, w)), category_id=category[0],
                                      category=category[1], score=margin_score(bgr, comp, fgd, bgd),
                                      prompt=None))
        return instances

    def label_box(self, image: np.ndarray, box: list[float], category: tuple[int, str],
                  prompt: str | None) -> Instance | None:
        """One instance from one [x0, y0, x1, y1] pixel box of an (H, W, 3) uint8 RGB image."""
        p = self.params
        h, w = image.shape[:2]
        # 1. clip the box, add context
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, x1 = sorted((max(0.0, min(w, x0)), max(0.0, min(w, x1))))
        y0, y1 = sorted((max(0.0, min(h, y0)), max(0.0, min(h, y1))))
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        mx, my = p.box_margin * (x1 - x0) + 4, p.box_margin * (y1 - y0) + 4
        cx0, cy0 = int(max(0, np.floor(x0 - mx))), int(max(0, np.floor(y0 - my)))
        cx1, cy1 = int(min(w, np.ceil(x1 + mx))), int(min(h, np.ceil(y1 + my)))
        crop = image[cy0:cy1, cx0:cx1]
        # 2. working size; the box as GrabCut's rectangle (kept one pixel inside the crop)
        small, scale = resize_longest(crop, p.working_size)
        sh, sw = small.shape[:2]
        rx0 = int(np.clip(np.floor((x0 - cx0) * scale), 1 if cx0 == 0 and sw > 2 else 0, sw - 2))
        ry0 = int(np.clip(np.floor((y0 - cy0) * scale), 1 if cy0 == 0 and sh > 2 else 0, sh - 2))
        rx1 = int(np.clip(np.ceil((x1 - cx0) * scale), rx0 + 1, sw - 1 if cx1 == w and sw > 2 else sw))
        ry1 = int(np.clip(np.ceil((y1 - cy0) * scale), ry0 + 1, sh - 1 if cy1 == h and sh > 2 else sh))
        mask = np.zeros((sh, sw), np.uint8)
        bgr = np.ascontiguousarray(small[:, :, ::-1])
        try:
            fg, fgd, bgd = run_grabcut(bgr, mask, (rx0, ry0, rx1 - rx0, ry1 - ry0), p.iterations)
        except cv2.error:
            return None  # degenerate rectangle (e.g. the box covers the whole crop with no context)
        # 3. the largest component is the instance
        comps = components_above(fg, 1)
        if not comps:
            return None
        comp = comps[0]
        full = np.zeros((h, w), bool)
        full[cy0:cy1, cx0:cx1] = upsample_mask(comp, crop.shape[:2])
        if not full.any():
            return None
        return Instance(mask=full, category_id=category[0], category=category[1],
                        score=margin_score(bgr, comp, fgd, bgd), prompt=prompt)

    def postprocess(self, image: np.ndarray, prompt: Any, payload: None) -> LabelOutput:
        """Host only (no network): GrabCut per box prompt, or on the whole image without prompts."""
        boxes = (prompt or {}).get("boxes_xyxy") if isinstance(prompt, dict) else None
        if not boxes:
            return LabelOutput(instances=self.label_whole_image(image))
        names = list(prompt.get("categories") or [])
        instances = []
        for i, box in enumerate(boxes):
            name = names[i] if i < len(names) else None
            category = self.resolve_category(name)
            if category is None:
                continue
            inst = self.label_box(image, box, category, prompt=name)
            if inst is not None:
                instances.append(inst)
        return LabelOutput(instances=instances)


class ClassicalInpaintParams(GrabCutParams):
    dilate: int = Field(3, ge=0, le=50, description="grow the foreground mask by this many pixels before filling")
    radius: int = Field(5, ge=1, le=50, description="OpenCV inpainting neighbourhood radius in pixels")
    method: Literal["telea", "ns"] = Field("telea",
                                           description="OpenCV inpainting: Telea fast marching or Navier-Stokes")


class ClassicalInpaint(GrabCutForeground):
    """Baseline foreground/background separation: GrabCut foreground (as ``classical_grabcut``, same
    prompts and categories) removed from the image with OpenCV inpainting (no weights).

    Layers: ``background`` (H, W, 3) uint8 RGB, the image with the union of the foreground instances
    (grown by ``dilate`` px) filled from its surroundings; ``foreground_mask`` (H, W) uint8 0/255, the
    filled region. Instances are the GrabCut ones. A weight-free classical baseline, not FoBa/SeFM.
    """

    name: ClassVar[str] = "classical_inpaint"
    Params = ClassicalInpaintParams
    params: ClassicalInpaintParams  # the validated Params of this labeler
    summary: ClassVar[str] = "baseline: GrabCut foreground + OpenCV inpainting -> background plate (no weights)"
    baseline: ClassVar[bool] = True

    def postprocess(self, image: np.ndarray, prompt: Any, payload: None) -> LabelOutput:
        from pseudolabel.models.inpainting import inpaint_opencv

        p = self.params
        out = super().postprocess(image, prompt, payload)
        # 1. union of the instances, grown a little so soft edges and halos are filled too
        fg = np.zeros(image.shape[:2], bool)
        for inst in out.instances:
            fg |= inst.mask
        if p.dilate and fg.any():
            size = 2 * p.dilate + 1
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
            fg = cv2.dilate(fg.astype(np.uint8), kernel).astype(bool)
        # 2. fill it from the surroundings
        out.layers["background"] = inpaint_opencv(image, fg, radius=p.radius, method=p.method)
        out.layers["foreground_mask"] = fg.astype(np.uint8) * 255
        return out
