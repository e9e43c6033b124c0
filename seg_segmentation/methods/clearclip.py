"""ClearCLIP (Lan, Chen, Ke, Wang, Feng, Zhang, ECCV 2024): the last visual block reduced to query-query
attention, without its residual and its MLP (design.md §13.1).

    method = ClearCLIP(clip)                       # model_type='clearclip', ignore_residual=True: the paper
    feats = method.dense_features(crops, states)   # [B, 3, h, w] -> [B, h/p, w/p, D]

The paper traces the noise in CLIP's dense maps to the residual connection of the last block and finds that, once
the residual and the MLP are dropped, attending with q·qᵀ (tokens attend to tokens that ask alike) keeps the maps
local. Its released configs run the block's own q·kᵀ attention instead (``model_type='vanilla'``): that setting is
available as a knob but is not the default.
"""
import torch

from .base import PAD_TO_PATCH, Knob, TrainingFreeMethod


def last_block_attention(q: torch.Tensor, k: torch.Tensor, model_type: str) -> torch.Tensor:
    """Attention weights per head, q, k [B, H, T, W/H] -> [B, H, T, T]: softmax(q qᵀ·s) for 'clearclip',
    softmax(q kᵀ·s) for 'vanilla', s = head_dim^-½ applied to the product."""
    key = q if model_type == 'clearclip' else k
    logits = q @ key.transpose(-2, -1) * q.shape[-1] ** -0.5
    return logits.float().softmax(dim=-1).to(q.dtype)       # float32 softmax, also under --precision bf16


def clear_attention(attn, x: torch.Tensor, model_type: str) -> torch.Tensor:
    """The last block's attention with ``attn``'s (``modules.layers.MultiheadAttention``) weights and
    ``last_block_attention``'s matrix: x [B, T, W] (after ln_1) -> [B, T, W] (after out_proj)."""
    q, k, v = attn.qkv_heads(x)                                              # [B, H, T, W/H]
    return attn.merge_heads(last_block_attention(q, k, model_type) @ v)


class ClearCLIP(TrainingFreeMethod):
    name = 'clearclip'
    year = 2024
    summary = 'query-query attention in the last block, its residual and MLP removed'
    paper = ('Lan, Chen, Ke, Wang, Feng, Zhang, ECCV 2024, "ClearCLIP: Decomposing CLIP Representations for '
             'Dense Vision-Language Inference"')
    knobs = (
        Knob('model_type', str, 'clearclip',
             "attention of the last block: 'clearclip' softmax(q·qᵀ), the paper's; 'vanilla' the block's own "
             "softmax(q·kᵀ), what ClearCLIP's committed configs run", choices=('clearclip', 'vanilla')),
        Knob('ignore_residual', bool, True,
             'drop the last block\'s residual, ln_2 and MLP (the paper); false keeps them (vanilla + false = plain '
             'CLIP)'),
    )
    # ClearCLIP's configs: short side 448 (long side <= 2048), 448 windows with stride 224, logit scale 50
    defaults = dict(resolution=448, crop=448, stride=224, logit_scale=50.0, prob_thd=0.0)
    presets = {
        'voc': dict(prob_thd=0.5),
        'context': dict(prob_thd=0.15),
        'coco': dict(prob_thd=0.4),
        'voc20': {}, 'context59': {}, 'coco_stuff': {}, 'ade20k': {},
        'cityscapes': dict(crop=224, stride=224),
    }
    # paper Table 1, CLIP ViT-B/16 (mean 38.1)
    published = dict(voc=51.8, context=32.6, coco=33.0, voc20=80.9, context59=35.9, coco_stuff=23.9,
                     cityscapes=30.0, ade20k=16.7)
    # a window side that is not a multiple of the patch size is zero-padded centred and its logits cut back, as
    # ClearCLIP does (never the case with its presets: every crop is a multiple of 16 and no side is shorter)
    pad_multiple = PAD_TO_PATCH

    def dense_features(self, crops: torch.Tensor, states) -> torch.Tensor:
        h, w = crops.shape[-2:]
        p = self.patch_size
        visual = self.clip.visual
        x = visual.tokens_before_last(crops)                                  # [B, 1+L, W]
        last = visual.transformer.resblocks[-1]
        a = clear_attention(last.attn, last.ln_1(x), self.model_type)
        if self.ignore_residual:
            x = a
        else:
            x = x + a
            x = x + last.mlp(last.ln_2(x))
        return visual.head(x[:, 1:]).unflatten(1, (h // p, w // p))          # [B, gh, gw, D]


METHOD = ClearCLIP
