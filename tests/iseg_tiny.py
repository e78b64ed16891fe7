"""Tiny random checkpoints shaped like the ones iSeg is published with, for tests and CPU benchmarks.

``build_sd21_tiny(path)`` writes a diffusers-layout Stable Diffusion whose UNet has SD 2.1's block
layout and head counts at a fraction of the width:
- ``layers_per_block=2``, so ``down_blocks.{1,2}.attentions.{0,1}`` and ``up_blocks.{1,2,3}.attentions.{0,1,2}``
  exist with SD 2.1's names (the reference's cross-attention layer list resolves);
- heads 5 / 10 / 20 / 20 per level (SD 2.1's ``attention_head_dim``), so the reference's self-attention
  heads [1, 2] at ``up_blocks.3`` and its VOC cross-attention head subsets (30 heads at latent/2, 100 at
  latent/4 over the reference's layers) index real heads.

``build_tiny_clip(path)`` writes a tiny random ``CLIPModel`` with its tokenizer and image processor,
loaded by the iseg tagger with ``from_pretrained``.

Both use the offline tokenizer of ``sd_tiny.py`` with ``WORDS`` below as single tokens.
"""
from __future__ import annotations

import json
import os

from sd_tiny import write_tiny_clip_tokenizer

WORDS = (
    "a photograph photo of and other object background the cat dog ground land grass tree building wall "
    "sky lake water river sea railway person car traffic light fire hydrant , ."
).split()


def build_sd21_tiny(path: str, seed: int = 0) -> str:
    """Build and ``save_pretrained`` a tiny random SD 2.1-shaped checkpoint under ``path``; returns ``path``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(40, 40, 80, 80),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(5, 10, 20, 20),  # SD 2.1's config: the number of heads per level
        cross_attention_dim=32,
        use_linear_projection=True,
        norm_num_groups=8,
    ).save_pretrained(os.path.join(path, "unet"))
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    ).save_pretrained(os.path.join(path, "vae"))
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(os.path.join(path, "tokenizer"), WORDS))
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(os.path.join(path, "text_encoder"))
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    ).save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return path


def build_tiny_clip(path: str, seed: int = 0, image_size: int = 32) -> str:
    """Build and ``save_pretrained`` a tiny random CLIPModel + tokenizer + image processor under ``path``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(path, WORDS))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path
