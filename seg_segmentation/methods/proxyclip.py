"""ProxyCLIP (Lan et al., ECCV 2024): proxy attention from a vision foundation model in CLIP's last block
(design.md §13.4).

    method = ProxyCLIP(clip, vfm)                  # vfm: modules.vfm.VisionTransformerVFM (DINO ViT-B/8 by default)
    feats = method.dense_features(crops, states)   # [B, 3, h, w] -> [B, h/p', w/p', D], p' = the VFM's patch

CLIP knows names but mixes its patch tokens poorly; a self-supervised ViT (DINO, DINOv2) knows which patches belong
together. ProxyCLIP keeps CLIP's values and lets the VFM decide who attends to whom: the last block's attention
becomes a softmax over the cosine similarities of the VFM's patch features, shifted by β times their mean, scaled
by γ and cut below zero. No residual, no MLP; the tokens live on the VFM's (finer) grid.
"""
import torch
import torch.nn.functional as F

from .base import Knob, TrainingFreeMethod

# ProxyCLIP un-normalises the CLIP-normalised window with these constants and normalises it for the VFM (DINO and
# DINOv2 were trained on ImageNet statistics); the evaluation's pixel constants (x255) differ in the 6th digit.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_normalised(x: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised images [B, 3, H, W] -> ImageNet-normalised, float32, computed as ProxyCLIP does
    (multiply, add, subtract, divide)."""
    c = lambda v: torch.tensor(v, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)  # noqa: E731
    return ((x.float() * c(CLIP_STD) + c(CLIP_MEAN)) - c(IMAGENET_MEAN)) / c(IMAGENET_STD)


def similarity(feats: torch.Tensor) -> torch.Tensor:
    """VFM features [B, C, h, w] -> cosine similarities of every position with every other [B, hw, hw], float32."""
    e = F.normalize(feats.float().flatten(2), dim=1)                          # [B, C, hw]
    return e.transpose(1, 2) @ e


def proxy_attention(sim: torch.Tensor, beta: float, gamma: float, mu=None) -> torch.Tensor:
    """Similarities [B, N, N] -> attention [B, N, N]: softmax over the last axis of (S − β·μ)·γ with the entries
    below 0 (strictly) removed. μ: each image's own mean similarity (diagonal included) by default; ProxyCLIP took
    one μ over the whole batch (a scalar or [B, 1, 1] may be given to reproduce that)."""
    mu = sim.mean(dim=(1, 2), keepdim=True) if mu is None else mu
    s = (sim - beta * mu) * gamma
    return s.masked_fill(s < 0, float('-inf')).softmax(dim=-1)


class ProxyCLIP(TrainingFreeMethod):
    name = 'proxyclip'
    year = 2024
    summary = "proxy attention: the last block attends by a second vision model's (DINO's) feature similarity"
    paper = ('Lan, Chen, Ke, Wang, Feng, Zhang, ECCV 2024, "ProxyCLIP: Proxy Attention Improves CLIP for '
             'Open-Vocabulary Segmentation"')
    knobs = (
        Knob('proxy_beta', float, 1.2, 'ProxyCLIP β: VFM similarities below β × their mean are not attended to'),
        Knob('proxy_gamma', float, 3.0, 'ProxyCLIP γ: sharpness; (similarity − β·mean) × γ enters the softmax'),
    )
    # ProxyCLIP's configs: short side 336 (448 Cityscapes, ADE20K), 336 windows every 112 px (224 Cityscapes),
    # logit scale 40, no PAMR, no area threshold; prob_thd only on the datasets with a background class
    defaults = dict(resolution=336, crop=336, stride=112, logit_scale=40.0, prob_thd=0.0)
    presets = {
        'voc': dict(prob_thd=0.2),
        'context': dict(prob_thd=0.15),
        'coco': dict(prob_thd=0.25),
        'voc20': {}, 'context59': {}, 'coco_stuff': {},
        'cityscapes': dict(resolution=448, crop=224),
        'ade20k': dict(resolution=448),
    }
    published = dict(voc=61.3, context=35.3, coco=37.5, voc20=80.3, context59=39.1, coco_stuff=26.5,
                     cityscapes=38.1, ade20k=20.2)
    pad_multiple = 56      # windows smaller than the crop: padded to multiples of 56 (= 7·8 = 4·14)
    vfm = 'dino_vitb8'

    def __init__(self, clip, vfm, **knobs):
        super().__init__(clip, **knobs)
        self.vfm_model = vfm       # (the class attribute vfm is the default's name)

    def dense_features(self, crops: torch.Tensor, states) -> torch.Tensor:
        feats = self.vfm_model.features(imagenet_normalised(crops))                  # [B, C, h, w]
        attn = proxy_attention(similarity(feats), self.proxy_beta, self.proxy_gamma)
        return self.attend(crops, attn, feats.shape[-2:])

    def attend(self, crops: torch.Tensor, attn: torch.Tensor, grid) -> torch.Tensor:
        """CLIP's last block with ``attn`` [B, hw, hw] (on the VFM's h×w grid) as its attention, for every head: the
        block's values of the patch tokens, resized bilinearly from CLIP's grid to h×w, mixed by ``attn``, then
        out_proj, ln_post, proj - no residual, no MLP, no class token -> [B, h, w, D]."""
        H, W = crops.shape[-2:]
        p = self.clip.patch_size
        visual = self.clip.visual
        x = visual.tokens_before_last(crops[..., :H - H % p, :W - W % p])     # [B, 1+gh*gw, W]; CLIP drops the rest
        last = visual.transformer.resblocks[-1]
        width = x.shape[-1]
        v = F.linear(last.ln_1(x[:, 1:]), last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])
        v = v.transpose(1, 2).unflatten(2, (H // p, W // p))                  # [B, W, gh, gw]
        v = F.interpolate(v, size=tuple(grid), mode='bilinear', align_corners=False).flatten(2).transpose(1, 2)
        out = last.attn.out_proj(attn.to(v.dtype) @ v)                          # [B, hw, W]
        return visual.head(out).unflatten(1, tuple(grid))                      # [B, h, w, D]


METHOD = ProxyCLIP
