"""The SeFM network in its published layout: a NAFNet-style U-Net of triplet self-attention (TSA) blocks.

This is the ``sefm`` architecture of ``sefm.SeFMConfig`` (the default). Tensors are (B, C, H, W) float;
the network maps (B, in_channels, H, W) in [0, 1] to (B, 3, H, W).

Layout (widths and depths for the default configuration, width 32):

1. ``intro``: 3×3 conv, in_channels → width.
2. ``encoders[i]`` (i = 0..3, depths 2, 2, 4, 6): TSA blocks at width·2^i channels with heads
   1, 2, 4, 4; after each level ``downs[i]``: 3×3 conv (no bias) to half the channels, then
   pixel-unshuffle ×2 (channels double, resolution halves).
3. ``middle``: 6 TSA blocks at width·16 channels (512), 8 heads.
4. ``decoders[j]`` (j = 0..3, deep to shallow, depths 3, 2, 4, 6): ``ups[j]``: 1×1 conv (no bias) to
   twice the channels, then pixel-shuffle ×2 (channels halve, resolution doubles); the encoder
   feature of that level is added (additive skip); then the TSA blocks of the level, with that
   level's heads.
5. ``ending``: 3×3 conv, width → 3; the output is ``ending(x)`` plus the input (its last 3 channels
   for a 6-channel input): a global residual.

A TSA block (``TBlock``) is, in order and with no normalisation other than the one named:

- ``att`` (``TSA``): y = conv1×1(x) → channel LayerNorm → **spatial** attention in non-overlapping
  ``window``×``window`` windows (16×16) → **channel** attention → **global** attention →
  conv1×1, added to x (the block's only attention residual: the three attentions run in sequence);
- ``conv``: a 1×1 conv (no residual);
- ``dp_ffn`` (``FFN``): x + conv1×1(GELU(conv1×1(x))), hidden = 2·channels.

The three attentions:

- spatial (``SAttention``): per window of N = window² pixels, q, k, v each from a 3×3 conv (a full
  conv, despite its name ``depthwise``; bias; zero padding at the window's border), ReLU and a 1×1
  conv (bias); ``heads`` heads of channels/heads dims, softmax(q·kᵀ/√d + relative position bias)
  with a learned ((2·window−1)², heads) bias table indexed by the pixel offset; then a linear
  projection.
- channel (``CAttention``): 1×1 conv → q, k, v (no bias), 3×3 depthwise conv (no bias), per head
  L2-normalised q and k over pixels, softmax(q·kᵀ · temperature) between channels, 1×1 conv out.
- global (``GAttention``): pixel-unshuffle by s = ``global_patch`` // heads (16, 8, 4, 4, 2 for
  heads 1, 2, 4, 4, 8), every s×s patch is one token of channels·s² dims; a linear map (no bias) to
  q, k, v of 64 dims per head, softmax(q·kᵀ/8) over all tokens of the image, a linear map back (with
  bias), pixel-shuffle. It attends across the whole canvas (as the channel attention pools over it),
  so the answer cell can see the demonstration cells.

Module and parameter names follow the layout, so a state dict of it loads (``load_layout_state_dict``;
the window attention's ``relative_position_index`` buffers are recomputed here, not stored).
Parameters that the layout holds but its forward pass does not use are kept, so that such state dicts
load and parameter counts agree: ``GAttention.conv1_1`` / ``conv1_2`` (1×1 convs to and
from channels/s) and ``FFN.norm``. At width 32 the network has 204,791,715 parameters (about 205 M),
of which 202,844,899 are used by the forward pass.

Inputs of any size: the input is zero-padded (bottom, right) to a multiple of
``TSAUNet.multiple`` — the least size for which every level's windows and global patches tile the
feature map (256 for the default configuration, so a 512×512 canvas is not padded) — and the output
cropped back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of (B, C, H, W) at each pixel (biased variance, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=1, keepdim=True)
        var = (x - mu).pow(2).mean(dim=1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class SepConv2d(nn.Module):
    """3×3 conv C → C (bias), ReLU, 1×1 conv C → out (bias): (n, C, h, w) -> (n, out, h, w).

    The first conv is named ``depthwise`` in this layout but is a full (ungrouped) 3×3 conv."""

    def __init__(self, channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.pointwise = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(F.relu(self.depthwise(x)))


class ConvProjection(nn.Module):
    """q, k, v of window attention, each from its own separable conv over the window's pixels."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = SepConv2d(channels, channels)
        self.to_k = SepConv2d(channels, channels)
        self.to_v = SepConv2d(channels, channels)

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, C, w, w) windows -> q, k, v, each (n, heads, w·w, C/heads), pixels in row-major order."""
        n, c, h, w = windows.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, self.heads, c // self.heads, h * w).transpose(2, 3)

        return split(self.to_q(windows)), split(self.to_k(windows)), split(self.to_v(windows))


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) int64 index into a ((2·window−1)², heads) bias table, N = window²: entry (i, j) encodes
    the (dy, dx) offset between pixels i and j of a window as (dy + window − 1)·(2·window − 1) + dx + window − 1."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + window - 1) * (2 * window - 1) + (rel[1] + window - 1)


class SAttention(nn.Module):
    """Multi-head attention inside each window, with a learned relative position bias.

    ``forward``: (n, C, w, w) windows -> (n, w·w, C) tokens (row-major pixels).
    """

    #: (w·w, w·w) int64 buffer: index into the bias table for each (query, key) pair
    relative_position_index: torch.Tensor

    def __init__(self, channels: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.window = window
        self.scale = (channels // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = ConvProjection(channels, heads)
        self.proj = nn.Linear(channels, channels)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) additive attention bias."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.heads).permute(2, 0, 1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(windows)
        bias = self.position_bias().to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (n, heads, N, d)
        n, heads, tokens, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(n, tokens, heads * d))


class CAttention(nn.Module):
    """Multi-head attention between channels (transposed attention). (B, C, H, W) -> same."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(channels * 3, channels * 3, 3, padding=1, groups=channels * 3, bias=False)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        out = attn.softmax(dim=-1) @ v
        return self.project_out(out.reshape(b, c, h, w))


