"""Training objectives of design.md §4: image-text contrastive, superpixel-consistency KL, MAE reconstruction.

Each runs in fp32 with autocast switched off, whatever precision the towers ran in: under autocast the ``.float()``
casts alone would not hold (matmuls are re-cast to bf16/fp16), and in bf16 the contrastive logits at scale 100
are off by ~0.1 and the superpixel counts ``S @ P`` are inexact above 256 patches.
"""
import functools

import torch
import torch.nn.functional as F

from common.ranks import rank_and_world
from .mae import patchify


def _fp32(loss_fn):
    """Run ``loss_fn`` with autocast off on the device of its first tensor argument."""
    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return loss_fn(*args, **kwargs)
    return wrapper


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather [B, D] from every rank -> [world*B, D]; gradients flow back to each rank's slice."""
    if rank_and_world(use_env=False)[1] == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), dim=0)


@_fp32
def contrastive_loss(image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch.  image_embed, text_embed [B, D] (local); logit_scale = s."""
    v = F.normalize(image_embed.float(), dim=-1)
    t = F.normalize(text_embed.float(), dim=-1)
    v_all, t_all = gather_with_grad(v), gather_with_grad(t)
    rank = rank_and_world(use_env=False)[0] if v_all.shape[0] != v.shape[0] else 0
    targets = torch.arange(v.shape[0], device=v.device) + v.shape[0] * rank
    s = logit_scale.float()
    logits_t2v = s * t @ v_all.t()
    logits_v2t = s * v @ t_all.t()
    return (F.cross_entropy(logits_t2v, targets) + F.cross_entropy(logits_v2t, targets)) / 2


@_fp32
def superpixel_kl_loss(hard_attn: torch.Tensor, superpixels: torch.Tensor) -> torch.Tensor:
    """Patches of one superpixel should pick the same center.

    hard_attn [B, G, L] (full pass), superpixels [B, h, w] labels with h*w = L. The assignment P [B, L, G] is
    compared with its superpixel average M by a symmetric KL over centers, summed and divided by B*L*G.
    """
    P = hard_attn.float().transpose(1, 2)                                     # [B, L, G]
    labels = superpixels.reshape(superpixels.shape[0], -1)                    # [B, L]
    if labels.shape[1] != P.shape[1]:
        raise ValueError(f"superpixel labels give {labels.shape[1]} patches, the image has {P.shape[1]}")
    S = (labels.unsqueeze(2) == labels.unsqueeze(1)).to(P.dtype)             # [B, L, L]
    M = (S @ P) / S.sum(dim=-1, keepdim=True).clamp(min=1)
    kl = (F.kl_div(F.log_softmax(P, dim=-1), F.softmax(M, dim=-1), reduction="sum")
          + F.kl_div(F.log_softmax(M, dim=-1), F.softmax(P, dim=-1), reduction="sum")) / 2
    return kl / P.numel()


@_fp32
def mae_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean over removed patches of the per-patch MSE.  pred [B, L, p*p*3], images [B, 3, H, W], mask [B, L] (1 = removed)."""
    target = patchify(images.float(), patch_size)
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
