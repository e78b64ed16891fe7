"""EvfSam: BEiT-3 early fusion + ``text_hidden_fcs`` + a transformers SAM tower, and checkpoint I/O.

Checkpoint directory (the published layout, YxZhang/evf-sam*):
    config.json        EvfConfig: hidden_size, out_dim, mm_extractor_scale (base|large),
                       sam_scale (huge | large | tiny), architectures [EvfSamModel | EvfSam2Model]
                       optional here: beit3_config {...}, sam_config {transformers Sam(2)Config dict},
                       sam_variant (sam | sam2), multitask (bool)
    model.safetensors | model.safetensors.index.json | pytorch_model.bin | pytorch_model.bin.index.json
                       tensors named mm_extractor.beit3.*, text_hidden_fcs.0.{0,2}.*, visual_model.*
    sentencepiece.bpe.model, tokenizer_config.json, special_tokens_map.json   the XLM-R tokenizer
    added_tokens.json  multitask checkpoints only: {"[semantic]": <id>}

Loading maps ``visual_model.*`` to transformers' names (sam.SamKeyMap) and fails, naming the keys,
when anything is missing or left over. safetensors first; ``.bin`` only via torch.load(weights_only=True).

Multitask or not (``checkpoint_multitask``) is read from the checkpoint's own files, never from its name
or location. The published checkpoints (hustvl/EVF-SAM at 9935dc5; the multitask ones arrived in
9d00853) have the same config.json fields and the same architecture (tensor names and shapes); what sets
the multitask ones apart is their tokenizer, which registers ``[semantic]`` as an added token (YxZhang/
evf-sam-multitask's added_tokens.json: ``{"[semantic]": 64002}``), so the stuff/part prefix is one token.
Departure: the reference picks its code path from the code revision it is run with (and its scripts pick
SAM-H/SAM-2 from the weights' name); here the checkpoint's files decide.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pseudolabel.models.evf_sam.beit3 import Beit3Config, Beit3Wrapper
from pseudolabel.models.evf_sam.sam import SamKeyMap, build_sam, sam_config, sam_image_size


class WeightsMismatchError(RuntimeError):
    """A checkpoint whose tensors do not match the model; the message names the keys."""


class MultitaskUndecidedError(ValueError):
    """The checkpoint's files do not say (or contradict each other on) whether it is a multitask one."""


#: the token the multitask checkpoints' tokenizers add (the "[semantic] " prompt prefix)
MULTITASK_TOKEN = "[semantic]"

#: tokenizer files that list added tokens; a checkpoint ships at least one (tokenizer_config.json)
TOKENIZER_METADATA = ("added_tokens.json", "tokenizer_config.json", "tokenizer.json")


@dataclass
class EvfSamConfig:
    variant: str                      # "sam" (SAM-H) or "sam2"
    beit3: Beit3Config
    sam: Any                          # transformers SamConfig / Sam2Config
    hidden_size: int = 1024
    out_dim: int = 256
    multitask: bool | None = None     # None: unknown (the labeler decides)
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict) -> "EvfSamConfig":
        # 1. which SAM: explicit, else the reference's class name, else the scale name
        variant = cfg.get("sam_variant")
        arch = " ".join(cfg.get("architectures") or [])
        if variant is None:
            if "EffiSam" in arch:
                raise ValueError("EVF-Effi-SAM checkpoints are not supported (only SAM-H and SAM-2)")
            if "EvfSam2" in arch:
                variant = "sam2"
            elif "EvfSam" in arch:
                variant = "sam"
            else:
                variant = "sam" if cfg.get("sam_scale", "huge") == "huge" else "sam2"
        # 2. towers: explicit configs win over the named presets
        beit = (Beit3Config(**cfg["beit3_config"]) if cfg.get("beit3_config")
                else Beit3Config.preset(cfg.get("mm_extractor_scale", "large")))
        sam = sam_config(variant, cfg.get("sam_config"), cfg.get("sam_scale"))
        hidden = int(cfg.get("hidden_size", beit.embed_dim))
        if hidden != beit.embed_dim:
            raise ValueError(f"hidden_size {hidden} != BEiT-3 embed_dim {beit.embed_dim}")
        return cls(variant=variant, beit3=beit, sam=sam, hidden_size=hidden, out_dim=int(cfg.get("out_dim", 256)),
                   multitask=cfg.get("multitask"), raw=dict(cfg))

    def to_dict(self) -> dict:
        out = dict(self.raw)
        out.update(model_type="evf", sam_variant=self.variant, hidden_size=self.hidden_size, out_dim=self.out_dim,
                   architectures=["EvfSam2Model" if self.variant == "sam2" else "EvfSamModel"],
                   beit3_config=self.beit3.to_dict(), sam_config=self.sam.to_dict())
        if self.multitask is not None:
            out["multitask"] = self.multitask
        return out

    @property
    def sam_image_size(self) -> int:
        return sam_image_size(self.variant, self.sam)


