"""Transformer building blocks shared by the text tower, the visual tower and the learnable-center block.

Parameter names follow OpenAI CLIP (``attn.in_proj_weight``, ``attn.out_proj``, ``ln_1``, ``mlp.c_fc`` ...) so that
CLIP and SegCLIP checkpoints load unchanged; the computation goes through
``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU) instead of ``nn.MultiheadAttention``.
"""
import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (CLIP convention; keeps bf16/fp16 autocast stable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU (its weights were trained with it)."""
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    """``quick_gelu`` as a module (the MLPs' ``gelu`` entry; it has no parameters, so no state-dict key)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with ``nn.MultiheadAttention``'s parameter layout.

    q_in [B, Tq, W], kv_in [B, Tk, W] (defaults to q_in) -> [B, Tq, W].  Each sample attends only to its own keys
    (design.md §10.1: the 2022 cross-attention mixed samples in training; this is the per-sample behaviour).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q_in: torch.Tensor, kv_in: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        W = q_in.shape[-1]
        if kv_in is None:
            q, k, v = self.qkv_heads(q_in)
        else:
            q = self.split_heads(F.linear(q_in, self.in_proj_weight[:W], self.in_proj_bias[:W]))
            k, v = (self.split_heads(t) for t in
                    F.linear(kv_in, self.in_proj_weight[W:], self.in_proj_bias[W:]).chunk(2, dim=-1))
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, W] -> [B, H, T, W/H] (head j = channels j*W/H ... (j+1)*W/H - 1)."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def qkv_heads(self, x: torch.Tensor):
        """x [B, T, W] (already layer-normed) -> q, k, v, each [B, H, T, W/H]: the in-projection's three thirds,
        for the training-free segmenters, which replace the attention matrix but keep these projections."""
        return tuple(self.split_heads(t) for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head outputs [B, H, T, W/H] -> out_proj of their concatenation [B, T, W]."""
        return self.out_proj(out.transpose(1, 2).flatten(2))


def clip_mlp(width: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(width, width * 4)),
        ("gelu", QuickGELU()),
        ("c_proj", nn.Linear(width * 4, width)),
    ]))


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-LN block.  x [B, T, W] -> [B, T, W]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = clip_mlp(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """CLIP's text transformer: ``resblocks.{i}``.  x [B, T, W] -> [B, T, W] with a causal mask."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


def run_blocks(blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def resize_positions(pos: torch.Tensor, h: int, w: int, offset: float = 0.1, antialias: bool = False) -> torch.Tensor:
    """A ViT's positional table [1+N, W] (class entry first, then a √N×√N patch grid) -> [1+h*w, W] for an h×w
    patch grid: the stored table when the grid is √N×√N, else the class entry and the grid resized bicubically
    (align_corners False) in float32, as DINO does and the CLIP methods (SCLIP and its successors) copied.

    offset > 0: ``scale_factor`` ((h+offset)/√N, (w+offset)/√N), not ``size=`` - the offset keeps the output grid
    h×w under rounding, and the sampling positions are those of that factor (DINO, CLIP, DINOv2 without
    registers: 0.1). offset 0: ``size=(h, w)`` (DINOv2 with registers). antialias: PyTorch's antialiased bicubic
    (PIL's kernel, a = -0.5) instead of a = -0.75 (DINOv2 with registers)."""
    n = pos.shape[0] - 1
    side = math.sqrt(n)
    if (h, w) == (int(side), int(side)):
        return pos
    grid = pos[1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2).float()
    how = dict(scale_factor=((h + offset) / side, (w + offset) / side)) if offset else dict(size=(h, w))
    grid = F.interpolate(grid, mode="bicubic", align_corners=False, antialias=antialias, **how).to(pos.dtype)
    if grid.shape[-2:] != (h, w):   # floor(√N·(g+0.1)/√N) = g for any grid a real image gives
        raise ValueError(f"positional embedding resized to {tuple(grid.shape[-2:])}, expected {(h, w)}")
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)
