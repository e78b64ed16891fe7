"""BEiT-3 multiway encoder (torchscale layout), with the original parameter names.

The module tree mirrors torchscale's ``BEiT3`` so a checkpoint's ``mm_extractor.beit3.*`` tensors load
with no renaming:

    text_embed.weight                                   (vocab, D)
    vision_embed.proj.{weight,bias}                     16 px patches
    vision_embed.{cls_token,mask_token}                 (1, 1, D)
    encoder.embed_positions.A.weight                    (num_patches + 1 + 2, D)   vision positions
    encoder.embed_positions.B.weight                    (max_source_positions, D)  text positions
    encoder.layers.N.self_attn.{q,k,v,out}_proj.{A,B}.*
    encoder.layers.N.self_attn.inner_attn_ln.{A,B}.*    sub-LN before the output projection
    encoder.layers.N.self_attn_layer_norm.{A,B}.*
    encoder.layers.N.ffn.{A,B}.{fc1,ffn_layernorm,fc2}.*
    encoder.layers.N.final_layer_norm.{A,B}.*
    encoder.layer_norm.{A,B}.*

Multiway: every ``.A`` module processes the vision tokens (the first ``1 + num_patches`` = 197 positions
at 224² / 16 px), every ``.B`` module the text tokens after them. Positions start at 2 in both tables
(the fairseq convention). Text padding is a key padding mask; padded tokens are also zeroed after the
embedding, as in the reference.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

POSITION_OFFSET = 2


@dataclass
class Beit3Config:
    """Shape of a BEiT-3 encoder. ``large`` is EVF-SAM's ``mm_extractor_scale: large``."""

    embed_dim: int = 1024
    layers: int = 24
    heads: int = 16
    ffn_dim: int = 4096
    vocab_size: int = 64010
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    max_source_positions: int = 1024
    layernorm_eps: float = 1e-5

    @classmethod
    def preset(cls, scale: str) -> "Beit3Config":
        if scale == "large":
            return cls()
        if scale == "base":
            return cls(embed_dim=768, layers=12, heads=12, ffn_dim=3072)
        raise ValueError(f"unknown BEiT-3 scale {scale!r}; expected 'base' or 'large'")

    @property
    def num_vision_tokens(self) -> int:
        """Class token + patches: 197 at 224² with 16 px patches (the multiway split position)."""
        return (self.img_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict:
        return asdict(self)


class Multiway(nn.Module):
    """Two copies of a module: ``A`` for positions ``[:split]`` (vision), ``B`` for ``[split:]`` (text)."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.A = a
        self.B = b

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """x: (N, L, ...) ; split: -1 = all A, 0 = all B, else the first index handled by B."""
        if split == -1:
            return self.A(x)
        if split == 0:
            return self.B(x)
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


def _multiway_ln(dim: int, eps: float) -> Multiway:
    return Multiway(nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps))


def _multiway_linear(d_in: int, d_out: int) -> Multiway:
    return Multiway(nn.Linear(d_in, d_out), nn.Linear(d_in, d_out))


class VisionEmbedding(nn.Module):
    """(N, 3, S, S) float in [-1, 1] -> (N, 1 + (S/16)², D): class token then patch tokens."""

    def __init__(self, cfg: Beit3Config):
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"BEiT-3 input must be {self.img_size}², got {tuple(pixels.shape[-2:])}")
        x = self.proj(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class FeedForward(nn.Module):
    """fc1 -> GELU -> sub-LN -> fc2."""

    def __init__(self, dim: int, ffn_dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x).float()).to(x.dtype)
        return self.fc2(self.ffn_layernorm(x))


class MultiwayAttention(nn.Module):
    """Self-attention with multiway q/k/v/out projections and a sub-LN before the output projection."""

    def __init__(self, cfg: Beit3Config):
        super().__init__()
        d = cfg.embed_dim
        self.heads = cfg.heads
        self.k_proj = _multiway_linear(d, d)
        self.v_proj = _multiway_linear(d, d)
        self.q_proj = _multiway_linear(d, d)
        self.out_proj = _multiway_linear(d, d)
        self.inner_attn_ln = _multiway_ln(d, cfg.layernorm_eps)

    def forward(self, x: torch.Tensor, split: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (N, L, D); key_padding_mask: (N, L) bool, True = padded (never attended to)."""
        n, length, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x, split)), heads(self.k_proj(x, split)), heads(self.v_proj(x, split))
        mask = None
        if key_padding_mask is not None:
            mask = (~key_padding_mask)[:, None, None, :]  # True = attend
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(n, length, d)
        return self.out_proj(self.inner_attn_ln(attn, split), split)


class EncoderLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + FFN(LN(x)); every norm and weight multiway."""

    def __init__(self, cfg: Beit3Config):
        super().__init__()
        self.self_attn = MultiwayAttention(cfg)
        self.self_attn_layer_norm = _multiway_ln(cfg.embed_dim, cfg.layernorm_eps)
        self.ffn = Multiway(FeedForward(cfg.embed_dim, cfg.ffn_dim, cfg.layernorm_eps),
                            FeedForward(cfg.embed_dim, cfg.ffn_dim, cfg.layernorm_eps))
        self.final_layer_norm = _multiway_ln(cfg.embed_dim, cfg.layernorm_eps)

    def forward(self, x: torch.Tensor, split: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x, split), split, key_padding_mask)
        return x + self.ffn(self.final_layer_norm(x, split), split)


class Encoder(nn.Module):
    def __init__(self, cfg: Beit3Config):
        super().__init__()
        self.embed_positions = Multiway(
            nn.Embedding(cfg.num_vision_tokens + POSITION_OFFSET, cfg.embed_dim),
            nn.Embedding(cfg.max_source_positions, cfg.embed_dim),
        )
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.layers)])
        self.layer_norm = _multiway_ln(cfg.embed_dim, cfg.layernorm_eps)


class BEiT3(nn.Module):
    """The fused vision-language encoder.

    forward(visual_tokens (N, 3, 224, 224) float in [-1, 1], textual_tokens (N, L) int64 XLM-R ids,
    text_padding_position (N, L) bool, True = padding) -> (N, 197 + L, D) float, the final hidden states
    (vision tokens first). EVF-SAM uses token 0 (the vision class token after fusion).
    """

    def __init__(self, cfg: Beit3Config):
        super().__init__()
        self.config = cfg
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, visual_tokens: torch.Tensor, textual_tokens: torch.Tensor,
                text_padding_position: torch.Tensor | None = None) -> torch.Tensor:
        # 1. embed both modalities; vision first, so the multiway split is the vision length
        x_img = self.vision_embed(visual_tokens)
        x_txt = self.text_embed(textual_tokens)
        split = x_img.shape[1]
        if x_txt.shape[1] + POSITION_OFFSET > self.config.max_source_positions:
            raise ValueError(f"prompt of {x_txt.shape[1]} tokens exceeds max_source_positions")
        # 2. positions start at 2 in both tables
        dev = x_img.device
        pos_img = self.encoder.embed_positions.A(torch.arange(split, device=dev) + POSITION_OFFSET)
        pos_txt = self.encoder.embed_positions.B(torch.arange(x_txt.shape[1], device=dev) + POSITION_OFFSET)
        x = torch.cat([x_img + pos_img, x_txt + pos_txt], dim=1)
        # 3. key padding mask over the joint sequence; padded positions zeroed as in the reference
        padding = None
        if text_padding_position is not None:
            padding = torch.cat([torch.zeros(x_img.shape[:2], dtype=torch.bool, device=dev),
                                 text_padding_position.to(torch.bool)], dim=1)
            x = x * (~padding).unsqueeze(-1).to(x.dtype)
        # 4. layers and the final multiway norm
        for layer in self.encoder.layers:
            x = layer(x, split, padding)
        return self.encoder.layer_norm(x, split)


class Beit3Wrapper(nn.Module):
    """Holds ``beit3`` so parameter names read ``mm_extractor.beit3.*`` as in the checkpoints."""

    def __init__(self, cfg: Beit3Config):
        super().__init__()
        self.beit3 = BEiT3(cfg)
