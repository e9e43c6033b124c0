"""One optimizer step (design.md §5): ``accum`` micro-batches of forward + backward under autocast, gradient
clipping, the update, the ``logit_scale`` clamp. Nothing here waits for the GPU.

A step whose loss (on any rank) or gradient norm is not finite changes nothing: the fused AdamW kernel skips the
update on a device-side flag (the same mechanism GradScaler uses), GradScaler backs off and resets its growth
tracker itself, and the LR schedule does not advance. The flag reaches the host one step later, through a
non-blocking copy that has long completed by the time the next step's update needs it, so the CPU never stalls the
GPU; loss values stay on the device until the loop reads them at a log step.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DistEnv
from .loaders import to_device
from .precision import autocast

LOGIT_SCALE_MAX = math.log(100)   # https://github.com/openai/CLIP/issues/46


class LossModule(nn.Module):
    """Makes ``SegCLIP.compute_losses`` the ``forward`` of a module, so DDP's gradient hooks see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.model.compute_losses(batch["input_ids"], batch["image"], superpixels=batch.get("superpixels"))


def wrap_for_training(model: nn.Module, env: DistEnv, find_unused: Optional[bool] = None) -> nn.Module:
    """LossModule, in DDP when distributed. find_unused None: on when the MAE branch is off (its blocks idle)."""
    if find_unused is None:
        find_unused = not getattr(getattr(model, "config", None), "use_vision_mae_recon", True)
    net = LossModule(model)
    if env.is_distributed:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=find_unused)
    return net


@dataclass
class StepRecord:
    """What one optimizer step did. ``terms`` and ``grad_norm`` are device tensors; ``skipped`` / ``stop`` are
    None / False until :meth:`settle` reads the step's flags (the same on every rank)."""
    step: int                              # optimizer steps done after this one (1-based)
    epoch: int                             # 0-based
    micro: int                             # micro-batches of the epoch consumed after this step
    terms: Dict[str, torch.Tensor]         # loss terms, mean over the micro-batches, detached
    grad_norm: torch.Tensor                # total gradient norm before clipping (unscaled)
    lrs: List[float]                       # LR of each parameter group used by this step
    _flags: torch.Tensor = field(repr=False)       # host copy of [skipped, stop requested on some rank]
    _ready: Any = field(default=None, repr=False)  # CUDA event after the copy, None on CPU
    skipped: Optional[bool] = None
    stop: bool = False

    @property
    def settled(self) -> bool:
        return self.skipped is not None

    def settle(self) -> "StepRecord":
        if self.skipped is None:
            if self._ready is not None:
                self._ready.synchronize()
            skipped, stop = self._flags.tolist()
            self.skipped, self.stop = skipped > 0, stop > 0
        return self


class OptimizerStep:
    """Runs optimizer steps for ``net`` (see module docstring). ``__call__`` returns the new step's record,
    unsettled; the previous one is settled (and the schedule advanced) before this step's update."""

    def __init__(self, net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 scaler: torch.amp.GradScaler, env: DistEnv, amp: str = "off", accum: int = 1,
                 clip_grad: float = 1.0):
        self.net, self.model, self.optimizer, self.scheduler, self.scaler = net, model, optimizer, scheduler, scaler
        self.env, self.amp, self.accum = env, amp, accum
        self.max_norm = clip_grad if clip_grad > 0 else float("inf")
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused AdamW takes a device-side "skip this update" flag; other optimizers need a host decision
        self.device_skip = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self._unsettled: Optional[StepRecord] = None

    def __call__(self, micro_batches: Iterable[Dict[str, Any]], *, step: int, epoch: int, micro: int,
                 stop_requested: bool = False) -> StepRecord:
        terms = self._forward_backward(micro_batches)
        flags = self._agree(~torch.isfinite(terms["total"]), stop_requested)
        self._poison_gradients(flags[0])
        self.settle()                    # the previous step decides where the schedule stands for this one
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        grad_norm, skipped = self._update(flags[0])
        host = torch.stack([skipped, flags[1]]).to("cpu", non_blocking=True)
        ready = None
        if host.device != flags.device and flags.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self._unsettled = StepRecord(step, epoch, micro, terms, grad_norm.detach(), lrs, host, ready)
        return self._unsettled

    def settle(self) -> Optional[StepRecord]:
        """Read the last step's flags (waits for it) and advance the LR schedule when it was taken."""
        rec, self._unsettled = self._unsettled, None
        if rec is not None and not rec.settle().skipped:
            self.scheduler.step()
        return rec

    # ------------------------------------------------------------------ parts
    def _forward_backward(self, micro_batches) -> Dict[str, torch.Tensor]:
        terms: Dict[str, torch.Tensor] = {}
        device = self.env.device
        for a, batch in enumerate(micro_batches):
            batch = to_device(batch, device)
            sync = a == self.accum - 1 or not self.env.is_distributed
            with (nullcontext() if sync else self.net.no_sync()):
                with autocast(self.amp, device):
                    losses = self.net(batch)
                self.scaler.scale(losses["total"] / self.accum).backward()
            for k, v in losses.items():
                terms[k] = terms[k] + v.detach() / self.accum if k in terms else v.detach() / self.accum
        return terms                     # a non-finite micro-batch loss leaves "total" non-finite

    def _agree(self, loss_bad: torch.Tensor, stop_requested: bool) -> torch.Tensor:
        """[loss not finite, stop requested] as floats, maximum over ranks (losses are not all-reduced, so the
        ranks must agree explicitly); stays on the device."""
        flags = torch.stack([loss_bad.float(), torch.full((), float(stop_requested), device=loss_bad.device)])
        if self.env.is_distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def _poison_gradients(self, loss_bad: torch.Tensor) -> None:
        """A non-finite loss makes the gradients non-finite too (NaN added to one of them), so that the gradient
        checks below (and GradScaler's) decide the skip by one rule, without reading the flag on the host."""
        grad = next((p.grad for p in self.params if p.grad is not None), None)
        if grad is not None:
            grad.add_(torch.where(loss_bad > 0, float("nan"), 0.0).to(grad.dtype))

    def _update(self, loss_bad: torch.Tensor):
        opt = self.optimizer
        if self.scaler.is_enabled():
            self.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        skipped = torch.maximum(loss_bad, (~torch.isfinite(grad_norm)).float())
        if self.scaler.is_enabled():
            # GradScaler skips on its own non-finite check of the (poisoned) gradients, backs off the scale and
            # resets its growth tracker in update(): one rule for both.
            self.scaler.step(opt)
            self.scaler.update()
        elif self.device_skip:
            opt.found_inf = skipped
            try:
                opt.step()
            finally:
                del opt.found_inf
        elif not bool(skipped):          # optimizers without a device-side skip: one host read per step
            opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.clip.logit_scale.clamp_(max=LOGIT_SCALE_MAX)
        return grad_norm, skipped
