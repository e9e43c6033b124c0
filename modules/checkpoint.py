"""Reading checkpoints safely: SegCLIP state dicts and OpenAI CLIP weights (SPEC §3, §9).

Files are read with ``torch.load(weights_only=True)`` (no arbitrary pickles); OpenAI's TorchScript archives are
read with ``torch.jit.load``. Every size of the model is inferred from the tensors.
"""
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CLIP_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
WRAPPER_KEYS = ("state_dict", "model", "module")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model; the message says which keys."""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


def load_state_dict_file(path: PathLike) -> Dict[str, torch.Tensor]:
    """path -> {name: tensor} on CPU.  Accepts a plain state dict, a dict wrapping one under 'state_dict' /
    'model', a DDP-prefixed ('module.') dict, or a TorchScript archive (OpenAI CLIP files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if _is_torchscript(path):
        try:
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:  # noqa: BLE001 - report any failure of the archive reader the same way
            raise CheckpointError(f"{path} looks like a TorchScript archive but could not be read: {e}") from e
        return {k: v for k, v in sd.items() if k not in CLIP_EXTRA_KEYS}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path} is not a weights-only PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Expected a state dict saved with torch.save(model.state_dict(), path).") from e
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    return as_state_dict(obj, source=str(path))


def as_state_dict(obj, source: str = "state dict") -> Dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source} is not a state dict of tensors; offending entries: {bad[:5]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def _require(sd: Mapping[str, torch.Tensor], *keys: str):
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"not a SegCLIP/CLIP ViT state dict: missing {missing[:6]}"
                              f"{' ...' if len(missing) > 6 else ''} (found {len(sd)} keys, e.g. {list(sd)[:3]})")


