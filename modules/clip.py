"""Plain CLIP ViT (OpenAI state-dict layout) with dense per-token features, for the training-free segmenters.

    clip = CLIP.from_state_dict(state_dict)              # OpenAI layout; every size inferred
    clip.encode_image(images)                            # [B,3,H,W] -> [B,D]   CLIP's image embedding
    clip.encode_text(tokens)                             # [B,T]     -> [B,D]
    clip.encode_dense(images, method='sclip')            # [B,3,H,W] -> [B,1+L,D] every token through ln_post, proj

The towers are built from the layers SegCLIP uses (``modules.layers``; the text tower is SegCLIP's own
``modeling.CLIP``). ``method='clip'`` runs the unmodified last block; ``method='sclip'`` replaces its attention by
SCLIP's correlative self-attention (Wang et al., ECCV 2024; design.md §12), keeping the block's residuals and MLP.
"""
import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .clip_formats import ACTIVATIONS
from .config import SegCLIPConfig, clip_config
from .layers import MultiheadAttention, Transformer, run_blocks
from .modeling import CLIP as CLIPWithText
from .modeling import ViTBase
from .state_dict import CLIP_EXTRA_KEYS, load_into, require_keys

DENSE_METHODS = ('clip', 'sclip')

CLIP_REQUIRED_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "visual.class_embedding",
                      "text_projection", "token_embedding.weight", "positional_embedding", "ln_final.weight")


def correlative_attention(attn: MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's correlative self-attention with ``attn``'s weights.  x [B, T, W] (after ln_1) -> [B, T, W].

    Per head: A = softmax(q qᵀ·s) + softmax(k kᵀ·s), s = head_dim^-½; out = out_proj(A v). Each token attends to
    the tokens that look like it (q·q, k·k) instead of the tokens it queries (q·k), which keeps features local."""
    B, T, W = x.shape
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))   # [B, H, T, W/H]
    scale = q.shape[-1] ** -0.5
    a = (q @ q.transpose(-2, -1) * scale).softmax(dim=-1) + (k @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    return attn.out_proj((a @ v).transpose(1, 2).reshape(B, T, W))


@torch.no_grad()
def round_weights_like_clip_load(model: nn.Module) -> nn.Module:
    """In place: round to float16 and back the tensors OpenAI's ``clip.load(..., jit=False)`` stores in float16
    (``clip.model.convert_weights``: conv / linear weights and biases, attention in-projections, ``proj``,
    ``text_projection``) before it casts the model to float32 on a CPU. A no-op on OpenAI's released weights, which
    are float16 already; it reproduces what code loading through ``clip.load`` computes with other float32 weights
    (the SCLIP reference fixture was recorded that way)."""
    for module in model.modules():
        tensors = []
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            tensors = [module.weight, module.bias]
        elif isinstance(module, MultiheadAttention):
            tensors = [module.in_proj_weight, module.in_proj_bias]
        tensors += [getattr(module, n, None) for n in ("proj", "text_projection")]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.copy_(t.half().to(t.dtype))
    return model


class DenseVisionTransformer(ViTBase):
    """``visual``: CLIP's plain ViT (``transformer.resblocks.{i}``) with dense outputs."""

    def __init__(self, cfg: SegCLIPConfig):
        super().__init__(cfg, Transformer(cfg.vision_width, cfg.vision_layers, cfg.vision_heads))

    def positional_embedding_for(self, h: int, w: int) -> torch.Tensor:
        """[1+h*w, W] as SCLIP resizes it: the stored √N×√N patch grid, bicubic with ``scale_factor`` =
        ((h+0.1)/√N, (w+0.1)/√N) - not ``size=`` - so the sampling positions are those of that factor, which
        differ slightly from SegCLIP's resize to the same grid (``ViTBase.positional_embedding_for``)."""
        pos = self.positional_embedding
        n = pos.shape[0] - 1
        side = math.sqrt(n)
        if (h, w) == (int(side), int(side)):
            return pos
        grid = pos[1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
                             align_corners=False).to(pos.dtype)
        if grid.shape[-2:] != (h, w):   # floor(√N·(g+0.1)/√N) = g for any grid a real image gives
            raise ValueError(f"positional embedding resized to {tuple(grid.shape[-2:])}, expected {(h, w)}")
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)

    def tokens(self, images: torch.Tensor, method: str = 'clip') -> torch.Tensor:
        """images [B, 3, H, W] -> last-block output [B, 1+L, W] (before ln_post)."""
        if method not in DENSE_METHODS:
            raise ValueError(f"unknown dense method {method!r}; choose one of {DENSE_METHODS}")
        blocks = self.transformer.resblocks
        x = run_blocks(blocks[:-1], self.embed(images))
        last = blocks[-1]
        if method == 'clip':
            return last(x)
        x = x + correlative_attention(last.attn, last.ln_1(x))
        return x + last.mlp(last.ln_2(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> CLIP's image embedding [B, D] (class token after ln_post, proj)."""
        x = self.ln_post(self.tokens(images)[:, 0])
        return x @ self.proj.to(x.dtype)


class CLIP(CLIPWithText):
    """OpenAI CLIP ViT: SegCLIP's text tower (``modeling.CLIP``) with the plain visual tower; OpenAI's names."""

    def __init__(self, cfg: SegCLIPConfig):
        super().__init__(cfg, visual=DenseVisionTransformer(cfg))

    @property
    def patch_size(self) -> int:
        return self.visual.patch_size

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], activation: str = 'quick_gelu') -> "CLIP":
        """An OpenAI-layout CLIP ViT state dict (``modules.checkpoint.load_clip_weights`` reads every file format
        into one) -> CLIP; raises CheckpointError naming missing / unexpected / mis-shaped keys.

        ``activation``: the MLP's, which no state dict records: 'quick_gelu' (OpenAI's models) or 'gelu' (most
        open_clip models trained elsewhere; a transformers config.json says which)."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        sd = {k: v for k, v in state_dict.items() if k not in CLIP_EXTRA_KEYS}
        require_keys(sd, *CLIP_REQUIRED_KEYS)
        cfg = clip_config(sd, first_stage_layer=0)   # no center block in a plain CLIP
        with torch.device("meta"):                   # every tensor is overwritten: skip the random init
            model = cls(cfg)
        model.to_empty(device="cpu")
        load_into(model, sd, strict=True, what="CLIP")
        if activation == 'gelu':
            for block in list(model.transformer.resblocks) + list(model.visual.transformer.resblocks):
                block.mlp.gelu = nn.GELU()
        return model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (CLIP-normalised) -> [B, D] (not normalised)."""
        return self.visual(images)

    def encode_dense(self, images: torch.Tensor, method: str = 'clip') -> torch.Tensor:
        """images [B, 3, H, W] -> [B, 1+L, D]: every token (class token first) through ln_post and proj."""
        x = self.visual.tokens(images, method)
        return self.visual.ln_post(x) @ self.visual.proj.to(x.dtype)
