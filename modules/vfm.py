"""DINO and DINOv2 vision transformers: the second vision models ("VFMs") of the training-free segmenters that use
one (ProxyCLIP, CASS; design.md §14).

    vfm = VisionTransformerVFM.from_state_dict(state_dict)   # the official checkpoint layout; every size inferred
    vfm.features(images)          # [B, 3, H, W] -> [B, C, H/p, W/p]   last block output after the final norm
    vfm.last_block_keys(images)   # [B, 3, H, W] -> [B, heads, 1+N, 64] keys of the last block's attention

``images`` are ImageNet-normalised. One class covers both families, told apart by their tensors:

- DINO (Caron et al. 2021; ``dino_{deitsmall,vitbase}{8,16}_pretrain.pth``): blocks x + attn(norm1(x)),
  x + mlp(norm2(x)); LayerNorm eps 1e-6, exact GELU, qkv with bias, head dimension 64.
- DINOv2 (Oquab et al. 2023; the torch.hub checkpoints, ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``): the same
  blocks with layer scale (x + ls1 ⊙ attn(norm1(x)), ...), a ``mask_token`` (unused at inference), optionally
  register tokens placed after the class token without positional term, and for ViT-g a SwiGLU MLP (``w12``,
  ``w3``).

The positional table is resized the way each official model does (``layers.resize_positions``): DINO and DINOv2
without registers bicubic with the +0.1 ``scale_factor``, DINOv2 with registers antialiased bicubic to ``size=``
(the hub's ``interpolate_offset=0`` / ``interpolate_antialias=True`` for its ``_reg`` models). A side that is not a
multiple of the patch size loses its remainder (DINO's convolution drops it; DINOv2's own code refuses such input).
timm implements both families but resizes the table its own way (``size=``, antialiased): on a 336 px input its
DINO features differ from DINO's own by 0.27, so the blocks are written here.
"""
import dataclasses
from collections import OrderedDict
from typing import Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerNorm, resize_positions
from .state_dict import CheckpointError, count_indices, load_into

HEAD_DIM = 64          # every released DINO / DINOv2 model: heads = width / 64
LN_EPS = 1e-6
REQUIRED_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight",
                 "blocks.0.attn.qkv.weight", "norm.weight")


@dataclasses.dataclass(frozen=True)
class VFMConfig:
    family: str              # 'dino' | 'dinov2'
    width: int
    depth: int
    patch_size: int
    grid: int                # side of the stored positional table (224/8 = 28 for DINO ViT-B/8, 518/14 = 37)
    mlp_hidden: int
    num_registers: int = 0
    swiglu: bool = False     # DINOv2 ViT-g

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM


