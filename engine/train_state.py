"""Training-state files for resuming, written atomically, readable with ``torch.load(weights_only=True)``.

A state file holds the model weights, optimizer / LR schedule / grad-scaler states, the position in the data
(epoch, micro-batches done in that epoch, optimizer steps done) and every rank's RNG states, so a resumed run sees
the same batches and draws the same noise as an uninterrupted one.
"""
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from common.errors import SegCLIPError, brief
from common.fileio import atomic_torch_save
from common.state_keys import diff_keys

from .distributed import DistEnv, all_gather_objects, broadcast_object, on_main_process

logger = logging.getLogger("segclip.train")

STATE_FORMAT = "segclip-train-state/1"
STATE_NAME = "training_state.pt"
WEIGHTS_NAME = "pytorch_model.bin.{epoch}"    # the 2022 name, 0-based epoch
RESEED_STRIDE = 7919       # resume on another process count: noise seed = seed + RESEED_STRIDE * (step + 1) + rank
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
        raise ResumeError(f"{path} is not a readable training state ({brief(e)})") from e
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        if isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ResumeError(f"{path} is a model state dict, not a training state: pass it as --init_model "
                              f"(that starts a new schedule), or resume from {STATE_NAME} in the output folder")
        if isinstance(state, Mapping) and "optimizer_state_dict" in state:
            raise ResumeError(f"{path} is a 2022 'pytorch_opt.bin' optimizer file, whose optimizer state this "
                              f"implementation cannot continue; start from its weights with --init_model")
        raise ResumeError(f"{path} is not a SegCLIP training state (no '{STATE_FORMAT}' marker)")
    _refuse_non_finite(path, state)
    return dict(state)


def _non_finite(tensors) -> Optional[str]:
    """'<name>: N NaN, M inf' of the first floating tensor in (name, tensor) pairs holding NaN or inf, else None."""
    from modules.state_dict import all_finite
    for name, v in tensors:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() and not all_finite(v):
            nan = int(torch.isnan(v).sum())
            return f"{name}: {nan} NaN, {int((~torch.isfinite(v)).sum()) - nan} inf"
    return None


def _refuse_non_finite(path: Path, state: Mapping[str, Any]) -> None:
    """A state whose weights or optimizer moments hold NaN / inf cannot be continued: every step from it is
    non-finite, and --resume auto would meet it again after every try. Say what it is and how to recover."""
    optim = (state.get("optimizer") or {}).get("state") or {}
    bad = _non_finite((f"model tensor {k}", v) for k, v in (state.get("model") or {}).items()) or _non_finite(
        (f"optimizer state {k}.{name}", v) for k, entry in optim.items() if isinstance(entry, Mapping)
        for name, v in entry.items())
    if bad is None:
        return
    weights = sorted(path.parent.glob(WEIGHTS_NAME.format(epoch="*")),
                     key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else -1)
    start = (f", e.g. from the last epoch's weights with --init_model {weights[-1]}" if weights else "")
    raise ResumeError(f"{path} holds non-finite values ({bad}): it was saved from a diverged run or is damaged, and "
                      f"continuing it would only give non-finite steps; start afresh with --overwrite{start}, or "
                      "resume from an earlier copy of the state with --resume_model FILE")


def check_model_fits(model_sd: Mapping[str, torch.Tensor], saved_sd: Mapping[str, torch.Tensor],
                     source: str = "resume file") -> None:
    """Raise ResumeError when the saved weights do not match the model built from the current flags."""
    diff = diff_keys(model_sd, saved_sd, found_name="saved")
    if diff:
        raise ResumeError(f"{source} was written for a different model architecture than the one these flags "
                          f"build (--pretrained_clip_name, --first_stage_layer, --use_vision_mae_recon ...): "
                          + diff.describe(limit=5))


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


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (CPU and every GPU) RNGs of this process."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- position
@dataclass
class Position:
    """Where a run stands: the epoch in progress (0-based), micro-batches of it consumed, optimizer steps done."""
    epoch: int = 0
    micro: int = 0
    global_step: int = 0