def config_from_state_dict(sd: Mapping[str, torch.Tensor], use_vision_mae_recon: Optional[bool] = None, **overrides):
    """Infer a SegCLIPConfig from a SegCLIP state dict (2022 names)."""
    from .modeling import SegCLIPConfig
    _require(sd, "clip.visual.conv1.weight", "clip.visual.positional_embedding", "clip.text_projection",
             "clip.token_embedding.weight", "clip.positional_embedding", "clip.ln_final.weight",
             "clip.visual.transformer.semantic_layer2.semantic_center")
    conv = sd["clip.visual.conv1.weight"]
    patch = conv.shape[-1]
    grid = int(round((sd["clip.visual.positional_embedding"].shape[0] - 1) ** 0.5))
    first = _count(sd, r"clip\.visual\.transformer\.layers0\.(\d+)\.")
    second = _count(sd, r"clip\.visual\.transformer\.layers2\.(\d+)\.")
    text_width = sd["clip.ln_final.weight"].shape[0]
    has_decoder = any(k.startswith("vis_mae_decoder.") for k in sd)
    if use_vision_mae_recon is None:
        use_vision_mae_recon = has_decoder
    kw = dict(
        embed_dim=sd["clip.text_projection"].shape[1], image_resolution=patch * grid, vision_width=conv.shape[0],
        vision_layers=first + second, vision_patch_size=patch, context_length=sd["clip.positional_embedding"].shape[0],
        vocab_size=sd["clip.token_embedding.weight"].shape[0], text_width=text_width, text_heads=max(1, text_width // 64),
        text_layers=_count(sd, r"clip\.transformer\.resblocks\.(\d+)\."), first_stage_layer=first,
        num_centers=sd["clip.visual.transformer.semantic_layer2.semantic_center"].shape[0],
        mae_layers=_count(sd, r"clip\.visual\.transformer\.layers_mae2\.(\d+)\.") or 2,
        use_vision_mae_recon=use_vision_mae_recon)
    if has_decoder:
        kw["decoder_width"] = sd["vis_mae_decoder.decoder_embed.weight"].shape[0]
        kw["decoder_depth"] = _count(sd, r"vis_mae_decoder\.decoder_blocks\.(\d+)\.")
    kw.update(overrides)
    return SegCLIPConfig(**kw)


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy ``sd`` into ``model``; raise CheckpointError listing missing / unexpected / mis-shaped keys.

    ``vis_mae_decoder.*`` in the file is ignored when the model has no decoder (MAE branch off)."""
    own = model.state_dict()
    has_decoder = any(k.startswith("vis_mae_decoder.") for k in own)
    sd = {k: v for k, v in sd.items() if has_decoder or not k.startswith("vis_mae_decoder.")}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    misshaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
    if misshaped or (strict and (missing or unexpected)):
        def show(items):
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {show(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped tensors: {show(misshaped)}")
        raise CheckpointError("checkpoint does not fit the SegCLIP model: " + "; ".join(parts))
    if missing or unexpected:
        logger.warning("loading with %d missing and %d unexpected keys (missing: %s; unexpected: %s)",
                       len(missing), len(unexpected), missing[:5], unexpected[:5])
    model.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------------------------------------- OpenAI CLIP
def load_clip_state_dict(path_or_state_dict, cache_dir: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A CLIP model name ('ViT-B/16'), a file, or a state dict -> OpenAI-layout state dict."""
    if isinstance(path_or_state_dict, Mapping):
        sd = as_state_dict(path_or_state_dict, "CLIP state dict")
    else:
        path = Path(path_or_state_dict)
        if not path.exists():
            from .download import resolve_clip_weights
            path = resolve_clip_weights(str(path_or_state_dict), cache_dir=cache_dir)
        sd = load_state_dict_file(path)
    sd = {k: v for k, v in sd.items() if k not in CLIP_EXTRA_KEYS}
    _require(sd, "visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
             "token_embedding.weight", "positional_embedding", "ln_final.weight")
    return sd


def clip_config(sd: Mapping[str, torch.Tensor], first_stage_layer: int = 10, **kw):
    """SegCLIPConfig for an OpenAI-layout CLIP ViT state dict."""
    from .modeling import SegCLIPConfig
    conv = sd["visual.conv1.weight"]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    text_width = sd["ln_final.weight"].shape[0]
    return SegCLIPConfig(
        embed_dim=sd["text_projection"].shape[1], image_resolution=conv.shape[-1] * grid, vision_width=conv.shape[0],
        vision_layers=_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."), vision_patch_size=conv.shape[-1],
        context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
        text_width=text_width, text_heads=max(1, text_width // 64),
        text_layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),  # anchored at the start: text blocks only
        first_stage_layer=first_stage_layer, **kw)


def clip_to_segclip_key(key: str, first_stage_layer: int) -> str:
    """CLIP key -> SegCLIP key: prefix 'clip.'; visual blocks split into layers0 / layers2 at first_stage_layer."""
    m = re.match(r"visual\.transformer\.resblocks\.(\d+)\.(.*)", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i < first_stage_layer:
            return f"clip.visual.transformer.layers0.{i}.{rest}"
        return f"clip.visual.transformer.layers2.{i - first_stage_layer}.{rest}"
    return "clip." + key


def clip_to_segclip_state_dict(sd: Mapping[str, torch.Tensor], first_stage_layer: int) -> Dict[str, torch.Tensor]:
    return {clip_to_segclip_key(k, first_stage_layer): v for k, v in sd.items() if k not in CLIP_EXTRA_KEYS}


# ---------------------------------------------------------------------------------------------- SegCLIP
def load_segclip(path: PathLike, device: Union[str, torch.device] = "cpu",
                 use_vision_mae_recon: Optional[bool] = None):
    """A SegCLIP checkpoint file -> SegCLIP in eval mode on ``device``."""
    from .modeling import SegCLIP
    sd = load_state_dict_file(path)
    try:
        model = SegCLIP.from_state_dict(sd, use_vision_mae_recon=use_vision_mae_recon)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    logger.info("loaded SegCLIP from %s (%d tensors, %.1fM parameters, MAE decoder %s)", path, len(sd),
                sum(p.numel() for p in model.parameters()) / 1e6, "on" if model.has_mae_decoder else "off")
    return model.to(device).eval()
