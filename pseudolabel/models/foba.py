"""``foba``: foreground/background separation by concept distillation (Dombrowski et al., ICCV 2023).

Per image, with a Stable Diffusion checkpoint (SD 1.4, or one fine-tuned by ``train_foba``):

1. Preliminary mask. Encode the image to its clean latent z0 (B, 4, h, w). For each timestep t in
   ``start_timestep, start_timestep - stride, ...`` (40 steps: 781, 761, ..., 1) re-noise z0 to t and run
   one UNet pass with ``"a photo of a {class}"`` (no classifier-free guidance) while every cross-attention
   (attn2) layer records its head-averaged softmax. Each layer's attention at the class token(s) is
   nearest-upsampled to the latent grid (h, w); the map is the mean over steps and layers. A two-component
   Gaussian mixture thresholds it (midpoint of the means), then a 3x3 majority filter cleans it.
2. Refinement. Blended-latent inpainting: a DDIM loop from the re-noised latent with the prompt
   ``"a photo of a background"`` where, before every step, the kept region (outside the preliminary mask)
   is replaced by z0 re-noised to that step's timestep; the last latent keeps z0 there exactly. Decoding
   gives a background plate. |reconstruction - plate| (mean over RGB) is thresholded by the Gaussian
   mixture, ANDed with the preliminary mask, then closed and hole-filled.
3. Output: one ``Instance`` (the job's class, score = mean min-max-normalised attention inside the mask),
   and layers ``background`` (H, W, 3) uint8 (the plate inside the preliminary mask, the input elsewhere)
   and ``foreground_mask`` (H, W) uint8 0/255.

Cost per image: ``attention_steps * repeats_per_step`` UNet passes + ``inpaint_steps`` passes (twice that
with guidance > 1), one VAE encode and two decodes.

Halves. ``forward`` (device, rows grouped by class) runs the encode, the attention passes, the inpainting
and the decodes. The preliminary mask (GMM + majority filter, numpy) is computed there too when the
refinement runs, because the inpainting needs it; without refinement it is left to ``postprocess``.
``postprocess`` (host, one image) does the difference GMM, the AND, closing and hole filling at
``resolution``, then resizes, scores and composites at the image size. Payload per image:

- ``attention`` (h, w) float32: the step/layer-averaged class attention on the latent grid (h = R / 8);
- ``prelim`` (h, w) bool: the preliminary mask (only with ``refine``);
- ``plate`` (R, R, 3) uint8: the decoded background plate (only with ``refine``);
- ``reference`` (R, R, 3) uint8: the VAE reconstruction the plate is compared with (only with ``refine``
  and ``difference_reference="reconstruction"``; with ``"input"`` the host resizes the image itself).
"""
from __future__ import annotations

from typing import Any, Callable, Literal

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
    encode_image,
    encode_text,
    load_sd_components,
    noisy_unet_pass,
    per_row_noise,
)
from pseudolabel.models.base import Instance, LabelerParams, LabelOutput, Labeler
from pseudolabel.models.device import compiled, to_host
from pseudolabel.models.masks import close_and_fill, gmm_mask, majority_filter
from pseudolabel.schemas.spec import LabelerSpec, OntologyEntry, StorageSpec


class FoBaParams(LabelerParams):
    category: str | None = Field(None, description="ontology category to separate (default: the first; a row's "
                                                    "prompt {'category': ...} overrides)")
    prompt_template: str = Field("a photo of a {}", description="foreground prompt; {} is the class text")
    background_prompt: str = Field("a photo of a background", description="prompt of the inpainting step")
    resolution: int = Field(512, ge=64, multiple_of=64, description="images are resized to a square of this side")
    start_timestep: int = Field(781, ge=0, lt=1000, description="first (noisiest) re-noising timestep")
    attention_steps: int = Field(40, ge=1, description="re-noised steps averaged for the preliminary mask (T)")
    attention_stride: int = Field(20, ge=1, description="timestep stride between those steps (781, 761, ..., 1)")
    repeats_per_step: int = Field(1, ge=1, description="UNet passes per step with fresh noise (N)")
    majority_size: int = Field(3, ge=1, description="side of the majority filter on the preliminary mask")
    refine: bool = Field(True, description="run the inpainting refinement (else the preliminary mask is final)")
    inpaint_steps: int = Field(50, ge=1, description="DDIM steps of the blended inpainting loop")
    inpaint_strength: float = Field(1.0, gt=0.0, le=1.0, description="fraction of the DDIM schedule run (1 = from noise)")
    inpaint_dilate: int = Field(0, ge=0, description="dilate the inpainted region by this many latent pixels")
    guidance_scale: float = Field(1.0, ge=1.0, description="classifier-free guidance of the inpainting (1 = none)")
    difference_reference: Literal["reconstruction", "input"] = Field(
        "reconstruction", description="compare the plate with the VAE reconstruction (cancels VAE error) or the input")
    closing_radius: int = Field(2, ge=0, description="disk radius (px at `resolution`) of the final closing")
    composite_background: bool = Field(True, description="background layer: plate inside the inpainted region, input elsewhere")
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


