"""The ``evf_sam`` labeler: text prompts from the job's ontology -> COCO instance masks.

Host preparation (``prepare``), per image, in the engine's decode tasks: both network inputs, resized
on the host as the reference does (``preprocess.prepare_inputs``). Device half (``forward``), per batch:
the SAM input is normalised (and padded) on the device; the SAM image encoder runs once per image;
every ontology prompt is fused with the image in BEiT-3 and decoded against that shared image
embedding; the low-res logits are resized to the image and thresholded (> 0) on the device and come
back bit-packed, with the IoU scores. Host half (``postprocess``), per image: unpack, filter by score
and area, de-duplicate, and attach to each kept mask the ontology entry's ``category_id``/``category``
and the prompt that made it.

Follows hustvl/EVF-SAM at 9935dc5 (inference.py, model/evf_sam.py, model/evf_sam2.py; unchanged since
9d00853, which added the multitask checkpoints); SAM-2 without ``multitask`` follows the revision before
it, 781bee0, which the original EVF-SAM2 checkpoints were released with. Departures: multitask or not is
read from the checkpoint's files (model.checkpoint_multitask) rather than implied by the code revision;
images and prompts are batched (the image's prompts against one SAM encoding per image). A row whose
prompt gives ``categories`` (image-level tags) is prompted with those ontology entries' prompts only
(``row_categories``, on by default).

A host half (``host_half``: no weights) reads what ``prepare`` needs (the SAM variant and input sizes from
config.json; multitask or not from config.json and the tokenizer's metadata files, unless the params
say) from the checkpoint with ``weights.read_checkpoint_file``, once, never copying the weights.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from pydantic import Field

from pseudolabel.models.base import Instance, Labeler, LabelerParams, LabelOutput, entry_id, row_entries
from pseudolabel.models.device import compiled, to_device, to_host
from pseudolabel.models.evf_sam.model import (
    MULTITASK_TOKEN,
    TOKENIZER_METADATA,
    EvfSamConfig,
    MultitaskUndecidedError,
    checkpoint_multitask,
    load_evf_sam,
    load_tokenizer,
)
from pseudolabel.models.evf_sam.postprocess import select_instances
from pseudolabel.models.evf_sam.preprocess import (
    InputShape,
    device_sam_pixels,
    masks_to_original,
    prepare_inputs,
    prompt_text,
)
from pseudolabel.models.weights import looks_like_local_path, read_checkpoint_file, resolve_weights
from pseudolabel.storage import protocol_of


class EvfSamParams(LabelerParams):
    score_threshold: float = Field(0.0, ge=0.0, le=1.0, description="keep masks whose IoU-head score is at least this")
    min_area: int = Field(1, ge=0,
                          description="drop masks with fewer pixels than this (empty masks are always dropped)")
    dedup_iou: float | None = Field(None, gt=0.0, le=1.0, description="if set, drop a mask whose IoU with a "
                                    "higher-scoring mask from another prompt exceeds this")
    multitask: bool | None = Field(None, description="a multitask checkpoint: prefix '[semantic] ' to prompts of "
                                   "ontology entries marked semantic and, for SAM-2, run the newer reference "
                                   "(straight resize, best of three masks) instead of the original one (longest-side "
                                   "resize, single-mask token); None = read it from the checkpoint: config.json "
                                   "'multitask', else whether its tokenizer registers the '[semantic]' token "
                                   "(the multitask checkpoints' added_tokens.json); an error if neither says")
    prompt_chunk: int = Field(64, ge=1, description="image-prompt pairs per BEiT-3 fusion pass")
    max_text_tokens: int = Field(512, ge=4, description="truncate tokenised prompts to this many tokens")
    row_categories: bool = Field(True, description="a row's 'categories' (image-level tags, e.g. from a COCO "
                                 "input) limit its prompts to those ontology entries' (none of them in the "
                                 "ontology: no prompt); false: every prompt on every image")


def _local_checkpoint(weights: str, storage, revision: str | None) -> str:
    """A local directory for a local path, an s3:// prefix or a hub id.

    A local path that is not a directory raises FileNotFoundError instead of being tried as a hub id.
    """
    local = resolve_weights(weights, storage, revision)
    if os.path.isdir(local):
        return local
    if looks_like_local_path(weights):
        raise FileNotFoundError(f"evf_sam weights {weights!r}: no such checkpoint directory "
                                "(a hub id has the form owner/name)")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=weights, revision=revision)


def _read_multitask(weights: str, storage, revision: str | None) -> bool:
    """``model.checkpoint_multitask`` without the weights: on a local checkpoint directory as it is; else
    on a temporary directory holding only config.json and the tokenizer's metadata files (the files it
    reads), read one by one. Its errors name ``weights``."""
    # 1. a local directory: read in place
    if protocol_of(weights) == "file":
        local = resolve_weights(weights, storage, revision)      # a local path: no copy
        if os.path.isdir(local):
            return checkpoint_multitask(local)
    # 2. a hub id or an s3:// prefix: the few small files only
    with tempfile.TemporaryDirectory(prefix="evf-sam-meta-") as tmp:
        for name in ("config.json", *TOKENIZER_METADATA):
            data = read_checkpoint_file(weights, name, storage, revision)
            if data is not None:
                (Path(tmp) / name).write_bytes(data)
        try:
            return checkpoint_multitask(tmp)
        except MultitaskUndecidedError as err:
            raise MultitaskUndecidedError(str(err).replace(tmp, weights)) from None


def read_input_shape(weights: str, storage, revision: str | None, multitask: bool | None) -> InputShape:
    """The checkpoint's ``InputShape`` from its config.json (and tokenizer metadata when ``multitask``
    is None), without loading or copying its weights: what a host half's ``prepare`` needs."""
    raw = read_checkpoint_file(weights, "config.json", storage, revision)
    if raw is None:
        raise FileNotFoundError(f"evf_sam weights {weights!r}: no config.json (a checkpoint directory, an "
                                "s3:// prefix or a hub id owner/name)")
    cfg = EvfSamConfig.from_dict(json.loads(raw))
    if multitask is None:
        multitask = _read_multitask(weights, storage, revision)
    return InputShape(cfg.variant, cfg.sam_image_size, cfg.beit3.img_size, bool(multitask))


