"""Reading checkpoints safely: SegCLIP state dicts and OpenAI CLIP weights (design.md §3, §9).

Files are read with ``torch.load(weights_only=True)`` (no arbitrary pickles); OpenAI's TorchScript archives are
read with ``torch.jit.load``. Every size of the model is inferred from the tensors.
"""
import logging
import os
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

from common.download import resolve_clip_weights
from .config import SegCLIPConfig
from .modeling import SegCLIP
from .state_dict import CLIP_EXTRA_KEYS, CheckpointError, as_state_dict, require_keys

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
WRAPPER_KEYS = ("state_dict", "model", "module")


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


# ---------------------------------------------------------------------------------------------- OpenAI CLIP
def load_clip_state_dict(path_or_state_dict, cache_dir: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A CLIP model name ('ViT-B/16'), a file, or a state dict -> OpenAI-layout state dict."""
    if isinstance(path_or_state_dict, Mapping):
        sd = as_state_dict(path_or_state_dict, "CLIP state dict")
    else:
        path = Path(path_or_state_dict)
        if not path.exists():
            path = resolve_clip_weights(str(path_or_state_dict), cache_dir=cache_dir)
        sd = load_state_dict_file(path)
    sd = {k: v for k, v in sd.items() if k not in CLIP_EXTRA_KEYS}
    require_keys(sd, "visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
             "token_embedding.weight", "positional_embedding", "ln_final.weight")
    return sd


# ---------------------------------------------------------------------------------------------- SegCLIP
def load_segclip(path: PathLike, device: Union[str, torch.device] = "cpu",
                 use_vision_mae_recon: Optional[bool] = None):
    """A SegCLIP checkpoint file -> SegCLIP in eval mode on ``device``."""
    sd = load_state_dict_file(path)
    try:
        model = SegCLIP.from_state_dict(sd, use_vision_mae_recon=use_vision_mae_recon)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    logger.info("loaded SegCLIP from %s (%d tensors, %.1fM parameters, MAE decoder %s)", path, len(sd),
                sum(p.numel() for p in model.parameters()) / 1e6, "on" if model.has_mae_decoder else "off")
    return model.to(device).eval()


def segclip_checkpoint_keys(**config) -> set:
    """Names of every tensor of a SegCLIP model with ``SegCLIPConfig(**config)`` — the defaults are the released
    ViT-B/16 checkpoint (415 keys). Built on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        return set(SegCLIP(SegCLIPConfig(**config)).state_dict())
