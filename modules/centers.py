"""The learnable-center block (``semantic_layer2``, design.md §2.3) and the MAE reconstruction head (design.md §2.4).

G learnable centers gather the L patch tokens into G group tokens; every patch is assigned to exactly one center
(a hard, straight-through assignment), and each group token is the mean of its patches, refined by an MLP.
"""
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import nn

from .layers import LayerNorm, MultiheadAttention, QuickGELU, clip_mlp, quick_gelu

GUMBEL_TAU = 0.9


def sample_gumbel(like: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise shaped like ``like``, in fp32."""
    return -torch.empty_like(like, dtype=torch.float32).exponential_().log()


class CrossAttentionBlock(nn.Module):
    """Centers attend to [centers, patches].  q [B, G, W], x [B, L, W] -> [B, G, W]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_x = LayerNorm(width)
        self.ln_k = LayerNorm(width)
        self.mlp = clip_mlp(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(torch.cat([q, x], dim=1))  # [B, G+L, W]; the patches are not normalised before this
        q = q + self.attn(self.ln_x(q), kv)
        return q + self.mlp(self.ln_2(q))


class LearnableCenterBlock(nn.Module):
    """``semantic_layer2``: patches [B, L, W] -> group tokens [B, G, W], hard_attn [B, G, L], soft_attn [B, G, L]."""

    def __init__(self, width: int, heads: int, num_centers: int = 8, num_cross_layers: int = 2):
        super().__init__()
        self.semantic_center = nn.Parameter(torch.empty(num_centers, width))
        nn.init.trunc_normal_(self.semantic_center, std=0.02)
        self.norm = LayerNorm(width)
        self.cross_att = nn.ModuleList([CrossAttentionBlock(width, heads) for _ in range(num_cross_layers)])
        self.cross_ln = LayerNorm(width)
        # 1x1 grouped convs over channels = a block-diagonal linear map applied to every token
        self.k_conv = nn.Conv1d(width, width, kernel_size=1, groups=heads, bias=False)
        self.v_conv = nn.Conv1d(width, width, kernel_size=1, groups=heads, bias=False)
        self.k_ln = LayerNorm(width)
        self.proj_o = nn.Sequential(OrderedDict([
            ("ln", LayerNorm(width)),
            ("mlp", nn.Sequential(OrderedDict([
                ("fc1", nn.Linear(width, 4 * width)),
                ("act", nn.GELU()),
                ("fc2", nn.Linear(4 * width, width)),
            ]))),
            ("act", QuickGELU()),  # the 2022 block ends with a QuickGELU after the MLP
        ]))

    def forward(self, x: torch.Tensor, gumbel_noise: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        q = self.semantic_center.unsqueeze(0).expand(B, -1, -1).to(x.dtype)   # [B, G, W]
        for block in self.cross_att:
            q = block(q, x)
        q = self.cross_ln(q)

        xn = self.norm(x).transpose(1, 2)                                     # [B, W, L]
        k = self.k_ln(self.k_conv(xn).transpose(1, 2))                        # [B, L, W]
        v = self.v_conv(xn).transpose(1, 2)                                   # [B, L, W]
        hard_attn, soft_attn = self.assign(q, k, gumbel_noise)               # [B, G, L] fp32 both

        out = (hard_attn.to(v.dtype) @ v) / hard_attn.sum(dim=-1, keepdim=True).clamp(min=1).to(v.dtype)
        groups = self.proj_o(q + out)                                         # [B, G, W], mean of assigned patches
        return groups, hard_attn, soft_attn

    def assign(self, q: torch.Tensor, k: torch.Tensor, gumbel_noise: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Hard (straight-through) and soft assignment of patches to centers, q [B, G, W], k [B, L, W] ->
        hard_attn, soft_attn [B, G, L], always in fp32 outside autocast: the logits are unscaled sums over W, and
        in bf16 a ViT-B has ties and flipped argmaxes on a few percent of its patches."""
        with torch.autocast(q.device.type, enabled=False):
            logits = q.float() @ k.float().transpose(1, 2)                    # [B, G, L], no scaling
            soft_attn = logits.softmax(dim=1)                                 # over centers: each patch picks one
            if self.training:
                noise = sample_gumbel(logits) if gumbel_noise is None else gumbel_noise.float()
                soft = ((logits + noise) / GUMBEL_TAU).softmax(dim=1)
            else:
                soft = soft_attn
            hard = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
            hard_attn = hard - soft.detach() + soft                           # straight-through estimator
        return hard_attn, soft_attn


class ReconstructLayer(nn.Module):
    """``reconstruct_layer2``: one token per kept patch from the groups it was assigned to.

    hard_attn [B, G, K], groups [B, G, W] -> [B, K, W].
    """

    def __init__(self, num_centers: int):
        super().__init__()
        self.rec_proj_a = nn.Sequential(OrderedDict([("a_fc", nn.Linear(num_centers, num_centers))]))

    def forward(self, hard_attn: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        mix = self.rec_proj_a(hard_attn.transpose(1, 2))                      # [B, K, G]
        return quick_gelu(mix @ groups)
