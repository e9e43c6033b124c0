"""SegCLIP: CLIP ViT whose visual tower groups patches with learnable centers (design.md §2).

    model = SegCLIP.from_state_dict(torch.load("segclip.bin", weights_only=True))
    out = model.encode_image(images)     # image_embed [B,D], group_embeds [B,G,D], soft_attn / hard_attn [B,G,L]
    text = model.encode_text(tokenize(["a photo of a cat."]))

Module names are the state-dict names of the 2022 code (``clip.visual.transformer.layers0`` ...), so the released
checkpoint loads unchanged. Every size is read from the state dict.
"""
import contextlib
import math
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import SegCLIPConfig, config_from_state_dict
from .centers import LearnableCenterBlock, ReconstructLayer
from .layers import LayerNorm, ResidualAttentionBlock, Transformer, run_blocks
from .losses import contrastive_loss, mae_loss, superpixel_kl_loss
from .mae import MAEDecoder, random_masking
from .state_dict import check_shapes, clip_to_segclip_state_dict, load_into


class ImageOutput(NamedTuple):
    image_embed: torch.Tensor    # [B, D]     max over group tokens, after ln_post/proj
    group_embeds: torch.Tensor   # [B, G, D]
    soft_attn: torch.Tensor      # [B, G, L]  softmax of the center-patch logits over G
    hard_attn: torch.Tensor      # [B, G, L]  one-hot patch -> center assignment (straight-through)


class SegTransformer(nn.Module):
    """``clip.visual.transformer``: layers0 on patches, the center block, layers2 on the groups (+ MAE parts)."""

    def __init__(self, cfg: SegCLIPConfig):
        super().__init__()
        W, H = cfg.vision_width, cfg.vision_heads
        self.layers0 = nn.Sequential(*[ResidualAttentionBlock(W, H) for _ in range(cfg.first_stage_layer)])
        self.semantic_layer2 = LearnableCenterBlock(W, H, cfg.num_centers)
        self.layers2 = nn.Sequential(*[ResidualAttentionBlock(W, H)
                                       for _ in range(cfg.vision_layers - cfg.first_stage_layer)])
        self.layers_mae2 = nn.Sequential(*[ResidualAttentionBlock(W, H) for _ in range(cfg.mae_layers)])
        self.reconstruct_layer2 = ReconstructLayer(cfg.num_centers)


class ViTBase(nn.Module):
    """CLIP's ViT stem and head (conv1, class / positional embeddings, ln_pre, ln_post, proj) around a
    ``transformer``: SegCLIP's grouping transformer here, plain ``resblocks`` in ``modules.clip``."""

    def __init__(self, cfg: SegCLIPConfig, transformer: nn.Module):
        super().__init__()
        W, p = cfg.vision_width, cfg.vision_patch_size
        self.patch_size = p
        scale = W ** -0.5
        self.conv1 = nn.Conv2d(3, W, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(W))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size ** 2 + 1, W))
        self.ln_pre = LayerNorm(W)
        self.transformer = transformer
        self.ln_post = LayerNorm(W)
        self.proj = nn.Parameter(scale * torch.randn(W, cfg.embed_dim))

    def positional_embedding_for(self, h: int, w: int) -> torch.Tensor:
        """[1+h*w, W]; the patch part is resized bicubically when the grid differs from the stored one."""
        pos = self.positional_embedding
        n = pos.shape[0] - 1
        side = int(round(math.sqrt(n)))
        if (h, w) == (side, side):
            return pos
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> tokens after ln_pre [B, 1+L, W] (class token first)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; "
                             f"resize or pad it to multiples of {p}")
        x = self.conv1(images.to(self.conv1.weight.dtype))                   # [B, W, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                      # [B, L, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding_for(h, w).to(x.dtype)
        return self.ln_pre(x)