def best_candidate(masks: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P, K, h, w) logits, (B, P, K) IoU -> the candidate with the highest IoU: (B, P, h, w), (B, P)."""
    best = iou.argmax(dim=-1)                                                      # (B, P)
    mask = torch.take_along_dim(masks, best[:, :, None, None, None], dim=2)[:, :, 0]
    return mask, torch.take_along_dim(iou, best[:, :, None], dim=2)[:, :, 0]


class EvfSam(nn.Module):
    """The EVF-SAM network.

    Parameters: ``mm_extractor.beit3.*`` (original names), ``text_hidden_fcs.0.{0,2}.*`` (original
    names), ``sam.*`` (transformers SamModel / Sam2Model names).
    """

    def __init__(self, config: EvfSamConfig):
        super().__init__()
        self.config = config
        self.mm_extractor = Beit3Wrapper(config.beit3)
        d = config.hidden_size
        self.text_hidden_fcs = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, config.out_dim))])
        self.sam = build_sam(config.variant, config.sam)
        self.key_map = SamKeyMap(config.variant, iou_head_depth=self._iou_depth())

    def _iou_depth(self) -> int:
        return int(getattr(self.config.sam.mask_decoder_config, "iou_head_depth", 3))

    # ------------------------------------------------------------------ forward pieces

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor):
        """(B, 3, S, S) normalised SAM input -> SAM-H: (B, C, E, E); SAM-2: [s0, s1, (B, C, E, E)].

        The expensive part; run once per image, shared by all its prompts.
        """
        pixels = pixels.to(self.sam.dtype)
        return self.sam.get_image_embeddings(pixels)

    @torch.inference_mode()
    def fuse(self, beit_pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Early fusion: (N, 3, 224, 224) in [-1, 1], (N, L) ids, (N, L) 1 = token / 0 = pad -> (N, out_dim).

        The first output token (the fused class token) through Linear-ReLU-Linear.
        """
        dtype = next(self.text_hidden_fcs.parameters()).dtype  # text_hidden_fcs.0.0.weight
        hidden = self.mm_extractor.beit3(beit_pixels.to(dtype), input_ids, text_padding_position=attention_mask == 0)
        return self.text_hidden_fcs[0](hidden[:, 0])

    @torch.inference_mode()
    def decoder_outputs(self, image_embeddings, prompt_embeds: torch.Tensor,
                        multimask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask decoder's candidates for B images × P prompts each.

        image_embeddings: as returned by ``encode_images`` for B images; prompt_embeds: (B, P, out_dim).
        Returns (low-res logits (B, P, K, 4E, 4E), IoU predictions (B, P, K)) in the model's dtype.
        SAM-H: K = 1, the single-mask token (the reference never asks SAM-H for three). SAM-2 with
        ``multimask`` (the multitask checkpoints' reference): K = 3, the multimask tokens; without it (the
        original EVF-SAM2 reference): K = 1, the single-mask token, replaced by the best-IoU multimask
        output where its logits are unstable (SAM-2's dynamic multimask, on in the reference build).
        """
        sam = self.sam
        last = image_embeddings[-1] if isinstance(image_embeddings, (list, tuple)) else image_embeddings
        b, _, eh, ew = last.shape
        sparse = prompt_embeds[:, :, None, :].to(last.dtype)                      # (B, P, 1, C)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, eh, ew)
        pos = sam.get_image_wide_positional_embeddings().repeat(b, 1, 1, 1).to(last.dtype)
        inputs = dict(image_embeddings=last, image_positional_embeddings=pos, sparse_prompt_embeddings=sparse,
                      dense_prompt_embeddings=dense)
        if self.config.variant == "sam":
            return sam.mask_decoder(**inputs, multimask_output=False)[:2]
        return sam.mask_decoder(**inputs, multimask_output=multimask,
                                high_resolution_features=list(image_embeddings[:-1]))[:2]

    @torch.inference_mode()
    def decode(self, image_embeddings, prompt_embeds: torch.Tensor,
               multimask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per image × prompt: ``decoder_outputs`` reduced by ``best_candidate``.

        Returns (low-res logits (B, P, 4E, 4E) float32, IoU predictions (B, P) float32).
        """
        masks, iou = self.decoder_outputs(image_embeddings, prompt_embeds, multimask)
        masks, iou = best_candidate(masks, iou)
        return masks.float(), iou.float()

    # ------------------------------------------------------------------ state dicts

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's tensors under the checkpoints' original names (visual_model.* for SAM)."""
        out: dict[str, torch.Tensor] = {}
        sam_part: dict[str, torch.Tensor] = {}
        for key, value in self.state_dict().items():
            if key.startswith("sam."):
                sam_part[key[len("sam."):]] = value
            else:
                out[key] = value
        out.update({f"visual_model.{k}": v for k, v in self.key_map.to_original(sam_part).items()})
        return out

    def load_original_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors with the original names; raise WeightsMismatchError naming missing/extra keys."""
        converted: dict[str, torch.Tensor] = {}
        visual: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        for key, value in state.items():
            if key.startswith("visual_model."):
                visual[key[len("visual_model."):]] = value
            elif key.startswith(("mm_extractor.", "text_hidden_fcs.")):
                converted[key] = value
            else:
                unexpected.append(key)
        sam_state, unknown = self.key_map.to_transformers(visual)
        unexpected += [f"visual_model.{k}" for k in unknown]
        converted.update({f"sam.{k}": v for k, v in sam_state.items()})
        expected = self.state_dict()
        missing = [k for k in expected if k not in converted]
        unexpected += [k for k in converted if k not in expected]
        if missing or unexpected:
            raise WeightsMismatchError(_mismatch_message(missing, unexpected, self.key_map))
        shape_errors = [f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(v.shape)}"
                        for k, v in expected.items() if tuple(converted[k].shape) != tuple(v.shape)]
        if shape_errors:
            raise WeightsMismatchError("shape mismatch:\n  " + "\n  ".join(shape_errors[:20]))
        self.load_state_dict(converted, strict=True)


def _original_name(key: str, key_map: SamKeyMap) -> str:
    if not key.startswith("sam."):
        return key
    try:
        return "visual_model." + next(iter(key_map.to_original({key[4:]: torch.empty(1)})))
    except KeyError:
        return key


def _mismatch_message(missing: list[str], unexpected: list[str], key_map: SamKeyMap, limit: int = 30) -> str:
    lines = ["checkpoint does not match the EVF-SAM model"]
    if missing:
        names = sorted({_original_name(k, key_map) for k in missing})
        more = " ..." if len(names) > limit else ""
        lines.append(f"missing keys ({len(names)}): " + ", ".join(names[:limit]) + more)
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:limit])
                     + (" ..." if len(unexpected) > limit else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------- files

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors first, .bin with weights_only=True."""
    root = Path(path)
    for name in WEIGHT_FILES:
        f = root / name
        if not f.exists():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            files = [root / s for s in shards]
        else:
            files = [f]
        state: dict[str, torch.Tensor] = {}
        for shard in files:
            if shard.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(shard)))
            else:
                state.update(torch.load(str(shard), map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(f"no weights in {root} (looked for {', '.join(WEIGHT_FILES)})")


def load_evf_sam(path: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> EvfSam:
    """Build EvfSam from ``config.json`` in a local checkpoint directory and load its weights."""
    cfg = EvfSamConfig.from_dict(json.loads((Path(path) / "config.json").read_text()))
    model = EvfSam(cfg)
    model.load_original_state_dict(read_state_dict(path))
    return model.to(device=device, dtype=dtype).eval()


def save_evf_sam(model: EvfSam, path: str | os.PathLike) -> None:
    """Write config.json + model.safetensors with the original (published) tensor names."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    state = {k: v.detach().contiguous().clone() for k, v in model.original_state_dict().items()}
    save_file(state, str(root / "model.safetensors"))


def tokenizer_added_tokens(path: str | os.PathLike) -> tuple[set[str], list[str]]:
    """(added tokens, the files that list them) from a checkpoint's tokenizer files (TOKENIZER_METADATA):
    ``added_tokens.json`` keys, ``tokenizer_config.json`` ``added_tokens_decoder`` contents,
    ``tokenizer.json`` ``added_tokens`` contents. No such file: (set(), [])."""
    root = Path(path)
    tokens: set[str] = set()
    files: list[str] = []
    for name in TOKENIZER_METADATA:
        f = root / name
        if not f.is_file():
            continue
        data = json.loads(f.read_text(encoding="utf-8"))
        files.append(name)
        if name == "added_tokens.json":
            tokens.update(data)
        elif name == "tokenizer_config.json":
            tokens.update(v["content"] for v in (data.get("added_tokens_decoder") or {}).values()
                          if isinstance(v, dict) and "content" in v)
        else:
            tokens.update(t["content"] for t in data.get("added_tokens") or []
                          if isinstance(t, dict) and "content" in t)
    return tokens, files


def checkpoint_multitask(path: str | os.PathLike) -> bool:
    """Whether the checkpoint directory holds a multitask EVF-SAM checkpoint, from its own files.

    Evidence: config.json's ``multitask`` (bool; the published configs have none) and the tokenizer
    files: the multitask checkpoints' tokenizer registers ``[semantic]`` as an added token, the others'
    do not. One of them decides; both present must agree. Raises MultitaskUndecidedError, naming the
    field and files, when they disagree or when there is neither (no ``multitask`` field and no tokenizer
    file that lists added tokens): the labeler's ``params.multitask`` settles it then.
    """
    root = Path(path)
    cfg = json.loads((root / "config.json").read_text())
    from_config = cfg.get("multitask")
    if from_config is not None and not isinstance(from_config, bool):
        raise MultitaskUndecidedError(f"{root}/config.json: 'multitask' must be true or false, got {from_config!r}")
    tokens, files = tokenizer_added_tokens(root)
    from_tokenizer = (MULTITASK_TOKEN in tokens) if files else None
    if from_config is not None and from_tokenizer is not None and from_config != from_tokenizer:
        has = "registers" if from_tokenizer else "does not register"
        raise MultitaskUndecidedError(
            f"checkpoint {root}: config.json says \"multitask\": {str(from_config).lower()}, but its tokenizer "
            f"({', '.join(files)}) {has} the {MULTITASK_TOKEN!r} token that the multitask checkpoints add; "
            "set the evf_sam labeler's params.multitask to true or false")
    if from_config is not None:
        return from_config
    if from_tokenizer is not None:
        return from_tokenizer
    raise MultitaskUndecidedError(
        f"cannot tell whether checkpoint {root} is a multitask one: config.json has no \"multitask\" field and "
        f"there is no tokenizer file ({', '.join(TOKENIZER_METADATA)}) to show whether the tokenizer registers "
        f"the {MULTITASK_TOKEN!r} token (the multitask checkpoints' added_tokens.json does); "
        "set the evf_sam labeler's params.multitask to true or false")


def load_tokenizer(path: str | os.PathLike, multitask: bool = False):
    """The XLM-R sentencepiece tokenizer shipped in the checkpoint directory (right padding).

    ``multitask``: make sure ``[semantic]`` is one token, as in the multitask checkpoints' tokenizer; if
    the files do not register it, it is added with the next free id (the tokenizer's length: 64002 for
    BEiT-3's 64000-piece sentencepiece model, the id evf-sam-multitask's added_tokens.json gives it).
    """
    from transformers import XLMRobertaTokenizer

    tok = XLMRobertaTokenizer.from_pretrained(str(path))
    tok.padding_side = "right"
    if multitask and MULTITASK_TOKEN not in tok.get_added_vocab():
        tok.add_tokens([MULTITASK_TOKEN])
    return tok
