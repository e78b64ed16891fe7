"""DirectSAM's host half: its parameters, its input preparation and its tokens, without torch.

``DirectSAMHost`` is what the engine's CPU tasks build (``models.registry.HOST_HALVES``): ``prepare``
resizes every pyramid view with the checkpoint's image processor (``directsam_views``) and
``postprocess`` turns the device half's quantised boundary map into tokens (``tokens``) and optional
token embeddings. Importing it loads numpy, PIL, OpenCV and scikit-image, not torch or transformers,
so the decode and host workers stay small. ``directsam.DirectSAM`` adds the network and the device half.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pseudolabel.models.base import Labeler, LabelerParams, LabelOutput
from pseudolabel.models.directsam_views import Preprocessing, pyramid_views
from pseudolabel.models.tokens import boundary_to_tokens
from pseudolabel.models.weights import read_checkpoint_file
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


def mask_pool(features: np.ndarray, label_map: np.ndarray, n_tokens: int) -> np.ndarray:
    """Average a feature map over each token's mask.

    Args:
        features: (C, h, w) float feature map of the whole image.
        label_map: (H, W) integer, 0 = unassigned, 1..K tokens.
        n_tokens: K.

    Returns:
        (K, C) float32: for each token, the mean of the feature cells weighted by how many of the
        token's pixels fall in each cell (pixel (y, x) falls in cell (y * h // H, x * w // W)). Every
        non-empty token covers at least one cell; an empty token gets zeros.
    """
    c, h, w = features.shape
    height, width = label_map.shape
    # 1. the feature cell under every pixel
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    cell = (rows[:, None] * w + cols[None, :]).reshape(-1)
    # 2. pixel counts per (token, cell) in one bincount
    flat = label_map.reshape(-1).astype(np.int64)
    counts = np.bincount(flat * (h * w) + cell, minlength=(n_tokens + 1) * h * w)
    cover = counts.reshape(n_tokens + 1, h * w)[1:].astype(np.float32)  # (K, h*w)
    # 3. weighted means
    feats = features.astype(np.float32).reshape(c, h * w)
    return ((cover @ feats.T) / np.maximum(cover.sum(1, keepdims=True), np.float32(1.0))).astype(np.float32)


def token_embeddings(features: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """(C, h, w) float32 features + (H, W) label map with tokens 1..K -> (K, C + 4) float32 rows
    ``[mask-pooled features, x0 / W, y0 / H, x1 / W, y1 / H]`` (see ``DirectSAM.embed``)."""
    k = int(label_map.max()) if label_map.size else 0
    if k == 0:
        return np.zeros((0, features.shape[0] + BOX_DIMS), np.float32)
    pooled = mask_pool(features, label_map, k)
    return np.concatenate([pooled, token_boxes(label_map, k)], axis=1)


class DirectSAMHost(Labeler[dict[str, np.ndarray]]):
    """DirectSAM without its network: parameters, ``prepare`` and ``postprocess`` (see the module)."""

    _preprocessing: Preprocessing | None  # set by DirectSAM's constructor, or read on first use by a host half
    name = "directsam"
    Params = DirectSAMParams
    params: DirectSAMParams  # the validated Params of this labeler
    summary = ("Subobject tokens from DirectSAM boundary maps (Segformer, crop pyramid, connected components; "
               "optional watershed partition)")
    default_weights = "chendelong/DirectSAM-1800px-0424"

    def setup_host(self) -> None:
        self._preprocessing = None

    @property
    def preprocessing(self) -> Preprocessing:
        """The checkpoint's image processor. A host half (no weights loaded) reads it from the
        checkpoint's ``preprocessor_config.json`` alone, once."""
        if self._preprocessing is None:
            self._preprocessing = self.load_preprocessing(self.weights_id, self.storage)
        return self._preprocessing

    def load_preprocessing(self, source: str, storage: StorageSpec | None = None) -> Preprocessing:
        """The image processor of the checkpoint at ``source`` (its ``preprocessor_config.json``; the
        Segformer processor's defaults for what it lacks), with ``params.resolution`` in place of its
        size when set."""
        p = self.params
        config = load_preprocessor(source, self.spec.revision, needed=p.resolution is None, storage=storage)
        return Preprocessing.from_config(config, p.resolution, DEFAULT_RESOLUTION, p.fast_resize)

    def weight_sources(self) -> list[str]:
        return super().weight_sources() + ([self.params.embedding_weights] if self.params.embedding_weights else [])

    # -- the host's parts of the two halves ----------------------------------------------------------------

    def prepare(self, image: np.ndarray, prompt: Any) -> dict[str, np.ndarray] | None:
        """Host preparation: ``views`` (V, R, R, 3) uint8, the image and its pyramid crops resized by the
        checkpoint's image processor (PIL, its resample filter), in ``image_views`` order; None with
        ``fast_resize`` (the device resizes)."""
        p = self.params
        if self.preprocessing.fast_resize:
            return None
        return {"views": pyramid_views(image, self.preprocessing, p.pyramid_layers, p.overlap)}

    def postprocess(self, image: np.ndarray, prompt: Any, payload: dict[str, np.ndarray]) -> LabelOutput:
        """Host half: boundary map -> tokens (shared post-processing), optional embeddings and layer."""
        p = self.params
        quantised = payload["boundary"]
        prob = quantised.astype(np.float32) / np.float32(65535)
        tokens = boundary_to_tokens(prob, p.threshold, p.mode, p.max_tokens, p.min_area)
        if "features" in payload:
            tokens.embeddings = token_embeddings(payload["features"], tokens.label_map)
        return LabelOutput(tokens=tokens, layers={"boundary": quantised} if p.save_boundary else {})
