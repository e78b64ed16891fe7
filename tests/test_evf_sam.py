"""EVF-SAM: checkpoint names and loading, multiway routing, preprocessing, the labeler (tiny random configs)."""
from __future__ import annotations

import copy
import itertools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pseudolabel.engine.payload import pack_payload, unpack_payload
from pseudolabel.models.device import resolve_dtype
from pseudolabel.models.evf_sam import labeler as evf_labeler
from pseudolabel.models.evf_sam.labeler import pack_bits
from pseudolabel.models.evf_sam.model import (
    EvfSam,
    EvfSamConfig,
    MultitaskUndecidedError,
    WeightsMismatchError,
    best_candidate,
    checkpoint_multitask,
    load_evf_sam,
    load_tokenizer,
    save_evf_sam,
    tokenizer_added_tokens,
)
from pseudolabel.models.evf_sam.postprocess import mask_iou_matrix, select_instances
from pseudolabel.models.evf_sam.preprocess import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    SEMANTIC_PREFIX,
    beit3_pixels,
    masks_to_original,
    prompt_text,
    sam_pixels,
)
from pseudolabel.models.evf_sam.random_checkpoint import random_config, write_random_checkpoint
from pseudolabel.models.evf_sam.sam import sam_config
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.spec import LabelerSpec

