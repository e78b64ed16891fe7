"""``directsam``: subobject tokens from DirectSAM boundary maps (ChenDelong1999/subobjects).

A SegformerForSemanticSegmentation with one output channel predicts, for every pixel, the probability
that it lies on a subobject boundary. The pyramid (``directsam_pyramid``) turns a batch of images into
boundary maps; the shared post-processing (``tokens.boundary_to_tokens``) turns each map into tokens.

Reference: ``DirectSAM/utils.py`` of ChenDelong1999/subobjects at commit
d3b1f701169e6cc71b1dbc78c96317587b45ec2a (the file last changed in 0eb4cb06a7bf4c648e09e4823edbcea59cc92916).
What follows it:

- preprocessing: the checkpoint's image processor, as its ``preprocessor_config.json`` says (size, or
  ``resolution`` in its place; ``resample`` filter through PIL; ``do_rescale``/``rescale_factor``;
  ``do_normalize``/``image_mean``/``image_std``), value for value (``directsam_pyramid.Preprocessing``);
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

import json
import logging
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from pseudolabel.models.base import Labeler, LabelerParams, LabelOutput
from pseudolabel.models.device import compiled, to_device, to_host
from pseudolabel.models.directsam_pyramid import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    preprocess,
    pyramid_probs,
    pyramid_views,
)
from pseudolabel.models.tokens import boundary_to_tokens
from pseudolabel.models.weights import read_checkpoint_file, resolve_weights
from pseudolabel.schemas.spec import StorageSpec

DEFAULT_RESOLUTION = 1024
#: number of box coordinates appended to every token embedding
BOX_DIMS = 4

log = logging.getLogger(__name__)


class DirectSAMParams(LabelerParams):
    resolution: int | None = Field(
        None, ge=32, description="square input side in px every view is resized to; None = the checkpoint's "
                                 "preprocessor size (1800 for DirectSAM-1800px-0424), else "
                                 f"{DEFAULT_RESOLUTION}. The resize uses the checkpoint's resample filter")
    pyramid_layers: int = Field(0, ge=0, le=4, description="crop pyramid layers (layer L adds 2^L x 2^L crops)")
    overlap: int = Field(90, ge=0, description="overlap in px between pyramid crops (border bands: 2/3 and 1/3 of it)")
    threshold: float = Field(0.25, ge=0.0, le=1.0, description="boundary threshold (README: 0.25 quick; 0.03 with "
                                                               "resolution 3600 and 1-2 pyramid layers)")
    mode: Literal["simple", "partition"] = Field(
        "simple", description="simple (the reference's probs_to_masks): tokens are the 8-connected regions below "
                              "the threshold, boundary pixels stay unassigned; partition (our addition, not in "
                              "the reference): a watershed on the map gives every boundary pixel to a neighbouring "
                              "token so the tokens tile the image, for a panoptic export or per-pixel features")
    max_tokens: int | None = Field(256, ge=1, description="keep at most this many tokens, largest first (the "
                                                          "reference's visualisation keeps 256)")
    min_area: int = Field(0, ge=0, description="drop seed regions smaller than this many px")
    batch_size: int = Field(8, ge=1, description="views (whole images and crops) per forward pass")
    fast_resize: bool = Field(
        False, description="resize views with torch's antialiased kernel on the device instead of the "
                           "checkpoint's image processor (PIL, its resample filter, on the host). Faster for "
                           "large views and pyramids but not exact: torch differs from PIL by one grey level "
                           "on some values (0.2 % on a photo, a quarter on noise), enough to split or merge "
                           "a token near the threshold. Bilinear and bicubic checkpoints only")
    save_boundary: bool = Field(False, description="also output the boundary map as a uint16 layer 'boundary' "
                                                   "(value / 65535 = probability)")
    embedding_weights: str | None = Field(
        None, description="transformers backbone (hub id, local dir or s3://, e.g. a DINOv2 AutoBackbone) for "
                          "token embeddings: mask-pooled features (C values) followed by the token's box "
                          "[x0/W, y0/H, x1/W, y1/H]; None = no embeddings")
    embedding_resolution: int = Field(448, ge=14, description="square input side of the embedding backbone")


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


def read_preprocessor(source: str, revision: str | None = None, storage: StorageSpec | None = None) -> dict[str, Any]:
    """The checkpoint's ``preprocessor_config.json`` as a dict, {} when the checkpoint has none.

    ``source``: a local directory, an s3:// prefix (the one file is read; the weights are not copied)
    or a hub id, whose file is downloaded at ``revision``. A hub file that cannot be fetched (offline
    and not in the hub cache) raises ``huggingface_hub.errors.LocalEntryNotFoundError``.
    """
    raw = read_checkpoint_file(source, "preprocessor_config.json", storage, revision)
    return {} if raw is None else json.loads(raw)


def load_preprocessor(source: str, revision: str | None, needed: bool,
                      storage: StorageSpec | None = None) -> dict[str, Any]:
    """``read_preprocessor``; when the hub file cannot be fetched, {} if the caller can do without it
    (logged), else an error naming the way out."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return read_preprocessor(source, revision, storage)
    except LocalEntryNotFoundError as err:
        if needed:
            raise ValueError(f"{source}: cannot fetch preprocessor_config.json ({err}); it sets the input "
                             "resolution: make it reachable or set params.resolution") from err
        log.warning("%s: preprocessor_config.json unavailable (%s); using ImageNet mean/std", source, err)
        return {}


