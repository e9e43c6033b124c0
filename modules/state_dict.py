"""Pure functions on state dicts (no files): validation, key diffing, CLIP -> SegCLIP key mapping.

State-dict names are those of the released checkpoint (docs/design.md, "State-dict names").
"""
import logging
import re
from typing import Dict, Mapping

import torch
from torch import nn

from common.errors import SegCLIPError
from common.state_keys import diff_keys

logger = logging.getLogger(__name__)

CLIP_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")   # non-tensor entries of OpenAI's archives


class CheckpointError(SegCLIPError, ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model; the message says which keys."""


def as_state_dict(obj, source: str = "state dict") -> Dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source} is not a state dict of tensors; offending entries: {bad[:5]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def all_finite(v: torch.Tensor) -> bool:
    """One pass and no tensor-sized temporary (isfinite().all() costs 5x more on a 755 MB checkpoint, and this runs
    on every load): min and max propagate NaN, and are +-inf exactly when some value is."""
    if v.is_complex():
        return bool(torch.isfinite(v).all())
    lo, hi = torch.aminmax(v)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> Dict[str, torch.Tensor]:
    """``sd`` unchanged, or CheckpointError naming the first tensor with NaN or inf values (such weights make every
    prediction the same class without any error)."""
    for k, v in sd.items():
        if (v.is_floating_point() or v.is_complex()) and v.numel() and not all_finite(v):
            bad = ~torch.isfinite(v)
            if bool(bad.any()):
                nan = int(torch.isnan(v).sum())
                raise CheckpointError(f"{source}: tensor {k} holds {nan} NaN and {int(bad.sum()) - nan} inf values "
                                      f"of {v.numel()}; the weights are damaged (or were saved after training "
                                      "diverged): use another checkpoint")
    return dict(sd)


def refuse_clip_layout(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """CheckpointError when ``sd`` is an OpenAI CLIP state dict where a SegCLIP checkpoint belongs."""
    if "visual.conv1.weight" in sd and not any(k.startswith("clip.") for k in sd):
        raise CheckpointError(f"{source} is an OpenAI CLIP state dict (keys such as visual.conv1.weight), not a "
                              "SegCLIP checkpoint: CLIP weights are given with --pretrained_clip_name")


def count_indices(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def require_keys(sd: Mapping[str, torch.Tensor], *keys: str):
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"not a SegCLIP/CLIP ViT state dict: missing {missing[:6]}"
                              f"{' ...' if len(missing) > 6 else ''} (found {len(sd)} keys, e.g. {list(sd)[:3]})")


def check_shapes(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], what: str = "tensor") -> None:
    """Raise CheckpointError for the first tensor of ``sd`` whose shape differs from ``own``'s."""
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(f"{what} {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True, what: str = "SegCLIP",
              assign: bool = False) -> None:
    """Copy ``sd`` into ``model``; raise CheckpointError listing missing / unexpected / mis-shaped keys.

    ``assign``: the model's tensors become ``sd``'s (cast to the model's dtype where it differs) instead of copies
    - for a model built on the meta device, which then owns them; every key must be present.
    ``vis_mae_decoder.*`` in the file is ignored when the model has no decoder (MAE branch off)."""
    own = model.state_dict()
    if "clip.visual.conv1.weight" in own:        # a SegCLIP model (plain CLIP models take CLIP's own layout)
        refuse_clip_layout(sd, "the checkpoint")
    has_decoder = any(k.startswith("vis_mae_decoder.") for k in own)
    sd = {k: v for k, v in sd.items() if has_decoder or not k.startswith("vis_mae_decoder.")}
    diff = diff_keys(own, sd)
    missing, unexpected = diff.missing, diff.unexpected
    if diff.misshaped or (strict and diff):
        raise CheckpointError(f"checkpoint does not fit the {what} model: {diff.describe()}")
    if missing or unexpected:
        logger.warning("loading with %d missing and %d unexpected keys (missing: %s; unexpected: %s)",
                       len(missing), len(unexpected), missing[:5], unexpected[:5])
    if assign:
        if missing:
            raise CheckpointError(f"cannot build the model from a state dict without {missing[:5]}")
        sd = {k: v if v.dtype == own[k].dtype else v.to(own[k].dtype) for k, v in sd.items() if k in own}
    model.load_state_dict(sd, strict=False, assign=assign)


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
