"""Reading checkpoints safely: SegCLIP state dicts, OpenAI CLIP weights and DINO / DINOv2 (design.md §3, §9, §14).

Files are read with ``torch.load(weights_only=True)`` (no arbitrary pickles); OpenAI's TorchScript archives,
``.safetensors`` files and Hugging Face CLIP folders by ``modules.clip_formats``, which runs no code from a file.
Every size of the model is inferred from the tensors.
"""
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

from common.download import resolve_clip_weights, resolve_vfm_weights
from common.errors import brief
from common.fileio import temporary_owner
from common.state_keys import diff_keys
from .clip import CLIP
from .clip_formats import (ClipWeights, is_safetensors, is_torchscript, read_hf_folder, read_safetensors,
                           read_torchscript_state_dict, to_openai_layout)
from .config import SegCLIPConfig
from .modeling import SegCLIP
from .precision import set_precision
from .state_dict import CLIP_EXTRA_KEYS, CheckpointError, as_state_dict, check_finite, require_keys
from .vfm import VFM_CONFIGS, VisionTransformerVFM, describe, meta_state_dict

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
WRAPPER_KEYS = ("state_dict", "model", "module")


def load_state_dict_file(path: PathLike) -> Dict[str, torch.Tensor]:
    """path -> {name: tensor} on CPU.  Accepts a plain state dict, a dict wrapping one under 'state_dict' /
    'model', a DDP-prefixed ('module.') dict, a TorchScript archive (OpenAI CLIP files; read without running it)
    or a ``.safetensors`` file.

    Every weights file the project reads passes here (SegCLIP checkpoints, CLIP weights of every format, the weights
    file of a Hugging Face folder), so this is where NaN / inf values are refused, whatever the format."""
    path = Path(path)
    return check_finite(_read_state_dict_file(path), source=str(path))