def token_boxes(label_map: np.ndarray, n_tokens: int) -> np.ndarray:
    """Normalised boxes of tokens 1..K of a label map.

    Returns:
        (K, 4) float32 ``[x0 / W, y0 / H, x1 / W, y1 / H]`` with x1, y1 exclusive, i.e. the COCO box
        ``[x, y, w, h]`` of the token's mask (pycocotools ``toBbox``) as ``[x, y, x + w, y + h]``
        divided by the image width and height. An empty token gets zeros.
    """
    from scipy import ndimage

    height, width = label_map.shape
    out = np.zeros((n_tokens, BOX_DIMS), np.float32)
    scale = np.array([width, height, width, height], np.float64)
    for k, sl in enumerate(ndimage.find_objects(label_map, max_label=n_tokens)):
        if sl is not None:
            sy, sx = sl
            out[k] = np.array([sx.start, sy.start, sx.stop, sy.stop], np.float64) / scale
    return out


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


def mask_pool(features: torch.Tensor, label_map: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Average a feature map over each token's mask.

    Args:
        features: (C, h, w) float feature map of the whole image.
        label_map: (H, W) int64, 0 = unassigned, 1..K tokens.
        n_tokens: K.

    Returns:
        (K, C) float32: for each token, the mean of the feature cells weighted by how many of the
        token's pixels fall in each cell (pixel (y, x) falls in cell (y * h // H, x * w // W)). Every
        non-empty token covers at least one cell; an empty token gets zeros.
    """
    c, h, w = features.shape
    height, width = label_map.shape
    # 1. the feature cell under every pixel
    rows = torch.arange(height, device=label_map.device) * h // height
    cols = torch.arange(width, device=label_map.device) * w // width
    cell = (rows[:, None] * w + cols[None, :]).reshape(-1)
    # 2. pixel counts per (token, cell) in one bincount
    flat = label_map.reshape(-1)
    counts = torch.bincount(flat * (h * w) + cell, minlength=(n_tokens + 1) * h * w)
    cover = counts.reshape(n_tokens + 1, h * w)[1:].float()  # (K, h*w)
    # 3. weighted means
    feats = features.float().reshape(c, h * w)
    return (cover @ feats.T) / cover.sum(1, keepdim=True).clamp_min(1.0)


class DirectSAM(Labeler[dict[str, np.ndarray]]):
    _preprocessing: Preprocessing | None  # set by the constructor, or read on first use by a host half
    name = "directsam"
    cuda_dtype = "bfloat16"  # SegFormer runs in bf16 on CUDA without overflow in its attention
    Params = DirectSAMParams
    params: DirectSAMParams  # the validated Params of this labeler
    summary = ("Subobject tokens from DirectSAM boundary maps (Segformer, crop pyramid, connected components; "
               "optional watershed partition)")
    default_weights = "chendelong/DirectSAM-1800px-0424"

    def __init__(self, spec, *, device: str = "cpu", storage=None):
        super().__init__(spec, device=device, storage=storage)
        p = self.params
        # 1. weights: hub id / local dir / s3:// prefix copied once per node
        local = resolve_weights(self.weights_id, self.storage, spec.revision)
        self.dtype = self.compute_dtype()
        self.model = load_segformer(local, device, self.dtype, spec.revision)
        self._network = compiled(self.model, spec.compile, self.name)
        # 2. the checkpoint's image processor (size, resample, rescale, normalise); Segformer defaults otherwise
        config = load_preprocessor(local, spec.revision, needed=p.resolution is None)
        self._preprocessing = Preprocessing.from_config(config, p.resolution, DEFAULT_RESOLUTION, p.fast_resize)
        self.resolution = self.preprocessing.size[0]
        # 3. optional embedding backbone
        self.backbone: torch.nn.Module | None = None
        if p.embedding_weights:
            emb_local = resolve_weights(p.embedding_weights, self.storage)
            self.backbone = load_backbone(emb_local).to(device=device, dtype=self.dtype).eval()
            emb_pre = load_preprocessor(emb_local, None, needed=False)
            self.emb_mean = tuple(emb_pre.get("image_mean") or IMAGENET_MEAN)
            self.emb_std = tuple(emb_pre.get("image_std") or IMAGENET_STD)

    def setup_host(self) -> None:
        self._preprocessing = None

    @property
    def preprocessing(self) -> Preprocessing:
        """The checkpoint's image processor. A host half (no weights loaded) reads it from the
        checkpoint's ``preprocessor_config.json`` alone, once."""
        if self._preprocessing is None:
            p = self.params
            config = load_preprocessor(self.weights_id, self.spec.revision, needed=p.resolution is None,
                                       storage=self.storage)
            self._preprocessing = Preprocessing.from_config(config, p.resolution, DEFAULT_RESOLUTION, p.fast_resize)
        return self._preprocessing

    def weight_sources(self) -> list[str]:
        return super().weight_sources() + ([self.params.embedding_weights] if self.params.embedding_weights else [])

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

    # -- the two halves ---------------------------------------------------------------------------------

    def prepare(self, image: np.ndarray, prompt: Any) -> dict[str, np.ndarray] | None:
        """Host preparation: ``views`` (V, R, R, 3) uint8, the image and its pyramid crops resized by the
        checkpoint's image processor (PIL, its resample filter), in ``image_views`` order; None with
        ``fast_resize`` (the device resizes)."""
        p = self.params
        if self.preprocessing.fast_resize:
            return None
        return {"views": pyramid_views(image, self.preprocessing, p.pyramid_layers, p.overlap)}

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

    def postprocess(self, image: np.ndarray, prompt: Any, payload: dict[str, np.ndarray]) -> LabelOutput:
        """Host half: boundary map -> tokens (shared post-processing), optional embeddings and layer."""
        p = self.params
        quantised = payload["boundary"]
        prob = quantised.astype(np.float32) / np.float32(65535)
        tokens = boundary_to_tokens(prob, p.threshold, p.mode, p.max_tokens, p.min_area)
        if "features" in payload:
            tokens.embeddings = token_embeddings(payload["features"], tokens.label_map)
        return LabelOutput(tokens=tokens, layers={"boundary": quantised} if p.save_boundary else {})


def boundary_quantise(prob: torch.Tensor) -> torch.Tensor:
    """(H, W) float probabilities in [0, 1] -> (H, W) uint16 round(prob * 65535) (half to even, in
    float64), on the same device: the payload and the ``boundary`` layer.

    16 bits keep low thresholds (0.02-0.03, the README's setting for high resolutions) exact to
    1/131070 when the layer is re-tokenised later (``evaluate --curve``); 8 bits would move them by up
    to 1/510.
    """
    return torch.round(prob.double().clamp(0.0, 1.0) * 65535).to(torch.uint16)


def token_embeddings(features: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """(C, h, w) float32 features + (H, W) label map with tokens 1..K -> (K, C + 4) float32 rows
    ``[mask-pooled features, x0 / W, y0 / H, x1 / W, y1 / H]`` (see ``DirectSAM.embed``)."""
    k = int(label_map.max()) if label_map.size else 0
    if k == 0:
        return np.zeros((0, features.shape[0] + BOX_DIMS), np.float32)
    pooled = mask_pool(torch.from_numpy(np.ascontiguousarray(features)),
                       torch.from_numpy(label_map.astype(np.int64)), k).numpy().astype(np.float32)
    return np.concatenate([pooled, token_boxes(label_map, k)], axis=1)
