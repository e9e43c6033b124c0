"""Pretraining loop (design.md §4-§5): DDP, AMP, gradient accumulation, NaN skipping, resumable checkpoints.

    env = init_distributed(args.local_rank)
    result = train(model, dataset, TrainConfig(...), env, eval_fn=...)

Batches are deterministic functions of (seed, epoch, position): a sampler cuts a seeded permutation into global
batches and each rank takes its slice, and every sample's augmentation is drawn from its own RNG seeded by
(seed, epoch, index). So a resumed run sees exactly the batches an uninterrupted run would have seen, with any
number of loader workers.
"""
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from .distributed import DistEnv, all_gather_objects, all_true, barrier
from .optimization import OptimConfig, build_optimizer
from .train_state import (ResumeError, atomic_torch_save, capture_rng_state, check_model_fits, make_training_state,
                          restore_rng_state, STATE_NAME)

logger = logging.getLogger("segclip.train")

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    batch_size: int = 256                 # global batch per optimizer step (all ranks, all accumulation steps)
    epochs: int = 20
    gradient_accumulation_steps: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip_grad: float = 1.0                # max grad norm; <= 0 disables clipping
    amp: str = "off"                      # off | bf16 | fp16
    seed: int = 42
    num_workers: int = 1
    pin_memory: bool = False
    output_dir: Optional[str] = None      # None: write nothing
    save_every_steps: int = 0             # 0: training state only at epoch ends
    stop_after_steps: int = 0             # > 0: stop (state saved) after this many optimizer steps overall
    n_display: int = 100
    find_unused_parameters: Optional[bool] = None   # None: on when the MAE branch is off (its blocks then idle)
    progress: bool = True
    steps_per_epoch: int = 0              # only for iterable datasets without len()


class LossModule(nn.Module):
    """Makes ``SegCLIP.compute_losses`` the ``forward`` of a module, so DDP's gradient hooks see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.model.compute_losses(batch["input_ids"], batch.get("attention_mask"), batch["image"],
                                         superpixels=batch.get("superpixels"))


# ---------------------------------------------------------------------------------------------- data order
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, independent of rank, worker and batch layout."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32).astype(np.uint64)
               .dot(np.array([1, 1 << 32], dtype=np.uint64)) & ((1 << 63) - 1))


class SeededDataset(Dataset):
    """Wraps a map-style dataset so item ``i`` in epoch ``e`` always gets the same random augmentation.

    The torch / numpy / python RNGs are seeded per item and restored afterwards, so the caller's random stream
    (Gumbel and masking noise in the main process when num_workers is 0) is left untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        s = sample_seed(self.seed, self.epoch, index)
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            np.random.seed(s % (1 << 32))
            random.seed(s)
            try:
                return self.dataset[index]
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)


