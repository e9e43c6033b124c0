"""The training loop (design.md §4-§5) over the pieces that ``engine.training.train`` sets up.

``Trainer.fit`` runs epochs; ``train_one_epoch`` runs optimizer steps and the per-step rules (log, save, stop);
``train_one_step`` takes the micro-batches of one step from the loader. Loss values stay on the device between log
steps (read there in one transfer); only the one-step-late skip / stop flags reach the host every step.
"""
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional

import torch
from torch import nn

from .distributed import DistEnv, all_gather_objects
from .loaders import TrainData
from .metrics import MetricsWriter
from .step import OptimizerStep, StepRecord
from .stopping import DivergenceError, DivergenceGuard, StopSignals
from .train_state import Position, capture_rng_state, restore_rng_state, save_epoch_weights, save_training_state

logger = logging.getLogger("segclip.train")

# An item may say how many corrupt samples the dataset replaced to produce it (summed per epoch, all ranks).
SKIPPED_SAMPLES_KEY = "skipped"


@dataclass
class TrainResult:
    global_step: int
    epoch: int
    finished: bool
    skipped_steps: int
    history: List[Dict[str, float]]
    eval_results: Dict[int, Dict[str, float]]
    stop_reason: Optional[str] = None     # None (finished), "stop_after_steps", or a signal name ("SIGTERM")


