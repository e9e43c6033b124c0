"""NACLIP (Hajimiri, Ben Ayed, Dolz, WACV 2025): neighbour-aware attention in CLIP's last block (design.md §13.2).

    method = NACLIP(clip)                          # arch 'reduced', attn_strategy 'naclip', gaussian_std 5
    feats = method.dense_features(crops, states)   # [B, 3, h, w] -> [B, h/p, w/p, D]

The last visual block is rebuilt around two ideas. Its attention compares keys with keys (a patch attends to the
patches that look like it) and adds a Gaussian bias Ω over the patch grid (it attends to its neighbours):
A = softmax(k kᵀ·s + Ω), s = head_dim^-½. And the block is 'reduced': its output is the attention's output
alone, without the residual stream (which carries the class token's global view into every patch) or the MLP.
The other strategies and the full block are the paper's ablations, kept as knobs.
"""
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from common.errors import UsageError
from .base import Knob, TrainingFreeMethod

ARCHS = ('reduced', 'vanilla')
ATTN_STRATEGIES = ('naclip', 'nonly', 'kk', 'csa', 'vanilla')


def gaussian_window(rows: int, cols: int, std: float) -> torch.Tensor:
    """[rows, cols] float32: exp(-(a² + b²)) on a centred grid scaled by 1/(σ√2), i.e. the Gaussian of σ patches.
    Built as NACLIP builds it (float32 linspace of the scaled ends), so the values equal its own to the bit."""
    kappa = 1 / (std * math.sqrt(2))
    axes = []
    for n in (rows, cols):
        start = -(n - 1) / 2.0
        axes.append(torch.linspace(start * kappa, (start + n - 1) * kappa, n, dtype=torch.float32))
    return torch.exp(-(axes[0][:, None] ** 2 + axes[1][None, :] ** 2))


@functools.lru_cache(maxsize=16)
def neighbourhood_bias(gh: int, gw: int, std: float, device=torch.device('cpu')) -> torch.Tensor:
    """Ω [1+gh*gw, 1+gh*gw] float32 for a gh×gw patch grid (row-major, class token first): for patches (r, c) and
    (r', c') the Gaussian window at offset (r-r', c-c'); 0 in the class token's row and column.

    Cached by everything it depends on (NACLIP's own cache is keyed by the grid alone, so a changed σ kept the
    old Ω); the result is shared: do not modify it in place."""
    window = gaussian_window(2 * gh - 1, 2 * gw - 1, std)
    r = torch.arange(gh).repeat_interleave(gw)                             # [L] row of each patch
    c = torch.arange(gw).repeat(gh)                                        # [L] column of each patch
    omega = window[gh - 1 + r[:, None] - r[None, :], gw - 1 + c[:, None] - c[None, :]]   # [L, L]
    return F.pad(omega, (1, 0, 1, 0)).to(device)


