"""SAM towers on transformers (SamModel for SAM-H, Sam2Model for SAM-2) and the state-dict mapping
from the original ``visual_model.*`` names (segment_anything / sam2 repositories) to transformers' names.

Follows hustvl/EVF-SAM at 9935dc5 (model/segment_anything, model/segment_anything_2, vendored there).
One departure from transformers' SamConfig defaults is needed to match it: the SAM-H two-way
transformer's ``norm1``..``norm4`` are ``nn.LayerNorm(256)`` (eps 1e-5) in the reference, while
transformers builds them with ``mask_decoder_config.layer_norm_eps`` (default 1e-6); ``sam_config``
sets 1e-5 (``SAM_H_TWO_WAY_LAYER_NORM_EPS``). Everything else in the decoder matches the defaults:
attention downsample 2 (self-attention 1), ReLU in the transformer MLP, ``skip_first_layer_pe`` on
layer 0 only, a 3-layer ReLU IoU head, LayerNorm2d (eps 1e-6) + GELU in the upscaling, the final
attention norm at eps 1e-5. (transformers' SAM-2 two-way blocks already use eps 1e-5.)

Pure functions on configs and key strings; no loading from disk here.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from transformers import (
    Sam2Config,
    Sam2Model,
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
)

SAM_VARIANTS = ("sam", "sam2")

#: eps of the SAM-H two-way transformer's four per-layer LayerNorms (reference
#: model/segment_anything/modeling/transformer.py, TwoWayAttentionBlock.__init__, lines 134-144:
#: ``nn.LayerNorm(embedding_dim)``, torch's default eps); transformers reads it from
#: ``SamMaskDecoderConfig.layer_norm_eps``, whose default is 1e-6.
SAM_H_TWO_WAY_LAYER_NORM_EPS = 1e-5

# --------------------------------------------------------------------------- configs


def sam_config(variant: str, overrides: dict[str, Any] | None = None, scale: str | None = None):
    """A transformers SamConfig (variant "sam") or Sam2Config ("sam2").

    ``overrides`` is a full config dict (as written by ``to_dict()``); without it the preset for
    ``scale`` is used: SAM ViT-H ("huge") or SAM-2 Hiera-L/T ("large"/"tiny"), as EVF-SAM builds them.
    SAM-H's two-way transformer LayerNorm eps is always the reference's 1e-5, whatever ``overrides``
    says: the reference has no such setting, and configs written before this was fixed carry 1e-6.
    """
    if variant == "sam":
        if overrides:
            config = SamConfig(**overrides)
        else:
            if scale not in (None, "huge"):
                raise ValueError(f"EVF-SAM (SAM-H path) supports sam_scale 'huge', got {scale!r}")
            vision = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120,
                          global_attn_indexes=[7, 15, 23, 31], window_size=14, output_channels=256,
                          image_size=1024, patch_size=16)
            config = SamConfig(vision_config=vision)
        decoder = config.mask_decoder_config
        if not isinstance(decoder, SamMaskDecoderConfig):  # SamConfig always builds one
            raise TypeError(f"SamConfig.mask_decoder_config is a {type(decoder).__name__}")
        decoder.layer_norm_eps = SAM_H_TWO_WAY_LAYER_NORM_EPS
        return config
    if variant == "sam2":
        if overrides:
            return Sam2Config(**overrides)
        presets: dict[str, dict[str, Any]] = {
            "large": dict(hidden_size=144, num_attention_heads=2, blocks_per_stage=[2, 6, 36, 4],
                          embed_dim_per_stage=[144, 288, 576, 1152], num_attention_heads_per_stage=[2, 4, 8, 16],
                          window_size_per_stage=[8, 4, 16, 8], global_attention_blocks=[23, 33, 43],
                          window_positional_embedding_background_size=[7, 7]),
            "tiny": dict(hidden_size=96, num_attention_heads=1, blocks_per_stage=[1, 2, 7, 2],
                         embed_dim_per_stage=[96, 192, 384, 768], num_attention_heads_per_stage=[1, 2, 4, 8],
                         window_size_per_stage=[8, 4, 14, 7], global_attention_blocks=[5, 7, 9],
                         window_positional_embedding_background_size=[7, 7]),
        }
        if scale not in presets:
            raise ValueError(f"EVF-SAM2 supports sam_scale {sorted(presets)}, got {scale!r}")
        backbone = dict(model_type="sam2_hiera_det_model", **presets[scale])
        vision = dict(backbone_config=backbone,
                      backbone_channel_list=list(reversed(presets[scale]["embed_dim_per_stage"])))
        return Sam2Config(vision_config=vision)
    raise ValueError(f"unknown SAM variant {variant!r}; expected one of {SAM_VARIANTS}")


def build_sam(variant: str, config) -> SamModel | Sam2Model:
    """SamModel or Sam2Model from its config, in eval mode."""
    model = SamModel(config) if variant == "sam" else Sam2Model(config)
    # the original has one random-Fourier matrix (pe_layer) for image and prompt positions
    model.prompt_encoder.shared_embedding = model.shared_image_embedding
    return model.eval()


def sam_image_size(variant: str, config) -> int:
    """Side of the square SAM input (1024 for the published models; smaller for tiny test configs)."""
    if variant == "sam":
        return int(config.vision_config.image_size)
    size = config.vision_config.backbone_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


# --------------------------------------------------------------------------- key mapping
#
# A rule is (original prefix, transformers prefix); "{n}" stands for a block index. Rules match at the
# start of a key (after "visual_model."); the first match wins, the rest of the key is kept.

_SAM_H_RULES: list[tuple[str, str]] = [
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.{n}.norm1.", "vision_encoder.layers.{n}.layer_norm1."),
    ("image_encoder.blocks.{n}.norm2.", "vision_encoder.layers.{n}.layer_norm2."),
    ("image_encoder.blocks.{n}.attn.", "vision_encoder.layers.{n}.attn."),
    ("image_encoder.blocks.{n}.mlp.", "vision_encoder.layers.{n}.mlp."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("prompt_encoder.point_embeddings.{n}.", "prompt_encoder.point_embed.{n}."),
]

_SAM2_RULES: list[tuple[str, str]] = [
    ("image_encoder.trunk.patch_embed.proj.", "vision_encoder.backbone.patch_embed.projection."),
    ("image_encoder.trunk.pos_embed_window", "vision_encoder.backbone.pos_embed_window"),
    ("image_encoder.trunk.pos_embed", "vision_encoder.backbone.pos_embed"),
    ("image_encoder.trunk.blocks.{n}.norm1.", "vision_encoder.backbone.blocks.{n}.layer_norm1."),
    ("image_encoder.trunk.blocks.{n}.norm2.", "vision_encoder.backbone.blocks.{n}.layer_norm2."),
    ("image_encoder.trunk.blocks.{n}.attn.", "vision_encoder.backbone.blocks.{n}.attn."),
    ("image_encoder.trunk.blocks.{n}.mlp.layers.0.", "vision_encoder.backbone.blocks.{n}.mlp.proj_in."),
    ("image_encoder.trunk.blocks.{n}.mlp.layers.1.", "vision_encoder.backbone.blocks.{n}.mlp.proj_out."),
    ("image_encoder.trunk.blocks.{n}.proj.", "vision_encoder.backbone.blocks.{n}.proj."),
    ("image_encoder.neck.convs.{n}.conv.", "vision_encoder.neck.convs.{n}."),
    ("no_mem_embed", "no_memory_embedding"),
]


def _prompt_encoder_rules(src: str) -> list[tuple[str, str]]:
    return [
        (f"{src}.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
        (f"{src}.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
        (f"{src}.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
        (f"{src}.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
        (f"{src}.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
        (f"{src}.no_mask_embed.", "prompt_encoder.no_mask_embed."),
        (f"{src}.not_a_point_embed.", "prompt_encoder.not_a_point_embed."),
    ]


def _mlp_rules(src: str, dst: str, depth: int) -> list[tuple[str, str]]:
    """Original MLP ``layers.0..d-1`` -> transformers ``proj_in``, ``layers.0..d-3``, ``proj_out``."""
    rules = [(f"{src}.layers.0.", f"{dst}.proj_in."), (f"{src}.layers.{depth - 1}.", f"{dst}.proj_out.")]
    rules += [(f"{src}.layers.{i}.", f"{dst}.layers.{i - 1}.") for i in range(1, depth - 1)]
    return rules


#: the attention blocks of a two-way transformer layer
_TWO_WAY_ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")


def _sam2_two_way_rules(t: str) -> list[tuple[str, str]]:
    """SAM-2's two-way transformer: attention ``out_proj`` -> ``o_proj``, MLP ``layers.{0,1}`` -> ``proj_{in,out}``.

    (SAM-H keeps ``out_proj`` and ``mlp.lin1/lin2`` in both naming schemes.) These must precede the
    ``layers.{n}.`` catch-all.
    """
    dst = "mask_decoder.transformer"
    rules = [(f"{t}.layers.{{n}}.{a}.out_proj.", f"{dst}.layers.{{n}}.{a}.o_proj.") for a in _TWO_WAY_ATTENTIONS]
    rules.append((f"{t}.final_attn_token_to_image.out_proj.", f"{dst}.final_attn_token_to_image.o_proj."))
    return rules + _mlp_rules(f"{t}.layers.{{n}}.mlp", f"{dst}.layers.{{n}}.mlp", 2)


def _mask_decoder_rules(src: str, iou_depth: int, sam2: bool) -> list[tuple[str, str]]:
    t = f"{src}.transformer"
    rules = _sam2_two_way_rules(t) if sam2 else []
    rules += [
        (f"{t}.layers.{{n}}.norm1.", "mask_decoder.transformer.layers.{n}.layer_norm1."),
        (f"{t}.layers.{{n}}.norm2.", "mask_decoder.transformer.layers.{n}.layer_norm2."),
        (f"{t}.layers.{{n}}.norm3.", "mask_decoder.transformer.layers.{n}.layer_norm3."),
        (f"{t}.layers.{{n}}.norm4.", "mask_decoder.transformer.layers.{n}.layer_norm4."),
        (f"{t}.layers.{{n}}.", "mask_decoder.transformer.layers.{n}."),
        (f"{t}.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
        (f"{t}.final_attn_token_to_image.", "mask_decoder.transformer.final_attn_token_to_image."),
        (f"{src}.output_upscaling.0.", "mask_decoder.upscale_conv1."),
        (f"{src}.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
        (f"{src}.output_upscaling.3.", "mask_decoder.upscale_conv2."),
        (f"{src}.iou_token.", "mask_decoder.iou_token."),
        (f"{src}.mask_tokens.", "mask_decoder.mask_tokens."),
    ]
    rules += _mlp_rules(f"{src}.output_hypernetworks_mlps.{{n}}", "mask_decoder.output_hypernetworks_mlps.{n}", 3)
    rules += _mlp_rules(f"{src}.iou_prediction_head", "mask_decoder.iou_prediction_head", iou_depth)
    if sam2:
        rules += [(f"{src}.conv_s0.", "mask_decoder.conv_s0."), (f"{src}.conv_s1.", "mask_decoder.conv_s1."),
                  (f"{src}.obj_score_token.", "mask_decoder.obj_score_token.")]
        rules += _mlp_rules(f"{src}.pred_obj_score_head", "mask_decoder.pred_obj_score_head", 3)
    return rules


#: SAM-2 parameters of the video (memory) path, which a single-image Sam2Model has no use for.
SAM2_VIDEO_ONLY_PREFIXES = ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc",
                            "no_obj_ptr", "obj_ptr_proj.", "obj_ptr_tpos_proj.", "mask_downsample.",
                            "no_obj_embed_spatial")


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{n}"), r"(\d+)"))


class SamKeyMap:
    """Original ``visual_model.*`` names <-> transformers SamModel/Sam2Model names, both ways.

    Two names need more than a rename: the random-Fourier positional matrix
    (``pe_layer.positional_encoding_gaussian_matrix``) feeds both ``shared_image_embedding`` and
    ``prompt_encoder.shared_embedding``; SAM-2's four ``point_embeddings.N`` (1, C) rows are stacked
    into one ``prompt_encoder.point_embed.weight`` (4, C).
    """

    def __init__(self, variant: str, iou_head_depth: int = 3):
        if variant not in SAM_VARIANTS:
            raise ValueError(f"unknown SAM variant {variant!r}")
        self.variant = variant
        sam2 = variant == "sam2"
        pe, md = ("sam_prompt_encoder", "sam_mask_decoder") if sam2 else ("prompt_encoder", "mask_decoder")
        self.prompt_src = pe
        self.pe_key = f"{pe}.pe_layer.positional_encoding_gaussian_matrix"
        self.pe_targets = ("shared_image_embedding.positional_embedding",
                           "prompt_encoder.shared_embedding.positional_embedding")
        rules = list(_SAM2_RULES if sam2 else _SAM_H_RULES)
        rules += _prompt_encoder_rules(pe) + _mask_decoder_rules(md, iou_head_depth, sam2)
        self.rules = [(_compile(a), a, _compile(b), b) for a, b in rules]

    @staticmethod
    def _apply(key: str, m: re.Match[str], target: str) -> str:
        """``target`` with its ``{n}`` filled from the groups of ``m`` (a match at the start of ``key``),
        followed by the rest of ``key``."""
        out = target
        for g in m.groups():
            out = out.replace("{n}", g, 1)
        return out + key[m.end():]

    def is_video_only(self, key: str) -> bool:
        return self.variant == "sam2" and key.startswith(SAM2_VIDEO_ONLY_PREFIXES)

    def to_transformers(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Original names (without ``visual_model.``) -> (transformers names, keys no rule knows).

        Video-only SAM-2 keys are dropped silently (they are listed in SAM2_VIDEO_ONLY_PREFIXES).
        """
        out: dict[str, torch.Tensor] = {}
        unknown: list[str] = []
        points: dict[int, torch.Tensor] = {}
        point_re = re.compile(rf"^{self.prompt_src}\.point_embeddings\.(\d+)\.weight$")
        for key, value in state.items():
            if self.is_video_only(key):
                continue
            if key == self.pe_key:
                for target in self.pe_targets:
                    out[target] = value
                continue
            if self.variant == "sam2" and (m := point_re.match(key)):
                points[int(m.group(1))] = value
                continue
            for src_re, _, _, dst in self.rules:
                if m := src_re.match(key):
                    out[self._apply(key, m, dst)] = value
                    break
            else:
                unknown.append(key)
        if points:
            if sorted(points) != list(range(len(points))):
                unknown.extend(f"{self.prompt_src}.point_embeddings.{i}.weight" for i in sorted(points))
            else:
                out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)], dim=0)
        return out, unknown

    def to_original(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers names -> original names (without ``visual_model.``); the inverse of the above."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key in self.pe_targets:
                out[self.pe_key] = value
                continue
            if self.variant == "sam2" and key == "prompt_encoder.point_embed.weight":
                for i in range(value.shape[0]):
                    out[f"{self.prompt_src}.point_embeddings.{i}.weight"] = value[i:i + 1]
                continue
            for _, src, dst_re, _ in self.rules:
                if m := dst_re.match(key):
                    out[self._apply(key, m, src)] = value
                    break
            else:
                raise KeyError(f"no original name known for {key}")
        return out
