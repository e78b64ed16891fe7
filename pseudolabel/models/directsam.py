"""``directsam``: subobject tokens from DirectSAM boundary maps (ChenDelong1999/subobjects).

A SegformerForSemanticSegmentation with one output channel predicts, for every pixel, the probability
that it lies on a subobject boundary. The pyramid (``directsam_pyramid``) turns a batch of images into
boundary maps; the shared post-processing (``tokens.boundary_to_tokens``) turns each map into tokens.
Three modules: ``directsam_views`` makes the views (no torch), ``directsam_host.DirectSAMHost`` holds the
parameters, ``prepare`` and ``postprocess`` (no torch: what the engine's CPU tasks import), and
``DirectSAM`` here adds the network and the device half.

Reference: ``DirectSAM/utils.py`` of ChenDelong1999/subobjects at commit
d3b1f701169e6cc71b1dbc78c96317587b45ec2a (the file last changed in 0eb4cb06a7bf4c648e09e4823edbcea59cc92916).
What follows it:

- preprocessing: the checkpoint's image processor, as its ``preprocessor_config.json`` says (size, or
  ``resolution`` in its place; ``resample`` filter through PIL; ``do_rescale``/``rescale_factor``;
  ``do_normalize``/``image_mean``/``image_std``), value for value (``directsam_views.Preprocessing``);
- ``inference_single_image``: logits upsampled bilinearly to each view's size, sigmoid, the crop pyramid
  with its border bands, the sum divided by ``layers + 1`` (``directsam_pyramid.pyramid_probs``);
- ``probs_to_masks``: tokens are the 8-connected components of ``prob < threshold``, largest first
  (``mode: simple``, the default); ``visualize_direct_sam_result`` keeps the 256 largest (``max_tokens``).

Where it departs:

- ``mode: partition`` is not in the reference: the boundary pixels that ``simple`` leaves unassigned are
  given to the neighbouring tokens by a watershed on the map, so the tokens tile the image (every pixel
  in exactly one token: panoptic export, per-pixel features, ASA without holes);
- the device half hands the host half the boundary map quantised to uint16 (``boundary_quantise``),
  so tokens are made from exactly what the ``boundary`` layer stores (1/65535 steps);
- optional token embeddings (``DirectSAM.embed``), not in the reference: the features of a transformers
  backbone (e.g. DINOv2 ``AutoBackbone``) averaged over the token's mask, followed by the token's box
  normalised by the image size, ``[x0 / W, y0 / H, x1 / W, y1 / H]``;
- views of a batch go through the network together; ``min_area`` and a per-token ``boundary_score``;
- ``fast_resize`` (off by default) swaps the PIL resize for torch's kernel on the device, which is not
  equal to PIL.

The checkpoint's ``preprocessor_config.json`` is read wherever the weights come from: a local
directory, an s3:// prefix (copied with the weights) or a hub id (downloaded at the spec's ``revision``
with ``huggingface_hub.hf_hub_download``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pseudolabel.models.device import compiled, to_device, to_host
from pseudolabel.models.directsam_host import (
    DirectSAMHost,
    load_preprocessor,
    token_embeddings,
)
from pseudolabel.models.directsam_pyramid import preprocess, pyramid_probs
from pseudolabel.models.directsam_views import IMAGENET_MEAN, IMAGENET_STD
from pseudolabel.models.weights import resolve_weights

#: SegFormer encoder sizes (MiT-B0..B5): depths, hidden sizes, decoder width; "tiny" is for tests
SEGFORMER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], decoder_hidden_size=32,
                 num_attention_heads=[1, 1, 2, 4]),
    "b0": dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], decoder_hidden_size=256),
    "b1": dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=256),
    "b2": dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
    "b3": dict(depths=[3, 4, 18, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
    "b4": dict(depths=[3, 8, 27, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
    "b5": dict(depths=[3, 6, 40, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
}


def segformer_config(size: str = "b0", **overrides: Any):
    """A SegformerConfig with one output channel (num_labels=1) of a named size (see SEGFORMER_SIZES)."""
    from transformers import SegformerConfig

    if size not in SEGFORMER_SIZES:
        raise ValueError(f"unknown Segformer size {size!r}; known: {', '.join(SEGFORMER_SIZES)}")
    return SegformerConfig(**{**SEGFORMER_SIZES[size], "num_labels": 1, **overrides})


def load_segformer(weights: str, device: str, dtype: torch.dtype, revision: str | None = None):
    """SegformerForSemanticSegmentation (num_labels=1) from a local dir or hub id, in eval mode."""
    from transformers import SegformerForSemanticSegmentation

    # transformers takes revision=None as its default branch; its annotation says str
    model = SegformerForSemanticSegmentation.from_pretrained(weights, revision=revision)  # type: ignore[arg-type]
    if model.config.num_labels != 1:
        raise ValueError(f"{weights}: DirectSAM needs a num_labels=1 Segformer, got {model.config.num_labels}")
    # transformers' wrapper around Module.to hides its signature from type checkers
    return model.to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]


def load_backbone(weights: str, revision: str | None = None):
    """A transformers backbone (the ``AutoBackbone`` class of the checkpoint's config) from a local dir
    or hub id. The class is looked up from the config directly: ``AutoBackbone.from_pretrained`` asks the
    hub whether the name is a repo before loading, which fails offline and for local directories."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

    config = AutoConfig.from_pretrained(weights, revision=revision)
    try:
        cls = MODEL_FOR_BACKBONE_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"{weights}: {type(config).__name__} has no transformers backbone class") from None
    # the auto mapping's values are model classes; its annotation says a tuple of them
    return cls.from_pretrained(weights, revision=revision)  # type: ignore[attr-defined]