class VisionTransformer(ViTBase):
    """``clip.visual``: CLIP's ViT with the learnable-center block after ``first_stage_layer`` blocks."""

    def __init__(self, cfg: SegCLIPConfig):
        super().__init__(cfg, SegTransformer(cfg))

    def group(self, patches: torch.Tensor, gumbel_noise: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """patches [B, L, W] -> group tokens [B, G, W], hard_attn, soft_attn [B, G, L] (layers0 + center block)."""
        return self.transformer.semantic_layer2(run_blocks(self.transformer.layers0, patches), gumbel_noise)

    def forward_patches(self, patches: torch.Tensor, gumbel_noise: Optional[torch.Tensor] = None) -> ImageOutput:
        """Full pass over patch tokens [B, L, W] (class token already dropped) -> ImageOutput."""
        groups, hard_attn, soft_attn = self.group(patches, gumbel_noise)
        groups = run_blocks(self.transformer.layers2, groups)                 # [B, G, W]
        x = torch.cat([groups.max(dim=1, keepdim=True).values, groups], dim=1)   # [B, 1+G, W]
        x = self.ln_post(x) @ self.proj.to(x.dtype)                           # [B, 1+G, D]
        return ImageOutput(x[:, 0], x[:, 1:], soft_attn, hard_attn)

    def forward(self, images: torch.Tensor, gumbel_noise: Optional[torch.Tensor] = None) -> ImageOutput:
        return self.forward_patches(self.embed(images)[:, 1:], gumbel_noise)  # the class token is never used

    def forward_plain(self, patches: torch.Tensor) -> torch.Tensor:
        """Plain CLIP pass (center block skipped): every visual block on the patch tokens [B, L, W], max-pooled over
        them as ``forward_patches`` pools the groups -> image_embed [B, D]. Training the same blocks, pooling and
        projection as a CLIP first gives the SegCLIP stage a CLIP whose tokens already carry text concepts."""
        x = run_blocks(self.transformer.layers2, run_blocks(self.transformer.layers0, patches))   # [B, L, W]
        return self.ln_post(x.max(dim=1).values) @ self.proj.to(x.dtype)


class CLIP(nn.Module):
    """``clip``: OpenAI CLIP's text tower + a visual tower (SegCLIP's by default; plain CLIP's in ``modules.clip``)."""

    def __init__(self, cfg: SegCLIPConfig, visual: Optional[nn.Module] = None):
        super().__init__()
        self.context_length = cfg.context_length
        self.visual = VisionTransformer(cfg) if visual is None else visual
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads)
        self.vocab_size = cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [B, T] (T <= context_length, EOT = largest id) -> [B, D]."""
        if token_ids.dim() != 2:
            raise ValueError(f"expected token ids [B, T], got shape {tuple(token_ids.shape)}")
        B, T = token_ids.shape
        if T > self.context_length:
            raise ValueError(f"{T} tokens exceed the context length {self.context_length}")
        # Value check only where it is free: on a GPU it would stall the stream every forward, and ids from the
        # tokenizer (tokenize_captions) are in range by construction.
        if token_ids.device.type == "cpu" and token_ids.numel() and (token_ids.min() < 0
                                                                     or token_ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got min {int(token_ids.min())}, "
                             f"max {int(token_ids.max())}")
        x = self.token_embedding(token_ids) + self.positional_embedding[:T]
        x = self.ln_final(self.transformer(x, causal=True))                   # [B, T, Wt]
        x = x[torch.arange(B, device=x.device), token_ids.argmax(dim=-1)]     # features at the EOT token
        return x @ self.text_projection.to(x.dtype)


class _SkipMetaInit(TorchFunctionMode):
    """Initialisers on meta tensors compute nothing, yet the first ``normal_`` / ``randn`` there costs seconds (it
    loads PyTorch's Python decompositions and TorchDynamo); skip them: in-place ops on meta tensors return their
    target, ``randn`` becomes ``empty``, a meta tensor times a number stays a meta tensor of its shape."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")      # nn.init functions take ``tensor=`` by keyword
        on_meta = isinstance(target, torch.Tensor) and target.is_meta
        if on_meta and name.endswith("_") and not name.endswith("__"):
            return target
        if func in (torch.randn, torch.rand):
            return torch.empty(*args, **kwargs)
        if on_meta and name in ("mul", "__mul__", "__rmul__") and len(args) == 2 \
                and isinstance(args[1], (int, float)):           # `scale * torch.randn(...)`
            return torch.empty(target.shape, dtype=target.dtype)
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_construction():
    """Modules built inside have meta parameters (shapes, no memory) and ran no initialiser."""
    with torch.device("meta"), _SkipMetaInit():
        yield