def attention_weights(q: torch.Tensor, k: torch.Tensor, strategy: str,
                      omega: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q, k [B, H, T, d] -> the attention matrix A [B, H, T, T] (float32) of ``strategy``; ``omega`` [T, T]
    (``neighbourhood_bias``) for 'naclip' and 'nonly'. Where NACLIP scales before or after the product is kept
    (it moves the last bit only)."""
    s = q.shape[-1] ** -0.5
    if strategy == 'naclip':
        # Ω is added as is, not scaled with the key-key logits
        logits = (k @ k.transpose(-2, -1)) * s + omega
    elif strategy == 'nonly':
        # Ω alone, scaled per image by s × the mean of |q_i|·|k_j| over heads and token pairs (NACLIP takes
        # one mean over the whole batch, and runs with batch 1 only; per image, batches equal one at a time)
        qn, kn = q.float().norm(dim=-1), k.float().norm(dim=-1)            # [B, H, T]
        scale = s * (qn.mean(dim=-1) * kn.mean(dim=-1)).mean(dim=1)        # [B]
        a = (scale[:, None, None, None] * omega).softmax(dim=-1)           # [B, 1, T, T]: the same for every head
        return a.expand(-1, q.shape[1], -1, -1)
    elif strategy == 'kk':
        logits = (k * s) @ k.transpose(-2, -1)
    elif strategy == 'csa':    # SCLIP's (seg_segmentation/methods/sclip.py)
        qq = ((q @ q.transpose(-2, -1)) * s).softmax(dim=-1, dtype=torch.float32)
        return qq + ((k @ k.transpose(-2, -1)) * s).softmax(dim=-1, dtype=torch.float32)
    elif strategy == 'vanilla':
        logits = (q * s) @ k.transpose(-2, -1)
    else:
        raise ValueError(f'unknown attention strategy {strategy!r}')
    return logits.softmax(dim=-1, dtype=torch.float32)


class NACLIP(TrainingFreeMethod):
    name = 'naclip'
    year = 2025
    summary = ('neighbour-aware key-key attention, last block without residual or MLP (no PAMR, as in the '
               'paper\'s table; --pamr_steps 10 as in its README\'s)')
    paper = ('Hajimiri, Ben Ayed, Dolz, WACV 2025, "Pay Attention to Your Neighbours: Training-Free '
             'Open-Vocabulary Semantic Segmentation"')
    knobs = (
        Knob('arch', str, 'reduced', "last block: 'reduced' (attention output only, NACLIP) or 'vanilla' "
             "(residual and MLP kept)", choices=ARCHS),
        Knob('attn_strategy', str, 'naclip', "last block's attention: naclip (k·kᵀ + Gaussian), nonly "
             "(Gaussian only), kk (k·kᵀ), csa (SCLIP's, arch vanilla only), vanilla (CLIP's)",
             choices=ATTN_STRATEGIES),
        Knob('gaussian_std', float, 5.0, 'σ of the neighbourhood Gaussian, in patches'),
    )
    # its configs with the paper's main table's PAMR off (the repository's README table is --pamr_steps 10, whose
    # dilations (8, 16) are the default): short side 336 (560 Cityscapes), windows 224/112 except the whole-image VOC
    # runs.
    defaults = dict(resolution=336, crop=224, stride=112, logit_scale=40.0, prob_thd=0.0, pamr_steps=0)
    presets = {
        'voc': dict(crop=0, prob_thd=0.1),
        'context': dict(prob_thd=0.1),
        'coco': dict(prob_thd=0.1),
        'voc20': dict(crop=0),
        'context59': {},
        'coco_stuff': {},
        'cityscapes': dict(resolution=560),
        'ade20k': {},
    }
    published = dict(voc=58.9, context=32.2, coco=33.2, voc20=79.7, context59=35.2, coco_stuff=23.3,
                     cityscapes=35.5, ade20k=17.4)
    renormalize = True

    def configure(self, **knobs) -> 'NACLIP':
        before = self.knob_values()
        super().configure(**knobs)
        problem = None
        if self.attn_strategy == 'csa' and self.arch != 'vanilla':
            problem = 'attn_strategy csa (SCLIP\'s attention) runs with arch vanilla only; add --arch vanilla'
        elif self.attn_strategy in ('naclip', 'nonly') and not 0 < self.gaussian_std < math.inf:
            problem = f'gaussian_std must be a positive number, got {self.gaussian_std}'
        if problem:
            for name, value in before.items():   # leave the method as it was
                setattr(self, name, value)
            raise UsageError(f'{self.name}: {problem}')
        return self

    def last_block(self, x: torch.Tensor, grid) -> torch.Tensor:
        """The last block's input x [B, 1+L, W] on a patch grid (gh, gw) -> its output [B, 1+L, W]."""
        block = self.clip.visual.transformer.resblocks[-1]
        q, k, v = block.attn.qkv_heads(block.ln_1(x))                      # [B, H, T, W/H]
        omega = None
        if self.attn_strategy in ('naclip', 'nonly'):
            omega = neighbourhood_bias(*grid, self.gaussian_std, x.device)
        a = attention_weights(q, k, self.attn_strategy, omega)             # [B, H, T, T]
        out = block.attn.merge_heads(a.to(v.dtype) @ v)
        if self.arch == 'reduced':
            return out
        x = x + out
        return x + block.mlp(block.ln_2(x))

    def dense_features(self, crops: torch.Tensor, states) -> torch.Tensor:
        grid = (crops.shape[-2] // self.patch_size, crops.shape[-1] // self.patch_size)
        x = self.clip.visual.tokens_before_last(crops)                     # [B, 1+L, W]
        x = self.last_block(x, grid)
        return self.clip.visual.head(x[:, 1:]).unflatten(1, grid)          # [B, gh, gw, D]


METHOD = NACLIP
