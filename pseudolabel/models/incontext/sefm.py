"""The SeFM network ("Separating Anything from Image in Context"), in two architectures.

SeFM repaints the answer cell of an in-context canvas (see ``canvas.py``). No public SeFM weights
exist: train a checkpoint with ``pseudolabel.jobs.training.incontext`` (or bring your own in one of these
layouts) and load it with ``SeFM.from_pretrained(dir)``. A checkpoint directory holds ``config.json``
(``SeFMConfig``, whose ``arch`` names the architecture) and ``model.safetensors``.

``SeFM(config)`` builds the architecture ``config.arch`` names; ``from_pretrained`` reads it from the
checkpoint. A ``config.json`` without ``arch`` (written before there were two) is ``sefm-small``.

Architectures (``SeFMConfig.arch``):

- ``sefm`` (default): the published SeFM layout, a NAFNet-style U-Net of triplet self-attention
  (TSA) blocks — 16×16 windowed spatial attention, channel attention and global attention in every
  block — width 32, encoder depths [2, 2, 4, 6], middle 6, decoder depths [3, 2, 4, 6] (deep to
  shallow), heads [1, 2, 4, 4, 8], output = ending conv + input. Its layers are described in
  ``sefm_reference.py``. At the default size it has **204.8 M parameters** (204,791,715, the
  published scale; 202,844,899 of them used by the forward pass, the rest held by the layout and
  unused). Meant for a GPU: a 512×512 canvas (cell 256).
- ``sefm-small``: a lighter restoration-transformer U-Net (Restormer-style blocks, attention across
  channels only), **not** the published layout. At its default size (width 48, encoder [4, 6, 6, 8],
  decoder [4, 6, 6], 4 refinement blocks) it has 25.5 M parameters (25,472,823); the CPU training
  configuration ``train_incontext.small_config`` (width 12, two levels) has about 35 k. Its last
  projection is zero-initialised, so an untrained one returns its input.

``sefm-small`` in detail:

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

Tensors (both): input (B, in_channels, H, W) float32 in [0, 1]; output (B, 3, H, W) in about [0, 1]
(not clamped). H and W need not be multiples of anything: ``sefm-small`` reflect-pads to a multiple of
2^(levels−1), ``sefm`` zero-pads to ``TSAUNet.multiple`` (256 at the default size); outputs are
cropped back.
"""
from __future__ import annotations

import json
import os
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pseudolabel.models.incontext.canvas import Layout
from pseudolabel.models.incontext.sefm_reference import TSAUNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

Arch = Literal["sefm", "sefm-small"]
ARCHS: tuple[str, ...] = ("sefm", "sefm-small")
#: the architecture of a checkpoint whose config.json names none
LEGACY_ARCH = "sefm-small"

#: per architecture, the value of every size field left out (None)
ARCH_DEFAULTS: dict[str, dict] = {
    "sefm": dict(width=32, enc_blocks=[2, 2, 4, 6], middle_blocks=6, dec_blocks=[3, 2, 4, 6],
                 heads=[1, 2, 4, 4, 8], ffn_expansion=2.0, window=16, global_patch=16),
    "sefm-small": dict(width=48, enc_blocks=[4, 6, 6, 8], dec_blocks=[4, 6, 6], refine_blocks=4,
                       heads=[1, 2, 4, 8], ffn_expansion=2.66),
}
#: fields that only one architecture has
ARCH_ONLY: dict[str, tuple[str, ...]] = {"sefm": ("middle_blocks", "window", "global_patch"),
                                         "sefm-small": ("refine_blocks",)}