def _read_state_dict_file(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if is_torchscript(path):
        sd = read_torchscript_state_dict(path)
        return as_state_dict({k: v for k, v in sd.items() if k not in CLIP_EXTRA_KEYS}, source=str(path))
    if is_safetensors(path):
        return as_state_dict(read_safetensors(path), source=str(path))
    try:
        # memory-mapped (zip files, i.e. every torch.save since 1.6): pages are read as the tensors are used, and
        # a model built with take_ownership keeps them without a copy
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the file's bytes say what it is
        raise unreadable_checkpoint(path, e) from e
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    return as_state_dict(obj, source=str(path))


_REDOWNLOAD = "delete it and download it again"


def unreadable_checkpoint(path: Path, e: BaseException) -> CheckpointError:
    """What a file that ``torch.load(weights_only=True)`` refused is, from its bytes: empty, an HTML page, a partial
    download, a truncated archive, a pickle of Python objects, or something else; and what to do about it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as err:
        return CheckpointError(f"{path} cannot be read ({err.strerror or err})")
    low = head.lstrip().lower()
    if size == 0:
        return CheckpointError(f"{path} is empty (0 bytes), left by an interrupted download or copy; {_REDOWNLOAD}")
    if low.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")) or b"<html" in low[:512]:
        return CheckpointError(f"{path} is an HTML page ({size:,} bytes), not a checkpoint: the download saved an "
                               f"error or sign-in page instead of the file; {_REDOWNLOAD}")
    if path.name.endswith(".part") or temporary_owner(path.name) is not None:   # a browser's or ours
        return CheckpointError(f"{path} is the temporary file of an unfinished download ({size:,} bytes); "
                               f"{_REDOWNLOAD}")
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return CheckpointError(f"{path} is truncated ({size:,} bytes; the end of the archive is missing), left by "
                               f"an interrupted download or copy; {_REDOWNLOAD}")
    text = str(e)
    refused = "Weights only load failed" in text        # torch's safe reader met something it does not read
    # torch names the first global it refuses ("Unsupported global: GLOBAL x.y", or in newer versions "unsupported
    # GLOBAL x.y whose module x is blocked"); an old-protocol pickle it cannot even parse is read for its globals
    found = re.search(r"unsupported global:? GLOBAL ([\w.]+)", text, re.IGNORECASE)
    foreign = found.group(1) if found else (pickle_foreign_global(path) if refused and head[:1] != b"\x80" else None)
    if foreign:
        return CheckpointError(f"{path} holds Python objects (such as {foreign}), not only tensors; reading them "
                               "would run code, so the file is refused (it is not damaged: downloading it again does "
                               "not help). Save the weights alone, with torch.save(model.state_dict(), path)")
    if head[:1] == b"\x80":      # a pickle protocol byte: the pre-zip torch.save format, or plain pickle.dump
        if refused:
            return CheckpointError(f"{path} is a pickle that is not a weights-only PyTorch checkpoint (written by "
                                   "pickle itself, or holding Python objects); reading it could run code, so it is "
                                   "not loaded. Save the weights with torch.save(model.state_dict(), path)")
        return CheckpointError(f"{path} is truncated or damaged ({size:,} bytes; {brief(e)}); {_REDOWNLOAD}")
    if head.startswith(b"PK\x03\x04"):
        return CheckpointError(f"{path} is a damaged archive ({size:,} bytes; {brief(e)}); {_REDOWNLOAD}")
    if refused:
        return CheckpointError(f"{path} is not a weights-only PyTorch checkpoint ({size:,} bytes that torch.load "
                               "cannot read as tensors). Expected a state dict saved with "
                               "torch.save(model.state_dict(), path)")
    return CheckpointError(f"{path} is not a weights-only PyTorch checkpoint ({brief(e)}). Expected a state dict "
                           "saved with torch.save(model.state_dict(), path)")


# Globals a weights-only file refers to (torch's tensor and storage rebuilding, OrderedDict, bytes in protocol 2).
_WEIGHTS_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode")
_MAX_PICKLE_SCAN = 64 << 20     # a checkpoint's pickle is kilobytes: only this much is read to look for globals


def pickle_foreign_global(path: Path) -> Optional[str]:
    """The first global (module.name) a pickle in ``path`` refers to beyond what a weights file holds -- an object
    to build or a function to call -- or None. Read from its opcodes with ``pickletools`` (which runs nothing):
    a plain pickle file (every protocol; several in a row, as the pre-zip torch.save writes), or the data.pkl of
    a zip checkpoint."""
    import io
    import pickletools
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                infos = [i for i in zf.infolist() if i.filename.endswith("data.pkl")]
                if not infos or infos[0].file_size > _MAX_PICKLE_SCAN:
                    return None
                data = zf.read(infos[0])
        else:
            with open(path, "rb") as f:
                data = f.read(_MAX_PICKLE_SCAN)
    except (OSError, zipfile.BadZipFile):
        return None
    stream, strings = io.BytesIO(data), []
    for _ in range(8):                  # the pre-zip format: magic number, protocol, system info, the object
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    name = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                else:
                    if isinstance(arg, str):
                        strings.append(arg)
                    continue
                if not name.startswith(_WEIGHTS_GLOBALS):
                    return name
        except Exception:  # noqa: BLE001 - the end of the pickles (storage bytes follow) or damage: stop looking
            return None
        if stream.tell() >= len(data):
            return None
    return None


# ---------------------------------------------------------------------------------------------- OpenAI CLIP
def load_clip_weights(path_or_state_dict, cache_dir: Optional[str] = None) -> ClipWeights:
    """A CLIP model name ('ViT-B/16'), a file (OpenAI TorchScript, a state dict, an open_clip checkpoint,
    ``.safetensors``), a Hugging Face ``transformers`` CLIP folder, or a state dict -> OpenAI-layout ClipWeights."""
    if isinstance(path_or_state_dict, Mapping):
        weights = to_openai_layout(check_finite(as_state_dict(path_or_state_dict, "CLIP state dict"),
                                                "CLIP state dict"))
    else:
        path = Path(path_or_state_dict)
        if not path.exists():
            path = resolve_clip_weights(str(path_or_state_dict), cache_dir=cache_dir)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise CheckpointError(f"{path} is a folder without config.json; give a CLIP weights file or a "
                                      "Hugging Face CLIP folder (config.json + model.safetensors / pytorch_model.bin)")
            weights = read_hf_folder(path, load_state_dict_file)
        else:
            weights = to_openai_layout(load_state_dict_file(path), str(path))
    sd = {k: v for k, v in weights.state_dict.items() if k not in CLIP_EXTRA_KEYS}
    require_keys(sd, "visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
             "token_embedding.weight", "positional_embedding", "ln_final.weight")
    weights.state_dict = sd
    return weights


def load_clip_state_dict(path_or_state_dict, cache_dir: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """As ``load_clip_weights``, for SegCLIP (``SegCLIP.from_clip``), whose towers use CLIP's QuickGELU: weights
    known to use another activation are refused."""
    weights = load_clip_weights(path_or_state_dict, cache_dir)
    if weights.activation not in (None, "quick_gelu"):
        raise CheckpointError(f"{path_or_state_dict if not isinstance(path_or_state_dict, Mapping) else 'CLIP'}: "
                              f"these CLIP weights use the {weights.activation} activation; SegCLIP is built on "
                              "OpenAI CLIP's QuickGELU (use them with --method clip or sclip)")
    return weights.state_dict


def load_clip(path_or_state_dict, cache_dir: Optional[str] = None, device: Union[str, torch.device] = "cpu",
              activation: Optional[str] = None):
    """Any CLIP weights ``load_clip_weights`` reads -> ``modules.clip.CLIP`` in eval mode on ``device``.
    ``activation`` ('quick_gelu' | 'gelu') overrides what the file says (open_clip files do not say: QuickGELU,
    OpenAI's, is assumed)."""
    weights = load_clip_weights(path_or_state_dict, cache_dir)
    model = CLIP.from_state_dict(weights.state_dict, activation=activation or weights.activation or "quick_gelu")
    logger.info("loaded CLIP (%s layout, %s) with %.1fM parameters", weights.layout,
                activation or weights.activation or "quick_gelu", sum(p.numel() for p in model.parameters()) / 1e6)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- SegCLIP
def load_segclip(path: PathLike, device: Union[str, torch.device] = "cpu",
                 use_vision_mae_recon: Optional[bool] = None, precision: str = "fp32"):
    """A SegCLIP checkpoint file -> SegCLIP in eval mode on ``device`` at ``precision`` (modules/precision.py).

    Built without random initialisation, on the file's (memory-mapped) tensors."""
    sd = load_state_dict_file(path)
    try:
        model = SegCLIP.from_state_dict(sd, use_vision_mae_recon=use_vision_mae_recon, take_ownership=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    logger.info("loaded SegCLIP from %s (%d tensors, %.1fM parameters, MAE decoder %s)", path, len(sd),
                sum(p.numel() for p in model.parameters()) / 1e6, "on" if model.has_mae_decoder else "off")
    return set_precision(model.to(device), precision).eval()


def segclip_checkpoint_keys(**config) -> set:
    """Names of every tensor of a SegCLIP model with ``SegCLIPConfig(**config)`` — the defaults are the released
    ViT-B/16 checkpoint (415 keys). Built on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        return set(SegCLIP(SegCLIPConfig(**config)).state_dict())


# ---------------------------------------------------------------------------------------------- DINO / DINOv2
def load_vfm(name_or_file, cache_dir: Optional[str] = None, device: Union[str, torch.device] = "cpu"
             ) -> VisionTransformerVFM:
    """The second vision model of ProxyCLIP / CASS (``--vfm``; design.md §14) -> ``modules.vfm.VisionTransformerVFM``
    in eval mode on ``device``.

    A name of ``common.download.VFM_URLS`` ('dino_vitb8', 'dinov2_vitb14_reg', ...): the official file in the cache,
    downloaded when missing and accepted only when it holds exactly that model's tensors (no checksums are
    published). A file: a DINO / DINOv2 state dict in the official layout, every size read from its tensors."""
    name = str(name_or_file)
    expected = VFM_CONFIGS.get(name)
    path = resolve_vfm_weights(name, cache_dir=cache_dir, verify=lambda p: check_vfm_file(p, name))
    sd = load_state_dict_file(path)
    try:
        model = VisionTransformerVFM.from_state_dict(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if expected is not None and model.config != expected:
        raise CheckpointError(f"{path} holds a {describe(model.config)}, not {name} ({describe(expected)}); "
                              f"{_REDOWNLOAD}")
    logger.info("loaded %s from %s (%.1fM parameters)", describe(model.config), path,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model.to(device).eval()


def check_vfm_file(path: PathLike, name: str) -> None:
    """ValueError unless the file at ``path`` holds exactly the tensors (names and shapes) of the released ``name``:
    the check of a downloaded DINO / DINOv2 file (read memory-mapped, nothing loaded whole)."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the file is not a weights-only checkpoint
        raise ValueError(f"not a loadable state dict: {brief(e)}") from None
    if not isinstance(sd, Mapping):
        raise ValueError(f"holds a {type(sd).__name__}, not a state dict")
    diff = diff_keys(meta_state_dict(VFM_CONFIGS[name]), sd)
    if diff:
        raise ValueError(f"expected the tensors of the released {name}: {diff.describe(limit=3)}")
