"""Plain CLIP ViT (OpenAI state-dict layout) with dense per-token features, for the training-free segmenters.

    clip = CLIP.from_state_dict(state_dict)              # OpenAI layout; every size inferred
    clip.encode_image(images)                            # [B,3,H,W] -> [B,D]   CLIP's image embedding
    clip.encode_text(tokens)                             # [B,T]     -> [B,D]
    clip.encode_dense(images)                            # [B,3,H,W] -> [B,1+L,D] every token through ln_post, proj
    clip.visual.tokens_before_last(images)               # [B,3,H,W] -> [B,1+L,W] what the last block receives

The towers are built from the layers SegCLIP uses (``modules.layers``; the text tower is SegCLIP's own
``modeling.CLIP``). The training-free segmenters (seg_segmentation/methods/, design.md §12-§13) replace the last
visual block with their own computation on ``tokens_before_last`` and finish with ``visual.head``.
"""
from typing import Mapping

import torch
from torch import nn

from .clip_formats import ACTIVATIONS
from .config import SegCLIPConfig, clip_config
from .layers import MultiheadAttention, Transformer, resize_positions, run_blocks
from .modeling import CLIP as CLIPWithText
from .modeling import ViTBase
from .state_dict import CLIP_EXTRA_KEYS, load_into, require_keys

CLIP_REQUIRED_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "visual.class_embedding",
                      "text_projection", "token_embedding.weight", "positional_embedding", "ln_final.weight")


@torch.no_grad()
def round_weights_like_clip_load(model: nn.Module) -> nn.Module:
    """In place: round to float16 and back the tensors OpenAI's ``clip.load(..., jit=False)`` stores in float16
    (``clip.model.convert_weights``: conv / linear weights and biases, attention in-projections, ``proj``,
    ``text_projection``) before it casts the model to float32 on a CPU. A no-op on OpenAI's released weights, which
    are float16 already; it reproduces what code loading through ``clip.load`` computes with other float32 weights
    (the SCLIP reference fixture was recorded that way)."""
    for module in model.modules():
        tensors = []
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            tensors = [module.weight, module.bias]
        elif isinstance(module, MultiheadAttention):
            tensors = [module.in_proj_weight, module.in_proj_bias]
        tensors += [getattr(module, n, None) for n in ("proj", "text_projection")]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.copy_(t.half().to(t.dtype))
    return model


class DenseVisionTransformer(ViTBase):
    """``visual``: CLIP's plain ViT (``transformer.resblocks.{i}``) with dense outputs."""

    def __init__(self, cfg: SegCLIPConfig):
        super().__init__(cfg, Transformer(cfg.vision_width, cfg.vision_layers, cfg.vision_heads))

    def positional_embedding_for(self, h: int, w: int) -> torch.Tensor:
        """[1+h*w, W] as SCLIP resizes it (``layers.resize_positions``, DINO's rule): the stored √N×√N patch grid,
        bicubic with ``scale_factor`` = ((h+0.1)/√N, (w+0.1)/√N) - not ``size=`` - so the sampling positions are
        those of that factor, which differ slightly from SegCLIP's resize to the same grid
        (``ViTBase.positional_embedding_for``)."""
        return resize_positions(self.positional_embedding, h, w)

    def tokens_before_last(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> the input of the last block [B, 1+L, W]: where the training-free methods
        (seg_segmentation/methods/) change CLIP."""
        return run_blocks(self.transformer.resblocks[:-1], self.embed(images))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> last-block output [B, 1+L, W] (before ln_post)."""
        return self.transformer.resblocks[-1](self.tokens_before_last(images))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [..., W] -> ln_post then proj -> [..., D]: how CLIP turns its class token into the image
        embedding, applied here to any token."""
        x = self.ln_post(x)
        return x @ self.proj.to(x.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> CLIP's image embedding [B, D] (class token after ln_post, proj)."""
        return self.head(self.tokens(images)[:, 0])


class CLIP(CLIPWithText):
    """OpenAI CLIP ViT: SegCLIP's text tower (``modeling.CLIP``) with the plain visual tower; OpenAI's names."""

    def __init__(self, cfg: SegCLIPConfig):
        super().__init__(cfg, visual=DenseVisionTransformer(cfg))

    @property
    def patch_size(self) -> int:
        return self.visual.patch_size

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], activation: str = 'quick_gelu') -> "CLIP":
        """An OpenAI-layout CLIP ViT state dict (``modules.checkpoint.load_clip_weights`` reads every file format
        into one) -> CLIP; raises CheckpointError naming missing / unexpected / mis-shaped keys.

        ``activation``: the MLP's, which no state dict records: 'quick_gelu' (OpenAI's models) or 'gelu' (most
        open_clip models trained elsewhere; a transformers config.json says which)."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        sd = {k: v for k, v in state_dict.items() if k not in CLIP_EXTRA_KEYS}
        require_keys(sd, *CLIP_REQUIRED_KEYS)
        cfg = clip_config(sd, first_stage_layer=0)   # no center block in a plain CLIP
        with torch.device("meta"):                   # every tensor is overwritten: skip the random init
            model = cls(cfg)
        model.to_empty(device="cpu")
        load_into(model, sd, strict=True, what="CLIP")
        if activation == 'gelu':
            for block in list(model.transformer.resblocks) + list(model.visual.transformer.resblocks):
                block.mlp.gelu = nn.GELU()
        return model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (CLIP-normalised) -> [B, D] (not normalised)."""
        return self.visual(images)

    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, 1+L, D]: every token (class token first) through ln_post and proj, the
        unmodified CLIP (the training-free methods change the last block: seg_segmentation/methods/)."""
        return self.visual.head(self.visual.tokens(images))