def blended_inpaint(unet, scheduler, clean_latents: torch.Tensor, keep: torch.Tensor,
                    text_embeddings: torch.Tensor, noise: torch.Tensor, num_steps: int, *,
                    strength: float = 1.0, guidance_scale: float = 1.0,
                    uncond_embeddings: torch.Tensor | None = None,
                    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                    unet_forward: Callable | None = None) -> torch.Tensor:
    """Blended-latent inpainting: denoise the region outside ``keep`` while the kept region follows z0.

    Args:
        unet: diffusers UNet2DConditionModel.
        scheduler: a diffusers scheduler with ``set_timesteps``/``step``/``add_noise`` (DDIM); mutated.
        clean_latents: z0 (B, C, h, w) (``encode_image`` output).
        keep: (B, 1, h, w) float/bool, 1 = kept (background) region, 0 = region to inpaint.
        text_embeddings: (B or 1, T, D) prompt embeddings.
        noise: (B, C, h, w) fixed noise; z0 is re-noised with it at every step.
        num_steps: scheduler steps; ``strength`` < 1 skips the noisiest ones.
        guidance_scale: classifier-free guidance (> 1 needs ``uncond_embeddings``).
        callback: ``callback(i, t, latents, renoised)`` called right before step i's UNet pass, with the
            blended latents and z0 re-noised to t.
        unet_forward: called instead of ``unet`` for the passes (e.g. a ``torch.compile``d UNet).
    Returns:
        (B, C, h, w) latents; equal to z0 where ``keep`` is 1.
    """
    param = next(unet.parameters())
    z0 = clean_latents.to(device=param.device, dtype=param.dtype)
    noise = noise.to(device=z0.device, dtype=z0.dtype)
    keep = keep.to(device=z0.device, dtype=z0.dtype)
    cond = text_embeddings.to(device=z0.device, dtype=z0.dtype)
    if cond.shape[0] == 1 and z0.shape[0] > 1:
        cond = cond.expand(z0.shape[0], -1, -1)
    use_cfg = guidance_scale > 1.0
    if use_cfg:
        if uncond_embeddings is None:
            raise ValueError("guidance_scale > 1 needs uncond_embeddings")
        uncond = uncond_embeddings.to(device=z0.device, dtype=z0.dtype).expand(z0.shape[0], -1, -1)
        cond = torch.cat([uncond, cond])

    # 1. schedule, truncated by strength; start from z0 re-noised to the first timestep
    scheduler.set_timesteps(num_steps, device=z0.device)
    timesteps = scheduler.timesteps
    first = min(int(round(num_steps * (1.0 - strength))), len(timesteps) - 1)
    timesteps = timesteps[first:]
    latents = scheduler.add_noise(z0, noise, timesteps[:1].repeat(z0.shape[0]))

    # 2. blend, then step
    for i, t in enumerate(timesteps):
        renoised = scheduler.add_noise(z0, noise, t.reshape(1).repeat(z0.shape[0]))
        latents = keep * renoised + (1.0 - keep) * latents
        if callback is not None:
            callback(i, t, latents, renoised)
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        eps = (unet_forward or unet)(model_in, t, encoder_hidden_states=cond).sample
        if use_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents).prev_sample

    # 3. the kept region is the clean latent exactly
    return keep * z0 + (1.0 - keep) * latents


def preliminary_mask(attention: np.ndarray, majority_size: int) -> np.ndarray:
    """(h, w) float32 class attention -> (h, w) bool: GMM midpoint threshold, then the majority filter."""
    return majority_filter(gmm_mask(attention), majority_size)


def refined_mask(reference: np.ndarray, plate: np.ndarray, prelim: np.ndarray, closing_radius: int) -> np.ndarray:
    """The refinement's mask for one image at the working resolution R.

    reference, plate: (R, R, 3) uint8 (the reconstruction or resized input, and the background plate);
    prelim: (h, w) bool preliminary mask. Returns (R, R) bool: the GMM threshold of |reference - plate|,
    ANDed with the preliminary mask (nearest-resized to R), then closed and hole-filled.
    """
    diff = difference_map(reference[None], plate[None])[0]
    return close_and_fill(gmm_mask(diff) & resize_mask(prelim, reference.shape[:2]), closing_radius)


