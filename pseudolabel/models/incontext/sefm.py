"""The SeFM network ("Separating Anything from Image in Context"): a U-Net of attention blocks.

SeFM repaints the answer cell of an in-context canvas (see ``canvas.py``). No public SeFM weights
exist: train a checkpoint with ``pseudolabel.jobs.train_incontext`` (or bring your own in this
layout) and load it with ``SeFM.from_pretrained(dir)``. A checkpoint directory holds
``config.json`` (``SeFMConfig``) and ``model.safetensors``.

Architecture (restoration-transformer U-Net):

1. embed: 3×3 conv, ``in_channels`` → ``width``.
2. encoder: ``len(enc_blocks)`` levels; level i runs ``enc_blocks[i]`` attention blocks at
   ``width·2^i`` channels with ``heads[i]`` heads; between levels a 3×3 conv halves the channels and a
   pixel-unshuffle (×2) folds 2×2 pixels into channels (so channels double, resolution halves). The
   last encoder level is the bottleneck.
3. decoder: for each level from deep to shallow, a 3×3 conv doubles the channels and a pixel-shuffle
   (×2) unfolds them (channels halve, resolution doubles); the encoder feature of that level is added
   (additive skip); ``dec_blocks[i]`` attention blocks follow.
4. refinement: ``refine_blocks`` attention blocks at full resolution, then a 3×3 conv to 3 channels.
   That last projection is zero-initialised and the result is added to the last 3 input channels
   (global residual), so the untrained network returns its input canvas — the query in the answer cell.

An attention block is x + MDTA(LN(x)), then x + GDFN(LN(x)):
- MDTA (multi-Dconv head transposed attention): 1×1 conv → q, k, v; 3×3 depthwise conv on each;
  per head, L2-normalised q and k over pixels, attention between *channels*
  softmax(q·kᵀ · temperature) (C/heads × C/heads, cost linear in pixels), output 1×1 conv.
- GDFN (gated depthwise feed-forward): 1×1 conv to 2·hidden, 3×3 depthwise conv, GELU(x1)·x2,
  1×1 conv back; hidden = ffn_expansion · channels.
- LN: layer norm over channels at each pixel, with bias.

Tensors: input (B, in_channels, H, W) float32 in [0, 1]; output (B, 3, H, W) in about [0, 1] (not
clamped). H and W need not be multiples of 2^(levels−1): the input is reflect-padded and the output
cropped back.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class SeFMConfig(BaseModel):
    """Size of a SeFM network. Defaults are the published scale; tests and CPU training use tiny ones."""

    model_config = ConfigDict(extra="forbid")

    in_channels: int | None = Field(None, description="3 for the grid canvas, 6 for the vertical (image|target) "
                                                      "canvas; default: the layout's")
    width: int = Field(48, ge=4, description="channels at full resolution")
    enc_blocks: list[int] = Field(default_factory=lambda: [4, 6, 6, 8],
                                  description="attention blocks per encoder level; the last level is the bottleneck")
    dec_blocks: list[int] = Field(default_factory=lambda: [4, 6, 6],
                                  description="attention blocks per decoder level, shallow to deep (len = levels - 1)")
    refine_blocks: int = Field(4, ge=0, description="attention blocks after the decoder")
    heads: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], description="attention heads per level")
    ffn_expansion: float = Field(2.66, gt=0)
    cell: int = Field(256, ge=8, description="canvas cell size the network was trained at")
    layout: str = Field("grid", description="canvas layout the network was trained on: grid | vertical")

    @model_validator(mode="after")
    def _check(self):
        levels = len(self.enc_blocks)
        if levels < 1:
            raise ValueError("enc_blocks needs at least one level")
        if len(self.dec_blocks) != levels - 1:
            raise ValueError(f"dec_blocks needs {levels - 1} entries (one per level above the bottleneck)")
        if len(self.heads) != levels:
            raise ValueError(f"heads needs {levels} entries")
        for i, h in enumerate(self.heads):
            if (self.width * 2 ** i) % h:
                raise ValueError(f"level {i}: {self.width * 2 ** i} channels not divisible by {h} heads")
        if self.layout not in ("grid", "vertical"):
            raise ValueError("layout must be grid or vertical")
        channels = 3 if self.layout == "grid" else 6
        if self.in_channels is None:
            self.in_channels = channels
        elif self.in_channels != channels:
            raise ValueError(f"layout {self.layout!r} stitches {channels}-channel canvases; in_channels is "
                             f"{self.in_channels} (leave it out to follow the layout)")
        return self

    @property
    def levels(self) -> int:
        return len(self.enc_blocks)


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channel axis of (B, C, H, W), with weight and bias."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        x = (x - mu) / torch.sqrt(var + self.eps)
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class TransposedAttention(nn.Module):
    """MDTA: multi-head attention across channels, with depthwise-conv q/k/v. (B, C, H, W) -> same."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.qkv_dw = nn.Conv2d(channels * 3, channels * 3, 3, padding=1, groups=channels * 3)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.reshape(b, c, h, w))


