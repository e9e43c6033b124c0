"""The model's sizes, and how to read them off a state dict (CLIP's habit: no size is ever passed by hand)."""
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from common.errors import SegCLIPError

from .state_dict import count_indices, refuse_clip_layout, require_keys


class ConfigError(SegCLIPError, ValueError):
    """Model sizes or options that do not fit together (e.g. a first stage as deep as the whole tower)."""


@dataclass
class SegCLIPConfig:
    embed_dim: int = 512
    image_resolution: int = 224
    vision_width: int = 768
    vision_layers: int = 12
    vision_patch_size: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    first_stage_layer: int = 10
    num_centers: int = 8
    mae_layers: int = 2
    decoder_width: Optional[int] = None   # default vision_width // 2
    decoder_depth: int = 3
    decoder_heads: int = 8
    use_vision_mae_recon: bool = True
    use_seglabel: bool = True
    mae_mask_ratio: float = 0.75
    # Training mode, not a size: the center block is skipped and the model trains as a plain CLIP (contrastive loss
    # only) - a CLIP pretraining stage before SegCLIP's, when no pretrained CLIP exists (the offline quickstart).
    plain_clip: bool = False

    def __post_init__(self):
        if self.decoder_width is None:
            self.decoder_width = self.vision_width // 2

    @property
    def vision_heads(self) -> int:
        return heads_for_width(self.vision_width)

    @property
    def grid_size(self) -> int:
        return self.image_resolution // self.vision_patch_size

    def validate(self):
        if not 0 < self.first_stage_layer < self.vision_layers:
            raise ConfigError(f"--first_stage_layer must be in [1, {self.vision_layers - 1}] for a "
                              f"{self.vision_layers}-layer visual tower, got {self.first_stage_layer}")
        return self


def heads_for_width(width: int) -> int:
    """Attention heads of a CLIP tower of this width: OpenAI CLIP's heads are 64 wide."""
    return max(1, width // 64)


def _shared_sizes(sd: Mapping[str, torch.Tensor], prefix: str) -> dict:
    """The sizes both layouts hold under ``prefix`` ('' for OpenAI CLIP, 'clip.' for SegCLIP): embedding, image
    resolution and patch, visual width, context, vocabulary, and the text tower."""
    conv = sd[prefix + "visual.conv1.weight"]                                   # [W, 3, P, P]
    grid = int(round((sd[prefix + "visual.positional_embedding"].shape[0] - 1) ** 0.5))
    text_width = sd[prefix + "ln_final.weight"].shape[0]
    text = re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."   # anchored at the start: text blocks only
    return dict(embed_dim=sd[prefix + "text_projection"].shape[1], image_resolution=conv.shape[-1] * grid,
                vision_width=conv.shape[0], vision_patch_size=conv.shape[-1],
                context_length=sd[prefix + "positional_embedding"].shape[0],
                vocab_size=sd[prefix + "token_embedding.weight"].shape[0], text_width=text_width,
                text_heads=heads_for_width(text_width), text_layers=count_indices(sd, text))


def config_from_state_dict(sd: Mapping[str, torch.Tensor], use_vision_mae_recon: Optional[bool] = None, **overrides):
    """Infer a SegCLIPConfig from a SegCLIP state dict (2022 names)."""
    refuse_clip_layout(sd, "the checkpoint")
    require_keys(sd, "clip.visual.conv1.weight", "clip.visual.positional_embedding", "clip.text_projection",
                 "clip.token_embedding.weight", "clip.positional_embedding", "clip.ln_final.weight",
                 "clip.visual.transformer.semantic_layer2.semantic_center")
    first = count_indices(sd, r"clip\.visual\.transformer\.layers0\.(\d+)\.")
    second = count_indices(sd, r"clip\.visual\.transformer\.layers2\.(\d+)\.")
    has_decoder = any(k.startswith("vis_mae_decoder.") for k in sd)
    kw = dict(_shared_sizes(sd, "clip."), vision_layers=first + second, first_stage_layer=first,
              num_centers=sd["clip.visual.transformer.semantic_layer2.semantic_center"].shape[0],
              mae_layers=count_indices(sd, r"clip\.visual\.transformer\.layers_mae2\.(\d+)\.") or 2,
              use_vision_mae_recon=has_decoder if use_vision_mae_recon is None else use_vision_mae_recon)
    if has_decoder:
        kw["decoder_width"] = sd["vis_mae_decoder.decoder_embed.weight"].shape[0]
        kw["decoder_depth"] = count_indices(sd, r"vis_mae_decoder\.decoder_blocks\.(\d+)\.")
    kw.update(overrides)
    return SegCLIPConfig(**kw)


def clip_config(sd: Mapping[str, torch.Tensor], first_stage_layer: int = 10, **kw):
    """SegCLIPConfig for an OpenAI-layout CLIP ViT state dict."""
    return SegCLIPConfig(**_shared_sizes(sd, ""), first_stage_layer=first_stage_layer,
                         vision_layers=count_indices(sd, r"visual\.transformer\.resblocks\.(\d+)\."), **kw)