class EvfSamLabeler(Labeler[dict[str, np.ndarray]]):
    name = "evf_sam"
    Params = EvfSamParams
    params: EvfSamParams  # the validated Params of this labeler
    summary = "EVF-SAM: text-prompted instance masks (BEiT-3 early fusion + SAM / SAM-2), one per ontology prompt"
    default_weights = "YxZhang/evf-sam2"

    def setup_host(self) -> None:
        """Every (entry, prompt) pair in ontology order: mask k of a payload belongs to pair k."""
        if not self.ontology:
            raise ValueError("evf_sam needs an ontology (prompt -> category) in the labeler spec")
        self.pairs = [(entry, p) for entry in self.ontology for p in entry.prompts]
        #: per pair, the index of its ontology entry
        self.pair_entries = [k for k, entry in enumerate(self.ontology) for _ in entry.prompts]
        self._input_shape: InputShape | None = None

    def __init__(self, spec, *, device: str = "cpu", storage=None):
        super().__init__(spec, device=device, storage=storage)     # setup_host: the ontology check, self.pairs
        # 1. model and tokenizer from the checkpoint directory
        path = _local_checkpoint(self.weights_id, self.storage, spec.revision)
        self.dtype = self.compute_dtype()
        self.model = load_evf_sam(path, device=device, dtype=self.dtype)
        cfg = self.model.config
        self.variant = cfg.variant
        self.sam_size = cfg.sam_image_size
        self.beit_size = cfg.beit3.img_size
        # multitask: the explicit param, else the checkpoint's own files (never its name or location)
        multitask = self.params.multitask
        self.multitask = checkpoint_multitask(path) if multitask is None else bool(multitask)
        self._input_shape = InputShape(self.variant, self.sam_size, self.beit_size, self.multitask)
        # the SAM image encoder: the expensive call, fixed S x S input
        self._encode = compiled(self.model.encode_images, spec.compile, "evf_sam")
        # 2. every (entry, prompt) pair, tokenised once for the whole run
        texts = [prompt_text(p, entry.semantic, self.multitask) for entry, p in self.pairs]
        tok = load_tokenizer(path, multitask=self.multitask)
        if self.multitask and tok.convert_tokens_to_ids(MULTITASK_TOKEN) >= cfg.beit3.vocab_size:
            raise ValueError(f"evf_sam weights {self.weights_id!r}: the {MULTITASK_TOKEN!r} token's id is outside "
                             f"BEiT-3's vocabulary ({cfg.beit3.vocab_size}); not a multitask checkpoint's tokenizer")
        max_len = min(self.params.max_text_tokens, cfg.beit3.max_source_positions - 2)
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        self.input_ids = enc["input_ids"].to(device)
        self.attention_mask = enc["attention_mask"].to(device)

    @property
    def input_shape(self) -> InputShape:
        """What decides the network inputs. The model's own config when loaded; a host half (no weights)
        reads it from the checkpoint's config.json (and tokenizer metadata) alone, once."""
        if self._input_shape is None:
            self._input_shape = read_input_shape(self.weights_id, self.storage, self.spec.revision,
                                                 self.params.multitask)
        return self._input_shape

    # ------------------------------------------------------------------ pieces

    def _ready(self, images: list[np.ndarray], prepared: list[Any] | None) -> list[dict[str, np.ndarray]]:
        """``prepare``'s arrays for every image: ``prepared`` when given, else made here."""
        ready = self.prepared_inputs(images, [None] * len(images), prepared)
        missing = [i for i, r in enumerate(ready) if r is None]
        if missing:
            raise ValueError(f"evf_sam: no prepared inputs for images {missing}")
        return cast("list[dict[str, np.ndarray]]", ready)

    def encode_images(self, images: list[np.ndarray], prepared: list[Any] | None = None):
        """SAM image embeddings for the batch (one encoder pass) and each image's resized (h', w').
        ``prepared``: ``prepare``'s arrays per image (made here when None)."""
        ready = self._ready(images, prepared)
        size = self.input_shape.sam_size
        pixels = torch.stack([device_sam_pixels(r, size, self.device) for r in ready]).to(self.dtype)
        return self._encode(pixels), [(int(r["hw"][0]), int(r["hw"][1])) for r in ready]

    def row_pairs(self, prompt: Any) -> list[int]:
        """Indices into ``self.pairs`` of the prompts one row is labelled with: every pair, or with
        ``row_categories`` and a row naming ``categories``, those of the named entries (in pair order)."""
        named = row_entries(self.ontology, prompt) if self.params.row_categories else None
        if named is None:
            return list(range(len(self.pairs)))
        return [k for k, entry in enumerate(self.pair_entries) if entry in named]

    def prompt_embeddings(self, images: list[np.ndarray], prepared: list[Any] | None = None,
                          pairs: list[list[int]] | None = None) -> list[torch.Tensor]:
        """Per image, (P_i, out_dim): the image fused with each of its prompts (``pairs[i]``, indices into
        ``self.pairs``; default every pair), in chunks of ``prompt_chunk`` image-prompt pairs across the
        batch. ``prepared``: ``prepare``'s arrays per image (made here when None)."""
        ready = self._ready(images, prepared)
        pairs = [list(range(len(self.pairs)))] * len(images) if pairs is None else pairs
        beit = torch.stack([to_device(r["beit"], self.device) for r in ready]).to(self.dtype)
        img_idx = torch.as_tensor([i for i, ks in enumerate(pairs) for _ in ks], dtype=torch.long, device=self.device)
        txt_idx = torch.as_tensor([k for ks in pairs for k in ks], dtype=torch.long, device=self.device)
        out = []
        for s in range(0, len(txt_idx), self.params.prompt_chunk):
            ii, tt = img_idx[s:s + self.params.prompt_chunk], txt_idx[s:s + self.params.prompt_chunk]
            out.append(self.model.fuse(beit[ii], self.input_ids[tt], self.attention_mask[tt]))
        fused = torch.cat(out) if out else beit.new_zeros((0, self.model.config.out_dim))
        return list(fused.split([len(ks) for ks in pairs]))

    # ------------------------------------------------------------------ the two halves

    def prepare(self, image: np.ndarray, prompt: Any) -> dict[str, np.ndarray]:
        """Host preparation of one (H, W, 3) uint8 RGB image (``preprocess.prepare_inputs``):

        - ``beit``: (3, b, b) float32, about [-1, 1], the BEiT-3 input (b = 224);
        - ``sam_image``: (h', w', 3) uint8, the resized SAM input (SAM-H: longest side S, multitask SAM-2:
          S × S), normalised and padded on the device; or, for the original SAM-2 checkpoints,
          ``sam_pixels``: (3, S, S) float32, already normalised and stretched (the reference stretches
          in float after normalising);
        - ``hw``: (2,) int64, (h', w'), the unpadded resized size ((S, S) for SAM-2).
        """
        return prepare_inputs(image, self.input_shape)

    @torch.inference_mode()
    def forward(self, images: list[np.ndarray], prompts: list[Any],
                prepared: list[dict[str, np.ndarray] | None] | None = None) -> list[dict[str, np.ndarray]]:
        """Device half. ``prepared``: ``prepare``'s arrays per image (made here when None). Per image:
        ``masks`` (P, H, ceil(W/8)) uint8, the (P, H, W) masks (logit > 0 at the image's size) bit-packed
        along W as ``np.packbits`` does; ``width`` () int64, W; ``scores`` (P,) float32, the IoU head's
        score clamped to [0, 1]; ``pairs`` (P,) int32, the prompts' indices into ``self.pairs``
        (``row_pairs``: all of them unless the row names ``categories``)."""
        if not images:
            return []
        ready = self._ready(images, prepared)
        pairs = [self.row_pairs(p) for p in prompts]
        # 1. image embeddings: the SAM encoder runs once per image
        embeddings, resized = self.encode_images(images, ready)
        # 2. each image fused with each of its prompts
        fused = self.prompt_embeddings(images, ready, pairs)
        tensors = []
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            if not pairs[i]:  # a row whose categories name no ontology entry: nothing to decode
                tensors += [torch.zeros((0, h, (w + 7) // 8), dtype=torch.uint8), torch.zeros(0)]
                continue
            # 3. decode this image's prompts against its shared embedding, masks at the image's size
            emb_i = ([e[i:i + 1] for e in embeddings] if isinstance(embeddings, (list, tuple))
                     else embeddings[i:i + 1])
            low_res, iou = self.model.decode(emb_i, fused[i][None], multimask=self.multitask)
            logits = masks_to_original(low_res[0], self.variant, self.sam_size, resized[i], (h, w))
            tensors += [pack_bits(logits > 0), iou[0].clamp(0.0, 1.0)]
        host = to_host(tensors)
        return [{"masks": host[2 * i], "width": np.asarray(image.shape[1], np.int64),
                 "scores": host[2 * i + 1].astype(np.float32), "pairs": np.asarray(pairs[i], np.int32)}
                for i, image in enumerate(images)]

    def postprocess(self, image: np.ndarray, prompt: Any, payload: dict[str, np.ndarray]) -> LabelOutput:
        """Host half: unpack the masks, filter and de-duplicate, attach each prompt's ontology category."""
        masks = np.unpackbits(payload["masks"], axis=-1, count=int(payload["width"])).astype(bool)
        scores, pairs = payload["scores"], [int(k) for k in payload["pairs"]]
        if len(masks) != len(pairs) or len(scores) != len(pairs) or not all(0 <= k < len(self.pairs) for k in pairs):
            raise ValueError(f"evf_sam payload has {len(masks)} masks / {len(scores)} scores for prompts {pairs} "
                             f"of {len(self.pairs)}")
        keep = select_instances(masks, scores, score_threshold=self.params.score_threshold,
                                min_area=self.params.min_area, dedup_iou=self.params.dedup_iou)
        instances = []
        for k in keep:
            entry, text = self.pairs[pairs[k]]
            instances.append(Instance(mask=masks[k], category_id=entry_id(entry), category=entry.category,
                                      score=float(scores[k]), prompt=text))
        return LabelOutput(instances=instances)


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """(..., W) bool -> (..., ceil(W/8)) uint8 on the masks' device, bit for bit ``np.packbits(axis=-1)``
    (big-endian bit order, the last byte zero-padded): the device-to-host copy shrinks eightfold."""
    w = masks.shape[-1]
    bits = masks.to(torch.uint8)
    if w % 8:
        bits = torch.nn.functional.pad(bits, (0, 8 - w % 8))
    bits = bits.view(*bits.shape[:-1], -1, 8)
    shifts = torch.arange(7, -1, -1, device=bits.device, dtype=torch.uint8)
    return (bits << shifts).sum(-1, dtype=torch.uint8)