def _saved_micro_layout(state: Mapping[str, Any]) -> Tuple[Optional[int], Optional[int]]:
    """(samples per micro-batch, micro-batches per epoch) of the run that wrote ``state``; None where it does not
    say (states of earlier versions: the sample count from their flags)."""
    per_micro = state.get("samples_per_micro")
    if per_micro is None:
        args = state.get("args") or {}
        if isinstance(args.get("batch_size"), int) and isinstance(args.get("gradient_accumulation_steps"), int):
            per_micro = args["batch_size"] // max(1, args["gradient_accumulation_steps"])
    return per_micro, state.get("micro_per_epoch")


def _same_samples(pos: Position, state: Mapping[str, Any], samples_per_micro: Optional[int], env: DistEnv) -> Position:
    """The saved position counts micro-batches of the run that wrote it; after a change of --batch_size or
    --gradient_accumulation_steps it is converted to this run's micro-batches at the same sample, so that no sample
    of the interrupted epoch is skipped (the data order is one permutation of samples, whatever the batch size)."""
    saved, saved_per_epoch = _saved_micro_layout(state)
    if not saved or not samples_per_micro or saved == samples_per_micro or pos.micro == 0:
        return pos
    if saved_per_epoch and pos.micro >= saved_per_epoch:      # saved at the end of an epoch: the next one starts
        return Position(pos.epoch + 1, 0, pos.global_step)
    done = pos.micro * saved
    micro, extra = divmod(done, samples_per_micro)
    if env.is_main:
        logger.warning("the training state was written with micro-batches of %d samples (--batch_size / "
                       "--gradient_accumulation_steps), this run's hold %d: epoch %d continues after its first %d "
                       "samples, at micro-batch %d%s", saved, samples_per_micro, pos.epoch + 1,
                       micro * samples_per_micro, micro,
                       f" (the {extra} samples before the saved position are seen again)" if extra else "")
    return Position(pos.epoch, micro, pos.global_step)


