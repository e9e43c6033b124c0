"""Plain CLIP: the unmodified model's patch tokens compared with the class names - the baseline every
training-free method improves on (design.md §12).

    method = PlainCLIP(clip)            # modules.clip.CLIP
    feats = method.dense_features(crops, states)   # [B, 3, h, w] -> [B, h/p, w/p, D]
"""
import torch

from .base import TrainingFreeMethod
from .sclip import SCLIP


class PlainCLIP(TrainingFreeMethod):
    name = 'clip'
    year = 2021
    summary = "the unmodified CLIP's patch tokens (a baseline)"
    paper = 'Radford et al., ICML 2021, "Learning Transferable Visual Models From Natural Language Supervision"'
    # no published protocol of its own: SCLIP's, as the papers that compare with plain CLIP use it
    defaults, presets = SCLIP.defaults, SCLIP.presets

    def dense_features(self, crops: torch.Tensor, states) -> torch.Tensor:
        h, w = crops.shape[-2:]
        p = self.patch_size
        tokens = self.clip.encode_dense(crops)[:, 1:]                         # [B, L, D]
        return tokens.unflatten(1, (h // p, w // p))


METHOD = PlainCLIP