class GlobalBatchSampler(Sampler):
    """Indices for one rank: a (seed, epoch) permutation cut into global micro-batches of ``world * local_batch``;
    rank r takes slice r of each. The last incomplete global batch is dropped (every rank needs a full batch for
    the all-gather). ``start_batch`` skips already-consumed global batches when resuming."""

    def __init__(self, num_samples: int, local_batch: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        self.num_samples, self.local_batch = num_samples, local_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def num_batches(self) -> int:
        return self.num_samples // (self.local_batch * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.local_batch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        gb = self.local_batch * self.world_size
        for b in range(self.start_batch, self.num_batches):
            lo = b * gb + self.rank * self.local_batch
            yield from order[lo:lo + self.local_batch]


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    global_step: int
    epoch: int
    finished: bool
    skipped_steps: int
    history: List[Dict[str, float]]
    eval_results: Dict[int, Dict[str, float]]


def check_batch_layout(cfg: TrainConfig, world_size: int) -> int:
    """Per-rank micro-batch size; a clear error when --batch_size does not split evenly."""
    denom = world_size * cfg.gradient_accumulation_steps
    if cfg.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {cfg.gradient_accumulation_steps}")
    if cfg.batch_size < denom or cfg.batch_size % denom:
        raise ValueError(f"--batch_size {cfg.batch_size} (global) must be a positive multiple of the number of "
                         f"processes ({world_size}) x --gradient_accumulation_steps "
                         f"({cfg.gradient_accumulation_steps}) = {denom}")
    return cfg.batch_size // denom


def train(model: nn.Module, dataset, cfg: TrainConfig, env: DistEnv, resume_state: Optional[Dict[str, Any]] = None,
          eval_fn: Optional[Callable[[nn.Module, int], Dict[str, float]]] = None,
          extra_state: Optional[Dict[str, Any]] = None) -> TrainResult:
    """Train ``model`` (a SegCLIP with ``compute_losses``; freezing already applied) on ``dataset``.

    dataset: map-style (items: input_ids, attention_mask [T], image [3,H,W], optional superpixels [h,w]) or an
    IterableDataset that shards itself across ranks. ``eval_fn(model, epoch)`` runs on every rank after each
    epoch (a distributed evaluation splits the images).
    Writes ``pytorch_model.bin.{epoch}`` and ``training_state.pt`` to ``cfg.output_dir`` on rank 0.
    """
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {cfg.amp!r}")
    device = env.device
    accum = cfg.gradient_accumulation_steps
    local_batch = check_batch_layout(cfg, env.world_size)
    model.to(device)

    # ---- data
    iterable = isinstance(dataset, IterableDataset)
    loader_gen = torch.Generator().manual_seed(cfg.seed)   # keeps DataLoader from drawing on the global RNG
    if iterable:
        sampler, seeded = None, None
        try:
            micro_per_epoch = len(dataset) // local_batch
        except TypeError:
            micro_per_epoch = cfg.steps_per_epoch * accum
        if micro_per_epoch <= 0:
            raise ValueError("the streaming dataset has no length: set --steps_per_epoch")
        loader = DataLoader(dataset, batch_size=local_batch, num_workers=cfg.num_workers, drop_last=True,
                            pin_memory=cfg.pin_memory and device.type == "cuda", generator=loader_gen)
    else:
        n = len(dataset)
        seeded = SeededDataset(dataset, cfg.seed)
        sampler = GlobalBatchSampler(n, local_batch, env.rank, env.world_size, cfg.seed)
        micro_per_epoch = sampler.num_batches
        loader = DataLoader(seeded, batch_size=local_batch, sampler=sampler, num_workers=cfg.num_workers,
                            drop_last=True, pin_memory=cfg.pin_memory and device.type == "cuda",
                            generator=loader_gen, persistent_workers=False)
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch <= 0:
        raise ValueError(f"the dataset ({len(dataset) if not iterable else '?'} samples) is smaller than one "
                         f"global batch ({cfg.batch_size}); lower --batch_size or add data")
    micro_per_epoch = steps_per_epoch * accum          # an incomplete accumulation group at the end is dropped
    total_steps = steps_per_epoch * cfg.epochs

    # ---- optimizer, schedule, precision
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    amp_dtype = AMP_DTYPES[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]

    # ---- resume
    start_epoch, start_micro, global_step = 0, 0, 0
    if resume_state is not None:
        check_model_fits(model.state_dict(), resume_state["model"])
        model.load_state_dict(resume_state["model"])
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ResumeError(f"the optimizer state in the resume file does not fit the current parameter groups "
                              f"(were --freeze_layer_num / --lr flags changed?): {e}") from e
        scheduler.load_state_dict(resume_state["scheduler"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch, start_micro = int(resume_state["epoch"]), int(resume_state["micro_step"])
        global_step = int(resume_state["global_step"])
        if start_micro >= micro_per_epoch:
            start_epoch, start_micro = start_epoch + 1, 0
        if env.is_main and resume_state.get("total_steps", total_steps) != total_steps:
            logger.warning("the resumed run was planned for %s optimizer steps, this one for %d (changed --epochs, "
                           "--batch_size or data?): the LR schedule continues on the new length",
                           resume_state.get("total_steps"), total_steps)
        rng = resume_state.get("rng") or []
        if env.rank < len(rng) and len(rng) == env.world_size:
            restore_rng_state(rng[env.rank])
        else:
            logger.warning("resume file holds RNG states of %d processes, this run has %d: reseeding",
                           len(rng), env.world_size)
            _seed_everything(cfg.seed + 7919 * (global_step + 1) + env.rank)
        if env.is_main:
            logger.info("resuming at epoch %d, micro-batch %d/%d, optimizer step %d/%d", start_epoch + 1,
                        start_micro, micro_per_epoch, global_step, total_steps)
    else:
        _seed_everything(cfg.seed + env.rank)   # noise streams differ per rank; the model is already identical

    # ---- wrap
    find_unused = cfg.find_unused_parameters
    if find_unused is None:
        find_unused = not getattr(getattr(model, "config", None), "use_vision_mae_recon", True)
    net = LossModule(model)
    if env.is_distributed:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused)

    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    history: List[Dict[str, float]] = []
    eval_results: Dict[int, Dict[str, float]] = {}
    skipped = 0
    samples_per_step = cfg.batch_size

    def save_state(epoch: int, micro: int) -> None:
        rngs = all_gather_objects(env, capture_rng_state())
        if env.is_main and out_dir is not None:
            state = make_training_state(model_sd=model.state_dict(), optimizer=optimizer, scheduler=scheduler,
                                        scaler=scaler, epoch=epoch, micro_step=micro, global_step=global_step,
                                        rng_states=rngs, extra=dict(extra_state or {}, world_size=env.world_size,
                                                                    total_steps=total_steps))
            atomic_torch_save(state, out_dir / STATE_NAME)
        barrier(env)

    if env.is_main:
        logger.info("training: %d epochs x %d steps = %d optimizer steps; global batch %d = %d process(es) x %d "
                    "x %d accumulation; amp %s; device %s", cfg.epochs, steps_per_epoch, total_steps,
                    cfg.batch_size, env.world_size, local_batch, accum, cfg.amp, device)
        for g in optimizer.param_groups:
            logger.info("  group %-22s lr %.3g  weight decay %.3g  %d tensors", g.get("name", "?"), g["initial_lr"],
                        g["weight_decay"], len(g["params"]))

    net.train()
    t_start = time.time()
    steps_this_run = 0
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        first_micro = start_micro if epoch == start_epoch else 0
        if sampler is not None:
            sampler.set_epoch(epoch, first_micro)
            seeded.set_epoch(epoch)
        elif hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        it = iter(loader)
        if iterable:                        # a stream cannot seek: consume what was already seen
            for _ in range(first_micro):
                next(it, None)
        bar = None
        if env.is_main and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=steps_per_epoch, initial=first_micro // accum, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       dynamic_ncols=True, leave=False)
        sums: Dict[str, float] = {}
        n_sum, t_log = 0, time.time()
        micro = first_micro
        while micro < micro_per_epoch:
            # ---- one optimizer step = `accum` micro-batches
            step_terms: Dict[str, float] = {}
            loss_finite = True
            for a in range(accum):
                batch = next(it, None)
                if batch is None:
                    raise RuntimeError(f"the data loader ran out after {micro} of {micro_per_epoch} micro-batches "
                                       f"in epoch {epoch + 1}")
                batch = _to_device(batch, device)
                sync = a == accum - 1 or not env.is_distributed
                with (nullcontext() if sync else net.no_sync()):
                    with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()):
                        losses = net(batch)
                    loss = losses["total"] / accum
                    loss_finite &= bool(torch.isfinite(loss.detach()))
                    scaler.scale(loss).backward()
                for k, v in losses.items():
                    step_terms[k] = step_terms.get(k, 0.0) + float(v.detach()) / accum
                micro += 1
            # ---- update
            lrs_used = [g["lr"] for g in optimizer.param_groups]
            if cfg.amp == "fp16":
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
            # Same decision on every rank (gradients are all-reduced, losses are not).
            ok = all_true(env, loss_finite and bool(torch.isfinite(grad_norm)))
            if ok:
                scale_before = scaler.get_scale() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                stepped = scale_before is None or scaler.get_scale() >= scale_before
                if stepped:
                    scheduler.step()
            else:
                stepped = False
                if scaler.is_enabled():
                    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():   # https://github.com/openai/CLIP/issues/46
                model.clip.logit_scale.clamp_(max=math.log(100))
            global_step += 1
            steps_this_run += 1
            if not stepped:
                skipped += 1
                if env.is_main:
                    logger.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped",
                                   global_step, step_terms.get("total"), float(grad_norm))
            # ---- bookkeeping / logging
            rec = dict(step_terms, grad_norm=float(grad_norm), step=global_step, epoch=epoch, stepped=float(stepped),
                       lr=lrs_used[-1])
            history.append(rec)
            for k, v in step_terms.items():
                sums[k] = sums.get(k, 0.0) + v
            n_sum += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_terms.get('total', float('nan')):.4f}")
            if env.is_main and (global_step % max(1, cfg.n_display) == 0 or micro == micro_per_epoch):
                dt = max(1e-9, time.time() - t_log)
                rate = n_sum * samples_per_step / dt
                elapsed = time.time() - t_start
                eta = elapsed / steps_this_run * (total_steps - global_step)
                terms = " ".join(f"{k} {v / n_sum:.4f}" for k, v in sums.items())
                lr_by_group = {str(g.get("name", i)).split("/")[0]: lr
                               for i, (g, lr) in enumerate(zip(optimizer.param_groups, lrs_used))}
                lrs = " ".join(f"{k}={v:.3g}" for k, v in lr_by_group.items())
                logger.info("epoch %d/%d step %d/%d (global %d/%d) | %s | grad norm %.3f | lr %s | %.1f samples/s "
                            "| ETA %s", epoch + 1, cfg.epochs, micro // accum, steps_per_epoch, global_step,
                            total_steps, terms, float(grad_norm), lrs, rate, _format_eta(eta))
                sums, n_sum, t_log = {}, 0, time.time()
            stop = cfg.stop_after_steps > 0 and global_step >= cfg.stop_after_steps and micro < micro_per_epoch
            if stop or (cfg.save_every_steps > 0 and global_step % cfg.save_every_steps == 0
                        and micro < micro_per_epoch):
                save_state(epoch, micro)
            if stop:
                if bar is not None:
                    bar.close()
                if env.is_main:
                    logger.info("stopping after optimizer step %d (--stop_after_steps); resume with --resume auto",
                                global_step)
                return TrainResult(global_step, epoch, False, skipped, history, eval_results)
        if bar is not None:
            bar.close()
        # ---- end of epoch: weights file, training state, evaluation
        if env.is_main and out_dir is not None:
            path = atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                                     out_dir / f"pytorch_model.bin.{epoch}")
            logger.info("epoch %d/%d done; weights saved to %s", epoch + 1, cfg.epochs, path)
        save_state(epoch, micro_per_epoch)
        if eval_fn is not None:       # on every rank: the evaluation shards the images over processes
            rng = capture_rng_state()   # evaluation must not shift the training noise (resume consistency)
            model.eval()
            with torch.no_grad():
                eval_results[epoch] = eval_fn(model, epoch)
            model.train()
            restore_rng_state(rng)
            if env.is_main:
                logger.info("epoch %d/%d evaluation: %s", epoch + 1, cfg.epochs, eval_results[epoch])
        barrier(env)
        if cfg.stop_after_steps > 0 and global_step >= cfg.stop_after_steps and epoch + 1 < cfg.epochs:
            return TrainResult(global_step, epoch + 1, False, skipped, history, eval_results)
    return TrainResult(global_step, epoch + 1 if cfg.epochs > start_epoch else start_epoch, True, skipped, history,
                       eval_results)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