class GAttention(nn.Module):
    """Attention over all s×s patches of the image (s = global_patch // heads). (B, C, H, W) -> same."""

    dim_head = 64

    def __init__(self, channels: int, heads: int, global_patch: int = 16):
        super().__init__()
        s = max(1, global_patch // heads)
        self.heads, self.shuffle = heads, s
        inner = self.dim_head * heads
        # held by the layout, unused by its forward pass (see the module docstring)
        self.conv1_1 = nn.Conv2d(channels, max(1, channels // s), 1)
        self.conv1_2 = nn.Conv2d(max(1, channels // s), channels, 1)
        self.to_qkv = nn.Linear(channels * s * s, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, channels * s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pixel_unshuffle(x, self.shuffle)
        b, c, h, w = y.shape
        tokens = y.flatten(2).transpose(1, 2)  # (B, h·w, C·s²)
        q, k, v = (t.reshape(b, h * w, self.heads, self.dim_head).transpose(1, 2)
                   for t in self.to_qkv(tokens).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.dim_head ** -0.5)
        out = self.to_out(out.transpose(1, 2).reshape(b, h * w, self.heads * self.dim_head))
        return F.pixel_shuffle(out.transpose(1, 2).reshape(b, c, h, w), self.shuffle)


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, H, W) -> (B·(H/w)·(W/w), C, w, w), windows in row-major order of the image."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, c, window, window)


def from_window_tokens(tokens: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``to_windows`` for tokens: (B·nW, w·w, C) -> (B, C, H, W)."""
    c = tokens.shape[-1]
    x = tokens.reshape(b, h // window, w // window, window, window, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class TSA(nn.Module):
    """Triplet self-attention: x + conv(global(channel(spatial(LN(conv(x)))))). (B, C, H, W) -> same."""

    def __init__(self, channels: int, heads: int, window: int = 16, global_patch: int = 16):
        super().__init__()
        self.window = window
        self.conv1_1 = nn.Conv2d(channels, channels, 1)
        self.norm = LayerNorm2d(channels)
        self.satt = SAttention(channels, heads, window)
        self.catt = CAttention(channels, heads)
        self.gatt = GAttention(channels, heads, global_patch)
        self.conv1_2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv1_1(x))
        b, _, h, w = y.shape
        y = from_window_tokens(self.satt(to_windows(y, self.window)), self.window, b, h, w)
        y = self.gatt(self.catt(y))
        return self.conv1_2(y) + x


class FFN(nn.Module):
    """x + conv1×1(GELU(conv1×1(x))), hidden = expansion · channels. ``norm`` is held, not used."""

    def __init__(self, channels: int, expansion: float = 2.0):
        super().__init__()
        hidden = max(1, int(channels * expansion))
        self.norm = LayerNorm2d(channels)  # held by the layout, unused by its forward pass
        self.linear = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.GELU())
        self.conv1_1 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1_1(self.linear(x)) + x


class TBlock(nn.Module):
    """One TSA block: TSA, a 1×1 conv, the feed-forward. (B, C, H, W) -> same."""

    def __init__(self, channels: int, heads: int, expansion: float = 2.0, window: int = 16, global_patch: int = 16):
        super().__init__()
        self.att = TSA(channels, heads, window, global_patch)
        self.conv = nn.Conv2d(channels, channels, 1)
        self.dp_ffn = FFN(channels, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dp_ffn(self.conv(self.att(x)))


class TSAUNet(nn.Module):
    """The U-Net of TSA blocks (see the module docstring).

    Args:
        in_channels: 3 (or 6 for two stacked RGB canvases; the residual uses the last 3).
        width: channels at full resolution.
        enc_blocks: TSA blocks per encoder level (shallow to deep).
        middle_blocks: TSA blocks at the bottom.
        dec_blocks: TSA blocks per decoder level, **deep to shallow** (one per encoder level).
        heads: heads per encoder level, then the middle's (len = levels + 1); decoder levels use
            the heads of the encoder level they join.
        expansion: feed-forward hidden width / channels.
        window: spatial attention window side; global_patch: global attention patch side at 1 head.
    """

    def __init__(self, in_channels: int = 3, width: int = 32, enc_blocks=(2, 2, 4, 6), middle_blocks: int = 6,
                 dec_blocks=(3, 2, 4, 6), heads=(1, 2, 4, 4, 8), expansion: float = 2.0, window: int = 16,
                 global_patch: int = 16):
        super().__init__()
        levels = len(enc_blocks)
        if len(dec_blocks) != levels or len(heads) != levels + 1:
            raise ValueError("dec_blocks needs one entry per encoder level and heads one more (the middle's)")
        self.levels, self.window, self.global_patch = levels, window, global_patch
        self.heads = list(heads)

        def stage(ch: int, n: int, h: int) -> nn.Sequential:
            return nn.Sequential(*[TBlock(ch, h, expansion, window, global_patch) for _ in range(n)])

        self.intro = nn.Conv2d(in_channels, width, 3, padding=1)
        self.ending = nn.Conv2d(width, 3, 3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        ch = width
        for i, n in enumerate(enc_blocks):
            self.encoders.append(stage(ch, n, heads[i]))
            self.downs.append(nn.Sequential(nn.Conv2d(ch, ch // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2)))
            ch *= 2
        self.middle = stage(ch, middle_blocks, heads[-1])
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for j, n in enumerate(dec_blocks):
            self.ups.append(nn.Sequential(nn.Conv2d(ch, ch * 2, 1, bias=False), nn.PixelShuffle(2)))
            ch //= 2
            self.decoders.append(stage(ch, n, heads[levels - 1 - j]))

    @property
    def multiple(self) -> int:
        """Input sides are padded to a multiple of this: at level l (l = levels: the middle) the
        feature map, 2^l times smaller, must tile into windows and into global patches."""
        m = 1
        for level in range(self.levels + 1):
            shuffle = max(1, self.global_patch // self.heads[level])
            m = math.lcm(m, 2 ** level * math.lcm(self.window, shuffle))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        xp = F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x
        feat = self.intro(xp)
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            feat = enc(feat)
            skips.append(feat)
            feat = down(feat)
        feat = self.middle(feat)
        for dec, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            feat = dec(up(feat) + skip)
        out = self.ending(feat) + xp[:, -3:]
        return out[:, :, :h, :w]


def load_layout_state_dict(net: TSAUNet, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict of this layout strictly, ignoring stored ``relative_position_index`` buffers
    (they only depend on the window size and are rebuilt by ``SAttention``)."""
    net.load_state_dict({k: v for k, v in state.items() if not k.endswith(".relative_position_index")}, strict=True)