def difference_map(reference: np.ndarray, plate: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 x2 -> (B, H, W) float32 mean absolute RGB difference in [0, 255]."""
    return np.abs(reference.astype(np.float32) - plate.astype(np.float32)).mean(-1)


def resize_image(image: np.ndarray, side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (side, side, 3) uint8 (area when shrinking, bilinear when growing)."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if side < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (side, side), interpolation=interp)


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) bool -> (H, W) bool, nearest neighbour."""
    return cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


# ---------------------------------------------------------------------------------------------------
# The labeler
# ---------------------------------------------------------------------------------------------------

class FoBa(Labeler):
    """Foreground mask + background plate of one class per image from Stable Diffusion attention."""

    name = "foba"
    Params = FoBaParams
    summary = ("foreground/background separation by concept distillation (Dombrowski et al., ICCV 2023): "
               "SD cross-attention mask refined by background inpainting")
    default_weights = "CompVis/stable-diffusion-v1-4"

    def __init__(self, spec: LabelerSpec, *, device: str = "cpu", storage: StorageSpec | None = None):
        super().__init__(spec, device=device, storage=storage)
        dev = "cpu" if device in (None, "auto") else device
        self.torch_device = torch.device(dev)
        self.sd = load_sd_components(self.weights_id, storage=self.storage, revision=spec.revision,
                                     dtype=spec.dtype, device=dev)
        from diffusers import DDIMScheduler

        self.ddim = DDIMScheduler.from_config(self.sd.scheduler.config)
        self._text_cache: dict[str, torch.Tensor] = {}
        # the inpainting loop's UNet (most of the passes); the attention passes stay eager, since they run
        # under capture processors that record from python in every cross-attention layer
        self._inpaint_unet = compiled(self.sd.unet, spec.compile, "foba")

    def setup_host(self) -> None:
        if not self.ontology:
            raise ValueError("foba needs an ontology with the class to separate")
        self._default_entry = self._entry(self.params.category) if self.params.category else self.ontology[0]

    # -- helpers ----------------------------------------------------------------------------------
    def _entry(self, category: str) -> OntologyEntry:
        for entry in self.ontology:
            if entry.category == category:
                return entry
        raise ValueError(f"category {category!r} is not in the job's ontology")

    def _row_entry(self, prompt: Any) -> OntologyEntry:
        if isinstance(prompt, dict):
            name = prompt.get("category")
            if name is None and prompt.get("categories"):
                name = prompt["categories"][0]
            if name is not None:
                return self._entry(str(name))
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

    # -- the algorithm ----------------------------------------------------------------------------
    @torch.inference_mode()
    def preliminary(self, latents: torch.Tensor, class_text: str) -> tuple[np.ndarray, np.ndarray]:
        """Clean latents (B, 4, h, w) -> (attention maps (B, h, w) float32, preliminary masks (B, h, w) bool)."""
        att = self.preliminary_attention(latents, class_text)
        return att, np.stack([preliminary_mask(a, self.params.majority_size) for a in att])

    @torch.inference_mode()
    def preliminary_attention(self, latents: torch.Tensor, class_text: str) -> np.ndarray:
        """Clean latents (B, 4, h, w) -> class attention maps (B, h, w) float32 on the host: the
        cross-attention at the class tokens averaged over the re-noised steps and the layers."""
        p = self.params
        prompt = p.prompt_template.format(class_text)
        token_idx = class_token_indices(self.sd.tokenizer, prompt, class_text)
        emb = self._embed(prompt)
        steps = attention_timesteps(p.start_timestep, p.attention_steps, p.attention_stride)
        noises = self._noise(latents.shape[0], tuple(latents.shape[1:]), len(steps) * p.repeats_per_step)
        store = AttentionStore(kind="cross", average=True)
        with capture_attention(self.sd.unet, store):
            for k, t in enumerate(steps):
                for r in range(p.repeats_per_step):
                    noisy_unet_pass(self.sd.unet, self.sd.scheduler, latents, t, emb,
                                    noise=noises[k * p.repeats_per_step + r])
        att = class_attention_map(store.select(kind="cross"), token_idx, tuple(latents.shape[-2:]))
        return to_host([att.float()])[0]

    @torch.inference_mode()
    def refine(self, latents: torch.Tensor, inputs: np.ndarray, prelim: np.ndarray,
               callback=None) -> tuple[np.ndarray, np.ndarray]:
        """The whole refinement in-process: ``inpaint`` then ``refined_mask`` per image.

        latents (B, 4, h, w); inputs (B, R, R, 3) uint8 at ``resolution``; prelim (B, h, w) bool.
        Returns (plates (B, R, R, 3) uint8, refined masks (B, R, R) bool).
        """
        plates, reference = self.inpaint(latents, inputs, prelim, callback=callback)
        reference = inputs if reference is None else reference
        masks = [refined_mask(r, pl, pm, self.params.closing_radius) for r, pl, pm in zip(reference, plates, prelim)]
        return plates, np.stack(masks)

    @torch.inference_mode()
    def inpaint(self, latents: torch.Tensor, inputs: np.ndarray, prelim: np.ndarray,
                callback=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Blended inpainting of the preliminary foreground with the background prompt, decoded.

        latents (B, 4, h, w); inputs (B, R, R, 3) uint8 at ``resolution``; prelim (B, h, w) bool.
        Returns (plates (B, R, R, 3) uint8, the VAE reconstructions (B, R, R, 3) uint8 when
        ``difference_reference`` is "reconstruction", else None: the reference is then ``inputs``).
        """
        p = self.params
        fg = torch.from_numpy(prelim[:, None].astype(np.float32))
        if p.inpaint_dilate:
            k = 2 * p.inpaint_dilate + 1
            fg = F.max_pool2d(fg, k, stride=1, padding=p.inpaint_dilate)
        keep = 1.0 - fg
        noise = self._noise(latents.shape[0], tuple(latents.shape[1:]), 1)[0]
        uncond = self._embed("") if p.guidance_scale > 1.0 else None
        out = blended_inpaint(self.sd.unet, self.ddim, latents, keep, self._embed(p.background_prompt), noise,
                              p.inpaint_steps, strength=p.inpaint_strength, guidance_scale=p.guidance_scale,
                              uncond_embeddings=uncond, callback=callback, unet_forward=self._inpaint_unet)
        plates = decode_latents(self.sd.vae, out)
        reference = decode_latents(self.sd.vae, latents) if p.difference_reference == "reconstruction" else None
        return plates, reference

    # -- device half ------------------------------------------------------------------------------
    def forward(self, images: list[np.ndarray], prompts: list[Any]) -> list[dict[str, np.ndarray]]:
        """Rows grouped by their class (one prompt per group); one payload per image, in input order."""
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(self._row_entry(prompt).category, []).append(i)
        payloads: list[dict[str, np.ndarray] | None] = [None] * len(images)
        for category, idx in groups.items():
            for i, payload in zip(idx, self._forward_class([images[i] for i in idx], self._entry(category))):
                payloads[i] = payload
        return payloads  # type: ignore[return-value]

    @torch.inference_mode()
    def _forward_class(self, images: list[np.ndarray], entry: OntologyEntry) -> list[dict[str, np.ndarray]]:
        p = self.params
        # 1. resize to the working square and encode
        inputs = np.stack([resize_image(im, p.resolution) for im in images])
        latents = encode_image(self.sd.vae, inputs).to(next(self.sd.unet.parameters()).dtype)
        # 2. class attention of the preliminary mask
        att = self.preliminary_attention(latents, self._class_text(entry))
        payloads = [{"attention": att[j]} for j in range(len(images))]
        if not p.refine:
            return payloads
        # 3. refinement by blended inpainting of the preliminary mask (thresholded here: the loop needs it)
        prelim = np.stack([preliminary_mask(a, p.majority_size) for a in att])
        plates, reference = self.inpaint(latents, inputs, prelim)
        for j, payload in enumerate(payloads):
            payload["prelim"] = prelim[j]
            payload["plate"] = plates[j]
            if reference is not None:
                payload["reference"] = reference[j]
        return payloads

    # -- host half --------------------------------------------------------------------------------
    def postprocess(self, image: np.ndarray, prompt: Any, payload: dict[str, np.ndarray]) -> LabelOutput:
        p = self.params
        entry = self._row_entry(prompt)
        class_text = self._class_text(entry)
        att = payload["attention"]
        res = (p.resolution, p.resolution)
        # 1. the mask at the working resolution
        if p.refine:
            prelim = payload["prelim"].astype(bool)
            plate_r = payload["plate"]
            reference = payload["reference"] if "reference" in payload else resize_image(image, p.resolution)
            mask_r = refined_mask(reference, plate_r, prelim, p.closing_radius)
        else:
            prelim = preliminary_mask(att, p.majority_size)
            plate_r, mask_r = None, resize_mask(prelim, res)
        # 2. back to the image's size
        hw = image.shape[:2]
        mask = resize_mask(mask_r, hw)
        norm = (att - att.min()) / (att.max() - att.min() + 1e-12)
        norm_img = cv2.resize(norm, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
        instances = []
        if mask.any():
            instances.append(Instance(mask=mask, category_id=int(entry.id), category=entry.category,
                                      score=float(norm_img[mask].mean()),
                                      prompt=p.prompt_template.format(class_text)))
        if plate_r is not None:
            plate = cv2.resize(plate_r, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
            if p.composite_background:
                region = resize_mask(prelim, hw)
                plate = np.where(region[..., None], plate, image)
        else:
            plate = image.copy()
        return LabelOutput(instances=instances, layers={
            "background": np.ascontiguousarray(plate.astype(np.uint8)),
            "foreground_mask": (mask.astype(np.uint8) * 255),
        })
