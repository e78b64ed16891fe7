"""``foba``: foreground/background separation by concept distillation (Dombrowski et al., ICCV 2023).

Per image, with two Stable Diffusion checkpoints: ``weights`` (the base model, SD 1.4 by default) gives
the attention, ``inpaint_weights`` (the EMA UNet fine-tuned by ``pseudolabel train-foba``) inpaints.

0. Canvas. The image is resized so its long edge is ``resolution`` (aspect kept) and put at the top left
   of a black ``resolution`` square; the VAE encodes the canvas (a posterior sample) to z0 (B, 4, h, w).
1. Preliminary mask. For each timestep t in ``start_timestep, start_timestep - stride, ...`` (40 steps:
   781, 761, ..., 1) z0 is re-noised to t and the base UNet runs once with ``"a photo of a {class}"``
   while every cross-attention layer records its head-averaged softmax. Each layer's attention at the
   class token(s) is nearest-upsampled to the latent grid and averaged over steps and layers. A
   two-component Gaussian mixture (scikit-learn's default rules, variance regularisation 1e-6)
   thresholds it at the mean of its means, and an orphan filter (3x3 majority, border kept) cleans it.
2. Refinement. DDIM (``inpaint_steps`` = 50, eta 0) with the fine-tuned UNet and ``"a photo of a
   background"`` from random x_T; before every step the kept region (outside the preliminary mask) is
   replaced by z0 q-sampled with fresh noise to that step's timestep. The decoded result (image part of
   the canvas) is compared with the resized image: the mean RGB |difference| on [0, 1] goes through the
   same GMM + orphan filter, ANDed with the preliminary mask upsampled bilinearly (any positive value).
3. Segmentation network. ``pseudolabel train-foba`` with ``stage: segmentation`` trains a U-Net at 128 px
   on the refined masks; with ``segmentation_weights`` set the labeler labels with it alone (no diffusion):
   the image, short edge resized to the network's resolution, probability >= ``segmentation_threshold``.
4. Output: one ``Instance`` (the job's class) and the layer ``foreground_mask`` (H, W) uint8 0/255; with
   the diffusion path also ``background`` (H, W, 3) uint8 (the inpainting inside the preliminary mask,
   the input elsewhere). Score: the mean min-max-normalised attention inside the mask (diffusion path) or
   the mean probability inside it (network).

Halves. ``prepare`` (host, one image, in the engine's decode tasks) makes the network's input: the
canvas (step 0) with the size of the image part, or the segmentation network's resized input.
``forward`` (device, rows grouped by class) runs the network(s): encode, attention passes, the
preliminary mask (needed by the inpainting), DDIM, decodes, or the segmentation network. ``postprocess``
(host, one image) composes the refined mask, resizes, scores and composites. Prepared inputs per image:

- ``canvas`` (R, R, 3) uint8 and ``part`` (2,) int32, the image part's (h', w') (diffusion path);
- ``pixels`` (3, h, w) float32 in [-1, 1]: the image with its short edge at the network's resolution
  (bilinear on the float image, as the network's input is made; only with ``segmentation_weights``).

Payload per image:

- ``attention`` (h, w) float32: the step/layer-averaged class attention on the canvas's latent grid;
- ``prelim`` (h, w) bool: the preliminary mask (only with ``refine``);
- ``plate`` (h', w', 3) uint8: the inpainting, image part of the canvas (only with ``refine``);
- ``reference`` (h', w', 3) uint8: the VAE reconstruction (only with ``difference_reference:
  reconstruction``; by default the host resizes the image itself);
- ``probability`` (h, w) float16: the segmentation network's output (only with ``segmentation_weights``).

Cost per image (diffusion path): ``attention_steps * repeats_per_step`` UNet passes + ``inpaint_steps``
passes (twice that with guidance > 1), one VAE encode and one or two decodes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, cast

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from pseudolabel.models.attention import (
    AttentionStore,
    CapturedAttention,
    capture_attention,
    decode_latents,
    encode_text,
    images_to_tensor,
    load_sd_components,
    noisy_unet_pass,
    per_row_noise,
    resolve_dtype,
)
from pseudolabel.models.base import (
    Instance,
    Labeler,
    LabelerParams,
    LabelOutput,
    entry_id,
    entry_index,
    row_entries,
)
from pseudolabel.models.device import compiled, to_device, to_host
from pseudolabel.models.foba_segnet import CONFIG_NAME as SEGNET_CONFIG
from pseudolabel.models.foba_segnet import load_segnet, segnet_input
from pseudolabel.models.foba_steps import (
    compose_refined_mask,
    ddim_schedule,
    ddim_step,
    long_edge_size,
    pad_to_canvas,
    q_sample,
    resize_long_edge,
    suggest_mask,
    unpad_canvas,
    upsample_mask_bilinear,
)
from pseudolabel.models.masks import close_and_fill
from pseudolabel.schemas.spec import LabelerSpec, OntologyEntry, StorageSpec


class FoBaParams(LabelerParams):
    category: str | None = Field(None, description="ontology category to separate (default: the first; a row's "
                                                    "prompt {'category': ...} overrides, else the first of its "
                                                    "'categories' in the ontology)")
    prompt_template: str = Field("a photo of a {}", description="foreground prompt; {} is the class text")
    background_prompt: str = Field("a photo of a background", description="prompt of the inpainting step")
    resolution: int = Field(512, ge=64, multiple_of=64,
                            description="canvas side: long edge resized to it, image at the top left, black padding")
    start_timestep: int = Field(781, ge=0, lt=1000, description="first (noisiest) re-noising timestep")
    attention_steps: int = Field(40, ge=1, description="re-noised steps averaged for the preliminary mask (T)")
    attention_stride: int = Field(20, ge=1, description="timestep stride between those steps (781, 761, ..., 1)")
    repeats_per_step: int = Field(1, ge=1, description="UNet passes per step with fresh noise (N)")
    refine: bool = Field(True, description="run the inpainting refinement (else the preliminary mask is final)")
    inpaint_weights: str | None = Field(
        None, description="checkpoint that inpaints: the EMA UNet from `pseudolabel train-foba` (hub id, "
                          "directory or s3:// prefix; its unet/ is loaded). Default: `weights` (not fine-tuned)")
    inpaint_steps: int = Field(50, ge=1, description="DDIM steps (eta 0) of the inpainting, from random x_T")
    guidance_scale: float = Field(1.0, ge=1.0, description="classifier-free guidance of the inpainting against "
                                                           "the foreground prompt (1 = none)")
    difference_reference: Literal["input", "reconstruction"] = Field(
        "input", description="compare the inpainting with the resized input; 'reconstruction' compares with the "
                             "VAE reconstruction instead (cancels the VAE's own error; not in the published method)")
    closing_radius: int = Field(0, ge=0, description="if > 0, close the refined mask with a disk of this radius (px "
                                                     "at `resolution`) and fill holes; fills thin gaps the "
                                                     "difference misses (not in the published method; 0 = off)")
    segmentation_weights: str | None = Field(
        None, description="segmentation network from `pseudolabel train-foba` (stage: segmentation); when set, "
                          "the labeler labels with it alone")
    segmentation_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="probability threshold of the network")
    composite_background: bool = Field(True, description="background layer: inpainting inside the preliminary "
                                                         "mask, input elsewhere (else the inpainting everywhere)")
    seed: int = Field(0, description="noise seed; every image gets the same noise sequence whatever its batch")


# ---------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------

def attention_timesteps(start: int, steps: int, stride: int) -> list[int]:
    """``[start, start - stride, ...]``, ``steps`` values, stopping before negative timesteps."""
    return [start - i * stride for i in range(steps) if start - i * stride >= 0]


def class_token_indices(tokenizer, prompt: str, class_text: str) -> list[int]:
    """Positions of ``class_text``'s tokens inside the tokenised ``prompt`` (BOS at position 0).

    A multi-token class name gives several consecutive positions. The last occurrence is used (the class
    follows the template's words). Raises ValueError when the class tokens do not occur (e.g. truncation).
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    sub = tokenizer(class_text, add_special_tokens=False).input_ids
    if not sub:
        raise ValueError(f"class text {class_text!r} has no tokens")
    hits = [i for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub]
    if not hits:
        raise ValueError(f"tokens of {class_text!r} not found in prompt {prompt!r}")
    return list(range(hits[-1], hits[-1] + len(sub)))


def class_attention_map(records: list[CapturedAttention], token_idx: list[int],
                        latent_hw: tuple[int, int]) -> torch.Tensor:
    """Mean cross-attention at the class tokens over layers, on the latent grid.

    records: captured cross-attention layers; ``probs`` (B, h_l * w_l, T) head-averaged (already averaged
    over steps) or (B, heads, Lq, T). token_idx: class token positions (their attention is averaged).
    Returns (B, h, w) float32 on the records' device: each layer's map nearest-upsampled to ``latent_hw``,
    then averaged over layers. Values are attention probabilities in [0, 1].
    """
    if not records:
        raise ValueError("no cross-attention layers were captured")
    maps = []
    for rec in records:
        probs = rec.probs.mean(1) if rec.probs.ndim == 4 else rec.probs      # (B, Lq, T)
        m = probs[..., token_idx].mean(-1).reshape(probs.shape[0], 1, *rec.hw)  # (B, 1, h_l, w_l)
        maps.append(F.interpolate(m.float(), size=tuple(latent_hw), mode="nearest")[:, 0])
    return torch.stack(maps).mean(0)


def blended_inpaint(unet, alphas_cumprod: torch.Tensor, clean_latents: torch.Tensor, keep: torch.Tensor,
                    text_embeddings: torch.Tensor, x_T: torch.Tensor, step_noise: list[torch.Tensor],
                    num_steps: int, *, guidance_scale: float = 1.0,
                    uncond_embeddings: torch.Tensor | None = None,
                    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
                    unet_forward: Callable | None = None) -> torch.Tensor:
    """DDIM (eta 0) from ``x_T`` where, before every step, the kept region is z0 q-sampled to that step.

    Args:
        unet: diffusers UNet2DConditionModel (epsilon prediction).
        alphas_cumprod: (T,) cumulative alphas of the training schedule.
        clean_latents: z0 (B, C, h, w).
        keep: (B, 1, h, w) float/bool, 1 = kept (background) region, 0 = region to inpaint.
        text_embeddings: (B or 1, L, D) prompt embeddings.
        x_T: (B, C, h, w) start noise. step_noise: ``num_steps`` tensors (B, C, h, w), the fresh noise of
            each step's q-sample.
        guidance_scale: classifier-free guidance (> 1 needs ``uncond_embeddings``).
        callback: ``callback(i, t, latents, renoised)`` right before step i's UNet pass.
        unet_forward: called instead of ``unet`` (e.g. a ``torch.compile``d UNet).
    Returns:
        (B, C, h, w) float32 latents after the last step (the kept region is not re-imposed at the end).
    """
    param = next(unet.parameters())
    dev, dtype = param.device, param.dtype
    z0 = clean_latents.to(device=dev, dtype=torch.float32)
    keep = keep.to(device=dev, dtype=torch.float32)
    cond = text_embeddings.to(device=dev, dtype=dtype)
    if cond.shape[0] == 1 and z0.shape[0] > 1:
        cond = cond.expand(z0.shape[0], -1, -1)
    use_cfg = guidance_scale > 1.0
    if use_cfg:
        if uncond_embeddings is None:
            raise ValueError("guidance_scale > 1 needs uncond_embeddings")
        uncond = uncond_embeddings.to(device=dev, dtype=dtype).expand(z0.shape[0], -1, -1)
        cond = torch.cat([uncond, cond])
    abar = torch.as_tensor(alphas_cumprod).double().cpu()
    timesteps, a_t, a_prev = ddim_schedule(abar, num_steps)
    if len(step_noise) < len(timesteps):
        raise ValueError(f"{len(timesteps)} steps need as many noise tensors, got {len(step_noise)}")
    img = x_T.to(device=dev, dtype=torch.float32)
    for i, t in enumerate(timesteps):
        # 1. the kept region: z0 noised to t with fresh noise
        renoised = q_sample(z0, step_noise[i].to(device=dev, dtype=torch.float32), float(abar[t]))
        img = keep * renoised + (1.0 - keep) * img
        if callback is not None:
            callback(i, t, img, renoised)
        # 2. one DDIM step
        model_in = torch.cat([img, img]) if use_cfg else img
        tt = torch.full((model_in.shape[0],), t, device=dev, dtype=torch.long)
        eps = (unet_forward or unet)(model_in.to(dtype), tt, encoder_hidden_states=cond).sample.float()
        if use_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        img = ddim_step(img, eps, float(a_t[i]), float(a_prev[i]))
    return img


def canvas_map_to_image(grid: np.ndarray, side: int, part_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """A map on the canvas's latent grid (h, w) -> the image's (H, W), nearest neighbour: to the canvas,
    cropped to the image part (h', w'), then to the image size."""
    dtype = grid.dtype
    is_bool = dtype.kind == "b"
    arr = grid.astype(np.float32) if is_bool else grid
    canvas = cv2.resize(arr, (side, side), interpolation=cv2.INTER_NEAREST)
    part = np.ascontiguousarray(unpad_canvas(canvas, part_hw))
    out = cv2.resize(part, (image_hw[1], image_hw[0]), interpolation=cv2.INTER_NEAREST)
    return out > 0.5 if is_bool else out


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) bool -> (H, W) bool, nearest neighbour."""
    return cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def refined_mask(original: np.ndarray, plate: np.ndarray, prelim: np.ndarray, side: int,
                 closing_radius: int = 0) -> np.ndarray:
    """``compose_refined_mask`` (h', w') bool, then closing + hole filling when ``closing_radius`` > 0."""
    mask = compose_refined_mask(original, plate, prelim, side)
    return close_and_fill(mask, closing_radius) if closing_radius > 0 else mask


# ---------------------------------------------------------------------------------------------------
# The labeler
# ---------------------------------------------------------------------------------------------------

class FoBa(Labeler[dict[str, np.ndarray]]):
    """Foreground mask + background plate of one class per image from Stable Diffusion attention."""

    name = "foba"
    Params = FoBaParams
    params: FoBaParams  # the validated Params of this labeler
    #: the segmentation network's resolution (loaded with it, or read by ``segnet_resolution``)
    _segnet_side: int | None
    summary = ("foreground/background separation by concept distillation (Dombrowski et al., ICCV 2023): "
               "SD cross-attention mask refined by inpainting with a fine-tuned SD, then a segmentation "
               "network trained on the refined masks")
    default_weights = "CompVis/stable-diffusion-v1-4"

    def __init__(self, spec: LabelerSpec, *, device: str = "cpu", storage: StorageSpec | None = None):
        super().__init__(spec, device=device, storage=storage)
        dev = "cpu" if device in (None, "auto") else device
        self.torch_device = torch.device(dev)
        p = self.params
        if p.segmentation_weights:
            from pseudolabel.models.weights import resolve_weights

            self.segnet, self._segnet_side = load_segnet(resolve_weights(p.segmentation_weights, self.storage),
                                                         device=dev)
            return
        self.sd = load_sd_components(self.weights_id, storage=self.storage, revision=spec.revision,
                                     dtype=spec.dtype, device=dev)
        self.inpaint_unet = self.sd.unet
        if p.refine and p.inpaint_weights and p.inpaint_weights != self.weights_id:
            from diffusers import UNet2DConditionModel

            from pseudolabel.models.weights import resolve_weights

            root = resolve_weights(p.inpaint_weights, self.storage)
            self.inpaint_unet = UNet2DConditionModel.from_pretrained(
                root, subfolder="unet", torch_dtype=resolve_dtype(spec.dtype, dev)).to(dev).eval()
        self.alphas_cumprod = self.sd.scheduler.alphas_cumprod.double().cpu()
        self._text_cache: dict[str, torch.Tensor] = {}
        # the inpainting loop's UNet (most of the passes); the attention passes stay eager, since they run
        # under capture processors that record from python in every cross-attention layer
        self._inpaint_unet = compiled(self.inpaint_unet, spec.compile, "foba")

    def setup_host(self) -> None:
        if not self.ontology:
            raise ValueError("foba needs an ontology with the class to separate")
        self._default_entry = self._entry(self.params.category) if self.params.category else self.ontology[0]
        self._segnet_side = None

    @property
    def segnet_resolution(self) -> int:
        """The segmentation network's training resolution (its input's short edge). A host half (no
        weights loaded) reads it from the checkpoint's config.json alone, once."""
        if self._segnet_side is None:
            import json

            from pseudolabel.models.weights import read_checkpoint_file

            source = self.params.segmentation_weights
            if not source:
                raise RuntimeError("foba: segnet_resolution needs segmentation_weights")
            data = read_checkpoint_file(source, SEGNET_CONFIG, self.storage)
            if data is None:
                raise FileNotFoundError(f"no foba segmentation network under {source} (missing {SEGNET_CONFIG})")
            self._segnet_side = int(json.loads(data)["resolution"])
        return self._segnet_side

    def weight_sources(self) -> list[str]:
        p = self.params
        if p.segmentation_weights:
            return [p.segmentation_weights]
        extra = [p.inpaint_weights] if p.refine and p.inpaint_weights and p.inpaint_weights != self.weights_id else []
        return super().weight_sources() + extra

    # -- helpers ----------------------------------------------------------------------------------
    def _entry(self, category: str) -> OntologyEntry:
        k = entry_index(self.ontology, category)
        if k is None:
            raise ValueError(f"category {category!r} is not in the job's ontology")
        return self.ontology[k]

    def _row_entry(self, prompt: Any) -> OntologyEntry:
        """The row's class: its ``category`` (must be in the ontology), else the first of its
        ``categories`` (image-level tags) that is, else ``params.category`` / the first entry. A row whose
        ``categories`` name no ontology entry is refused (an error row: nothing of the job's to separate)."""
        if isinstance(prompt, dict):
            if prompt.get("category") is not None:
                return self._entry(str(prompt["category"]))
            named = row_entries(self.ontology, prompt)
            if named == []:
                raise ValueError(f"none of the row's categories {list(prompt['categories'])} is in the job's "
                                 f"ontology ({', '.join(e.category for e in self.ontology)})")
            if named:
                return self.ontology[named[0]]
        return self._default_entry

    @staticmethod
    def _class_text(entry: OntologyEntry) -> str:
        return entry.prompts[0] if entry.prompts else entry.category

    @torch.inference_mode()
    def _embed(self, text: str) -> torch.Tensor:
        if text not in self._text_cache:
            self._text_cache[text] = encode_text(self.sd.tokenizer, self.sd.text_encoder, text)[0]
        return self._text_cache[text]

    def _noise(self, n: int, shape: tuple[int, ...], count: int) -> list[torch.Tensor]:
        """``count`` noise tensors (n, *shape), image j's noise depending only on the seed."""
        return per_row_noise(n, shape, self.params.seed, count)

    def _noise_plan(self, n: int, latent_shape: tuple[int, ...]) -> dict[str, list[torch.Tensor]]:
        """All of a batch's noise in one per-row stream: the VAE sample, the attention passes, x_T and the
        inpainting's q-samples (in that order)."""
        p = self.params
        n_att = len(attention_timesteps(p.start_timestep, p.attention_steps, p.attention_stride)) * p.repeats_per_step
        n_inp = (1 + p.inpaint_steps) if p.refine else 0
        draws = self._noise(n, latent_shape, 1 + n_att + n_inp)
        return {"vae": draws[:1], "attention": draws[1:1 + n_att], "x_T": draws[1 + n_att:2 + n_att],
                "steps": draws[2 + n_att:]}

    # -- the algorithm ----------------------------------------------------------------------------
    @staticmethod
    def canvas(images: list[np.ndarray], side: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Images -> (canvases (B, side, side, 3) uint8, the image parts' (h', w'))."""
        parts = [resize_long_edge(im, side) for im in images]
        return np.stack([pad_to_canvas(pt, side) for pt in parts]), [pt.shape[:2] for pt in parts]

    @torch.inference_mode()
    def encode(self, canvases: np.ndarray, noise: torch.Tensor) -> torch.Tensor:
        """(B, R, R, 3) uint8 -> z0 (B, 4, R/8, R/8): a posterior sample (mean + std * noise), scaled."""
        vae = self.sd.vae
        param = next(vae.parameters())
        dist = vae.encode(images_to_tensor(canvases).to(device=param.device, dtype=param.dtype)).latent_dist
        z = dist.mean + dist.std * noise.to(device=param.device, dtype=param.dtype)
        return (z * vae.config.scaling_factor).to(next(self.sd.unet.parameters()).dtype)

    @torch.inference_mode()
    def preliminary(self, latents: torch.Tensor, class_text: str,
                    noises: list[torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Clean latents (B, 4, h, w) -> (attention maps (B, h, w) float32, preliminary masks (B, h, w) bool)."""
        att = self.preliminary_attention(latents, class_text, noises)
        return att, np.stack([suggest_mask(a) for a in att])

    @torch.inference_mode()
    def preliminary_attention(self, latents: torch.Tensor, class_text: str,
                              noises: list[torch.Tensor] | None = None) -> np.ndarray:
        """Clean latents (B, 4, h, w) -> class attention maps (B, h, w) float32 on the host: the
        cross-attention at the class tokens averaged over the re-noised steps and the layers (base model)."""
        p = self.params
        prompt = p.prompt_template.format(class_text)
        token_idx = class_token_indices(self.sd.tokenizer, prompt, class_text)
        emb = self._embed(prompt)
        steps = attention_timesteps(p.start_timestep, p.attention_steps, p.attention_stride)
        if noises is None:
            noises = self._noise(latents.shape[0], tuple(latents.shape[1:]), len(steps) * p.repeats_per_step)
        store = AttentionStore(kind="cross", average=True)
        with capture_attention(self.sd.unet, store):
            for k, t in enumerate(steps):
                for r in range(p.repeats_per_step):
                    noisy_unet_pass(self.sd.unet, self.sd.scheduler, latents, t, emb,
                                    noise=noises[k * p.repeats_per_step + r])
        att = class_attention_map(store.select(kind="cross"), token_idx,
                                  (int(latents.shape[-2]), int(latents.shape[-1])))
        return to_host([att.float()])[0]

    @torch.inference_mode()
    def inpaint(self, latents: torch.Tensor, prelim: np.ndarray, class_text: str, x_T: torch.Tensor,
                step_noise: list[torch.Tensor], callback=None) -> torch.Tensor:
        """DDIM inpainting of the preliminary foreground with the background prompt (fine-tuned UNet).

        latents (B, 4, h, w); prelim (B, h, w) bool. Returns the final latents (B, 4, h, w) float32.
        """
        p = self.params
        keep = 1.0 - torch.from_numpy(prelim[:, None].astype(np.float32))
        uncond = self._embed(p.prompt_template.format(class_text)) if p.guidance_scale > 1.0 else None
        return blended_inpaint(self.inpaint_unet, self.alphas_cumprod, latents, keep,
                               self._embed(p.background_prompt), x_T, step_noise, p.inpaint_steps,
                               guidance_scale=p.guidance_scale, uncond_embeddings=uncond, callback=callback,
                               unet_forward=self._inpaint_unet)

    @torch.inference_mode()
    def canvas_preliminary(self, images: list[np.ndarray], class_text: str) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (attention (B, h, w) float32, preliminary masks (B, h, w) bool) on the canvas's latent
        grid, with the same canvas and noise as ``forward``."""
        canvases, _ = self.canvas(images, self.params.resolution)
        lat = self.params.resolution // 8
        noise = self._noise_plan(len(images), (4, lat, lat))
        return self.preliminary(self.encode(canvases, noise["vae"][0]), class_text, noise["attention"])

    # -- host preparation -------------------------------------------------------------------------
    def prepare(self, image: np.ndarray, prompt: Any) -> dict[str, np.ndarray]:
        """Host preparation of one (H, W, 3) uint8 RGB image (see the module docstring): the diffusion
        path's ``canvas`` (R, R, 3) uint8 and ``part`` (2,) int32 (h', w'), or the segmentation
        network's ``pixels`` (3, h, w) float32 in [-1, 1] with ``segmentation_weights``."""
        if self.params.segmentation_weights:
            return {"pixels": np.ascontiguousarray(segnet_input(image, self.segnet_resolution)[0].numpy())}
        canvases, parts = self.canvas([image], self.params.resolution)
        return {"canvas": canvases[0], "part": np.asarray(parts[0], np.int32)}

    # -- device half ------------------------------------------------------------------------------
    def forward(self, images: list[np.ndarray], prompts: list[Any],
                prepared: list[dict[str, np.ndarray] | None] | None = None) -> list[dict[str, np.ndarray]]:
        """Rows grouped by their class (one prompt per group); one payload per image, in input order.
        ``prepared``: ``prepare``'s inputs per image (made here when None)."""
        ready = cast("list[dict[str, np.ndarray]]", self.prepared_inputs(images, prompts, prepared))
        if self.params.segmentation_weights:
            return [self._forward_segnet(r["pixels"]) for r in ready]
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(self._row_entry(prompt).category, []).append(i)
        payloads: list[dict[str, np.ndarray] | None] = [None] * len(images)
        for category, idx in groups.items():
            for i, payload in zip(idx, self._forward_class([ready[i] for i in idx], self._entry(category))):
                payloads[i] = payload
        return payloads  # type: ignore[return-value]

    @torch.inference_mode()
    def _forward_segnet(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """(3, h, w) float32 network input -> payload {probability (h, w) float16}."""
        param = next(self.segnet.parameters())
        x = to_device(pixels[None], param.device).to(dtype=param.dtype)
        prob = self.segnet(x)[0, 0]
        return {"probability": to_host([prob.to(torch.float16)])[0]}

    @torch.inference_mode()
    def _forward_class(self, ready: list[dict[str, np.ndarray]], entry: OntologyEntry) -> list[dict[str, np.ndarray]]:
        """One class's rows: their prepared ``canvas`` and ``part`` -> their payloads."""
        p = self.params
        class_text = self._class_text(entry)
        # 1. canvases (prepared), noise, encode
        canvases = np.stack([r["canvas"] for r in ready])
        parts = [(int(r["part"][0]), int(r["part"][1])) for r in ready]
        n = len(ready)
        lat_shape = (4, p.resolution // 8, p.resolution // 8)
        noise = self._noise_plan(n, lat_shape)
        latents = self.encode(canvases, noise["vae"][0])
        # 2. class attention of the preliminary mask (base model)
        att = self.preliminary_attention(latents, class_text, noise["attention"])
        payloads = [{"attention": att[j]} for j in range(n)]
        if not p.refine:
            return payloads
        # 3. inpainting of the preliminary mask (thresholded here: the loop needs it), decoded
        prelim = np.stack([suggest_mask(a) for a in att])
        out = self.inpaint(latents, prelim, class_text, noise["x_T"][0], noise["steps"])
        plates = decode_latents(self.sd.vae, out)
        reference = decode_latents(self.sd.vae, latents) if p.difference_reference == "reconstruction" else None
        for j, payload in enumerate(payloads):
            payload["prelim"] = prelim[j]
            payload["plate"] = np.ascontiguousarray(unpad_canvas(plates[j], parts[j]))
            if reference is not None:
                payload["reference"] = np.ascontiguousarray(unpad_canvas(reference[j], parts[j]))
        return payloads

    # -- host half --------------------------------------------------------------------------------
    def refined_from_payload(self, image: np.ndarray, payload: dict[str, np.ndarray]) -> np.ndarray:
        """The refined mask (h', w') bool at the canvas scale from one refinement payload."""
        p = self.params
        original = payload["reference"] if "reference" in payload else resize_long_edge(image, p.resolution)
        return refined_mask(original, payload["plate"], payload["prelim"].astype(bool), p.resolution,
                            p.closing_radius)

    def postprocess(self, image: np.ndarray, prompt: Any, payload: dict[str, np.ndarray]) -> LabelOutput:
        p = self.params
        entry = self._row_entry(prompt)
        class_text = self._class_text(entry)
        hw = image.shape[:2]
        if p.segmentation_weights:
            return self._postprocess_segnet(image, entry, payload["probability"])
        att = payload["attention"]
        part = long_edge_size(hw, p.resolution)
        # 1. the mask at the canvas scale, then at the image's size
        if p.refine:
            prelim = payload["prelim"].astype(bool)
            mask = resize_mask(self.refined_from_payload(image, payload), hw)
        else:
            prelim = suggest_mask(att)
            mask = canvas_map_to_image(prelim, p.resolution, part, hw)
        norm = (att - att.min()) / (att.max() - att.min() + 1e-12)
        norm_img = canvas_map_to_image(norm.astype(np.float32), p.resolution, part, hw)
        instances = []
        if mask.any():
            instances.append(Instance(mask=mask, category_id=entry_id(entry), category=entry.category,
                                      score=float(norm_img[mask].mean()),
                                      prompt=p.prompt_template.format(class_text)))
        # 2. the background plate at the image's size
        if p.refine:
            plate = cv2.resize(payload["plate"], (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
            if p.composite_background:
                region = unpad_canvas(upsample_mask_bilinear(prelim, (p.resolution,) * 2), part)
                plate = np.where(resize_mask(region, hw)[..., None], plate, image)
        else:
            plate = image.copy()
        return LabelOutput(instances=instances, layers={
            "background": np.ascontiguousarray(plate.astype(np.uint8)),
            "foreground_mask": (mask.astype(np.uint8) * 255),
        })

    def _postprocess_segnet(self, image: np.ndarray, entry: OntologyEntry, prob: np.ndarray) -> LabelOutput:
        hw = image.shape[:2]
        prob_img = cv2.resize(prob.astype(np.float32), (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        mask = prob_img >= self.params.segmentation_threshold
        instances = []
        if mask.any():
            instances.append(Instance(mask=mask, category_id=entry_id(entry), category=entry.category,
                                      score=float(prob_img[mask].mean()),
                                      prompt=self.params.prompt_template.format(self._class_text(entry))))
        return LabelOutput(instances=instances, layers={"foreground_mask": mask.astype(np.uint8) * 255})
