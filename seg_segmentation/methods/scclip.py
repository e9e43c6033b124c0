"""SC-CLIP (Bai et al., 2024): self-calibrated CLIP, training-free dense features (design.md §13.3).

    method = SCCLIP(clip)                          # layer indices from the CLIP's depth unless given
    feats = method.dense_features(crops, states)   # [B, 3, h, w] -> [B, h/p, w/p, D]

CLIP's last blocks produce a few "anomaly" tokens that every patch attends to. SC-CLIP finds them with a local
outlier factor on the penultimate block's output and replaces each by the mean of its neighbours, then rebuilds the
last block from the model's own middle layers: their patch similarities pool the tokens and steer the attention
(no residual, no MLP), and a second pass does the same on the sum of several middle layers.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from common.errors import UsageError
from .base import Knob, TrainingFreeMethod

BETA = 0.4                # similarities below it do not pool
LOF_NEIGHBOURS = 30       # k of the local outlier factor
CONTAMINATION = 0.05      # share of tokens called outliers
MID_SCALE = 3.0           # sharpness of the middle-layer attention
# Layer indices (block i's output, blocks numbered from 0) and class-token weight: ViT-B/16's from the paper's
# configs; ViT-L/14's given by the authors (SuleBai/SC-CLIP issue #5). Other depths: ``layer_rule``.
VIT_B = dict(pre_adjust_idx=8, post_adjust_idx=3, multi_start_idx=3, multi_end_idx=10, res_cls=0.3)
VIT_L = dict(pre_adjust_idx=16, post_adjust_idx=6, multi_start_idx=8, multi_end_idx=19, res_cls=0.1)
MIN_DEPTH = 4             # the shallowest ViT whose scaled ViT-B indices are all block outputs
BY_DEPTH = 'unset: {0} on a 12-block CLIP, {1} on 24 blocks, else {0} x blocks / 12 rounded down'


def layer_rule(depth: int) -> Dict[str, Optional[float]]:
    """The knobs for a ViT of ``depth`` blocks: ViT-B's on 12, ViT-L's on 24, otherwise ViT-B's indices scaled by
    depth/12 (rounded down) with ViT-B's res_cls; indices None below MIN_DEPTH."""
    if depth == 24:
        return dict(VIT_L)
    return {k: v if k == 'res_cls' else (v * depth // 12 if depth >= MIN_DEPTH else None) for k, v in VIT_B.items()}


def lof_scores(x: torch.Tensor, k: int = LOF_NEIGHBOURS) -> torch.Tensor:
    """SC-CLIP's local outlier factor of each token of one image: x [N, W] -> [N].

    Its variant: squared distances, and each token's reach distance to a neighbour is its *own* k-distance, so
    lrd(p) = k / kd(p) and score(p) = mean over p's neighbours o of lrd(o) / lrd(p)."""
    N = x.shape[0]
    k = min(k, N - 1)                 # the original needs N > k (fewer tokens: k shrinks)
    if k < 1:
        return x.new_ones(N)          # one token: nothing to compare, no outlier
    # The k+1 nearest by squared norms of difference vectors, as the original (the Gram expansion's rounding can
    # swap a 30th and a 31st neighbour), but only among 8 spare candidates the cheap expansion picks: O(N·k·W).
    sq = (x * x).sum(-1)
    c = min(N, k + 1 + 8)
    cand = (sq[:, None] + sq[None, :] - 2 * x @ x.T).topk(c, dim=-1, largest=False).indices      # [N, c]
    dist, j = (torch.linalg.vector_norm(x[:, None] - x[cand], dim=-1) ** 2).topk(k + 1, dim=-1, largest=False)
    dist, nbr = dist[:, 1:], cand.gather(1, j)[:, 1:]       # the first is the token itself
    lrd = k / torch.maximum(dist, dist[:, -1:]).mean(-1)     # [N]
    return (lrd[nbr] / lrd[:, None]).mean(-1)


def repair(tokens: torch.Tensor, outliers: torch.Tensor, grid) -> torch.Tensor:
    """tokens [B, N, W], outliers [B, N] (True = outlier) on a row-major grid (G_r, G_c) -> [B, N, W]: each outlier
    cell becomes the mean of its in-grid 8-neighbours that are not outliers (kept when it has none)."""
    B, N, W = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(B, W, *grid)                 # cell i at (i // G_c, i % G_c)
    keep = (~outliers).to(tokens.dtype).reshape(B, 1, *grid)
    ring = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    ring[..., 1, 1] = 0
    total = F.conv2d(fmap * keep, ring.expand(W, 1, 3, 3), padding=1, groups=W)
    count = F.conv2d(keep, ring, padding=1)                            # [B, 1, G_r, G_c]
    fix = outliers.reshape(B, 1, *grid) & (count > 0)
    return torch.where(fix, total / count.clamp(min=1), fmap).flatten(2).transpose(1, 2)


def cosine(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, W] -> [B, N, N] float32 cosine similarities (no eps, as the original)."""
    t = tokens.float()
    t = t / t.norm(dim=-1, keepdim=True)
    return t @ t.transpose(1, 2)


def aggregate(tokens: torch.Tensor, simi: torch.Tensor) -> torch.Tensor:
    """Each token -> the mean of the tokens similar to it: simi [B, N, N] below BETA set to 0, rows normalised."""
    c = simi.masked_fill(simi < BETA, 0.0)
    return (c / (c.sum(-1, keepdim=True) + 1e-6)).to(tokens.dtype) @ tokens            # [B, N, W]


def calibrated_attention(attn, x: torch.Tensor, mid_simi: torch.Tensor) -> torch.Tensor:
    """The last block's attention rebuilt, with ``attn``'s weights: x [B, N, W] (after ln_1), mid_simi [B, N, N]
    -> [B, N, W]. Per head the mean of two attentions: the middle layer's similarities (sharpened; pairs below
    the image's mean similarity excluded) and k·kᵀ. q is not used."""
    _, k, v = attn.qkv_heads(x)                                         # [B, H, N, W/H]
    m = MID_SCALE * (mid_simi - mid_simi.mean(dim=(-2, -1), keepdim=True))
    m = m.masked_fill(m < 0, float('-inf'))                            # the diagonal (1) always stays
    kk = (k @ k.transpose(-2, -1)).float() * k.shape[-1] ** -0.5
    a = (m.softmax(dim=-1)[:, None] + kk.softmax(dim=-1)) / 2
    return attn.merge_heads(a.to(v.dtype) @ v)


class SCCLIP(TrainingFreeMethod):
    name = 'scclip'
    year = 2024
    summary = 'anomaly tokens repaired, last block rebuilt from middle-layer similarities, multi-level fusion'
    paper = ('Bai, Liu, Han, Zhang, Tang, arXiv 2411.15869 (2024), "Self-Calibrated CLIP for Training-Free '
             'Open-Vocabulary Segmentation"')
    knobs = (
        Knob('pre_adjust_idx', int, None, 'block (from 0) whose output, outliers repaired, gives the similarities '
             'that pool the tokens and steer the last attention; ' + BY_DEPTH.format(8, 16)),
        Knob('post_adjust_idx', int, None, 'block whose output gives the similarities that pool the result; ' +
             BY_DEPTH.format(3, 6)),
        Knob('multi_start_idx', int, None, 'first block of the summed multi-level features; ' +
             BY_DEPTH.format(3, 8)),
        Knob('multi_end_idx', int, None, 'end (exclusive) of the summed blocks; ' + BY_DEPTH.format(10, 19)),
        Knob('res_cls', float, None, 'weight of the class token added to every output token; unset: 0.1 on a '
             '24-block CLIP, else 0.3'),
    )
    # SC-CLIP's configs: short side 336 (560 Cityscapes), 224 windows with stride 112, 80 prompts, no PAMR
    defaults = dict(resolution=336, crop=224, stride=112, logit_scale=40.0, prob_thd=0.0)
    presets = {
        'voc': dict(logit_scale=50.0, prob_thd=0.15, area_thd=0.1),
        'context': dict(logit_scale=40.0, prob_thd=0.15),
        'coco': dict(logit_scale=55.0, prob_thd=0.35),
        'cityscapes': dict(resolution=560),
    }
    published = dict(voc=64.6, context=36.8, coco=37.7, voc20=84.3, context59=40.1, coco_stuff=26.6,
                     cityscapes=41.0, ade20k=20.1)

    @property
    def depth(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    def knob_values(self) -> Dict:
        """The knobs as they run: each one left unset comes from the CLIP's depth (``layer_rule``)."""
        rule = layer_rule(self.depth)
        return {k: rule[k] if v is None else v for k, v in super().knob_values().items()}

    def configure(self, **knobs) -> 'SCCLIP':
        super().configure(**knobs)
        v, top = self.knob_values(), self.depth - 2      # block outputs 0 ... depth-2 exist (the last block is rebuilt)
        for name in ('pre_adjust_idx', 'post_adjust_idx', 'multi_start_idx'):
            if v[name] is not None and not 0 <= v[name] <= top:
                raise UsageError(f'{self.name}: {name} {v[name]} is not a block output of this {self.depth}-block '
                                 f'CLIP (0 ... {top})')
        if None not in (v['multi_start_idx'], v['multi_end_idx']) and \
                not v['multi_start_idx'] < v['multi_end_idx'] <= top + 1:
            raise UsageError(f'{self.name}: multi_end_idx {v["multi_end_idx"]} must be above multi_start_idx '
                             f'{v["multi_start_idx"]} and at most {top + 1} on this {self.depth}-block CLIP')
        return self

    def dense_features(self, crops: torch.Tensor, states, steps: Optional[dict] = None) -> torch.Tensor:
        """``steps``: a dict that receives the intermediates (tests)."""
        v = self.knob_values()
        if None in v.values():
            raise UsageError(f'{self.name}: this CLIP has {self.depth} blocks, too few for the layer rule (at least '
                             f'{MIN_DEPTH}); give pre_adjust_idx, post_adjust_idx, multi_start_idx, multi_end_idx')
        h, w = crops.shape[-2:]
        grid = (h // self.patch_size, w // self.patch_size)
        visual = self.clip.visual
        *blocks, last = visual.transformer.resblocks
        x, multi = visual.embed(crops), 0                                     # [B, 1+N, W]
        for i, block in enumerate(blocks):                                    # x = F_i, block i's output
            x = block(x)
            if i == v['pre_adjust_idx']:
                f_pre = x
            if i == v['post_adjust_idx']:
                f_post = x
            if v['multi_start_idx'] <= i < v['multi_end_idx']:
                multi = multi + x
        # outliers of the penultimate output, per image; torch.quantile on float32 as the original (design.md)
        scores = torch.stack([lof_scores(t) for t in x[:, 1:].float()])        # [B, N]
        outliers = scores > torch.quantile(scores, 1 - CONTAMINATION, dim=-1, keepdim=True)
        y = repair(x[:, 1:], outliers, grid)                                  # [B, N, W]
        pre = repair(f_pre[:, 1:], outliers, grid)                            # the same cells repaired
        mid_simi, post_simi = cosine(pre), cosine(f_post[:, 1:])              # [B, N, N]; f_post not repaired
        y1 = aggregate(y, mid_simi)
        attn = calibrated_attention(last.attn, last.ln_1(y1), mid_simi)
        main = aggregate(attn + v['res_cls'] * x[:, :1], post_simi)
        fused = calibrated_attention(last.attn, last.ln_1(multi[:, 1:]), mid_simi) + v['res_cls'] * multi[:, :1]
        fused = aggregate(fused, post_simi)
        if steps is not None:
            steps.update(f_pre=f_pre, f_post=f_post, f_last=x, lof_scores=scores, outliers=outliers, y=y, pre=pre,
                         y1=y1, mid_simi=mid_simi, attn=attn, main=main, multi=multi, fused=fused)
        return visual.head(main + fused).unflatten(1, grid)                  # [B, G_r, G_c, D]


METHOD = SCCLIP
