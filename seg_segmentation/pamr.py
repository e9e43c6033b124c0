"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as the training-free segmenters apply it.

    refined = pamr(image, mask, steps=10, dilations=(8, 16))   # image [B,K,H,W], mask [B,C,H,W] -> [B,C,H,W]

Each pixel's mask becomes, ``steps`` times, an average of its neighbours' masks at distances ``dilations``, weighted
by how alike their colours are relative to the local colour spread (design.md §12).
"""
from typing import Sequence

import torch
import torch.nn.functional as F

# the 8 neighbours of a 3x3 window, row by row (the order of PAMR's shift kernels)
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(x: torch.Tensor, dilations: Sequence[int], with_centre: bool = False) -> torch.Tensor:
    """x [B, K, H, W] -> [B, K, P, H, W]: the value at each neighbour at distance d (replicate padding), for each d
    in ``dilations``; P = 8 (or 9 with the centre) per dilation."""
    H, W = x.shape[-2:]
    offsets = [(0, 0)] + _NEIGHBOURS if with_centre else _NEIGHBOURS
    out = []
    for d in dilations:
        # Beyond the image every neighbour is a replicated edge pixel, so a distance above max(H, W) gives the
        # values it gives at max(H, W): the same result, without padding the image to (H + 2d) x (W + 2d) (a
        # distance of 100,000 asked for 480 GB).
        d = min(d, max(H, W))
        p = F.pad(x, [d, d, d, d], mode='replicate')
        out.extend(p[..., d + dy * d:d + dy * d + H, d + dx * d:d + dx * d + W] for dy, dx in offsets)
    return torch.stack(out, dim=2)


def pixel_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """image [B, K, H, W] -> [B, 1, 8·|dilations|, H, W]: softmax over neighbours of −|Δcolour| / (0.1·σ),
    averaged over the K channels; σ = the unbiased std of the window values over every dilation together (as the
    reference kernel stacks them)."""
    neighbours = _shifted(image, dilations)                                   # [B, K, 8n, H, W]
    std = _shifted(image, dilations, with_centre=True).std(dim=2, keepdim=True)   # [B, K, 1, H, W]
    aff = -(image[:, :, None] - neighbours).abs() / (1e-8 + 0.1 * std)
    return aff.mean(dim=1, keepdim=True).softmax(dim=2)


def pamr(image: torch.Tensor, mask: torch.Tensor, steps: int = 10, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """image [B, K, H, W] (normalised colours), mask [B, C, H, W] (logits or probabilities) -> refined [B, C, H, W]."""
    if image.dim() != 4 or mask.dim() != 4 or image.shape[0] != mask.shape[0]:
        raise ValueError(f'pamr expects image [B,K,H,W] and mask [B,C,H,W], got {tuple(image.shape)} and '
                         f'{tuple(mask.shape)}')
    dilations = [int(d) for d in dilations]
    if not dilations or min(dilations) < 1:
        raise ValueError(f'PAMR dilations must be positive integers, got {dilations}')
    if steps < 0:
        raise ValueError(f'PAMR steps must be >= 0, got {steps}')
    if mask.shape[-2:] != image.shape[-2:]:
        mask = F.interpolate(mask, size=image.shape[-2:], mode='bilinear', align_corners=True)
    image = image.to(mask.dtype)
    aff = pixel_affinity(image, dilations)                                    # [B, 1, P, H, W]
    for _ in range(int(steps)):
        mask = (_shifted(mask, dilations) * aff).sum(dim=2)
    return mask
