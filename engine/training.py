"""Pretraining (design.md §4-§5): set-up of a run, then ``engine.loop.Trainer`` runs it.

    env = init_distributed(args.local_rank)
    result = train(model, dataset, TrainConfig(...), env, eval_fn=...)

The pieces: ``loaders`` (data order, exact resume), ``precision`` (--amp, TF32), ``step`` (one optimizer step:
AMP, accumulation, non-finite skipping), ``loop`` (epochs, logging, saving, stop rules, evaluation),
``metrics`` (metrics.jsonl, TensorBoard), ``stopping`` (signals, divergence), ``train_state`` (resume files),
``run_lock`` (one run per output folder).
"""
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from common.fileio import remove_stale_temporaries

from .distributed import DistEnv
from .loaders import DataLayoutError, build_train_data
from .loop import Trainer, TrainResult
from .metrics import MetricsWriter
from .optimization import OptimConfig, build_optimizer
from .precision import allow_tf32, check_precision
from .step import OptimizerStep, wrap_for_training
from .stopping import StopSignals
from .train_state import Position, restore_training_state, seed_everything

logger = logging.getLogger("segclip.train")

__all__ = ["TrainConfig", "TrainResult", "check_batch_layout", "train"]


@dataclass
class TrainConfig:
    batch_size: int = 256                 # global batch per optimizer step (all ranks, all accumulation steps)
    epochs: int = 20
    gradient_accumulation_steps: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip_grad: float = 1.0                # max grad norm; <= 0 disables clipping
    amp: str = "off"                      # off | bf16 | fp16
    tf32: bool = True                     # with amp off on a GPU that has TF32: allow it for matmuls
    seed: int = 42
    num_workers: int = 1
    pin_memory: bool = False
    output_dir: Optional[str] = None      # None: write nothing
    save_every_steps: int = 0             # 0: training state only at epoch ends
    stop_after_steps: int = 0             # > 0: stop (state saved) after this many optimizer steps overall
    max_nonfinite_steps: int = 20         # stop after this many consecutive non-finite steps; 0: never
    n_display: int = 100
    tensorboard: bool = False             # also write TensorBoard events to OUTPUT_DIR/tensorboard
    find_unused_parameters: Optional[bool] = None   # None: on when the MAE branch is off (its blocks then idle)
    progress: bool = True
    steps_per_epoch: int = 0              # only for iterable datasets without len()


def check_batch_layout(cfg: TrainConfig, world_size: int) -> int:
    """Per-rank micro-batch size; a clear error when --batch_size does not split evenly."""
    denom = world_size * cfg.gradient_accumulation_steps
    if cfg.gradient_accumulation_steps < 1:
        raise DataLayoutError(f"--gradient_accumulation_steps must be >= 1, got {cfg.gradient_accumulation_steps}")
    if cfg.batch_size < denom or cfg.batch_size % denom:
        raise DataLayoutError(f"--batch_size {cfg.batch_size} (global) must be a positive multiple of the number of "
                              f"processes ({world_size}) x --gradient_accumulation_steps "
                              f"({cfg.gradient_accumulation_steps}) = {denom}")
    return cfg.batch_size // denom


def train(model: nn.Module, dataset, cfg: TrainConfig, env: DistEnv, resume_state: Optional[Dict[str, Any]] = None,
          eval_fn: Optional[Callable[[nn.Module, int], Dict[str, float]]] = None,
          extra_state: Optional[Dict[str, Any]] = None) -> TrainResult:
    """Train ``model`` (a SegCLIP with ``compute_losses``; freezing already applied) on ``dataset``.

    dataset: map-style (items: input_ids, attention_mask [T], image [3,H,W], optional superpixels [h,w]) or an
    IterableDataset that shards itself across ranks. ``eval_fn(model, epoch)`` runs on every rank after each
    epoch (a distributed evaluation splits the images). ``resume_state``: from ``load_resume_state``.
    Writes ``pytorch_model.bin.{epoch}``, ``training_state.pt`` and ``metrics.jsonl`` to ``cfg.output_dir``
    (rank 0).
    """
    check_precision(cfg.amp, env.device)
    local_batch = check_batch_layout(cfg, env.world_size)
    model.to(env.device)
    data = build_train_data(dataset, local_batch, env, seed=cfg.seed, accum=cfg.gradient_accumulation_steps,
                            num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                            steps_per_epoch=cfg.steps_per_epoch, global_batch=cfg.batch_size)
    total_steps = data.steps_per_epoch * cfg.epochs
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.amp == "fp16")
    samples_per_micro = cfg.batch_size // cfg.gradient_accumulation_steps     # one global micro-batch
    if resume_state is not None:
        position = restore_training_state(resume_state, model=model, optimizer=optimizer, scheduler=scheduler,
                                          scaler=scaler, env=env, micro_per_epoch=data.micro_per_epoch,
                                          total_steps=total_steps, seed=cfg.seed, samples_per_micro=samples_per_micro)
    else:
        position = Position()
        seed_everything(cfg.seed + env.rank)   # noise streams differ per rank; the model is already identical
    step = OptimizerStep(wrap_for_training(model, env, cfg.find_unused_parameters), model, optimizer, scheduler,
                         scaler, env, amp=cfg.amp, accum=cfg.gradient_accumulation_steps, clip_grad=cfg.clip_grad)
    tf32 = allow_tf32(cfg.amp, env.device, cfg.tf32)
    if env.is_main:
        _remove_temporaries(cfg.output_dir)
        _log_plan(cfg, env, data, total_steps, local_batch, optimizer, tf32)
    with StopSignals() as signals, \
            MetricsWriter(cfg.output_dir, env.is_main, cfg.tensorboard, position.global_step) as metrics:
        trainer = Trainer(model=model, data=data, step=step, cfg=cfg, env=env, position=position,
                          total_steps=total_steps, metrics=metrics, signals=signals, eval_fn=eval_fn,
                          extra_state=dict(extra_state or {}, samples_per_micro=samples_per_micro,
                                           micro_per_epoch=data.micro_per_epoch))   # a resume's position in samples
        return trainer.fit()


def _remove_temporaries(output_dir: Optional[str]) -> None:
    removed = remove_stale_temporaries(output_dir) if output_dir else 0
    if removed:
        logger.info("removed %d temporary file(s) left in %s by a killed run", removed, output_dir)


def _log_plan(cfg: TrainConfig, env: DistEnv, data, total_steps: int, local_batch: int, optimizer,
              tf32: Optional[str]) -> None:
    logger.info("training: %d epochs x %d steps = %d optimizer steps; global batch %d = %d process(es) x %d "
                "x %d accumulation; amp %s; device %s (%s)", cfg.epochs, data.steps_per_epoch, total_steps,
                cfg.batch_size, env.world_size, local_batch, cfg.gradient_accumulation_steps, cfg.amp, env.device,
                f"{env.backend} process group" if env.is_distributed else "no process group")
    if tf32:
        logger.info(tf32)
    for g in optimizer.param_groups:
        logger.info("  group %-22s lr %.3g  weight decay %.3g  %d tensors", g.get("name", "?"), g["initial_lr"],
                    g["weight_decay"], len(g["params"]))
