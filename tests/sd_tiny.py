"""A tiny random-weight Stable Diffusion in diffusers layout, for tests and CPU benchmarks.

``build_tiny_sd(path)`` writes ``path/{unet,vae,text_encoder,tokenizer,scheduler}`` with
``save_pretrained`` so the real loading code (``from_pretrained(path, subfolder=...)``) is exercised.

The architecture mirrors SD's block layout at a fraction of the width:
- UNet2DConditionModel with 4 levels: CrossAttnDownBlock2D x3 + DownBlock2D, UNetMidBlock2DCrossAttn,
  UpBlock2D + CrossAttnUpBlock2D x3, so ``down_blocks.{0,1,2}``/``up_blocks.{1,2,3}`` hold attn1/attn2
  at latent/1, /2, /4 (and the mid block at /8), exactly as in SD 1.x/2.x;
- AutoencoderKL with 4 latent channels and 4 levels (3 downsamplings: 8x, as in SD);
- CLIPTextModel (hidden 32 = the UNet's cross_attention_dim, 77 positions) and a CLIPTokenizer built
  offline from a small byte-level BPE vocabulary: the words in ``WORDS`` are single tokens, every other
  word splits into characters (so ``"zebra"`` is a 5-token class name);
- a DDIM scheduler with SD's scaled-linear beta schedule.
"""
from __future__ import annotations

import json
import os

WORDS = (
    "a photograph photo of and other object background the cat dog ground land grass tree sky wall "
    "building road floor person car , ."
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_clip_tokenizer(path: str, words: tuple[str, ...] | list[str] = WORDS, max_length: int = 77) -> str:
    """Write vocab.json/merges.txt/tokenizer_config.json of a tiny CLIP BPE tokenizer to ``path``.

    Vocabulary: every byte symbol alone and with the end-of-word marker ``</w>``, the merge chain of
    each word in ``words`` (left-to-right merges, last one carries ``</w>``), then the two specials.
    """
    os.makedirs(path, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in words:
        chars = list(word)
        if len(chars) == 1:
            continue
        chars[-1] = chars[-1] + "</w>"
        current = chars[0]
        for nxt in chars[1:]:
            merge = f"{current} {nxt}"
            current = current + nxt
            if merge not in merges:
                merges.append(merge)
                vocab.append(current)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    seen: dict[str, int] = {}
    for tok in vocab:
        seen.setdefault(tok, len(seen))
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(seen, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return path


def build_tiny_sd(path: str, seed: int = 0, sample_size: int = 16) -> str:
    """Build and ``save_pretrained`` a tiny random Stable Diffusion under ``path``; returns ``path``.

    ``sample_size`` is the UNet's nominal latent size (images of 8 * sample_size px); any multiple of 8
    works at run time.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)

    # 1. UNet: SD's block layout, narrow
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 2, 4, 4),
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    unet.save_pretrained(os.path.join(path, "unet"))

    # 2. VAE: 4 latent channels, 8x downsampling
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8 * sample_size,
    )
    vae.save_pretrained(os.path.join(path, "vae"))

    # 3. Text encoder + tokenizer
    tok_dir = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(text_config).save_pretrained(os.path.join(path, "text_encoder"))

    # 4. Scheduler (SD's schedule)
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    ).save_pretrained(os.path.join(path, "scheduler"))

    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        }, f)
    return path