@dataclass
class Tally:
    """Sums over log intervals or epochs of host values."""
    sums: Dict[str, float] = field(default_factory=dict)
    steps: int = 0                # finite steps summed
    skipped: int = 0              # non-finite steps
    grad_norm: float = 0.0
    t0: float = field(default_factory=time.time)

    def add(self, terms: Dict[str, float], grad_norm: float, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
            return
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.grad_norm += grad_norm
        self.steps += 1

    def means(self) -> Dict[str, float]:
        return {k: v / self.steps for k, v in self.sums.items()} if self.steps else {}


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    def __init__(self, *, model: nn.Module, data: TrainData, step: OptimizerStep, cfg, env: DistEnv,
                 position: Position, total_steps: int, metrics: MetricsWriter, signals: StopSignals,
                 eval_fn: Optional[Callable[[nn.Module, int], Dict[str, float]]] = None,
                 extra_state: Optional[Dict[str, Any]] = None):
        self.model, self.data, self.step, self.cfg, self.env = model, data, step, cfg, env
        self.pos, self.total_steps, self.metrics, self.signals = position, total_steps, metrics, signals
        self.eval_fn, self.extra_state = eval_fn, dict(extra_state or {}, total_steps=total_steps)
        self.out_dir = cfg.output_dir
        self.guard = DivergenceGuard(cfg.max_nonfinite_steps)
        self.history: List[Dict[str, float]] = []
        self.eval_results: Dict[int, Dict[str, float]] = {}
        self.skipped_steps = 0
        self.last_saved_step: Optional[int] = position.global_step if position.global_step else None
        self.resumed_at: Optional[int] = self.last_saved_step      # the resumed state's step (None: a fresh start)
        self._finite_steps = 0                         # steps of this run with a finite loss and gradient
        self._unchecked: Deque[StepRecord] = deque()   # flags not yet looked at
        self._unlogged: List[StepRecord] = []          # values not yet read from the device
        self._agreed_stop = False
        self._t_start, self._steps_this_run = time.time(), 0
        self._interval, self._epoch = Tally(), Tally()
        self._corrupt = 0                              # corrupt samples replaced in this epoch, this rank
        self._bar = None

    # ------------------------------------------------------------------ one step
    def _micro_batches(self, it: Iterator, epoch: int) -> Iterator[Dict[str, Any]]:
        for _ in range(self.cfg.gradient_accumulation_steps):
            batch = next(it, None)
            if batch is None:
                raise RuntimeError(f"the data loader ran out after {self.pos.micro} of {self.data.micro_per_epoch} "
                                   f"micro-batches in epoch {epoch + 1}")
            skipped = batch.pop(SKIPPED_SAMPLES_KEY, None)     # a CPU tensor: reading it costs no GPU sync
            if skipped is not None:
                self._corrupt += int(skipped.sum())
            self.pos.micro += 1
            yield batch

    def train_one_step(self, it: Iterator, epoch: int) -> StepRecord:
        rec = self.step(self._micro_batches(it, epoch), step=self.pos.global_step + 1, epoch=epoch,
                        micro=self.pos.micro + self.cfg.gradient_accumulation_steps,
                        stop_requested=self.signals.requested)
        self.pos.global_step += 1
        self._steps_this_run += 1
        self._unchecked.append(rec)
        self._unlogged.append(rec)
        self._check_settled()
        if self._bar is not None:
            self._bar.update(1)
        return rec

    def _check_settled(self) -> None:
        """Skip / stop flags of the steps whose flags have arrived, in order; stops a diverging run."""
        while self._unchecked and self._unchecked[0].settled:
            rec = self._unchecked.popleft()
            self._agreed_stop |= rec.stop
            if rec.skipped:
                self.skipped_steps += 1
                if self.env.is_main:
                    logger.warning("step %d: non-finite loss or gradient: update skipped", rec.step)
            else:
                self._finite_steps += 1
            if self.guard.update(rec.skipped, rec.step):
                raise self._divergence_error(rec)

    def _sync(self) -> None:
        self.step.settle()
        self._check_settled()

    def _divergence_error(self, rec: StepRecord) -> DivergenceError:
        if self.resumed_at is not None and self._finite_steps == 0:
            # Not a learning rate to lower: a resumed run keeps the rates saved in its state, so --resume auto would
            # meet the same wall again. The state itself (or the data from its position on) cannot be continued.
            weights = f"{self.out_dir}/pytorch_model.bin.N" if self.out_dir else "pytorch_model.bin.N"
            return DivergenceError(
                f"every one of the {self.guard.streak} optimizer steps since resuming from the training state of "
                f"optimizer step {self.resumed_at} had a non-finite loss or gradient, so training stopped: that state "
                "cannot be continued as it is (a resumed run keeps the learning rates saved in its state, so lowering "
                f"--lr does not change it). Start afresh with --overwrite, e.g. from a good epoch's weights with "
                f"--init_model {weights}, or raise --max_nonfinite_steps (0 disables this check)")
        kept = (f"the latest training state in {self.out_dir} (optimizer step {self.last_saved_step}) is from "
                f"before them and stays the one --resume auto continues from" if self.last_saved_step else
                "no training state was saved")
        return DivergenceError(f"{self.guard.streak} consecutive optimizer steps ({self.guard.first_bad}-"
                               f"{rec.step}) had a non-finite loss or gradient, so training stopped; {kept}. "
                               f"Lower --lr (the largest LR now is {max(rec.lrs):.3g}) and start afresh with "
                               "--overwrite (a resumed run keeps the learning rates saved in its state), try --amp "
                               "off, or raise --max_nonfinite_steps (0 disables this check)")

    @property
    def stop_requested(self) -> bool:
        """Every rank reaches the same answer at the same step (the flag travels with the step's all-reduce)."""
        return self._agreed_stop if self.env.is_distributed else self.signals.requested

    # ------------------------------------------------------------------ one epoch
    def train_one_epoch(self, epoch: int) -> Optional[str]:
        """Optimizer steps until the epoch ends (-> None) or the run must stop (-> the reason; state saved)."""
        cfg, data = self.cfg, self.data
        first = self.pos.micro if epoch == self.pos.epoch else 0
        self.pos = Position(epoch, first, self.pos.global_step)
        it = data.epoch_batches(epoch, first)
        self._epoch, self._interval, self._corrupt = Tally(), Tally(), 0
        if self.env.is_main and cfg.progress:
            from tqdm import tqdm
            self._bar = tqdm(total=data.steps_per_epoch, initial=first // cfg.gradient_accumulation_steps,
                             desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True, leave=False)
        try:
            while self.pos.micro < data.micro_per_epoch:
                self.train_one_step(it, epoch)
                end = self.pos.micro == data.micro_per_epoch
                step = self.pos.global_step
                if step % max(1, cfg.n_display) == 0 or end:
                    self.log_interval(epoch)
                if end:
                    return None
                reason = self._stop_reason()
                if reason or (cfg.save_every_steps > 0 and step % cfg.save_every_steps == 0):
                    self.save_state()
                if reason:
                    self.log_interval(epoch)         # the steps since the last log line
                    self._log_stop(reason)
                    return reason
            return None
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _stop_reason(self) -> Optional[str]:
        if self.stop_requested:
            return self.signals.name or "signal"
        if 0 < self.cfg.stop_after_steps <= self.pos.global_step:
            return "stop_after_steps"
        return None

    def _log_stop(self, reason: str) -> None:
        if not self.env.is_main:
            return
        why = "--stop_after_steps" if reason == "stop_after_steps" else reason
        logger.info("stopping after optimizer step %d (%s); resume with --resume auto", self.pos.global_step, why)

    # ------------------------------------------------------------------ logging
    def log_interval(self, epoch: int) -> None:
        """Read the values of the steps since the last log line (one device->host transfer), log, write metrics."""
        self._sync()
        recs, self._unlogged = self._unlogged, []
        if not recs:
            return
        keys = list(recs[0].terms)
        values = torch.stack([torch.stack([r.terms[k].float() for k in keys] + [r.grad_norm.float()])
                              for r in recs]).cpu().tolist()
        for r, row in zip(recs, values):
            terms = dict(zip(keys, row[:-1]))
            self.history.append(dict(terms, grad_norm=row[-1], step=r.step, epoch=epoch,
                                     stepped=float(not r.skipped), lr=r.lrs[-1]))
            self._interval.add(terms, row[-1], r.skipped)
            self._epoch.add(terms, row[-1], r.skipped)
        corrupt = self._sum_over_ranks(self._corrupt)
        tally, self._interval = self._interval, Tally()
        if not self.env.is_main:
            return
        n = len(recs)
        rate = n * self.cfg.batch_size / max(1e-9, time.time() - tally.t0)
        eta = (time.time() - self._t_start) / self._steps_this_run * (self.total_steps - self.pos.global_step)
        means = tally.means()
        lrs = self._lrs_by_group(recs[-1].lrs)
        loss_scale = self.step.scaler.get_scale() if self.step.scaler.is_enabled() else None
        grad_norm = tally.grad_norm / tally.steps if tally.steps else float("nan")
        terms = " ".join(f"{k} {v:.4f}" for k, v in means.items()) or "all steps skipped"
        extra = (f" | {tally.skipped} skipped" if tally.skipped else "") + \
                (f" | {corrupt} corrupt samples replaced" if corrupt else "")
        logger.info("epoch %d/%d step %d/%d (global %d/%d) | %s | grad norm %.3f | lr %s | %.1f samples/s | ETA %s%s",
                    epoch + 1, self.cfg.epochs, self.pos.micro // self.cfg.gradient_accumulation_steps,
                    self.data.steps_per_epoch, self.pos.global_step, self.total_steps, terms, grad_norm,
                    " ".join(f"{k}={v:.3g}" for k, v in self._short_lrs(recs[-1].lrs).items()), rate,
                    _format_eta(eta), extra)
        if self._bar is not None and "total" in means:
            self._bar.set_postfix(loss=f"{means['total']:.4f}")
        self.metrics.write(dict(type="step", step=self.pos.global_step, epoch=epoch,
                                epoch_step=self.pos.micro // self.cfg.gradient_accumulation_steps, steps=n,
                                loss=means, grad_norm=grad_norm, lr=lrs, samples_per_s=rate,
                                skipped_steps=tally.skipped, skipped_samples=corrupt, loss_scale=loss_scale,
                                time=round(time.time() - self._t_start, 3)))

    def _lrs_by_group(self, lrs: List[float]) -> Dict[str, float]:
        return {str(g.get("name", i)): lr for i, (g, lr) in enumerate(zip(self.step.optimizer.param_groups, lrs))}

    def _short_lrs(self, lrs: List[float]) -> Dict[str, float]:
        """One LR per LR group (decay / no_decay halves share it), for the log line."""
        return {k.split("/")[0]: v for k, v in self._lrs_by_group(lrs).items()}

    def _sum_over_ranks(self, count: int) -> int:
        return sum(all_gather_objects(self.env, int(count)))

    # ------------------------------------------------------------------ saving, end of epoch
    def save_state(self, micro: Optional[int] = None) -> None:
        """The training state at the current position -- unless the last step was not finite: then the previous
        state stays the latest (its weights did not yet produce a non-finite step)."""
        self._sync()
        if self.guard.streak:
            if self.env.is_main:
                logger.warning("the last step was not finite: keeping the training state of step %s",
                               self.last_saved_step)
            return
        pos = Position(self.pos.epoch, self.pos.micro if micro is None else micro, self.pos.global_step)
        save_training_state(self.out_dir, model=self.model, optimizer=self.step.optimizer,
                            scheduler=self.step.scheduler, scaler=self.step.scaler, position=pos, env=self.env,
                            extra=self.extra_state)
        if self.out_dir is not None:
            self.last_saved_step = pos.global_step

    def end_of_epoch(self, epoch: int) -> None:
        """Weights file, training state, evaluation, the epoch's metrics record."""
        tally, seconds = self._epoch, time.time() - self._epoch.t0      # training time, without the evaluation
        corrupt = self._sum_over_ranks(self._corrupt)
        if self.env.is_main and corrupt:
            logger.warning("epoch %d/%d: %d corrupt sample(s) replaced by others (all workers and processes)",
                           epoch + 1, self.cfg.epochs, corrupt)
        if not self.guard.streak:
            path = save_epoch_weights(self.out_dir, self.model, epoch, self.env)
            if path is not None and self.env.is_main:
                logger.info("epoch %d/%d done; weights saved to %s", epoch + 1, self.cfg.epochs, path)
        self.save_state(micro=self.data.micro_per_epoch)
        self.pos = Position(epoch + 1, 0, self.pos.global_step)
        if self.eval_fn is not None and not self.stop_requested:
            self.eval_results[epoch] = self.evaluate(epoch)
        steps = tally.steps + tally.skipped
        self.metrics.write(dict(type="epoch", epoch=epoch, step=self.pos.global_step, steps=steps,
                                loss=tally.means(), skipped_steps=tally.skipped, skipped_samples=corrupt,
                                seconds=round(seconds, 3),
                                samples_per_s=steps * self.cfg.batch_size / max(seconds, 1e-9),
                                eval=self.eval_results.get(epoch)))

    def evaluate(self, epoch: int) -> Dict[str, float]:
        """``eval_fn`` on every rank (a distributed evaluation splits the images), without shifting the training
        noise streams (resume consistency)."""
        rng = capture_rng_state()
        self.model.eval()
        try:
            with torch.no_grad():
                result = self.eval_fn(self.model, epoch)
        finally:
            self.model.train()
            restore_rng_state(rng)
        if self.env.is_main:
            logger.info("epoch %d/%d evaluation: %s", epoch + 1, self.cfg.epochs, result)
        return result

    # ------------------------------------------------------------------ the run
    def fit(self) -> TrainResult:
        self.model.train()
        self.step.net.train()
        for epoch in range(self.pos.epoch, self.cfg.epochs):
            reason = self.train_one_epoch(epoch)
            if reason:
                return self._result(epoch, False, reason)
            self.end_of_epoch(epoch)
            reason = self._stop_reason()
            if reason and epoch + 1 < self.cfg.epochs:
                self._log_stop(reason)
                return self._result(epoch + 1, False, reason)
        return self._result(self.pos.epoch, True, None)

    def _result(self, epoch: int, finished: bool, reason: Optional[str]) -> TrainResult:
        return TrainResult(self.pos.global_step, epoch, finished, self.skipped_steps, self.history,
                           self.eval_results, reason)