class SegCLIP(nn.Module):
    def __init__(self, config: SegCLIPConfig):
        super().__init__()
        self.config = config.validate()
        self.clip = CLIP(config)
        if config.use_vision_mae_recon:
            self.vis_mae_decoder = MAEDecoder(config.vision_width, config.grid_size ** 2, config.vision_patch_size,
                                              config.decoder_width, config.decoder_depth, config.decoder_heads)
        self.initialize_parameters()

    # ------------------------------------------------------------------ construction
    def initialize_parameters(self):
        """design.md §3: Linear/Embedding N(0, 0.02), biases 0, LayerNorm 1/0; CLIP's own tensors as CLIP inits them."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data.normal_(mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.data.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.data.fill_(1.0)
                module.bias.data.zero_()
        c = self.clip
        nn.init.normal_(c.positional_embedding, std=0.01)
        nn.init.normal_(c.text_projection, std=c.transformer.width ** -0.5)

    @property
    def patch_size(self) -> int:
        return self.config.vision_patch_size

    @property
    def has_mae_decoder(self) -> bool:
        return hasattr(self, "vis_mae_decoder")

    @staticmethod
    def config_from_state_dict(sd: Mapping[str, torch.Tensor], **overrides) -> SegCLIPConfig:
        return config_from_state_dict(sd, **overrides)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], use_vision_mae_recon: Optional[bool] = None,
                        strict: bool = True, take_ownership: bool = False, **overrides) -> "SegCLIP":
        """Build from a SegCLIP checkpoint (e.g. the released ``segclip.bin``); every size is inferred.

        With ``strict`` (every tensor in the file) the model is built on the meta device and gets the file's
        tensors: no random initialisation that the checkpoint would overwrite (1.6 s for ViT-B/16 on 2 cores).
        ``take_ownership``: the model keeps ``state_dict``'s tensors themselves (a dict just read from a file)
        instead of copies, so the caller must not use them afterwards.
        ``vis_mae_decoder.*`` may be absent (the MAE branch is then off). Raises ``CheckpointError`` listing
        missing / unexpected / mis-shaped keys.
        """
        cfg = config_from_state_dict(state_dict, use_vision_mae_recon=use_vision_mae_recon, **overrides)
        if not strict:   # missing tensors keep their initialisation
            model = cls(cfg)
            load_into(model, state_dict, strict=False)
            return model
        with meta_construction():
            model = cls(cfg)
        if not take_ownership:
            state_dict = {k: v.clone() for k, v in state_dict.items()}
        load_into(model, state_dict, strict=True, assign=True)
        return model

    @classmethod
    def from_clip(cls, clip_state_dict: Mapping[str, torch.Tensor], first_stage_layer: int = 10,
                  use_vision_mae_recon: bool = True, use_seglabel: bool = True, **overrides) -> "SegCLIP":
        """Build from an OpenAI-layout CLIP ViT state dict (design.md, "Initialisation from CLIP"): CLIP tensors
        are copied in, the centers, the MAE blocks and the decoder are freshly initialised. Files and model names
        are read by ``modules.checkpoint.load_clip_state_dict``."""
        from .config import clip_config
        cfg = clip_config(clip_state_dict, first_stage_layer=first_stage_layer,
                          use_vision_mae_recon=use_vision_mae_recon, use_seglabel=use_seglabel, **overrides)
        model = cls(cfg)
        mapped = clip_to_segclip_state_dict(clip_state_dict, first_stage_layer)
        check_shapes(model.state_dict(), mapped, what="CLIP tensor")
        model.load_state_dict(mapped, strict=False)
        return model

    # ------------------------------------------------------------------ inference
    def encode_image(self, images: torch.Tensor, gumbel_noise: Optional[torch.Tensor] = None) -> ImageOutput:
        """images [B, 3, H, W] (normalised; H, W multiples of the patch size) -> ImageOutput."""
        return self.clip.visual(images, gumbel_noise)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [B, T] -> text embeddings [B, D] (not normalised)."""
        return self.clip.encode_text(token_ids)

    def logit_scale_value(self) -> torch.Tensor:
        """s = min(exp(logit_scale), 100)."""
        return self.clip.logit_scale.exp().clamp(max=100)

    # ------------------------------------------------------------------ training
    def compute_losses(self, input_ids: torch.Tensor, images: torch.Tensor, superpixels: Optional[torch.Tensor] = None,
                       gumbel_noise: Optional[Sequence[Optional[torch.Tensor]]] = None,
                       mae_noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """design.md §4.  input_ids [B, T]; images [B, 3, H, W]; superpixels [B, h, w] patch labels;
        gumbel_noise = (full pass [B, G, L], MAE pass [B, G, K]); mae_noise [B, 1+L].

        Returns 'contrastive', 'kl', 'mae' (the terms that are on) and 'total'; with ``config.plain_clip`` only
        'contrastive' and 'total', from ``VisionTransformer.forward_plain``. No attention mask: CLIP's causal
        mask and EOT pooling ignore the padding already. The loss functions run in fp32 outside autocast.
        """
        full_noise, mae_pass_noise = (gumbel_noise if gumbel_noise is not None else (None, None))
        visual = self.clip.visual
        text = self.encode_text(input_ids)                                    # [B, D]
        tokens = visual.embed(images)                                         # [B, 1+L, W], shared by both passes
        if self.config.plain_clip:   # CLIP pretraining stage: no centers, so no superpixel or MAE term
            image_embed = visual.forward_plain(tokens[:, 1:])
            loss = contrastive_loss(image_embed, text, self.logit_scale_value())
            return {"contrastive": loss, "total": loss}
        out = visual.forward_patches(tokens[:, 1:], full_noise)
        losses = {"contrastive": contrastive_loss(out.image_embed, text, self.logit_scale_value())}

        if self.config.use_seglabel and superpixels is not None:
            losses["kl"] = superpixel_kl_loss(out.hard_attn, superpixels)

        if self.config.use_vision_mae_recon:
            if not self.has_mae_decoder:
                raise RuntimeError("use_vision_mae_recon is on but this model has no vis_mae_decoder")
            kept, mask, ids_restore = random_masking(tokens, self.config.mae_mask_ratio, mae_noise)
            groups, hard_attn, _ = visual.group(kept[:, 1:], mae_pass_noise)  # [B, G, W], [B, G, K]
            rec = visual.transformer.reconstruct_layer2(hard_attn, groups)    # [B, K, W]
            rec = run_blocks(visual.transformer.layers_mae2, rec)
            pred = self.vis_mae_decoder(rec, ids_restore)                     # [B, L, p*p*3]
            losses["mae"] = mae_loss(pred, images, mask[:, 1:], self.patch_size)

        losses["total"] = sum(losses.values())
        return losses
