"""Training-state files for resuming, written atomically, readable with ``torch.load(weights_only=True)``.

A state file holds the model weights, optimizer / LR schedule / grad-scaler states, the position in the data
(epoch, micro-batches done in that epoch, optimizer steps done) and every rank's RNG states, so a resumed run sees
the same batches and draws the same noise as an uninterrupted one.
"""
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch

from common.errors import SegCLIPError
from common.fileio import atomic_torch_save  # noqa: F401  (re-exported: the training state is saved with it)

STATE_FORMAT = "segclip-train-state/1"
STATE_NAME = "training_state.pt"
PathLike = Union[str, os.PathLike]


class ResumeError(SegCLIPError, ValueError):
    """A resume file is missing, corrupt, or was written for a different model / optimizer setup."""


# ---------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors / ints / lists only (safe for ``weights_only`` loading)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npk = state["numpy"]
    np.random.set_state(("MT19937", npk["keys"].numpy().astype(np.uint32), npk["pos"], npk["has_gauss"],
                         npk["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- files
def find_resume_file(output_dir: PathLike) -> Optional[Path]:
    """The latest training state in ``output_dir`` (for ``--resume auto``), or None."""
    path = Path(output_dir) / STATE_NAME
    return path if path.is_file() else None


def load_training_state(path: PathLike) -> Dict[str, Any]:
    """Read a state file written by ``engine.training``; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"resume file not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ResumeError(f"{path} is not a readable training state ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        if isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ResumeError(f"{path} is a model state dict, not a training state: pass it as --init_model "
                              f"(that starts a new schedule), or resume from {STATE_NAME} in the output folder")
        if isinstance(state, Mapping) and "optimizer_state_dict" in state:
            raise ResumeError(f"{path} is a 2022 'pytorch_opt.bin' optimizer file, whose optimizer state this "
                              f"implementation cannot continue; start from its weights with --init_model")
        raise ResumeError(f"{path} is not a SegCLIP training state (no '{STATE_FORMAT}' marker)")
    return dict(state)


def check_model_fits(model_sd: Mapping[str, torch.Tensor], saved_sd: Mapping[str, torch.Tensor],
                     source: str = "resume file") -> None:
    """Raise ResumeError when the saved weights do not match the model built from the current flags."""
    missing = sorted(set(model_sd) - set(saved_sd))
    unexpected = sorted(set(saved_sd) - set(model_sd))
    misshaped = [f"{k}: saved {tuple(saved_sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
                 for k in model_sd if k in saved_sd and saved_sd[k].shape != model_sd[k].shape]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        raise ResumeError(f"{source} was written for a different model architecture than the one these flags "
                          f"build (--pretrained_clip_name, --first_stage_layer, --use_vision_mae_recon ...): "
                          + "; ".join(parts))


def make_training_state(*, model_sd: Mapping[str, torch.Tensor], optimizer, scheduler, scaler, epoch: int,
                        micro_step: int, global_step: int, rng_states: List[Dict[str, Any]],
                        extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    state = {
        "format": STATE_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model_sd.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": int(epoch),                # epoch in progress (0-based)
        "micro_step": int(micro_step),      # micro-batches of that epoch already consumed
        "global_step": int(global_step),    # optimizer steps taken so far (attempted, incl. skipped ones)
        "rng": rng_states,                  # one entry per rank
    }
    if extra:
        state.update(extra)
    return state
