"""Attention capture and single noisy passes on a diffusers Stable Diffusion UNet.

Shared by the labelers that read segmentation out of diffusion attention (iseg, foba). Nothing here
knows about either method.

API
---
Loading and encoding:
- ``load_sd_components(weights, storage=None, revision=None, dtype="auto", device="cpu") -> SDComponents``
  (a NamedTuple ``vae, unet, text_encoder, tokenizer, scheduler``) from a diffusers-layout directory,
  hub id or s3:// prefix; eval mode, on ``device``, in ``dtype``.
- ``encode_image(vae, images, generator=None, sample=False) -> latents`` (B, 4, H/8, W/8) float, already
  multiplied by ``vae.config.scaling_factor``.
- ``decode_latents(vae, latents) -> (B, H, W, 3) uint8``.
- ``encode_text(tokenizer, text_encoder, texts) -> (embeddings (B, T, D), input_ids (B, T) int64)``,
  padded to ``tokenizer.model_max_length``.
- ``noisy_unet_pass(unet, scheduler, latents, timestep, text_embeddings, generator=None, noise=None)
  -> noise prediction (B, 4, h, w)``: one UNet pass on ``scheduler.add_noise(latents, noise, t)``, no
  classifier-free guidance. Gradients are not disabled here; wrap in ``torch.inference_mode()``.
- ``per_row_noise(batch, shape, seed, count=1, device=None, dtype=None) -> [noise (batch, *shape), ...]``:
  noise (float32 on the CPU by default, else on ``device`` in ``dtype``) where every row is drawn from its
  own generator seeded with ``seed``, so an image's noise does not depend on the batch it is in or its
  position there (pass it as ``noisy_unet_pass(..., noise=...)``).

Capture:
- ``AttentionStore(layers=None, kind="both", resolutions=None, factors=None, per_head=False,
  average=False, device=None)``: which layers to record and how. A layer is recorded only when it
  passes every filter given (``layers``: module names or name prefixes; ``kind``: "self" (attn1),
  "cross" (attn2) or "both"; ``resolutions``: side lengths ``s`` (meaning s x s) or ``(h, w)`` pairs;
  ``factors``: downsampling factors relative to the latent, e.g. 1, 2, 4, 8). ``average=True`` keeps a
  running mean over UNet passes (for averaging over many timesteps) instead of the last pass.
- ``capture_attention(unet, store=None, **filters)``: context manager; installs an
  ``AttentionCaptureProcessor`` on every attention module of ``unet``, yields the store, and restores
  each module's previous processor on exit (also on error). Layers not requested run their original
  processor unchanged (e.g. fused SDPA), so only the requested layers pay for materialised probabilities.
- After a pass: ``store.maps`` is ``{module name: CapturedAttention}``; ``CapturedAttention.probs`` is
  (B, Lq, Lk) head-averaged or (B, heads, Lq, Lk) per head, float32, rows summing to 1, with
  Lq = h * w (row-major over the (h, w) grid) and Lk = h * w (self) or the text length (cross).
  ``store.select(kind=..., resolution=..., factor=...)`` lists captured layers;
  ``store.by_resolution(kind)`` groups them as ``{(h, w): [CapturedAttention, ...]}``;
  ``store.mean_by_resolution(kind)`` gives ``{(h, w): (B, Lq, Lk)}`` averaged over layers and heads.

The spatial grid (h, w) of a layer comes from its query length and the latent shape seen by the
UNet's forward (recorded by a pre-hook): the latent is halved (rounding up, as SD's stride-2 convs do)
until the area equals the query length. Nothing assumes 64 x 64 latents.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, cast

import numpy as np
import torch

from pseudolabel.models.device import resolve_dtype  # the one dtype rule (auto: float16 on CUDA)

KINDS = ("self", "cross")


# ---------------------------------------------------------------------------------------------------
# Loading and encoding
# ---------------------------------------------------------------------------------------------------

class SDComponents(NamedTuple):
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


def _load_scheduler(root: str, revision: str | None):
    import diffusers

    cls = diffusers.DDIMScheduler
    config_path = os.path.join(root, "scheduler", "scheduler_config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            name = json.load(f).get("_class_name")
        candidate = getattr(diffusers, name, None) if name else None
        if candidate is not None and hasattr(candidate, "add_noise"):
            cls = candidate
    return cls.from_pretrained(root, subfolder="scheduler", revision=revision)


def load_sd_components(weights: str, storage=None, revision: str | None = None,
                       dtype: "str | torch.dtype | None" = "auto", device: str = "cpu") -> SDComponents:
    """Load a Stable Diffusion checkpoint in diffusers layout (hub id, local directory or s3:// prefix).

    Subfolders ``vae``, ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler`` load with
    ``from_pretrained`` (safetensors first, no remote code). Models are put in eval mode, moved to
    ``device`` and cast to ``dtype`` (the VAE stays float32 unless bfloat16 is asked for, since SD's VAE
    overflows in float16).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pseudolabel.models.weights import resolve_weights

    root = resolve_weights(weights, storage, revision)
    torch_dtype = resolve_dtype(dtype, device)
    vae_dtype = torch.bfloat16 if torch_dtype == torch.bfloat16 else torch.float32
    rev: dict[str, Any] = {"revision": revision} if revision and not os.path.isdir(root) else {}
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch_dtype, **rev)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=vae_dtype, **rev)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **rev)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **rev)
    scheduler = _load_scheduler(root, rev.get("revision"))
    unet = unet.to(device).eval()
    vae = vae.to(device).eval()
    text_encoder = text_encoder.to(device=device, dtype=torch_dtype).eval()  # type: ignore[call-arg]  # stub: .to() typed as unbound
    return SDComponents(vae, unet, text_encoder, tokenizer, scheduler)


