"""MAE branch pieces (design.md §2.4): random masking, the light decoder and the reconstruction target."""
from collections import OrderedDict
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerNorm


def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the lowest-noise tokens; the class token (slot 0) is always kept.

    x [B, 1+L, W], noise [B, 1+L] ~ U[0,1) -> kept [B, K+1, W] (class first), mask [B, 1+L] (1 = removed),
    ids_restore [B, 1+L].
    """
    B, N, W = x.shape
    len_keep = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, device=x.device) if noise is None else noise.to(x.device, torch.float32).clone()
    noise[:, 0] = -1.0
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, W))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images [B, 3, H, W] -> [B, L, p*p*3], pixel order (p, q, c) inside a patch, patches row-major."""
    B, C, H, W = images.shape
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, C, h, patch_size, w, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, patch_size * patch_size * C)


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (MAE convention) -> [grid_size**2 (+1), dim]; the class slot is zeros."""
    def embed_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    emb = np.concatenate([embed_1d(dim // 2, grid_w), embed_1d(dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


class DecoderAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DecoderBlock(nn.Module):
    """Pre-LN ViT block with exact GELU and LayerNorm eps 1e-6 (timm layout: norm1, attn.qkv, attn.proj, norm2, mlp)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = DecoderAttention(dim, heads)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("fc1", nn.Linear(dim, hidden)), ("act", nn.GELU()),
                                              ("fc2", nn.Linear(hidden, dim))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAEDecoder(nn.Module):
    """``vis_mae_decoder``: K kept-patch tokens [B, K, W] + ids_restore [B, 1+L] -> pixel predictions [B, L, p*p*3]."""

    def __init__(self, in_width: int, num_patches: int, patch_size: int, width: Optional[int] = None,
                 depth: int = 3, heads: int = 8):
        super().__init__()
        width = width or in_width // 2
        grid = int(round(num_patches ** 0.5))
        self.decoder_embed = nn.Linear(in_width, width, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(width, grid).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([DecoderBlock(width, heads) for _ in range(depth)])
        self.decoder_norm = LayerNorm(width, eps=1e-6)
        self.decoder_pred = nn.Linear(width, patch_size ** 2 * 3, bias=True)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        B, K, _ = tokens.shape
        x = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)      # mean token in the class slot
        x = self.decoder_embed(x)                                             # [B, 1+K, Wd]
        n_masked = ids_restore.shape[1] - x.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, n_masked, -1)], dim=1)   # [B, 1+L, Wd]
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))    # un-shuffle
        x = x + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]