class SeFMConfig(BaseModel):
    """Architecture and size of a SeFM network, and the canvas it was trained on.

    Size fields left out take the architecture's defaults (``ARCH_DEFAULTS``: the published scale
    for ``sefm``); they are filled in at validation without counting as set (``model_fields_set``
    holds only what was given). Fields of the other architecture must stay unset (None).
    """

    model_config = ConfigDict(extra="forbid")

    arch: Arch = Field("sefm", description="sefm: the published TSA U-Net (GPU scale) | sefm-small: a lighter "
                                           "Restormer-style U-Net (CPU)")
    in_channels: int | None = Field(None, description="3 for the grid canvas, 6 for the vertical (image|target) "
                                                      "canvas; default: the layout's")
    width: int | None = Field(None, ge=4, description="channels at full resolution (sefm 32, sefm-small 48)")
    enc_blocks: list[int] | None = Field(None, description="blocks per encoder level, shallow to deep (sefm "
                                                           "[2, 2, 4, 6]; sefm-small [4, 6, 6, 8], its last level "
                                                           "being the bottleneck)")
    dec_blocks: list[int] | None = Field(None, description="blocks per decoder level; sefm: deep to shallow, one "
                                                           "per encoder level ([3, 2, 4, 6]); sefm-small: shallow "
                                                           "to deep, levels - 1 entries ([4, 6, 6])")
    middle_blocks: int | None = Field(None, ge=0, description="sefm only: blocks at the bottom (6)")
    refine_blocks: int | None = Field(None, ge=0, description="sefm-small only: blocks after the decoder (4)")
    heads: list[int] | None = Field(None, description="attention heads per level; sefm: one more entry, the "
                                                      "middle's ([1, 2, 4, 4, 8]); sefm-small [1, 2, 4, 8]")
    ffn_expansion: float | None = Field(None, gt=0, description="feed-forward hidden / channels (sefm 2, "
                                                                "sefm-small 2.66)")
    window: int | None = Field(None, ge=1, description="sefm only: spatial attention window side (16)")
    global_patch: int | None = Field(None, ge=1, description="sefm only: global attention patch side at one head "
                                                             "(16; heads h use 16 // h)")
    cell: int = Field(256, ge=8, description="canvas cell size the network was trained at (256: a 512 canvas)")
    layout: Layout = Field("grid", description="canvas layout the network was trained on: grid | vertical")

    @model_validator(mode="after")
    def _check(self):
        # 1. the architecture's defaults for what was left out (not marked as set)
        for other, fields in ARCH_ONLY.items():
            if other != self.arch:
                given = [f for f in fields if getattr(self, f) is not None]
                if given:
                    raise ValueError(f"{', '.join(given)}: only for arch {other!r} (this config is {self.arch!r})")
        for key, value in ARCH_DEFAULTS[self.arch].items():
            if getattr(self, key) is None:
                self.__dict__[key] = list(value) if isinstance(value, list) else value
        # 2. shapes
        levels = len(self.enc_blocks)
        if levels < 1:
            raise ValueError("enc_blocks needs at least one level")
        if self.arch == "sefm":
            if len(self.dec_blocks) != levels:
                raise ValueError(f"dec_blocks needs {levels} entries (one per encoder level, deep to shallow)")
            if len(self.heads) != levels + 1:
                raise ValueError(f"heads needs {levels + 1} entries (one per level, then the middle's)")
            channels = [self.width * 2 ** i for i in range(levels + 1)]
        else:
            if len(self.dec_blocks) != levels - 1:
                raise ValueError(f"dec_blocks needs {levels - 1} entries (one per level above the bottleneck)")
            if len(self.heads) != levels:
                raise ValueError(f"heads needs {levels} entries")
            channels = [self.width * 2 ** i for i in range(levels)]
        for i, (c, h) in enumerate(zip(channels, self.heads)):
            if h < 1 or c % h:
                raise ValueError(f"level {i}: {c} channels not divisible by {h} heads")
        # 3. canvas
        if self.layout not in ("grid", "vertical"):
            raise ValueError("layout must be grid or vertical")
        expected = 3 if self.layout == "grid" else 6
        if self.in_channels is None:
            self.__dict__["in_channels"] = expected
        elif self.in_channels != expected:
            raise ValueError(f"layout {self.layout!r} stitches {expected}-channel canvases; in_channels is "
                             f"{self.in_channels} (leave it out to follow the layout)")
        return self

    @property
    def levels(self) -> int:
        assert self.enc_blocks is not None, "validation fills enc_blocks"
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
    """A SeFM network. ``SeFM(config)`` returns the architecture ``config.arch`` names (``SeFMNet`` for
    ``sefm``, ``SeFMSmall`` for ``sefm-small``); ``forward``: (B, in_channels, H, W) in [0, 1] ->
    (B, 3, H, W). Checkpoints: ``save_pretrained`` / ``from_pretrained``."""

    config: SeFMConfig

    def __new__(cls, config: SeFMConfig | None = None, *args, **kwargs):
        if cls is SeFM:
            cls = ARCH_CLASSES[(config or SeFMConfig()).arch]
        return super().__new__(cls)

    # -------------------------------------------------------------------------------------------
    # Checkpoints: config.json (with arch) + model.safetensors
    # -------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str) -> None:
        """Write ``config.json`` (architecture and size) and ``model.safetensors`` to a local directory."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump({"model_type": "sefm", **self.config.model_dump()}, f, indent=2)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt", "arch": self.config.arch})

    @staticmethod
    def load_config(directory: str) -> SeFMConfig:
        """The ``SeFMConfig`` of a checkpoint directory (``arch`` absent: ``sefm-small``)."""
        cfg_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; SeFM has no public weights, "
                                    "train a checkpoint with pseudolabel.jobs.training.incontext")
        with open(cfg_path) as f:
            raw = json.load(f)
        raw.pop("model_type", None)
        raw.setdefault("arch", LEGACY_ARCH)
        return SeFMConfig.model_validate(raw)

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str = "cpu") -> "SeFM":
        """Load a checkpoint written by ``save_pretrained`` into the architecture its config names
        (safetensors only; nothing is unpickled)."""
        from safetensors.torch import load_file

        config = cls.load_config(directory)
        model = SeFM(config)
        if cls is not SeFM and not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {config.arch!r} network, not a {cls.__name__}")
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME), device=map_location), strict=True)
        return model.eval()


class SeFMSmall(SeFM):
    """``sefm-small``: the Restormer-style U-Net described in the module docstring."""

    def __init__(self, config: SeFMConfig | None = None):
        super().__init__()
        self.config = config = config or SeFMConfig(arch="sefm-small")
        if config.arch != "sefm-small":
            raise ValueError(f"SeFMSmall builds arch 'sefm-small', not {config.arch!r}")
        w, levels, e = config.width, config.levels, config.ffn_expansion
        assert (config.in_channels is not None and w is not None and e is not None and config.enc_blocks is not None
                and config.dec_blocks is not None and config.heads is not None
                and config.refine_blocks is not None), "validation fills every sefm-small size field"
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
        assert self.out.bias is not None
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


class SeFMNet(SeFM, TSAUNet):
    """``sefm``: the published TSA U-Net (``sefm_reference.TSAUNet``) with its config and checkpoints.
    The ending conv keeps PyTorch's default initialisation, as published: an untrained network does
    not return its input."""

    def __init__(self, config: SeFMConfig | None = None):
        config = config or SeFMConfig()
        if config.arch != "sefm":
            raise ValueError(f"SeFMNet builds arch 'sefm', not {config.arch!r}")
        assert (config.in_channels is not None and config.width is not None and config.enc_blocks is not None
                and config.middle_blocks is not None and config.dec_blocks is not None and config.heads is not None
                and config.ffn_expansion is not None and config.window is not None
                and config.global_patch is not None), "validation fills every sefm size field"
        TSAUNet.__init__(self, in_channels=config.in_channels, width=config.width, enc_blocks=config.enc_blocks,
                         middle_blocks=config.middle_blocks, dec_blocks=config.dec_blocks, heads=config.heads,
                         expansion=config.ffn_expansion, window=config.window, global_patch=config.global_patch)
        self.config = config


ARCH_CLASSES: dict[str, type[SeFM]] = {"sefm": SeFMNet, "sefm-small": SeFMSmall}


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