def images_to_tensor(images: "np.ndarray | list[np.ndarray] | torch.Tensor") -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB (array, list of same-size arrays or tensor) -> (B, 3, H, W) float in [-1, 1]."""
    if isinstance(images, list):
        images = np.stack(images)
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def encode_image(vae, images, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
    """Images (B, H, W, 3) uint8 RGB, H and W multiples of 8 -> latents (B, C, H/8, W/8).

    The posterior mean (or a sample drawn with ``generator`` when ``sample``) times
    ``vae.config.scaling_factor``; returned in the VAE's dtype on its device.
    """
    param = next(vae.parameters())
    x = images_to_tensor(images).to(device=param.device, dtype=param.dtype)
    dist = vae.encode(x).latent_dist
    latents = dist.sample(generator) if sample else dist.mean
    return latents * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Latents (B, C, h, w) scaled by ``scaling_factor`` -> images (B, 8h, 8w, 3) uint8 RGB."""
    param = next(vae.parameters())
    x = vae.decode(latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor).sample
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def encode_text(tokenizer, text_encoder, texts: "str | list[str]") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (last hidden states (B, T, D) in the encoder's dtype, input_ids (B, T) int64).

    T = ``tokenizer.model_max_length`` (77 for SD); longer prompts are truncated.
    """
    if isinstance(texts, str):
        texts = [texts]
    param = next(text_encoder.parameters())
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    hidden = text_encoder(ids.to(param.device))[0]
    return hidden, ids


def noisy_unet_pass(unet, scheduler, latents: torch.Tensor, timestep: "int | torch.Tensor",
                    text_embeddings: torch.Tensor, generator: torch.Generator | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """One UNet pass on ``latents`` noised to ``timestep``; no classifier-free guidance.

    Args:
        latents: (B, C, h, w) clean latents (``encode_image`` output).
        timestep: int in [0, num_train_timesteps) or a 0-d / (B,) tensor.
        text_embeddings: (B, T, D) or (1, T, D) (broadcast over the batch).
        generator: seeds the noise (a CPU generator works for any device). The draw is one (B, C, h, w)
            tensor, so a row's noise depends on its position in the batch; use ``per_row_noise`` when
            results must not depend on the batch.
        noise: explicit noise (B, C, h, w) instead of drawing it.

    Returns:
        the UNet's noise prediction (B, C, h, w) in the UNet's dtype.
    """
    param = next(unet.parameters())
    latents = latents.to(device=param.device, dtype=param.dtype)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else "cpu")
    noise = noise.to(device=latents.device, dtype=latents.dtype)
    t = torch.as_tensor(timestep, device=latents.device).long()
    if t.ndim == 0:
        t = t.repeat(latents.shape[0])
    noisy = scheduler.add_noise(latents, noise, t)
    cond = text_embeddings.to(device=latents.device, dtype=latents.dtype)
    if cond.shape[0] == 1 and latents.shape[0] > 1:
        cond = cond.expand(latents.shape[0], -1, -1)
    return unet(noisy, t, encoder_hidden_states=cond).sample


def per_row_noise(batch: int, shape: "Iterable[int]", seed: int, count: int = 1,
                  device: "str | torch.device | None" = None, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """``count`` standard-normal tensors (batch, *shape), batch-independent.

    Each row has its own generator seeded with ``seed`` and draws its ``count`` samples in order, so
    row j of the k-th tensor is the same for every batch size and position: an image labelled alone, or
    retried on its own after a failed batch, sees exactly the noise it saw inside the batch.

    By default the draw is float32 on the CPU. With ``device`` (and ``dtype``) each row draws there, in
    that dtype, from a generator of that device: on CUDA, a row's noise is then what
    ``torch.manual_seed(seed); torch.randn_like(latent)`` gives for a (1, *shape) latent of that dtype.
    """
    shape = tuple(int(s) for s in shape)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    kind = dtype or torch.float32
    if batch <= 0:
        return [torch.zeros((0, *shape), device=dev, dtype=kind) for _ in range(count)]
    gens = [torch.Generator(dev).manual_seed(int(seed)) for _ in range(batch)]
    return [torch.stack([torch.randn((1, *shape), generator=g, device=dev, dtype=kind)[0] for g in gens])
            for _ in range(count)]


# ---------------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------------

def _as_hw(r: "int | tuple[int, int]") -> tuple[int, int]:
    """A grid size given as one side (square) or (h, w) -> (h, w) ints."""
    if np.isscalar(r):
        side = int(cast(int, r))
        return side, side
    hw = cast("tuple[int, int]", r)
    return int(hw[0]), int(hw[1])


def grid_for_length(length: int, latent_hw: tuple[int, int] | None) -> tuple[tuple[int, int], int]:
    """The (h, w) grid of a token sequence of ``length`` inside a UNet fed ``latent_hw``, and its factor.

    The latent is halved (rounding up) until its area is ``length``; without a latent shape the grid
    is taken square. Raises ValueError when no level matches.
    """
    if latent_hw is not None:
        h, w = int(latent_hw[0]), int(latent_hw[1])
        factor = 1
        while h * w > length and (h > 1 or w > 1):
            h, w, factor = (h + 1) // 2, (w + 1) // 2, factor * 2
        if h * w == length:
            return (h, w), factor
    side = int(round(length ** 0.5))
    if side * side == length:
        factor = int(round(latent_hw[0] / side)) if latent_hw else 1
        return (side, side), max(factor, 1)
    raise ValueError(f"query length {length} matches no level of latent {latent_hw}")


@dataclass
class CapturedAttention:
    """One layer's recorded attention.

    probs: (B, Lq, Lk) head-averaged or (B, heads, Lq, Lk) per head; float32; softmax rows sum to 1;
    Lq = h * w in row-major order; Lk = h * w (self) or the text length (cross). With ``average`` it is
    the mean over the ``count`` passes recorded.
    """

    name: str
    kind: str
    hw: tuple[int, int]
    factor: int
    probs: torch.Tensor
    count: int = 1


class AttentionStore:
    """Which attention layers to record, and the records.

    Args:
        layers: module names (or name prefixes, e.g. ``"up_blocks.3"``) to record; None = any.
        kind: "self", "cross" or "both".
        resolutions: grid sizes to record: ints ``s`` (s x s) or ``(h, w)``; None = any.
        factors: downsampling factors relative to the latent (1, 2, 4, 8); None = any.
        per_head: keep heads separate (B, heads, Lq, Lk) instead of their mean.
        average: running mean over passes (memory of one pass) instead of keeping the last pass.
        device: where records live (default: where they were computed); "cpu" frees accelerator memory.
    """

    def __init__(self, layers: Iterable[str] | None = None, kind: str = "both",
                 resolutions: Iterable[int | tuple[int, int]] | None = None,
                 factors: Iterable[int] | None = None, per_head: bool = False, average: bool = False,
                 device: "str | torch.device | None" = None):
        if kind not in ("self", "cross", "both"):
            raise ValueError(f"kind must be self, cross or both, not {kind!r}")
        self.layers = tuple(layers) if layers is not None else None
        self.kind = kind
        self.resolutions = None
        if resolutions is not None:
            self.resolutions = {_as_hw(r) for r in resolutions}
        self.factors = {int(f) for f in factors} if factors is not None else None
        self.per_head = per_head
        self.average = average
        self.device = device
        self.latent_hw: tuple[int, int] | None = None
        self.maps: dict[str, CapturedAttention] = {}

    # -- selection --------------------------------------------------------------------------------
    def wants_layer(self, name: str, kind: str) -> bool:
        """Static part of the filter (name and kind), decided before any shape is known."""
        if self.kind != "both" and kind != self.kind:
            return False
        if self.layers is not None and not any(name == p or name.startswith(p + ".") for p in self.layers):
            return False
        return True

    def wants_grid(self, hw: tuple[int, int], factor: int) -> bool:
        if self.resolutions is not None and tuple(hw) not in self.resolutions:
            return False
        if self.factors is not None and factor not in self.factors:
            return False
        return True

    # -- recording --------------------------------------------------------------------------------
    def record(self, name: str, kind: str, hw: tuple[int, int], factor: int, probs: torch.Tensor) -> None:
        """Add one pass of ``probs`` (B, heads, Lq, Lk) for layer ``name``."""
        probs = probs.float() if self.per_head else head_mean(probs)
        if self.device is not None:
            probs = probs.to(self.device)
        old = self.maps.get(name)
        if self.average and old is not None and old.probs.shape == probs.shape:
            n = old.count + 1
            old.probs.mul_((n - 1) / n).add_(probs, alpha=1.0 / n)
            old.count = n
        else:
            self.maps[name] = CapturedAttention(name, kind, (hw[0], hw[1]), factor,
                                                probs.clone() if self.average else probs)

    def reset(self) -> None:
        """Forget every record (keeps the filters)."""
        self.maps.clear()

    # -- reading ----------------------------------------------------------------------------------
    def select(self, kind: str | None = None, resolution: "int | tuple[int, int] | None" = None,
               factor: int | None = None) -> list[CapturedAttention]:
        """Captured layers matching ``kind``/``resolution``/``factor`` in UNet order."""
        want_hw = None if resolution is None else _as_hw(resolution)
        out = []
        for rec in self.maps.values():
            if kind is not None and rec.kind != kind:
                continue
            if want_hw is not None and rec.hw != want_hw:
                continue
            if factor is not None and rec.factor != factor:
                continue
            out.append(rec)
        return out

    def by_resolution(self, kind: str | None = None) -> dict[tuple[int, int], list[CapturedAttention]]:
        """``{(h, w): [CapturedAttention, ...]}`` for the captured layers of ``kind``."""
        groups: dict[tuple[int, int], list[CapturedAttention]] = {}
        for rec in self.select(kind=kind):
            groups.setdefault(rec.hw, []).append(rec)
        return groups

    def mean_by_resolution(self, kind: str | None = None) -> dict[tuple[int, int], torch.Tensor]:
        """``{(h, w): (B, Lq, Lk) float32}``: mean over the layers (and heads) at each grid size."""
        out = {}
        for hw, recs in self.by_resolution(kind).items():
            stacked = [r.probs.mean(1) if r.probs.ndim == 4 else r.probs for r in recs]
            out[hw] = torch.stack(stacked).mean(0)
        return out


def head_mean(probs: torch.Tensor) -> torch.Tensor:
    """(B, heads, Lq, Lk) -> (B, Lq, Lk) float32 mean over heads, accumulated in float32.

    No float32 copy of all heads is made: float32 input and CUDA half/bfloat16 input reduce directly
    (CUDA reads the low-precision values into a float32 accumulator); other low-precision input (e.g.
    float16 on the CPU, where a dtype-changing reduction would cast the whole tensor first) is summed one
    head at a time, so the extra memory is one head's map.
    """
    if probs.dtype == torch.float32 or (probs.is_cuda and probs.dtype in (torch.float16, torch.bfloat16)):
        return probs.mean(1, dtype=torch.float32)
    acc = probs[:, 0].float()
    for h in range(1, probs.shape[1]):
        acc.add_(probs[:, h])
    return acc.div_(probs.shape[1])


class AttentionCaptureProcessor:
    """Computes attention like diffusers' ``AttnProcessor`` and hands the softmaxed probabilities to a store.

    Installed per module by ``capture_attention``; a module the store does not want (by name/kind, or
    by grid size at call time) runs ``fallback`` (its original processor) instead.
    """

    def __init__(self, store: AttentionStore, name: str, kind: str, fallback):
        self.store = store
        self.name = name
        self.kind = kind
        self.fallback = fallback

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        # 1. decide from the query grid whether this call is recorded
        if hidden_states.ndim == 4:
            length = hidden_states.shape[-1] * hidden_states.shape[-2]
        else:
            length = hidden_states.shape[1]
        try:
            hw, factor = grid_for_length(length, self.store.latent_hw)
        except ValueError:
            hw, factor = None, 0
        if hw is None or not self.store.wants_grid(hw, factor):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        # 2. standard attention with materialised probabilities
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, Lq, Lk)

        # 3. record (B, heads, Lq, Lk)
        b = probs.shape[0] // attn.heads
        self.store.record(self.name, self.kind, hw, factor, probs.detach().reshape(b, attn.heads, *probs.shape[1:]))

        # 4. finish the layer exactly as AttnProcessor does
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_modules(model: torch.nn.Module) -> Iterator[tuple[str, Any, str]]:
    """(name, module, kind) of every diffusers ``Attention`` inside ``model``; kind is self or cross."""
    from diffusers.models.attention_processor import Attention

    for name, module in model.named_modules():
        if isinstance(module, Attention):
            yield name, module, ("cross" if module.is_cross_attention else "self")


@contextlib.contextmanager
def capture_attention(unet: torch.nn.Module, store: AttentionStore | None = None,
                      **filters) -> Iterator[AttentionStore]:
    """Record attention of ``unet`` inside the ``with`` block; previous processors come back on exit.

    ``store`` or ``filters`` (the ``AttentionStore`` arguments) choose the layers; the latent size of
    each forward is read by a pre-hook so grid sizes follow the input.
    """
    if store is None:
        store = AttentionStore(**filters)
    elif filters:
        raise TypeError("pass either a store or filters, not both")

    def _latent_hook(_module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            store.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    saved: list[tuple[Any, Any]] = []
    hook = unet.register_forward_pre_hook(_latent_hook, with_kwargs=True)
    try:
        for name, module, kind in attention_modules(unet):
            if not store.wants_layer(name, kind):
                continue
            previous = module.processor
            saved.append((module, previous))
            module.set_processor(AttentionCaptureProcessor(store, name, kind, previous))
        yield store
    finally:
        hook.remove()
        for module, previous in saved:
            module.set_processor(previous)