# The released models, by the names of their torch.hub entries (URLs: common/download.py, VFM_URLS).
def _dino(width, patch):
    return VFMConfig('dino', width, 12, patch, 224 // patch, 4 * width)


def _dinov2(width, depth, registers=0, swiglu=False):
    hidden = (int(4 * width * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * width
    return VFMConfig('dinov2', width, depth, 14, 37, hidden, registers, swiglu)


VFM_CONFIGS = {
    'dino_vits8': _dino(384, 8), 'dino_vits16': _dino(384, 16), 'dino_vitb8': _dino(768, 8),
    'dino_vitb16': _dino(768, 16),
    'dinov2_vits14': _dinov2(384, 12), 'dinov2_vitb14': _dinov2(768, 12), 'dinov2_vitl14': _dinov2(1024, 24),
    'dinov2_vitg14': _dinov2(1536, 40, swiglu=True),
    'dinov2_vits14_reg': _dinov2(384, 12, 4), 'dinov2_vitb14_reg': _dinov2(768, 12, 4),
    'dinov2_vitl14_reg': _dinov2(1024, 24, 4), 'dinov2_vitg14_reg': _dinov2(1536, 40, 4, swiglu=True),
}


class Attention(nn.Module):
    """DINO's attention: one ``qkv`` Linear (with bias), ``proj``. x [B, T, C] -> [B, T, C].

    fused: through ``scaled_dot_product_attention`` (DINOv2's code), else softmax(q·kᵀ·d^-½)·v written out
    (DINO's). The two round differently (~1e-6), and ProxyCLIP's hard cut of the similarities at 0 turns such a
    difference into 1e-3 on the rows it flips, so each family computes as its own code does."""

    def __init__(self, width: int, heads: int, fused: bool = True):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def qkv_heads(self, x: torch.Tensor):
        """x [B, T, C] (after norm1) -> q, k, v, each [B, heads, T, C/heads]."""
        return self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)                                              # [B, heads, T, C/heads]
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1, dtype=torch.float32)
            out = attn.to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).flatten(2))


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SwiGLU(nn.Module):
    """DINOv2 ViT-g's MLP: w3(silu(a) ⊙ b) with a, b the halves of w12(x)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); ls = identity for DINO."""

    def __init__(self, cfg: VFMConfig):
        super().__init__()
        W = cfg.width
        self.norm1 = LayerNorm(W, eps=LN_EPS)
        self.attn = Attention(W, cfg.heads, fused=cfg.family == 'dinov2')
        self.norm2 = LayerNorm(W, eps=LN_EPS)
        self.mlp = SwiGLU(W, cfg.mlp_hidden) if cfg.swiglu else nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(W, cfg.mlp_hidden)), ("act", nn.GELU()), ("fc2", nn.Linear(cfg.mlp_hidden, W))]))
        layer_scale = cfg.family == 'dinov2'
        self.ls1 = LayerScale(W) if layer_scale else nn.Identity()
        self.ls2 = LayerScale(W) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, C, H/p, W/p] (remainders dropped by the stride)."""
        return self.proj(images.to(self.proj.weight.dtype))


class VisionTransformerVFM(nn.Module):
    """A DINO or DINOv2 ViT with the official state-dict names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.{i}``, ``norm``; DINOv2 also ``mask_token``, ``register_tokens``, ``ls1``/``ls2``)."""

    def __init__(self, cfg: VFMConfig):
        super().__init__()
        W = cfg.width
        self.config = cfg
        self.patch_size, self.width, self.heads, self.num_registers = cfg.patch_size, W, cfg.heads, cfg.num_registers
        self.patch_embed = PatchEmbed(W, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, W))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, W))
        if cfg.num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, W))
        if cfg.family == 'dinov2':
            self.mask_token = nn.Parameter(torch.zeros(1, W))     # masked-image training only
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = LayerNorm(W, eps=LN_EPS)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """[1+h*w, C]: the positional table for an h×w patch grid, resized as the official model does."""
        registers = self.num_registers > 0   # the hub's _reg models: offset 0, antialiased
        return resize_positions(self.pos_embed[0], h, w, offset=0.0 if registers else 0.1, antialias=registers)

    def tokens(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """images [B, 3, H, W] -> input of the first block [B, 1+R+N, C] (class token, R registers, N = h*w patches
        in row-major order) and the patch grid (h, w)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        x = self.patch_embed(images)                                            # [B, C, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                        # [B, N, C]
        x = torch.cat([self.cls_token.to(x.dtype).expand(len(x), -1, -1), x], dim=1)
        x = x + self.positions(h, w).to(x.dtype)
        if self.num_registers:
            x = torch.cat([x[:, :1], self.register_tokens.to(x.dtype).expand(len(x), -1, -1), x[:, 1:]], dim=1)
        return x, (h, w)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (ImageNet-normalised) -> [B, C, H/p, W/p]: the last block's output through the final
        norm, class and register tokens dropped (DINO's ``get_intermediate_layers(x)[0]``, DINOv2's with
        ``reshape=True``)."""
        x, (h, w) = self.tokens(images)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x[:, 1 + self.num_registers:])                            # [B, N, C]
        return x.transpose(1, 2).unflatten(2, (h, w))

    def last_block_keys(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (ImageNet-normalised) -> [B, heads, 1+N, 64]: the keys of the last block's attention
        (its qkv applied to norm1 of its input), class token first, then the N patches in row-major order;
        DINOv2's register tokens are left out."""
        x, _ = self.tokens(images)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        k = last.attn.qkv_heads(last.norm1(x))[1]                               # [B, heads, 1+R+N, 64]
        return torch.cat([k[:, :, :1], k[:, :, 1 + self.num_registers:]], dim=2)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "VisionTransformerVFM":
        """A DINO / DINOv2 state dict in the official layout -> the model (float32); CheckpointError naming what does
        not fit."""
        with torch.device("meta"):             # every tensor is overwritten: skip the initialisation
            model = cls(config_from_state_dict(state_dict))
        model.to_empty(device="cpu")
        load_into(model, state_dict, strict=True, what=f"{model.config.family.upper()} ViT")
        return model



def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> VFMConfig:
    """Every size from the tensors: width (class token), depth (block indices), patch (kernel), positional table,
    registers, MLP width; DINOv2 has a ``mask_token``, ViT-g a SwiGLU MLP (``mlp.w12``)."""
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise CheckpointError(f"not a DINO / DINOv2 state dict in the official layout: missing {missing[:4]} "
                              f"(found {len(sd)} keys, e.g. {list(sd)[:3]})")
    width = sd["cls_token"].shape[-1]
    if width % HEAD_DIM:
        raise CheckpointError(f"DINO / DINOv2 width {width} is not a multiple of the head dimension {HEAD_DIM}")
    n = sd["pos_embed"].shape[1] - 1
    grid = round(n ** 0.5)
    if grid * grid != n:
        raise CheckpointError(f"pos_embed has {n} patch positions, not a square grid")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[1 if swiglu else 0]
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return VFMConfig(family="dinov2" if "mask_token" in sd else "dino", width=width,
                     depth=count_indices(sd, r"blocks\.(\d+)\."), patch_size=sd["patch_embed.proj.weight"].shape[-1],
                     grid=grid, mlp_hidden=hidden, num_registers=registers, swiglu=swiglu)


def meta_state_dict(cfg: VFMConfig) -> dict:
    """The tensors (names and shapes, on the meta device: no memory) of a model with ``cfg`` - what a downloaded
    official checkpoint must hold."""
    with torch.device("meta"):
        return VisionTransformerVFM(cfg).state_dict()


def describe(cfg: VFMConfig) -> str:
    """'DINOv2 ViT width 768, 12 blocks, patch 14, 4 registers' (for messages)."""
    return (f"{'DINOv2' if cfg.family == 'dinov2' else 'DINO'} ViT width {cfg.width}, {cfg.depth} blocks, patch "
            f"{cfg.patch_size}" + (f", {cfg.num_registers} registers" if cfg.num_registers else ""))