class GatedFeedForward(nn.Module):
    """GDFN: gated depthwise-conv feed-forward. (B, C, H, W) -> same."""

    def __init__(self, channels: int, expansion: float):
        super().__init__()
        hidden = max(1, int(channels * expansion))
        self.proj_in = nn.Conv2d(channels, hidden * 2, 1)
        self.dw = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2)
        self.proj_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dw(self.proj_in(x)).chunk(2, dim=1)
        return self.proj_out(F.gelu(x1) * x2)


class AttentionBlock(nn.Module):
    """x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(self, channels: int, heads: int, expansion: float):
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels)
        self.attn = TransposedAttention(channels, heads)
        self.norm2 = ChannelLayerNorm(channels)
        self.ffn = GatedFeedForward(channels, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Downsample(nn.Module):
    """3×3 conv to C/2, pixel-unshuffle ×2: (B, C, H, W) -> (B, 2C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3×3 conv to 2C, pixel-shuffle ×2: (B, C, H, W) -> (B, C/2, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _stage(channels: int, blocks: int, heads: int, expansion: float) -> nn.Sequential:
    return nn.Sequential(*[AttentionBlock(channels, heads, expansion) for _ in range(blocks)])


class SeFM(nn.Module):
    """The SeFM U-Net. ``forward``: (B, in_channels, H, W) in [0, 1] -> (B, 3, H, W)."""

    def __init__(self, config: SeFMConfig | None = None):
        super().__init__()
        self.config = config = config or SeFMConfig()
        w, levels, e = config.width, config.levels, config.ffn_expansion
        # 1. embedding
        self.embed = nn.Conv2d(config.in_channels, w, 3, padding=1)
        # 2. encoder (the last level is the bottleneck)
        self.encoders = nn.ModuleList(
            [_stage(w * 2 ** i, config.enc_blocks[i], config.heads[i], e) for i in range(levels)])
        self.downs = nn.ModuleList([Downsample(w * 2 ** i) for i in range(levels - 1)])
        # 3. decoder, indexed by level (0 = full resolution)
        self.ups = nn.ModuleList([Upsample(w * 2 ** (i + 1)) for i in range(levels - 1)])
        self.decoders = nn.ModuleList(
            [_stage(w * 2 ** i, config.dec_blocks[i], config.heads[i], e) for i in range(levels - 1)])
        # 4. refinement and zero-initialised output projection (global residual -> identity at init)
        self.refine = _stage(w, config.refine_blocks, config.heads[0], e)
        self.out = nn.Conv2d(w, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def multiple(self) -> int:
        return 2 ** (self.config.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        xp = F.pad(x, (0, pw, 0, ph), mode="reflect" if (ph < h and pw < w) else "replicate") if (ph or pw) else x
        # 1-2. embed and encode, keeping each level's features for the skips
        feat = self.embed(xp)
        skips = []
        for i, enc in enumerate(self.encoders):
            feat = enc(feat)
            if i < len(self.downs):
                skips.append(feat)
                feat = self.downs[i](feat)
        # 3. decode with additive skips
        for i in reversed(range(len(self.decoders))):
            feat = self.decoders[i](self.ups[i](feat) + skips[i])
        # 4. refine, project, global residual on the last 3 input channels
        out = self.out(self.refine(feat)) + xp[:, -3:]
        return out[:, :, :h, :w]

    # -------------------------------------------------------------------------------------------
    # Checkpoints: config.json + model.safetensors
    # -------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str) -> None:
        """Write ``config.json`` and ``model.safetensors`` to a local directory."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump({"model_type": "sefm", **self.config.model_dump()}, f, indent=2)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str = "cpu") -> "SeFM":
        """Load a checkpoint written by ``save_pretrained`` (safetensors only; nothing is unpickled)."""
        from safetensors.torch import load_file

        cfg_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; SeFM has no public weights, "
                                    "train a checkpoint with pseudolabel.jobs.train_incontext")
        with open(cfg_path) as f:
            raw = json.load(f)
        raw.pop("model_type", None)
        model = cls(SeFMConfig.model_validate(raw))
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME), device=map_location), strict=True)
        return model.eval()


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))