def restore_training_state(state: Mapping[str, Any], *, model, optimizer, scheduler, scaler, env: DistEnv,
                           micro_per_epoch: int, total_steps: int, seed: int,
                           samples_per_micro: Optional[int] = None) -> Position:
    """Load a state from :func:`load_training_state` into the objects of this run; -> where to continue.
    ``samples_per_micro``: samples of one global micro-batch of this run (--batch_size / accumulation steps)."""
    check_model_fits(model.state_dict(), state["model"])
    model.load_state_dict(state["model"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise ResumeError(f"the optimizer state in the resume file does not fit the current parameter groups "
                          f"(were --freeze_layer_num / --lr flags changed?): {e}") from e
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    pos = _same_samples(Position(int(state["epoch"]), int(state["micro_step"]), int(state["global_step"])), state,
                        samples_per_micro, env)
    if pos.micro >= micro_per_epoch:
        pos = Position(pos.epoch + 1, 0, pos.global_step)
    if env.is_main and state.get("total_steps", total_steps) != total_steps:
        logger.warning("the resumed run was planned for %s optimizer steps, this one for %d (changed --epochs, "
                       "--batch_size or data?): the LR schedule continues on the new length",
                       state.get("total_steps"), total_steps)
    rng = state.get("rng") or []
    if env.rank < len(rng) and len(rng) == env.world_size:
        restore_rng_state(rng[env.rank])
    else:
        logger.warning("resume file holds RNG states of %d processes, this run has %d: reseeding",
                       len(rng), env.world_size)
        seed_everything(seed + RESEED_STRIDE * (pos.global_step + 1) + env.rank)
    if env.is_main:
        logger.info("resuming at epoch %d, micro-batch %d/%d, optimizer step %d/%d", pos.epoch + 1, pos.micro,
                    micro_per_epoch, pos.global_step, total_steps)
    return pos


def _refuse_fresh_start(found: Optional[Path], resume_model: Optional[PathLike], overwrite: bool) -> Optional[str]:
    """Rank 0, without --resume auto: None to go on (after deleting an earlier state when ``overwrite``), else the
    one line that refuses to replace an earlier run's training state."""
    if found is None:
        return None
    if resume_model and Path(resume_model).resolve() == found.resolve():
        return None                      # continuing this folder's own state, named explicitly
    if overwrite:
        found.unlink(missing_ok=True)
        logger.info("--overwrite: deleted the training state of an earlier run, %s; starting afresh", found)
        return None
    return (f"{found.parent} holds the training state of an earlier run ({STATE_NAME}); use --resume auto to "
            f"continue it, or choose another --output_dir, or pass --overwrite to start afresh (that replaces its "
            f"{STATE_NAME} and metrics.jsonl)")


def load_resume_state(env: DistEnv, output_dir: Optional[PathLike], resume_model: Optional[PathLike] = None,
                      auto: bool = False, overwrite: bool = False) -> Optional[Dict[str, Any]]:
    """The training state to continue from (``--resume_model FILE`` or ``--resume auto``), or None to start fresh.

    With ``--resume auto`` rank 0 decides whether there is a state and tells the others; every rank then reads
    ``OUTPUT_DIR/training_state.pt`` on its own filesystem. A rank without the file, or with a copy of another
    step, fails on every rank with one line naming it -- rather than ranks starting at different steps and hanging
    in mismatched collectives.

    Without ``--resume auto``, a training state already in ``output_dir`` (an earlier run's progress) is never
    overwritten by default: ResumeError, unless ``overwrite`` (``--overwrite``: that state is then deleted here,
    so that the folder never pairs it with the new run's files) or ``resume_model`` is that very file.
    """
    found = find_resume_file(output_dir) if (output_dir is not None and env.is_main) else None
    if not auto:
        refusal = _refuse_fresh_start(found, resume_model, overwrite) if env.is_main else None
        refusal = broadcast_object(env, refusal)
        if refusal is not None:
            raise ResumeError(refusal)
    if resume_model:
        choice = str(resume_model)
    else:                   # --resume auto: rank 0 decides whether there is a state; each rank reads its own copy
        choice = str(Path(output_dir) / STATE_NAME) if broadcast_object(env, auto and found is not None) else None
    if choice is None:
        if auto and env.is_main:
            logger.info("--resume auto: no training state in %s, starting fresh", output_dir)
        return None
    state, problem = None, None
    try:
        state = load_training_state(choice)
    except ResumeError as e:
        problem = str(e)
    reports = all_gather_objects(env, (problem, None if state is None else int(state["global_step"]),
                                       socket.gethostname()))
    if reports[0][0] is not None:
        raise ResumeError(reports[0][0])
    bad = [f"rank {r} on {host}: {p}" for r, (p, _, host) in enumerate(reports) if p is not None]
    if bad:
        raise ResumeError(f"rank 0 resumes from {choice}, which other processes cannot read ({'; '.join(bad[:3])}"
                          f"{' ...' if len(bad) > 3 else ''}); put --output_dir on a filesystem every node shares, "
                          f"or copy the file to the same path on each node")
    steps = {s for _, s, _ in reports}
    if len(steps) > 1:
        raise ResumeError(f"the copies of {choice} differ between nodes (optimizer steps "
                          f"{sorted(steps)}); copy rank 0's file to every node")
    return state


# ---------------------------------------------------------------------------------------------- saving
def save_training_state(output_dir: Optional[PathLike], *, model, optimizer, scheduler, scaler, position: Position,
                        env: DistEnv, extra: Optional[Dict[str, Any]] = None) -> Optional[Path]:
    """``OUTPUT_DIR/training_state.pt`` from rank 0, with every rank's RNG states (a collective: all ranks call
    it). A write error (e.g. no space left) is raised on every rank."""
    rngs = all_gather_objects(env, capture_rng_state())
    if output_dir is None:
        return None
    path = Path(output_dir) / STATE_NAME

    def write():
        atomic_torch_save(make_training_state(model_sd=model.state_dict(), optimizer=optimizer, scheduler=scheduler,
                                              scaler=scaler, epoch=position.epoch, micro_step=position.micro,
                                              global_step=position.global_step, rng_states=rngs,
                                              extra=dict(extra or {}, world_size=env.world_size)), path)
    on_main_process(env, write)
    return path


def save_epoch_weights(output_dir: Optional[PathLike], model, epoch: int, env: DistEnv) -> Optional[Path]:
    """``OUTPUT_DIR/pytorch_model.bin.{epoch}``: the plain model state dict (rank 0 writes, all ranks call)."""
    if output_dir is None:
        return None
    path = Path(output_dir) / WEIGHTS_NAME.format(epoch=epoch)
    on_main_process(env, lambda: atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                                                   path))
    return path