ONTOLOGY = [
    {"category": "square", "prompts": ["square", "a box"]},
    {"category": "circle"},
    {"category": "sky", "semantic": True, "id": 7},
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Random-weight checkpoints (published layout) for both SAM variants: variant -> directory."""
    out = {}
    for variant in ("sam", "sam2"):
        d = tmp_path_factory.mktemp(f"evf-{variant}")
        write_random_checkpoint(d, variant, seed=1)
        out[variant] = str(d)
    return out


def _image(h=90, w=120, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 40, np.uint8)
    img[h // 4: 3 * h // 4, w // 4: w // 2] = (220, 60, 60)
    return np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def _fused(model, n=1, ids=None, mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, 224, 224, generator=g) * 2 - 1
    if ids is None:
        ids = torch.randint(3, 100, (n, 6), generator=g)
    if mask is None:
        mask = torch.ones_like(ids)
    return model.fuse(pixels, ids, mask)


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("variant", ["sam", "sam2"])
def test_original_names_load_strict_and_roundtrip(variant):
    torch.manual_seed(0)
    src = EvfSam(random_config(variant)).eval()
    state = src.original_state_dict()
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"mm_extractor", "text_hidden_fcs", "visual_model"}
    assert not any(k.startswith("visual_model.vision_encoder") for k in state)  # original names, not ours
    torch.manual_seed(1)
    dst = EvfSam(random_config(variant)).eval()
    dst.load_original_state_dict(state)
    for key, value in src.state_dict().items():
        assert torch.equal(value, dst.state_dict()[key]), key
    x = torch.randn(1, 3, 64, 64)
    f1, f2 = _fused(src), _fused(dst)
    m1, _ = src.decode(src.encode_images(x), f1[None])
    m2, _ = dst.decode(dst.encode_images(x), f2[None])
    assert torch.allclose(m1, m2)


def _expand(patterns, **ranges):
    """Key patterns -> key set; each ``{x}`` placeholder takes every value in ``ranges[x]``."""
    out = set()
    for p in patterns:
        names = re.findall(r"\{(\w)\}", p)
        for values in itertools.product(*(ranges[n] for n in names)):
            out.add(p.format(**dict(zip(names, values))))
    return out


# The reference's SAM-H (segment_anything) parameter names, written out by hand.
SAM_H_REFERENCE = [
    "visual_model.image_encoder.pos_embed",
    "visual_model.image_encoder.patch_embed.proj.weight", "visual_model.image_encoder.patch_embed.proj.bias",
    *[f"visual_model.image_encoder.blocks.{{i}}.{n}" for n in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "attn.rel_pos_h", "attn.rel_pos_w", "norm2.weight", "norm2.bias", "mlp.lin1.weight", "mlp.lin1.bias",
        "mlp.lin2.weight", "mlp.lin2.bias")],
    "visual_model.image_encoder.neck.0.weight", "visual_model.image_encoder.neck.1.weight",
    "visual_model.image_encoder.neck.1.bias", "visual_model.image_encoder.neck.2.weight",
    "visual_model.image_encoder.neck.3.weight", "visual_model.image_encoder.neck.3.bias",
    "visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "visual_model.prompt_encoder.point_embeddings.{p}.weight", "visual_model.prompt_encoder.not_a_point_embed.weight",
    *[f"visual_model.prompt_encoder.mask_downscaling.{j}.{n}" for j in (0, 1, 3, 4, 6) for n in ("weight", "bias")],
    "visual_model.prompt_encoder.no_mask_embed.weight",
    "visual_model.mask_decoder.iou_token.weight", "visual_model.mask_decoder.mask_tokens.weight",
    *[f"visual_model.mask_decoder.transformer.layers.{{l}}.{a}.{x}_proj.{n}"
      for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
      for x in ("q", "k", "v", "out") for n in ("weight", "bias")],
    *[f"visual_model.mask_decoder.transformer.layers.{{l}}.{n}.{w}" for n in ("norm1", "norm2", "norm3", "norm4")
      for w in ("weight", "bias")],
    *[f"visual_model.mask_decoder.transformer.layers.{{l}}.mlp.{n}.{w}" for n in ("lin1", "lin2")
      for w in ("weight", "bias")],
    *[f"visual_model.mask_decoder.transformer.final_attn_token_to_image.{x}_proj.{n}"
      for x in ("q", "k", "v", "out") for n in ("weight", "bias")],
    "visual_model.mask_decoder.transformer.norm_final_attn.weight",
    "visual_model.mask_decoder.transformer.norm_final_attn.bias",
    *[f"visual_model.mask_decoder.output_upscaling.{j}.{n}" for j in (0, 1, 3) for n in ("weight", "bias")],
    *[f"visual_model.mask_decoder.output_hypernetworks_mlps.{{m}}.layers.{j}.{n}" for j in (0, 1, 2)
      for n in ("weight", "bias")],
    *[f"visual_model.mask_decoder.iou_prediction_head.layers.{j}.{n}" for j in (0, 1, 2) for n in ("weight", "bias")],
]

# The reference's SAM-2 (sam2's SAM2Base as EVF-SAM2 builds it) parameter names a single image uses,
# written out by hand. {i}: Hiera block; {s}: first block of stages 2-4 (the width changes: a projection);
# {c}: FPN neck level; {l}: two-way transformer layer; {m}: mask token; {p}: point embedding.
_ATTN = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
_WB = ("weight", "bias")
SAM2_REFERENCE = [
    "visual_model.image_encoder.trunk.pos_embed", "visual_model.image_encoder.trunk.pos_embed_window",
    *[f"visual_model.image_encoder.trunk.patch_embed.proj.{n}" for n in _WB],
    *[f"visual_model.image_encoder.trunk.blocks.{{i}}.{n}" for n in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.layers.0.weight", "mlp.layers.0.bias", "mlp.layers.1.weight",
        "mlp.layers.1.bias")],
    "visual_model.image_encoder.trunk.blocks.{s}.proj.weight", "visual_model.image_encoder.trunk.blocks.{s}.proj.bias",
    "visual_model.image_encoder.neck.convs.{c}.conv.weight", "visual_model.image_encoder.neck.convs.{c}.conv.bias",
    "visual_model.no_mem_embed",
    "visual_model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "visual_model.sam_prompt_encoder.point_embeddings.{p}.weight",
    "visual_model.sam_prompt_encoder.not_a_point_embed.weight", "visual_model.sam_prompt_encoder.no_mask_embed.weight",
    *[f"visual_model.sam_prompt_encoder.mask_downscaling.{j}.{n}" for j in (0, 1, 3, 4, 6) for n in _WB],
    "visual_model.sam_mask_decoder.iou_token.weight", "visual_model.sam_mask_decoder.mask_tokens.weight",
    "visual_model.sam_mask_decoder.obj_score_token.weight",
    *[f"visual_model.sam_mask_decoder.transformer.layers.{{l}}.{a}.{x}_proj.{n}" for a in _ATTN
      for x in ("q", "k", "v", "out") for n in _WB],
    *[f"visual_model.sam_mask_decoder.transformer.layers.{{l}}.norm{j}.{n}" for j in (1, 2, 3, 4) for n in _WB],
    *[f"visual_model.sam_mask_decoder.transformer.layers.{{l}}.mlp.layers.{j}.{n}" for j in (0, 1) for n in _WB],
    *[f"visual_model.sam_mask_decoder.transformer.final_attn_token_to_image.{x}_proj.{n}"
      for x in ("q", "k", "v", "out") for n in _WB],
    "visual_model.sam_mask_decoder.transformer.norm_final_attn.weight",
    "visual_model.sam_mask_decoder.transformer.norm_final_attn.bias",
    *[f"visual_model.sam_mask_decoder.output_upscaling.{j}.{n}" for j in (0, 1, 3) for n in _WB],
    *[f"visual_model.sam_mask_decoder.{c}.{n}" for c in ("conv_s0", "conv_s1") for n in _WB],
    *[f"visual_model.sam_mask_decoder.output_hypernetworks_mlps.{{m}}.layers.{j}.{n}" for j in (0, 1, 2) for n in _WB],
    *[f"visual_model.sam_mask_decoder.{h}.layers.{j}.{n}" for h in ("iou_prediction_head", "pred_obj_score_head")
      for j in (0, 1, 2) for n in _WB],
]

# Some of the reference's SAM-2 video-path (memory) parameters, also in the published checkpoints.
SAM2_VIDEO_REFERENCE = [
    "visual_model.maskmem_tpos_enc", "visual_model.no_mem_pos_enc", "visual_model.no_obj_ptr",
    "visual_model.mask_downsample.weight", "visual_model.obj_ptr_proj.layers.2.bias",
    "visual_model.memory_attention.layers.3.cross_attn_image.k_proj.weight",
    "visual_model.memory_attention.layers.0.linear1.weight", "visual_model.memory_attention.norm.bias",
    "visual_model.memory_encoder.mask_downsampler.encoder.12.weight", "visual_model.memory_encoder.pix_feat_proj.bias",
    "visual_model.memory_encoder.fuser.layers.1.dwconv.weight", "visual_model.memory_encoder.fuser.layers.0.weight",
    "visual_model.memory_encoder.out_proj.weight",
]


def _sam_h_ranges(cfg) -> dict:
    return dict(i=range(cfg.sam.vision_config.num_hidden_layers),
                l=range(cfg.sam.mask_decoder_config.num_hidden_layers), m=range(4), p=range(4))


def _sam2_ranges(cfg) -> dict:
    stages = list(cfg.sam.vision_config.backbone_config.blocks_per_stage)
    return dict(i=range(sum(stages)), s=list(itertools.accumulate(stages[:-1])),
                c=range(len(cfg.sam.vision_config.backbone_channel_list)),
                l=range(cfg.sam.mask_decoder_config.num_hidden_layers), m=range(4), p=range(4))


# torchscale BEiT-3 names (mm_extractor.beit3.*) and the projection, written out by hand.
_MW = ("A", "B")
BEIT3_REFERENCE = [
    "mm_extractor.beit3.text_embed.weight", "mm_extractor.beit3.vision_embed.proj.weight",
    "mm_extractor.beit3.vision_embed.proj.bias", "mm_extractor.beit3.vision_embed.mask_token",
    "mm_extractor.beit3.vision_embed.cls_token",
    "mm_extractor.beit3.encoder.embed_positions.A.weight", "mm_extractor.beit3.encoder.embed_positions.B.weight",
    *[f"mm_extractor.beit3.encoder.layers.{{l}}.self_attn.{x}_proj.{w}.{n}" for x in ("k", "v", "q", "out")
      for w in _MW for n in ("weight", "bias")],
    *[f"mm_extractor.beit3.encoder.layers.{{l}}.{m}.{w}.{n}"
      for m in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm", "ffn.{}.fc1", "ffn.{}.fc2",
                "ffn.{}.ffn_layernorm") for w in _MW for n in ("weight", "bias") if "{}" not in m],
    *[f"mm_extractor.beit3.encoder.layers.{{l}}.ffn.{w}.{m}.{n}" for w in _MW for m in ("fc1", "fc2", "ffn_layernorm")
      for n in ("weight", "bias")],
    *[f"mm_extractor.beit3.encoder.layer_norm.{w}.{n}" for w in _MW for n in ("weight", "bias")],
    *[f"text_hidden_fcs.0.{j}.{n}" for j in (0, 2) for n in ("weight", "bias")],
]


def test_reference_sam_h_and_beit3_key_patterns_load_strict():
    torch.manual_seed(0)
    cfg = random_config("sam")
    model = EvfSam(cfg).eval()
    ours = model.original_state_dict()
    sam_keys = _expand(SAM_H_REFERENCE, **_sam_h_ranges(cfg))
    beit_keys = _expand(BEIT3_REFERENCE, l=range(cfg.beit3.layers))
    assert {k for k in ours if k.startswith("visual_model.")} == sam_keys
    assert {k for k in ours if not k.startswith("visual_model.")} == beit_keys
    # a state dict written purely from the reference's names (fresh tensors) loads strictly
    g = torch.Generator().manual_seed(5)
    reference = {k: torch.randn(ours[k].shape, generator=g) for k in sorted(sam_keys | beit_keys)}
    fresh = EvfSam(cfg).eval()
    fresh.load_original_state_dict(reference)
    loaded = fresh.original_state_dict()
    for k, v in reference.items():
        assert torch.equal(loaded[k], v), k
    # the positional matrix feeds both transformers copies
    pe = reference["visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert torch.equal(fresh.sam.shared_image_embedding.positional_embedding, pe)
    assert torch.equal(fresh.sam.prompt_encoder.shared_embedding.positional_embedding, pe)


def test_reference_sam2_key_patterns_load_strict():
    torch.manual_seed(0)
    cfg = random_config("sam2")
    model = EvfSam(cfg).eval()
    ours = model.original_state_dict()
    sam_keys = _expand(SAM2_REFERENCE, **_sam2_ranges(cfg))
    assert {k for k in ours if k.startswith("visual_model.")} == sam_keys
    # a state dict with only the reference's names (fresh tensors) plus video-path tensors loads strictly
    g = torch.Generator().manual_seed(5)
    reference = {k: torch.randn(ours[k].shape, generator=g) for k in sorted(sam_keys)}
    reference.update({k: v for k, v in ours.items() if not k.startswith("visual_model.")})
    reference.update({k: torch.zeros(3) for k in SAM2_VIDEO_REFERENCE})
    fresh = EvfSam(cfg).eval()
    fresh.load_original_state_dict(reference)
    loaded = fresh.original_state_dict()
    for k in sam_keys:
        assert torch.equal(loaded[k], reference[k]), k
    layer = fresh.sam.mask_decoder.transformer.layers[1]
    src = "visual_model.sam_mask_decoder.transformer"
    assert torch.equal(layer.cross_attn_image_to_token.o_proj.weight,
                       reference[f"{src}.layers.1.cross_attn_image_to_token.out_proj.weight"])
    assert torch.equal(layer.mlp.proj_out.bias, reference[f"{src}.layers.1.mlp.layers.1.bias"])
    assert torch.equal(fresh.sam.mask_decoder.transformer.final_attn_token_to_image.o_proj.bias,
                       reference[f"{src}.final_attn_token_to_image.out_proj.bias"])
    points = [reference[f"visual_model.sam_prompt_encoder.point_embeddings.{i}.weight"] for i in range(4)]
    assert torch.equal(fresh.sam.prompt_encoder.point_embed.weight, torch.cat(points))


# config.json of the published checkpoints: only these fields (no beit3_config / sam_config)
PUBLISHED_CONFIGS = {
    "evf-sam": {"architectures": ["EvfSamModel"], "model_type": "evf", "hidden_size": 1024, "out_dim": 256,
                "mm_extractor_scale": "large", "sam_scale": "huge", "torch_dtype": "float32"},
    "evf-sam2": {"architectures": ["EvfSam2Model"], "model_type": "evf", "hidden_size": 1024, "out_dim": 256,
                 "mm_extractor_scale": "large", "sam_scale": "large", "torch_dtype": "float32"},
}

# (name, shape) per published model, from the reference's module definitions
PUBLISHED_SHAPES = {
    "evf-sam": {
        "visual_model.image_encoder.pos_embed": (1, 64, 64, 1280),
        "visual_model.image_encoder.blocks.7.attn.rel_pos_h": (127, 80),      # global attention
        "visual_model.image_encoder.blocks.0.attn.rel_pos_h": (27, 80),       # 14² windows
        "visual_model.image_encoder.neck.0.weight": (256, 1280, 1, 1),
        "visual_model.mask_decoder.transformer.layers.1.mlp.lin1.weight": (2048, 256),
        "visual_model.mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
    },
    "evf-sam2": {
        "visual_model.image_encoder.trunk.pos_embed": (1, 144, 7, 7),
        "visual_model.image_encoder.trunk.pos_embed_window": (1, 144, 8, 8),
        "visual_model.image_encoder.trunk.blocks.47.mlp.layers.0.weight": (4608, 1152),
        "visual_model.image_encoder.trunk.blocks.44.proj.weight": (1152, 576),
        "visual_model.image_encoder.neck.convs.0.conv.weight": (256, 1152, 1, 1),
        "visual_model.image_encoder.neck.convs.3.conv.weight": (256, 144, 1, 1),
        "visual_model.sam_mask_decoder.transformer.layers.1.mlp.layers.0.weight": (2048, 256),
        "visual_model.sam_mask_decoder.transformer.layers.0.cross_attn_token_to_image.out_proj.weight": (256, 128),
        "visual_model.sam_mask_decoder.conv_s0.weight": (32, 256, 1, 1),
        "visual_model.sam_mask_decoder.pred_obj_score_head.layers.2.weight": (1, 256),
        "visual_model.no_mem_embed": (1, 1, 256),
    },
}


@pytest.mark.parametrize("name", ["evf-sam", "evf-sam2"])
def test_published_config_builds_the_full_size_model_on_meta(name):
    cfg = EvfSamConfig.from_dict(PUBLISHED_CONFIGS[name])
    assert cfg.variant == ("sam2" if name == "evf-sam2" else "sam") and cfg.sam_image_size == 1024
    with torch.device("meta"):
        model = EvfSam(cfg)
    assert all(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    state = model.original_state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "mm_extractor.beit3.encoder.embed_positions.A.weight": (199, 1024),
        "mm_extractor.beit3.encoder.embed_positions.B.weight": (1024, 1024),
        "mm_extractor.beit3.text_embed.weight": (64010, 1024),
        "text_hidden_fcs.0.2.weight": (256, 1024),
        **PUBLISHED_SHAPES[name],
    }
    assert {k: shapes.get(k) for k in expected} == expected
    # every name is the reference's, at full depth
    ranges = _sam2_ranges(cfg) if cfg.variant == "sam2" else _sam_h_ranges(cfg)
    reference = SAM2_REFERENCE if cfg.variant == "sam2" else SAM_H_REFERENCE
    assert {k for k in state if k.startswith("visual_model.")} == _expand(reference, **ranges)
    assert {k for k in state if not k.startswith("visual_model.")} == _expand(BEIT3_REFERENCE, l=range(24))
    # README: 1.32B (SAM-H) and 898M (SAM-2, which also counts the video-path modules left out here)
    n = sum(p.numel() for p in model.parameters())
    assert (1.31e9 < n < 1.33e9) if name == "evf-sam" else (0.88e9 < n < 0.898e9)


@pytest.mark.parametrize("variant", ["sam", "sam2"])
def test_missing_and_extra_keys_fail_with_their_names(variant):
    model = EvfSam(random_config(variant)).eval()
    state = model.original_state_dict()
    missing = dict(state)
    gone = [k for k in state if k.startswith("visual_model.") and "no_mask_embed" in k][0]
    del missing[gone]
    del missing["mm_extractor.beit3.encoder.layers.0.ffn.B.fc1.weight"]
    with pytest.raises(WeightsMismatchError) as err:
        EvfSam(random_config(variant)).load_original_state_dict(missing)
    assert gone in str(err.value) and "mm_extractor.beit3.encoder.layers.0.ffn.B.fc1.weight" in str(err.value)
    extra = dict(state)
    extra["visual_model.image_encoder.extra_block.weight"] = torch.zeros(1)
    extra["lm_head.weight"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError) as err:
        EvfSam(random_config(variant)).load_original_state_dict(extra)
    assert "visual_model.image_encoder.extra_block.weight" in str(err.value) and "lm_head.weight" in str(err.value)


def test_sam2_video_only_tensors_are_ignored():
    model = EvfSam(random_config("sam2")).eval()
    state = model.original_state_dict()
    assert "visual_model.no_mem_embed" in state
    assert "visual_model.sam_prompt_encoder.point_embeddings.3.weight" in state
    state["visual_model.memory_attention.layers.0.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    state["visual_model.maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    EvfSam(random_config("sam2")).load_original_state_dict(state)


# ---------------------------------------------------------------------------------------------- SAM-H decoder
#
# The reference's SAM-H mask decoder (segment_anything's MaskDecoder + TwoWayTransformer, as EVF-SAM
# builds it: depth 2, 8 heads, MLP 2048, attention downsample 2, iou_head_depth 3), written out here from
# its definition and run on the checkpoint's tensors under their original names:
#   Attention(q, k, v): q/k/v projections to dim // downsample (self-attention: downsample 1), heads,
#     softmax(q kᵀ / sqrt(head dim)) v, out_proj.
#   TwoWayAttentionBlock (layer 0 skips the query PE in self-attention and has no residual there):
#     q = norm1(q + self_attn(q + qpe, q + qpe, q)); q = norm2(q + t2i(q + qpe, k + kpe, k));
#     q = norm3(q + lin2(relu(lin1(q)))); k = norm4(k + i2t(k + kpe, q + qpe, q));
#     norm1..norm4 are nn.LayerNorm(256): eps 1e-5.
#   then q = norm_final_attn(q + final_attn(q + qpe, k + kpe, k)) (nn.LayerNorm, eps 1e-5);
#   upscaling: ConvTranspose2d, LayerNorm2d (eps 1e-6), GELU, ConvTranspose2d, GELU;
#   mask m = MLP_m(mask token m) · upscaled; IoU = MLP(iou token); MLPs: Linear, ReLU between layers.
#   Image PE: grid centres (i + 0.5) / E -> 2c - 1 -> @ G -> 2π -> [sin, cos].

_REF_LN_EPS, _REF_LN2D_EPS = 1e-5, 1e-6


def _ref_layer_norm(x, state, name, eps=_REF_LN_EPS):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * state[f"{name}.weight"] + state[f"{name}.bias"]


def _ref_linear(x, state, name):
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def _ref_attention(q, k, v, state, name, heads):
    q, k, v = (_ref_linear(t, state, f"{name}.{p}_proj") for t, p in ((q, "q"), (k, "k"), (v, "v")))
    b, n, c = q.shape

    def split(t):
        return t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)

    attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    out = (attn @ split(v)).transpose(1, 2).reshape(b, n, c)
    return _ref_linear(out, state, f"{name}.out_proj")


def _ref_mlp(x, state, name, depth):
    for i in range(depth):
        x = _ref_linear(x, state, f"{name}.layers.{i}")
        x = torch.relu(x) if i < depth - 1 else x
    return x


def _ref_sam_h_decoder(state, image_embedding, sparse, heads, depth=2):
    """(1, C, E, E) image embedding, (N, 1, C) prompt tokens -> token-0 logits (N, 4E, 4E), IoU (N,)."""
    s = {k[len("visual_model."):]: v.double() for k, v in state.items() if k.startswith("visual_model.")}
    md, t = "mask_decoder", "mask_decoder.transformer"
    n, (_, c, e, _) = sparse.shape[0], image_embedding.shape
    # dense PE from the random-Fourier matrix
    centres = (torch.arange(e, dtype=torch.float64) + 0.5) / e
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    coords = (torch.stack([xx, yy], -1) * 2 - 1) @ s["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    pe = torch.cat([torch.sin(2 * math.pi * coords), torch.cos(2 * math.pi * coords)], -1)     # (E, E, C)
    # tokens and image
    tokens = torch.cat([s[f"{md}.iou_token.weight"], s[f"{md}.mask_tokens.weight"]])[None].expand(n, -1, -1)
    qpe = torch.cat([tokens, sparse.double()], dim=1)
    src = image_embedding.double() + s["prompt_encoder.no_mask_embed.weight"].reshape(1, c, 1, 1)
    keys = src.flatten(2).transpose(1, 2).expand(n, -1, -1)
    kpe = pe.reshape(1, e * e, c)
    q = qpe
    for i in range(depth):
        p = f"{t}.layers.{i}"
        if i == 0:
            q = _ref_attention(q, q, q, s, f"{p}.self_attn", heads)
        else:
            q = q + _ref_attention(q + qpe, q + qpe, q, s, f"{p}.self_attn", heads)
        q = _ref_layer_norm(q, s, f"{p}.norm1")
        q = _ref_layer_norm(q + _ref_attention(q + qpe, keys + kpe, keys, s, f"{p}.cross_attn_token_to_image", heads),
                            s, f"{p}.norm2")
        hidden = _ref_linear(torch.relu(_ref_linear(q, s, f"{p}.mlp.lin1")), s, f"{p}.mlp.lin2")
        q = _ref_layer_norm(q + hidden, s, f"{p}.norm3")
        keys = _ref_layer_norm(keys + _ref_attention(keys + kpe, q + qpe, q, s, f"{p}.cross_attn_image_to_token",
                                                     heads), s, f"{p}.norm4")
    q = _ref_layer_norm(q + _ref_attention(q + qpe, keys + kpe, keys, s, f"{t}.final_attn_token_to_image", heads),
                        s, f"{t}.norm_final_attn")
    # upscaling
    up = keys.transpose(1, 2).reshape(n, c, e, e)
    up = F.conv_transpose2d(up, s[f"{md}.output_upscaling.0.weight"], s[f"{md}.output_upscaling.0.bias"], stride=2)
    mean = up.mean(1, keepdim=True)
    var = ((up - mean) ** 2).mean(1, keepdim=True)
    up = (up - mean) / torch.sqrt(var + _REF_LN2D_EPS)
    up = up * s[f"{md}.output_upscaling.1.weight"][:, None, None] + s[f"{md}.output_upscaling.1.bias"][:, None, None]
    up = F.gelu(up)
    up = F.gelu(F.conv_transpose2d(up, s[f"{md}.output_upscaling.3.weight"], s[f"{md}.output_upscaling.3.bias"],
                                   stride=2))
    hyper = _ref_mlp(q[:, 1], s, f"{md}.output_hypernetworks_mlps.0", 3)                      # token 0 only
    masks = torch.einsum("nc,nchw->nhw", hyper, up)
    iou = _ref_mlp(q[:, 0], s, f"{md}.iou_prediction_head", 3)[:, 0]
    return masks, iou


def test_sam_h_two_way_layer_norms_have_the_reference_eps():
    """norm1..norm4 of every two-way block are nn.LayerNorm (eps 1e-5) in the reference, not transformers'
    SamMaskDecoderConfig default 1e-6: checked on a low-variance input, where the two differ by ~2x."""
    cfg = random_config("sam")
    model = EvfSam(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, cfg.sam.mask_decoder_config.hidden_size, generator=g) * 3e-3    # variance ~1e-5
    decoder = model.sam.mask_decoder
    checked = 0
    for i, layer in enumerate(decoder.transformer.layers):
        for j in range(1, 5):
            norm = getattr(layer, f"layer_norm{j}")
            with torch.no_grad():
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
                norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
            state = {"n.weight": norm.weight.detach(), "n.bias": norm.bias.detach()}
            with torch.no_grad():
                assert torch.allclose(norm(x), _ref_layer_norm(x, state, "n"), atol=1e-5), (i, j)
                assert not torch.allclose(norm(x), _ref_layer_norm(x, state, "n", eps=1e-6), atol=1e-2)
            checked += 1
    assert checked == 4 * cfg.sam.mask_decoder_config.num_hidden_layers
    final = decoder.transformer.layer_norm_final_attn
    state = {"n.weight": final.weight.detach(), "n.bias": final.bias.detach()}
    with torch.no_grad():
        assert torch.allclose(final(x), _ref_layer_norm(x, state, "n"), atol=1e-5)
    # the upscaling LayerNorm2d keeps 1e-6
    up = decoder.upscale_layer_norm
    y = torch.randn(2, up.weight.shape[0], 3, 3, generator=g) * 1e-3
    mean, var = y.mean(1, keepdim=True), y.var(1, unbiased=False, keepdim=True)
    w, b = up.weight.detach()[:, None, None], up.bias.detach()[:, None, None]
    with torch.no_grad():
        assert torch.allclose(up(y), (y - mean) / torch.sqrt(var + 1e-6) * w + b, atol=1e-5)
    # the same for the published SAM-H preset and for a stored config written with transformers' default
    assert sam_config("sam", scale="huge").mask_decoder_config.layer_norm_eps == 1e-5
    stale = cfg.sam.to_dict()
    stale["mask_decoder_config"]["layer_norm_eps"] = 1e-6
    assert sam_config("sam", stale).mask_decoder_config.layer_norm_eps == 1e-5


def test_sam_h_mask_decoder_matches_the_reference_definition():
    """Our SAM-H decoder (transformers SamMaskDecoder + the key map) == the reference's decoder written out
    above, on the checkpoint's own tensors. With transformers' default eps (1e-6) in norm1..norm4 the
    logits are ~3.5e-4 of their spread off here; with the reference's 1e-5, ~2e-7 (float32 rounding)."""
    torch.manual_seed(0)
    cfg = random_config("sam")
    model = EvfSam(cfg).eval()
    with torch.no_grad():       # spread the random weights as write_random_checkpoint does
        for p in model.sam.mask_decoder.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    g = torch.Generator().manual_seed(1)
    c, e = cfg.sam.mask_decoder_config.hidden_size, cfg.sam.prompt_encoder_config.image_embedding_size
    emb = torch.randn(1, c, e, e, generator=g)
    prompts = torch.randn(1, 4, c, generator=g)
    masks, iou = model.decoder_outputs(emb, prompts, multimask=False)
    assert masks.shape == (1, 4, 1, 4 * e, 4 * e) and iou.shape == (1, 4, 1)
    ref_masks, ref_iou = _ref_sam_h_decoder(model.original_state_dict(), emb, prompts[0][:, None],
                                            heads=cfg.sam.mask_decoder_config.num_attention_heads)
    spread = float(ref_masks.max() - ref_masks.min())
    assert spread > 1e-3
    err = float((masks[0, :, 0].double() - ref_masks).abs().max()) / spread
    assert err < 1e-5, err
    assert float((iou[0, :, 0].double() - ref_iou).abs().max()) < 5e-7


# ---------------------------------------------------------------------------------------------- BEiT-3


def _perturb(model, needle):
    with torch.no_grad():
        for name, p in model.mm_extractor.named_parameters():
            if needle in name:
                p.add_(torch.randn_like(p))


def test_multiway_text_weights_unused_when_text_fully_masked():
    torch.manual_seed(0)
    model = EvfSam(random_config("sam")).eval()
    ids = torch.randint(3, 100, (2, 5))
    masked = torch.zeros_like(ids)
    base_masked = _fused(model, 2, ids, masked)
    base_open = _fused(model, 2, ids)
    changed = copy.deepcopy(model)
    _perturb(changed, ".B.")
    assert torch.allclose(_fused(changed, 2, ids, masked), base_masked, atol=1e-6)
    assert not torch.allclose(_fused(changed, 2, ids), base_open, atol=1e-3)  # text path really uses .B
    vision_changed = copy.deepcopy(model)
    _perturb(vision_changed, ".A.")
    assert not torch.allclose(_fused(vision_changed, 2, ids, masked), base_masked, atol=1e-3)


def test_padding_with_the_mask_leaves_output_unchanged():
    torch.manual_seed(0)
    model = EvfSam(random_config("sam")).eval()
    ids = torch.randint(3, 100, (1, 5))
    alone = _fused(model, 1, ids)
    padded_ids = torch.cat([ids, torch.full((1, 4), 1)], dim=1)
    padded_mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    assert torch.allclose(_fused(model, 1, padded_ids, padded_mask), alone, atol=1e-5)
    # without the mask the pad tokens do change the result
    assert not torch.allclose(_fused(model, 1, padded_ids), alone, atol=1e-4)


def test_positions_start_at_two():
    torch.manual_seed(0)
    model = EvfSam(random_config("sam")).eval()
    base = _fused(model)
    pos = model.mm_extractor.beit3.encoder.embed_positions
    assert pos.A.weight.shape[0] == 197 + 2
    with torch.no_grad():
        pos.A.weight[:2].add_(torch.randn(2, pos.A.weight.shape[1]))
        pos.B.weight[:2].add_(torch.randn(2, pos.B.weight.shape[1]))
    assert torch.allclose(_fused(model), base, atol=1e-6)
    with torch.no_grad():
        pos.B.weight[2].add_(torch.randn(pos.B.weight.shape[1]))
    assert not torch.allclose(_fused(model), base, atol=1e-4)


# ---------------------------------------------------------------------------------------------- preprocessing


def test_beit3_pixels_range_and_shape():
    img = _image(90, 120)
    x = beit3_pixels(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert -1.1 <= float(x.min()) and float(x.max()) <= 1.1
    assert torch.allclose(beit3_pixels(np.zeros((50, 70, 3), np.uint8)), torch.full((3, 224, 224), -1.0))
    assert torch.allclose(beit3_pixels(np.full((50, 70, 3), 255, np.uint8)), torch.full((3, 224, 224), 1.0))


def test_sam_pixels_longest_side_pad_and_plain_resize():
    img = _image(90, 120)
    x, hw = sam_pixels(img, 64, "sam")
    assert x.shape == (3, 64, 64) and hw == (48, 64)
    assert torch.all(x[:, 48:, :] == 0)                # padding below the resized image
    assert float(x[:, :48].abs().max()) > 0.5
    mean_img = np.broadcast_to(np.array([124, 116, 104], np.uint8), (30, 20, 3)).copy()
    xm, hw2 = sam_pixels(mean_img, 64, "sam")
    assert hw2 == (64, 43) and float(xm[:, :, :43].abs().max()) < 0.02   # SAM mean -> ~0
    x2, hw3 = sam_pixels(img, 64, "sam2")
    assert x2.shape == (3, 64, 64) and hw3 == (64, 64)


def _sam_normalized(x: torch.Tensor) -> torch.Tensor:
    """(3, h, w) on the 0-255 scale -> SAM's mean/std, written out independently of the module."""
    return (x.float() - torch.tensor(SAM_PIXEL_MEAN)[:, None, None]) / torch.tensor(SAM_PIXEL_STD)[:, None, None]


def _pil_resized(img: np.ndarray, w: int, h: int, resample=Image.BILINEAR) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) uint8 tensor, resized by PIL."""
    return torch.from_numpy(np.array(Image.fromarray(img).resize((w, h), resample))).permute(2, 0, 1)


def test_sam_h_longest_side_is_pil_resized():
    """ResizeLongestSide.apply_image: torchvision's resize of a PIL image, default (bilinear) interpolation."""
    img = _image(90, 120)
    x, hw = sam_pixels(img, 64, "sam")
    assert hw == (48, 64)
    assert torch.allclose(x[:, :48], _sam_normalized(_pil_resized(img, 64, 48)), atol=1e-5)
    assert not torch.allclose(x[:, :48], _sam_normalized(_pil_resized(img, 64, 48, Image.BICUBIC)), atol=1e-3)


def test_sam2_pixels_follow_the_reference_revision():
    img = _image(90, 120)
    # multitask checkpoints (newer reference): the uint8 tensor bilinear-resized to S², then mean/std
    u8 = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    straight = _sam_normalized(F.interpolate(u8[None], size=(64, 64), mode="bilinear", align_corners=False)[0])
    x, hw = sam_pixels(img, 64, "sam2", multitask=True)
    assert hw == (64, 64) and torch.allclose(x, straight, atol=1e-6)
    # original checkpoints: PIL longest side, mean/std, then a float bilinear stretch to S²
    longest = _sam_normalized(_pil_resized(img, 64, 48))
    stretched = F.interpolate(longest[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    x_orig, hw = sam_pixels(img, 64, "sam2", multitask=False)
    assert hw == (64, 64) and torch.allclose(x_orig, stretched, atol=1e-6)
    assert not torch.allclose(x, x_orig, atol=1e-2)


def test_beit3_pixels_resize_without_antialiasing():
    """The reference resizes the float tensor with torchvision (antialias=None: none for tensors)."""
    img = _image(300, 400)                                   # a downscale, where antialiasing would matter
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    plain = F.interpolate(x[None], size=(224, 224), mode="bicubic", align_corners=False)[0]
    assert torch.allclose(beit3_pixels(img), (plain - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize("variant", ["sam", "sam2"])
def test_masks_come_back_at_original_size(variant):
    low = torch.randn(3, 16, 16)
    out = masks_to_original(low, variant, 64, (48, 64) if variant == "sam" else (64, 64), (90, 120))
    assert out.shape == (3, 90, 120)


def test_semantic_prefix():
    assert prompt_text("sky", True, True) == SEMANTIC_PREFIX + "sky" == "[semantic] sky"
    assert prompt_text("sky", True, False) == "sky"
    assert prompt_text("zebra", False, True) == "zebra"


def test_select_instances_filters_and_dedups():
    m = np.zeros((4, 10, 10), bool)
    m[0, :5] = True
    m[1, :5] = True
    m[1, 5, 0] = True          # near-duplicate of 0
    m[2, 8:, 8:] = True         # 4 px
    scores = np.array([0.9, 0.95, 0.8, 0.2])   # mask 3 is empty
    assert select_instances(m, scores) == [1, 0, 2]
    assert select_instances(m, scores, score_threshold=0.85) == [1, 0]
    assert select_instances(m, scores, min_area=5) == [1, 0]
    assert select_instances(m, scores, dedup_iou=0.5) == [1, 2]


# ---------------------------------------------------------------------------------------------- labeler


def _labeler(weights, storage=None, dtype="auto", **params):
    spec = LabelerSpec(name="evf_sam", weights=weights, ontology=ONTOLOGY, params=params, dtype=dtype)
    return labeler_class("evf_sam")(spec, device="cpu", storage=storage)


def _assert_greedy_dedup(kept, everything, threshold):
    """``kept`` is ``everything`` de-duplicated greedily by score at ``threshold`` (same image, one prompt each)."""
    by_prompt = {i.prompt: i for i in everything}
    assert kept and all(by_prompt[i.prompt].score == i.score for i in kept)
    assert kept[0].prompt == max(everything, key=lambda i: i.score).prompt      # the best always stays
    masks = np.stack([i.mask for i in kept])
    overlap = mask_iou_matrix(masks, masks)
    np.fill_diagonal(overlap, 0.0)
    assert (overlap <= threshold).all()                                          # no two kept masks overlap
    for dropped in (i for i in everything if i.prompt not in {k.prompt for k in kept}):
        rivals = [k for k in kept if k.score >= dropped.score]                   # dropped for a better one
        assert rivals and mask_iou_matrix(dropped.mask[None], np.stack([k.mask for k in rivals])).max() > threshold


@pytest.mark.parametrize("variant", ["sam", "sam2"])
def test_labeler_outputs_ontology_categories_at_original_size(ckpt, variant):
    lab = _labeler(ckpt[variant])
    assert lab.variant == variant
    images = [_image(90, 120, 0), _image(70, 50, 1)]
    calls = []
    hook = lab.model.sam.vision_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    out = lab(images)
    hook.remove()
    assert calls == [2]                     # the SAM encoder ran once for the batch: once per image
    assert len(out) == 2
    allowed = {(1, "square", "square"), (1, "square", "a box"), (2, "circle", "circle"), (7, "sky", "sky")}
    for img, o in zip(images, out):
        assert o.instances, "random weights still give some non-empty masks"
        for inst in o.instances:
            assert inst.mask.shape == img.shape[:2] and inst.mask.dtype == bool and inst.mask.any()
            assert (inst.category_id, inst.category, inst.prompt) in allowed
            assert 0.0 <= inst.score <= 1.0
    # thresholds: nothing passes a score above the best; dedup never adds
    best = max(i.score for o in out for i in o.instances)
    assert all(not o.instances for o in _labeler(ckpt[variant], score_threshold=min(1.0, best + 1e-3))(images))
    dd = _labeler(ckpt[variant], dedup_iou=0.05)(images)
    for kept, everything in zip(dd, out):
        _assert_greedy_dedup(kept.instances, everything.instances, 0.05)
    assert sum(len(o.instances) for o in dd) < sum(len(o.instances) for o in out)   # random masks overlap


def _instances(output):
    return [(i.category_id, i.category, i.prompt, i.score, i.mask.dtype, i.mask.shape, i.mask.tobytes())
            for i in output.instances]


@pytest.mark.parametrize("variant,multitask,params", [("sam", False, {}), ("sam2", False, {}), ("sam2", True, {}),
                                                      ("sam", False, {"dedup_iou": 0.05, "min_area": 30})])
def test_split_halves_give_the_labels_of_one_call(ckpt, variant, multitask, params):
    """forward -> payload bytes -> a weight-free host half's postprocess == labeler(images), field by field."""
    lab = _labeler(ckpt[variant], multitask=multitask, **params)
    assert lab.splits() and lab.has_device_half()
    images = [_image(90, 120, 0), _image(70, 50, 1), _image(33, 77, 2)]     # widths 8k and not
    whole = lab(images)
    payloads = lab.forward(images, [None] * len(images))
    assert len(payloads) == len(images)
    host = type(lab).host_half(lab.spec)
    assert not hasattr(host, "model") and not hasattr(host, "input_ids")
    n_p = len(lab.pairs)
    split = []
    for img, payload, one in zip(images, payloads, whole):
        h, w = img.shape[:2]
        # compact plain NumPy arrays: masks bit-packed along W, float32 scores
        assert {k: (type(v), v.dtype, v.shape) for k, v in payload.items()} == {
            "masks": (np.ndarray, np.uint8, (n_p, h, (w + 7) // 8)),
            "width": (np.ndarray, np.int64, ()),
            "scores": (np.ndarray, np.float32, (n_p,)),
            "pairs": (np.ndarray, np.int32, (n_p,))}
        assert payload["pairs"].tolist() == list(range(n_p))  # no row categories: every prompt
        shipped = unpack_payload(pack_payload(payload))
        out = host.postprocess(img, None, shipped)
        assert _instances(out) == _instances(one)
        assert out.tokens is None and out.layers == {}
        split.append(out)
    assert sum(len(o.instances) for o in split) > 0
    # the host half reproduces the masks the device thresholded, and keeps exactly what select_instances keeps
    masks = np.unpackbits(payloads[0]["masks"], axis=-1, count=120).astype(bool)
    keep = select_instances(masks, payloads[0]["scores"], score_threshold=lab.params.score_threshold,
                            min_area=lab.params.min_area, dedup_iou=lab.params.dedup_iou)
    assert [(i.prompt, i.score) for i in split[0].instances] == [(lab.pairs[k][1], float(payloads[0]["scores"][k]))
                                                                 for k in keep]


def test_host_half_loads_no_weights(ckpt, monkeypatch):
    """host_half needs only the spec: a weights path that does not exist, no loader called."""
    lab = _labeler(ckpt["sam2"], dedup_iou=0.3)
    images = [_image(90, 120, 7)]
    expected = lab(images)[0]
    payload = unpack_payload(pack_payload(lab.forward(images, [None])[0]))

    def refuse(*args, **kwargs):
        raise AssertionError("the host half loaded something")

    for name in ("load_evf_sam", "load_tokenizer", "_local_checkpoint"):
        monkeypatch.setattr(evf_labeler, name, refuse)
    spec = LabelerSpec(name="evf_sam", weights="/no/such/evf-sam2", ontology=ONTOLOGY, params={"dedup_iou": 0.3})
    host = labeler_class("evf_sam").host_half(spec)
    assert host.device == "cpu" and [(e.category, p) for e, p in host.pairs] == [(e.category, p) for e, p in lab.pairs]
    assert _instances(host.postprocess(images[0], None, payload)) == _instances(expected)
    # the ontology is checked on the host too, and a payload for another ontology is refused
    with pytest.raises(ValueError, match="needs an ontology"):
        labeler_class("evf_sam").host_half(LabelerSpec(name="evf_sam", weights="/no/such/evf-sam2"))
    short = LabelerSpec(name="evf_sam", weights="/no/such", ontology=ONTOLOGY[:1])
    with pytest.raises(ValueError, match="prompts"):
        labeler_class("evf_sam").host_half(short).postprocess(images[0], None, payload)


@pytest.mark.parametrize("width", [1, 7, 8, 9, 16, 77, 120])
def test_pack_bits_is_numpy_packbits(width):
    masks = torch.rand(3, 5, width, generator=torch.Generator().manual_seed(width)) > 0.5
    packed = pack_bits(masks)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(masks.numpy(), axis=-1))
    assert np.array_equal(np.unpackbits(packed.numpy(), axis=-1, count=width).astype(bool), masks.numpy())


def test_compile_flag_wraps_the_image_encoder(ckpt, monkeypatch):
    calls = []

    def record(fn, enabled, what):
        calls.append((fn, enabled, what))
        return fn

    monkeypatch.setattr(evf_labeler, "compiled", record)
    spec = LabelerSpec(name="evf_sam", weights=ckpt["sam"], ontology=ONTOLOGY, compile=True)
    lab = labeler_class("evf_sam")(spec, device="cpu")
    assert calls == [(lab.model.encode_images, True, "evf_sam")]
    assert not _labeler(ckpt["sam"]).spec.compile


@pytest.mark.parametrize("variant,multitask", [("sam", False), ("sam2", False), ("sam2", True)])
def test_labeler_masks_match_direct_model_call(ckpt, variant, multitask):
    """Batched prompts (padded) give the same masks as one prompt at a time through the model, with the
    reference revision's SAM input and mask choice."""
    lab = _labeler(ckpt[variant], multitask=multitask)
    img = _image(90, 120, 3)
    got = {(i.category, i.prompt): i.mask for i in lab([img])[0].instances}
    model, tok = lab.model, load_tokenizer(ckpt[variant], multitask=multitask)
    pixels, resized = sam_pixels(img, 64, variant, multitask)
    emb = model.encode_images(pixels[None])
    for (cat, prompt), mask in got.items():
        enc = tok([prompt_text(prompt, cat == "sky", multitask)], return_tensors="pt")
        f = model.fuse(beit3_pixels(img)[None], enc["input_ids"], enc["attention_mask"])
        low, _ = model.decode(emb, f[None], multimask=multitask)
        ref = masks_to_original(low[0], variant, 64, resized, (90, 120))[0] > 0
        assert (ref.numpy() == mask).mean() > 0.999


def test_sam2_picks_the_best_iou_of_three():
    torch.manual_seed(0)
    model = EvfSam(random_config("sam2")).eval()
    emb = model.encode_images(torch.randn(2, 3, 64, 64))
    prompts = _fused(model, 6).view(2, 3, -1)
    # random weights: the choice is the IoU head's argmax among the three multimask outputs
    masks, iou = model.decoder_outputs(emb, prompts, multimask=True)
    assert masks.shape[:3] == (2, 3, 3) and iou.shape == (2, 3, 3)
    chosen, score = model.decode(emb, prompts, multimask=True)
    best = iou.argmax(-1)
    for b, q in itertools.product(range(2), range(3)):
        assert torch.equal(chosen[b, q], masks[b, q, best[b, q]].float()) and score[b, q] == iou[b, q].max()
    # steer the IoU head (tokens: 0 = single mask, 1-3 = multimask) so that candidate k wins everywhere
    head = model.sam.mask_decoder.iou_prediction_head.proj_out
    for k in range(3):
        with torch.no_grad():
            head.bias.fill_(-1e3)
            head.bias[1 + k] = 1e3
        masks, iou = model.decoder_outputs(emb, prompts, multimask=True)
        assert (iou.argmax(-1) == k).all()
        chosen, score = model.decode(emb, prompts, multimask=True)
        assert torch.equal(chosen, masks[:, :, k].float()) and torch.equal(score, iou[:, :, k].float())


def test_best_candidate_is_the_argmax():
    masks = torch.arange(2 * 3 * 3 * 4, dtype=torch.float32).view(2, 3, 3, 2, 2)
    iou = torch.tensor([[[0.1, 0.9, 0.2], [0.8, 0.1, 0.3], [0.0, 0.2, 0.7]],
                        [[0.5, 0.4, 0.6], [0.3, 0.3, 0.9], [0.9, 0.2, 0.1]]])
    chosen, score = best_candidate(masks, iou)
    expect = [[1, 0, 2], [2, 2, 0]]
    for b, q in itertools.product(range(2), range(3)):
        assert torch.equal(chosen[b, q], masks[b, q, expect[b][q]]) and score[b, q] == iou[b, q, expect[b][q]]


def test_sam2_single_mask_output_for_original_checkpoints():
    """The original EVF-SAM2 reference asks SAM-2 for one mask: token 0, or where its logits are unstable
    the best multimask output (SAM-2's dynamic multimask)."""
    torch.manual_seed(0)
    model = EvfSam(random_config("sam2")).eval()
    emb = model.encode_images(torch.randn(1, 3, 64, 64))
    prompts = _fused(model, 2)[None]
    best_of_three = best_candidate(*model.decoder_outputs(emb, prompts, multimask=True))[0]
    # random weights: token 0's logits are all near 0, unstable -> the best of three
    masks, iou = model.decoder_outputs(emb, prompts, multimask=False)
    assert masks.shape[:3] == (1, 2, 1) and iou.shape == (1, 2, 1)
    assert torch.equal(masks[:, :, 0], best_of_three)
    # a sharp (stable) token 0 is used as it is
    decoder = model.sam.mask_decoder
    with torch.no_grad():
        decoder.output_hypernetworks_mlps[0].proj_out.weight.mul_(1e8)
    masks, _ = model.decoder_outputs(emb, prompts, multimask=False)
    decoder.dynamic_multimask_via_stability = False
    token0, _ = model.decoder_outputs(emb, prompts, multimask=False)
    assert torch.equal(masks, token0) and not torch.equal(masks[:, :, 0], best_of_three)


def _semantic_id(path) -> int:
    return json.loads((Path(path) / "added_tokens.json").read_text())["[semantic]"]


def test_multitask_prefix_from_config(tmp_path):
    write_random_checkpoint(tmp_path, "sam", multitask=True)
    lab = _labeler(str(tmp_path))
    assert lab.multitask
    tok = load_tokenizer(tmp_path)
    # the multitask tokenizer's added token: "[semantic]" is one id, the one added_tokens.json gives
    assert tok.convert_tokens_to_ids("[semantic]") == _semantic_id(tmp_path)
    sky = [i for i, (e, p) in enumerate(lab.pairs) if e.category == "sky"][0]
    ids = lab.input_ids[sky][lab.attention_mask[sky] == 1].tolist()
    assert ids == tok("[semantic] sky")["input_ids"] and ids[1] == _semantic_id(tmp_path)
    square = [i for i, (e, p) in enumerate(lab.pairs) if p == "square"][0]
    assert lab.input_ids[square][lab.attention_mask[square] == 1].tolist() == tok("square")["input_ids"]
    assert not _labeler(str(tmp_path), multitask=False).multitask


def _drop_config_field(path, field="multitask"):
    f = Path(path) / "config.json"
    cfg = json.loads(f.read_text())
    cfg.pop(field, None)
    f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("variant", ["sam", "sam2"])
def test_multitask_is_read_from_the_checkpoint_not_its_name(tmp_path, variant):
    """config.json without a 'multitask' field (as published): the tokenizer decides; the directory name,
    which the reference's scripts would go by, does not."""
    renamed_multitask = tmp_path / "evf-copy"
    write_random_checkpoint(renamed_multitask, variant, multitask=True)
    _drop_config_field(renamed_multitask)
    named_multitask = tmp_path / "evf-sam-multitask-but-not"
    write_random_checkpoint(named_multitask, variant)
    assert "multitask" not in json.loads((named_multitask / "config.json").read_text())
    assert checkpoint_multitask(renamed_multitask) and not checkpoint_multitask(named_multitask)
    lab = _labeler(str(renamed_multitask))
    assert lab.multitask
    sky = [i for i, (e, p) in enumerate(lab.pairs) if e.category == "sky"][0]
    assert lab.input_ids[sky][1] == _semantic_id(renamed_multitask)
    plain = _labeler(str(named_multitask))
    assert not plain.multitask
    sky_ids = plain.input_ids[sky][plain.attention_mask[sky] == 1].tolist()
    assert sky_ids == load_tokenizer(named_multitask)("sky")["input_ids"]                  # no prefix


def test_multitask_from_each_tokenizer_file_layout(tmp_path):
    """added_tokens.json keys, tokenizer_config.json added_tokens_decoder, tokenizer.json added_tokens."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    assert tokenizer_added_tokens(tmp_path) == (set(), ["tokenizer_config.json"])
    assert checkpoint_multitask(tmp_path) is False
    decoder = {"0": {"content": "<s>", "special": True}, "64002": {"content": "[semantic]", "special": False}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    assert checkpoint_multitask(tmp_path) is True
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 64002, "content": "[semantic]"}]}))
    assert checkpoint_multitask(tmp_path) is True
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[semantic]": 64002}))
    assert checkpoint_multitask(tmp_path) is True
    (tmp_path / "config.json").write_text(json.dumps({"multitask": True}))
    assert checkpoint_multitask(tmp_path) is True


def test_undecidable_multitask_is_refused_unless_set(tmp_path):
    write_random_checkpoint(tmp_path, "sam2")
    _drop_config_field(tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).unlink()
    # neither a config field nor a tokenizer file that lists added tokens: refuse, naming both
    with pytest.raises(MultitaskUndecidedError) as err:
        _labeler(str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and '"multitask"' in msg and "config.json" in msg
    assert "added_tokens.json" in msg and "tokenizer_config.json" in msg and "params.multitask" in msg
    # the explicit override settles it either way
    assert not _labeler(str(tmp_path), multitask=False).multitask
    forced = _labeler(str(tmp_path), multitask=True)
    assert forced.multitask
    # forced multitask on a tokenizer without the token: "[semantic]" becomes one token after the vocabulary
    base = load_tokenizer(tmp_path)
    sky = [i for i, (e, p) in enumerate(forced.pairs) if e.category == "sky"][0]
    assert forced.input_ids[sky][1] == len(base)
    assert len(base("[semantic]")["input_ids"]) > 3                            # pieces without it


def test_contradicting_multitask_evidence_is_refused_unless_set(tmp_path):
    write_random_checkpoint(tmp_path, "sam", multitask=True)
    (tmp_path / "added_tokens.json").unlink()                  # config.json says multitask, the tokenizer not
    with pytest.raises(MultitaskUndecidedError, match=r'config\.json says "multitask": true.*does not register'):
        _labeler(str(tmp_path))
    assert _labeler(str(tmp_path), multitask=True).multitask
    write_random_checkpoint(tmp_path / "b", "sam", multitask=True)
    _drop_config_field(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps(dict(cfg, multitask=False)))
    with pytest.raises(MultitaskUndecidedError, match=r'"multitask": false.*registers'):
        checkpoint_multitask(tmp_path / "b")
    assert not _labeler(str(tmp_path / "b"), multitask=False).multitask
    (tmp_path / "b" / "config.json").write_text(json.dumps(dict(cfg, multitask="yes")))
    with pytest.raises(MultitaskUndecidedError, match="must be true or false"):
        checkpoint_multitask(tmp_path / "b")


def test_bin_checkpoint_loads_like_safetensors(ckpt, tmp_path):
    model = load_evf_sam(ckpt["sam"])
    torch.save(model.original_state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((__import__("pathlib").Path(ckpt["sam"]) / "config.json").read_text())
    again = load_evf_sam(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    save_evf_sam(again, tmp_path / "resaved")
    assert (tmp_path / "resaved" / "model.safetensors").exists()


def test_sharded_safetensors_index_loads_like_one_file(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    src = Path(ckpt["sam2"])
    state = load_file(str(src / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    assert not (tmp_path / "model.safetensors").exists()
    one, sharded = load_evf_sam(src), load_evf_sam(tmp_path)
    for k, v in one.state_dict().items():
        assert torch.equal(v, sharded.state_dict()[k]), k
    images = [_image(90, 120, 5)]
    a, b = _labeler(str(src))(images)[0].instances, _labeler(str(tmp_path))(images)[0].instances
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x.prompt, x.score) == (y.prompt, y.score) and np.array_equal(x.mask, y.mask)


@pytest.fixture
def no_hub(monkeypatch):
    """Records hub downloads instead of making them: the list of repo ids asked for."""
    import huggingface_hub

    asked = []

    def refuse(repo_id, revision=None, **kwargs):
        asked.append(repo_id)
        raise ConnectionRefusedError("no hub in tests")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    return asked


@pytest.mark.parametrize("weights", ["/no/such/evf-sam2", "./evf-sam2-missing", "../evf-sam2-missing",
                                     "~/no/such/evf-sam2", "file:///no/such/evf-sam2", "checkpoints/run1/evf-sam2"])
def test_mistyped_local_path_is_not_sent_to_the_hub(no_hub, weights):
    with pytest.raises(FileNotFoundError, match=re.escape(repr(weights))):
        _labeler(weights)
    assert no_hub == []


def test_hub_id_goes_to_the_hub(no_hub):
    with pytest.raises(ConnectionRefusedError):
        _labeler("someone/evf-sam2-missing")
    assert no_hub == ["someone/evf-sam2-missing"]


def test_dtype_follows_the_one_rule(ckpt):
    """``auto`` is float16 on CUDA (as the reference runs) and float32 elsewhere; a named dtype is used
    as asked on any device."""
    from pseudolabel.models.evf_sam.labeler import EvfSamLabeler

    assert EvfSamLabeler.cuda_dtype == "float16"
    assert resolve_dtype("auto", "cuda", EvfSamLabeler.cuda_dtype) == torch.float16
    assert resolve_dtype("auto", "cpu", EvfSamLabeler.cuda_dtype) == torch.float32
    assert resolve_dtype("bfloat16", "cuda:1") == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    images = [_image(90, 120, 6)]
    reference = _labeler(ckpt["sam"])(images)[0].instances
    lab = _labeler(ckpt["sam"], dtype="bfloat16")
    assert lab.dtype == torch.bfloat16
    assert {p.dtype for p in lab.model.parameters()} == {torch.bfloat16}
    got = lab(images)[0].instances
    assert [i.prompt for i in got] == [i.prompt for i in reference]


def test_local_and_s3_weights_give_identical_output(ckpt, s3_bucket, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    bucket, storage = s3_bucket
    fs = fsspec.filesystem("s3", key=storage.key, secret=storage.secret,
                           client_kwargs={"endpoint_url": storage.endpoint_url, "region_name": storage.region})
    fs.put(ckpt["sam2"] + "/", f"{bucket[5:]}/evf-sam2/", recursive=True)
    images = [_image(90, 120, 4)]
    local = _labeler(ckpt["sam2"])(images)[0].instances
    remote = _labeler(f"{bucket}/evf-sam2", storage=storage)(images)[0].instances
    assert len(local) == len(remote) > 0
    for a, b in zip(local, remote):
        assert (a.category_id, a.prompt, a.score) == (b.category_id, b.prompt, b.score)
        assert np.array_equal(a.mask, b.mask)


def test_s3_copies_are_decided_by_their_files(s3_bucket, tmp_path, monkeypatch):
    """An S3 copy under any name takes the path its files say (the old name-based guess would take the
    other one for both of these)."""
    import fsspec

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    bucket, storage = s3_bucket
    fs = fsspec.filesystem("s3", key=storage.key, secret=storage.secret,
                           client_kwargs={"endpoint_url": storage.endpoint_url, "region_name": storage.region})
    write_random_checkpoint(tmp_path / "mt", "sam2", multitask=True)
    _drop_config_field(tmp_path / "mt")
    write_random_checkpoint(tmp_path / "plain", "sam2")
    fs.put(str(tmp_path / "mt") + "/", f"{bucket[5:]}/evf-sam2-copy/", recursive=True)
    fs.put(str(tmp_path / "plain") + "/", f"{bucket[5:]}/evf-sam2-multitask/", recursive=True)
    assert _labeler(f"{bucket}/evf-sam2-copy", storage=storage).multitask
    assert not _labeler(f"{bucket}/evf-sam2-multitask", storage=storage).multitask


# -- per-row categories ---------------------------------------------------------------------------

def test_row_categories_name_the_ontology_entries_to_prompt():
    from pseudolabel.models.base import entry_index, row_entries

    onto = LabelerSpec(name="evf_sam", weights="/x", ontology=ONTOLOGY).ontology  # ids 1, 2, 7
    assert [entry_index(onto, v) for v in ("square", "circle", 7, 2, "zebra", 3, True)] == [0, 1, 2, 1, None, None,
                                                                                            None]
    assert row_entries(onto, None) is None and row_entries(onto, {"boxes_xyxy": [[0, 0, 1, 1]]}) is None
    assert row_entries(onto, {"categories": []}) is None
    assert row_entries(onto, {"categories": ["sky", "zebra", 7, "square"]}) == [2, 0]  # once each, row order
    assert row_entries(onto, {"categories": ["zebra"]}) == []


def test_rows_naming_categories_are_prompted_with_those_entries_only(ckpt):
    """Four rows of one image: no categories (every prompt), two entries by name, one by id, and a
    name outside the ontology (no prompt, no instance). Each row's instances are the full row's
    instances of its prompts; the split halves agree with the one call; ``row_categories: false``
    prompts every row with everything."""
    lab = _labeler(ckpt["sam2"])
    image = _image(90, 120, 3)
    images = [image] * 4
    prompts = [None, {"categories": ["sky", "square"]}, {"categories": [7]}, {"categories": ["zebra"]}]
    assert [lab.row_pairs(p) for p in prompts] == [[0, 1, 2, 3], [0, 1, 3], [3], []]
    outs = lab(images, prompts)
    full = {i.prompt: i for i in outs[0].instances}
    assert {i.category for i in outs[0].instances} == {"square", "circle", "sky"}  # random weights: all there
    for out, wanted in zip(outs[1:], [{"square", "a box", "[semantic] sky", "sky"}, {"sky", "[semantic] sky"}, set()]):
        got = {i.prompt: i for i in out.instances}
        assert set(got) == {p for p in full if p in wanted}
        for p, inst in got.items():
            assert inst.category_id == full[p].category_id and inst.score == pytest.approx(full[p].score, abs=1e-5)
            assert (inst.mask != full[p].mask).mean() < 0.01
    assert outs[3].instances == []
    # the split halves: payloads carry each row's prompt indices; an empty row ships empty arrays
    payloads = lab.forward(images, prompts)
    assert [p["pairs"].tolist() for p in payloads] == [[0, 1, 2, 3], [0, 1, 3], [3], []]
    assert payloads[3]["masks"].shape == (0, 90, 15) and payloads[3]["scores"].shape == (0,)
    host = type(lab).host_half(lab.spec)
    for img, prm, payload, one in zip(images, prompts, payloads, outs):
        assert _instances(host.postprocess(img, prm, unpack_payload(pack_payload(payload)))) == _instances(one)
    # off: every row gets every prompt
    every = _labeler(ckpt["sam2"], row_categories=False)
    assert [every.row_pairs(p) for p in prompts] == [[0, 1, 2, 3]] * 4
    assert [len(o.instances) for o in every(images, prompts)] == [len(outs[0].instances)] * 4
