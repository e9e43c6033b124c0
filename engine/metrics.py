"""Machine-readable training metrics: ``OUTPUT_DIR/metrics.jsonl`` and, with ``--tensorboard``, TensorBoard events.

metrics.jsonl holds one JSON object a line, appended as the run goes (like log.txt; a killed run can leave a torn
last line, which :func:`read_metrics` skips). Two kinds, told apart by ``"type"``:

- ``"step"`` -- every ``--n_display`` optimizer steps and at each epoch end: ``step`` (optimizer steps done),
  ``epoch`` (0-based, as in ``pytorch_model.bin.{epoch}``), ``epoch_step``, ``steps`` (steps averaged in this
  record), ``loss`` {term: mean}, ``grad_norm`` (mean, before clipping), ``lr`` {group: LR of the last step},
  ``samples_per_s``, ``skipped_steps`` (non-finite steps in the interval), ``skipped_samples`` (corrupt samples
  replaced so far in this epoch, all workers and ranks), ``loss_scale`` (fp16), ``time`` (s since the start).
- ``"epoch"`` -- at each epoch end: ``epoch``, ``step``, ``steps``, ``loss`` (epoch means), ``skipped_steps``,
  ``skipped_samples`` (epoch total over workers and ranks), ``seconds``, ``samples_per_s`` and ``eval`` (the
  end-of-epoch evaluation, when one ran).

A resumed run first drops the records of steps after the resumed training state, so the file reads as one run.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from common.errors import SegCLIPError
from common.fileio import OutputError, atomic_write_text, describe_os_error

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: Union[str, os.PathLike], kind: Optional[str] = None) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl (only ``"type" == kind`` when given); a torn last line is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if kind is None or rec.get("type") == kind:
            out.append(rec)
    return out


class MetricsWriter:
    """Writes metrics.jsonl (and TensorBoard scalars) on the main process; a no-op elsewhere or without a folder.

    start_step: optimizer steps already done (a resumed run); later records of an earlier run are dropped.
    """

    def __init__(self, output_dir: Optional[Union[str, os.PathLike]], enabled: bool = True,
                 tensorboard: bool = False, start_step: int = 0):
        self.path = Path(output_dir) / METRICS_NAME if (output_dir and enabled) else None
        self._tb = None
        if self.path is None:
            return
        kept = []
        if self.path.is_file():
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise SegCLIPError(f"--tensorboard needs the tensorboard package ({e}); "
                                   f"pip install -r requirements.txt") from e
            # purge_step hides the events of steps after the resumed state written by the interrupted run
            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR),
                                     purge_step=start_step + 1 if start_step else None)

    def write(self, record: Dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(record, allow_nan=True) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:
            raise OutputError(describe_os_error(e, self.path)) from e
        if self._tb is not None:
            self._scalars(record)

    def _scalars(self, rec: Dict[str, Any]) -> None:
        step, prefix = rec["step"], "" if rec["type"] == "step" else "epoch/"
        for k, v in rec.get("loss", {}).items():
            self._tb.add_scalar(f"{prefix}loss/{k}", v, step)
        for k, v in rec.get("lr", {}).items():
            self._tb.add_scalar(f"lr/{k}", v, step)
        for k, v in (rec.get("eval") or {}).items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"eval/{k}", v, step)
        for k in ("grad_norm", "samples_per_s", "skipped_steps", "skipped_samples", "loss_scale"):
            if rec.get(k) is not None:
                self._tb.add_scalar(f"{prefix}{k}", rec[k], step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