class DirectSAM(DirectSAMHost):
    """The whole labeler: ``DirectSAMHost`` (parameters, ``prepare``, ``postprocess``) plus the network
    and its device half."""

    cuda_dtype = "bfloat16"  # SegFormer runs in bf16 on CUDA without overflow in its attention

    def __init__(self, spec, *, device: str = "cpu", storage=None):
        super().__init__(spec, device=device, storage=storage)
        p = self.params
        # 1. weights: hub id / local dir / s3:// prefix copied once per node
        local = resolve_weights(self.weights_id, self.storage, spec.revision)
        self.dtype = self.compute_dtype()
        self.model = load_segformer(local, device, self.dtype, spec.revision)
        self._network = compiled(self.model, spec.compile, self.name)
        # 2. the checkpoint's image processor (size, resample, rescale, normalise); Segformer defaults otherwise
        self._preprocessing = self.load_preprocessing(local)
        self.resolution = self.preprocessing.size[0]
        # 3. optional embedding backbone
        self.backbone: torch.nn.Module | None = None
        if p.embedding_weights:
            emb_local = resolve_weights(p.embedding_weights, self.storage)
            self.backbone = load_backbone(emb_local).to(device=device, dtype=self.dtype).eval()
            emb_pre = load_preprocessor(emb_local, None, needed=False)
            self.emb_mean = tuple(emb_pre.get("image_mean") or IMAGENET_MEAN)
            self.emb_std = tuple(emb_pre.get("image_std") or IMAGENET_STD)

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._network(pixel_values=pixel_values.to(self.dtype)).logits

    def boundary_maps(self, images: list[np.ndarray], views: list[np.ndarray] | None = None) -> list[torch.Tensor]:
        """N (H, W, 3) uint8 RGB images -> N (H, W) float32 boundary probabilities in [0, 1] (on device).

        ``views``: per image, its views already resized by the image processor (``prepare``), or None
        (resized here, or on the device with ``fast_resize``)."""
        p = self.params
        with torch.inference_mode():
            return pyramid_probs(images, self._forward, self.preprocessing, p.pyramid_layers, p.overlap,
                                 p.batch_size, self.device, resized=views, to_device=to_device)

    def feature_maps(self, images: list[np.ndarray]) -> torch.Tensor:
        """(N, C, h, w) float32: the embedding backbone's last feature map at ``embedding_resolution``."""
        res = self.params.embedding_resolution
        if self.backbone is None:
            raise RuntimeError("feature_maps needs embedding_weights")
        with torch.inference_mode():
            pixels = preprocess(images, res, self.device, self.emb_mean, self.emb_std)
            return self.backbone(pixel_values=pixels.to(self.dtype)).feature_maps[-1].float()

    def embed(self, images: list[np.ndarray], label_maps: list[np.ndarray]) -> list[np.ndarray]:
        """Token embeddings: N label maps (H, W) with tokens 1..K -> N arrays (K, C + 4) float32.

        Row k - 1 (token k) is ``[f_1 .. f_C, x0 / W, y0 / H, x1 / W, y1 / H]``: the last feature map of
        the backbone (C channels) at ``embedding_resolution`` averaged over the token's mask
        (``mask_pool``), then the token's box normalised by the image size (``token_boxes``; x1, y1
        exclusive, so ``[x0, y0, x1 - x0, y1 - y0]`` in px is the token's COCO ``bbox``).
        """
        fmaps = to_host(list(self.feature_maps(images)))
        return [token_embeddings(f, lm) for f, lm in zip(fmaps, label_maps)]

    # -- the device half (prepare and postprocess: DirectSAMHost) -----------------------------------------

    def forward(self, images: list[np.ndarray], prompts: list[Any],
                prepared: list[dict[str, np.ndarray] | None] | None = None) -> list[dict[str, np.ndarray]]:
        """Device half. ``prepared``: ``prepare``'s views per image (made here when None). Payload per image:

        - ``boundary``: (H, W) uint16, round(probability * 65535): the boundary map at the image's size,
          quantised on the device (the host works from exactly what the ``boundary`` layer stores;
          1/65535 is far below the network's bf16 precision);
        - ``features``: (C, h, w) float32, the embedding backbone's feature map (only with
          ``embedding_weights``; pooled over the tokens on the host).
        """
        ready = self.prepared_inputs(images, prompts, prepared)
        views = None if self.preprocessing.fast_resize else [r["views"] for r in ready]  # type: ignore[index]
        with torch.inference_mode():
            quantised = [boundary_quantise(prob) for prob in self.boundary_maps(images, views)]
            tensors = quantised + (list(self.feature_maps(images)) if self.backbone is not None else [])
        host = to_host(tensors)
        n = len(images)
        payloads = [{"boundary": host[i]} for i in range(n)]
        if self.backbone is not None:
            for i in range(n):
                payloads[i]["features"] = host[n + i]
        return payloads


def boundary_quantise(prob: torch.Tensor) -> torch.Tensor:
    """(H, W) float probabilities in [0, 1] -> (H, W) uint16 round(prob * 65535) (half to even, in
    float64), on the same device: the payload and the ``boundary`` layer.

    16 bits keep low thresholds (0.02-0.03, the README's setting for high resolutions) exact to
    1/131070 when the layer is re-tokenised later (``evaluate --curve``); 8 bits would move them by up
    to 1/510.
    """
    return torch.round(prob.double().clamp(0.0, 1.0) * 65535).to(torch.uint16)


