"""SCLIP (Wang, Mei, Yuille, ECCV 2024): correlative self-attention in CLIP's last block (design.md §12).

    method = SCLIP(clip)
    feats = method.dense_features(crops, states)   # [B, 3, h, w] -> [B, h/p, w/p, D]

The last block keeps its residuals and MLP; only its attention matrix changes, per head
A = softmax(q qᵀ·s) + softmax(k kᵀ·s), s = head_dim^-½: each token attends to the tokens that look like it rather
than to those its query asks for, which keeps the features local.
"""
import torch

from .base import TrainingFreeMethod


def correlative_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's attention with ``attn``'s (``modules.layers.MultiheadAttention``) weights: x [B, T, W] (after
    ln_1) -> [B, T, W]."""
    q, k, v = attn.qkv_heads(x)                                              # [B, H, T, W/H]
    scale = q.shape[-1] ** -0.5
    a = (q @ q.transpose(-2, -1) * scale).softmax(dim=-1) + (k @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    return attn.merge_heads(a @ v)


class SCLIP(TrainingFreeMethod):
    name = 'sclip'
    year = 2024
    summary = 'correlative self-attention (q·qᵀ + k·kᵀ) in the last block'
    paper = ('Wang, Mei, Yuille, ECCV 2024, "SCLIP: Rethinking Self-Attention for Dense Vision-Language '
             'Inference"')
    # SCLIP's configs: short side 336 (448 COCO-Stuff, 560 Cityscapes), 224 windows with stride 112, 80 prompts
    defaults = dict(resolution=336, crop=224, stride=112, logit_scale=40.0, prob_thd=0.0)
    presets = {
        'voc': dict(logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
        'context': dict(logit_scale=50.0, prob_thd=0.1),
        'coco': dict(logit_scale=50.0, prob_thd=0.1),
        'coco_stuff': dict(resolution=448),
        'cityscapes': dict(resolution=560),
    }
    published = dict(voc=59.6, context=31.7, coco=33.5, voc20=81.5, context59=34.5, coco_stuff=22.8,
                     cityscapes=32.3, ade20k=16.5)

    def dense_features(self, crops: torch.Tensor, states) -> torch.Tensor:
        h, w = crops.shape[-2:]
        p = self.patch_size
        visual = self.clip.visual
        x = visual.tokens_before_last(crops)                                  # [B, 1+L, W]
        last = visual.transformer.resblocks[-1]
        x = x + correlative_attention(last.attn, last.ln_1(x))
        x = x + last.mlp(last.ln_2(x))
        return visual.head(x[:, 1:]).unflatten(1, (h // p, w // p))          # [B, gh, gw, D]


METHOD = SCLIP
