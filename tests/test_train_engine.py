"""The training engine's parts on CPU: metrics.jsonl and TensorBoard, a step without host reads, fp32 assignment and
losses under autocast, GradScaler back-off, precision / device / SLURM layout checks, per-sample seeding."""
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from engine.distributed import DistEnv, first_slurm_host, select_device, slurm_layout
from engine.loaders import SeededDataset
from engine.metrics import METRICS_NAME, TENSORBOARD_DIR, read_metrics
from engine.optimization import OptimConfig, build_optimizer
from engine.precision import PrecisionError, allow_tf32, check_precision
from engine.step import OptimizerStep
from engine.train_state import find_resume_file, load_training_state
from engine.training import train
from tests.test_train_loop import RandomPairs, cfg_for, make_model


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_jsonl_and_tensorboard_across_a_resume(reference, tmp_path):
    """Step records every --n_display steps and at epoch ends, epoch records; values equal the run's history; a
    resumed run continues the file; TensorBoard events hold the same scalars (read back with tensorboard)."""
    clip = reference["clip_state_dict"]
    ds = RandomPairs(6)                                   # batch 2: 3 steps per epoch, 2 epochs
    cfg = dict(batch_size=2, epochs=2, n_display=2, tensorboard=True)
    r1 = train(make_model(clip), ds, cfg_for(tmp_path, stop_after_steps=1, **cfg), DistEnv())
    state = load_training_state(find_resume_file(tmp_path))
    r2 = train(make_model(clip), ds, cfg_for(tmp_path, **cfg), DistEnv(), resume_state=state)
    assert r2.finished and r2.global_step == 6

    steps = read_metrics(tmp_path / METRICS_NAME, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 6]   # stop at 1, log at 2 and 4, epoch ends at 3 and 6
    history = {h["step"]: h for h in r1.history + r2.history}
    groups = {"lower_lr/decay", "lower_lr/no_decay", "lr/decay", "lr/no_decay"}
    prev = 0
    for rec in steps:
        covered = [history[s] for s in range(prev + 1, rec["step"] + 1)]
        assert rec["steps"] == len(covered) and rec["epoch"] == covered[-1]["epoch"]
        assert set(rec["loss"]) == {"contrastive", "kl", "mae", "total"}
        for k in rec["loss"]:
            assert rec["loss"][k] == pytest.approx(sum(h[k] for h in covered) / len(covered), rel=1e-6)
        assert rec["grad_norm"] == pytest.approx(sum(h["grad_norm"] for h in covered) / len(covered), rel=1e-6)
        assert set(rec["lr"]) == groups and rec["lr"]["lr/decay"] == pytest.approx(covered[-1]["lr"])
        assert rec["samples_per_s"] > 0 and rec["skipped_steps"] == 0 and rec["skipped_samples"] == 0
        prev = rec["step"]
    epochs = read_metrics(tmp_path / METRICS_NAME, "epoch")
    assert [(r["epoch"], r["step"]) for r in epochs] == [(0, 3), (1, 6)]
    assert epochs[1]["steps"] == 3 and epochs[1]["loss"]["total"] == pytest.approx(
        sum(history[s]["total"] for s in range(4, 7)) / 3, rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("loss/total")}
    assert tb == pytest.approx({r["step"]: r["loss"]["total"] for r in steps}, rel=1e-6)
    assert {"grad_norm", "samples_per_s", "lr/lr/decay", "epoch/loss/total"} <= set(acc.Tags()["scalars"])


def test_corrupt_sample_counts_are_summed_per_epoch_over_workers(reference, tmp_path, caplog):
    """Items that report replaced corrupt samples (``skipped``, as dataloaders.datasets does): one total per epoch
    over both loader workers, in the log and in metrics.jsonl."""
    class Reporting(RandomPairs):
        def __getitem__(self, i):
            return dict(super().__getitem__(i), skipped=2 if i in (1, 6) else 0)

    train(make_model(reference["clip_state_dict"]), Reporting(8), cfg_for(tmp_path, batch_size=4, epochs=1,
                                                                           num_workers=2), DistEnv())
    (epoch,) = read_metrics(tmp_path / METRICS_NAME, "epoch")
    assert epoch["skipped_samples"] == 4
    assert read_metrics(tmp_path / METRICS_NAME, "step")[-1]["skipped_samples"] == 4
    assert "epoch 1/1: 4 corrupt sample(s) replaced" in caplog.text


# ---------------------------------------------------------------------------------------------- the step
class HostReads(TorchDispatchMode):
    """Records every read of a tensor value by the host (``.item()``, ``bool()``, ``float()`` ... all go through
    ``aten._local_scalar_dense``); on a GPU each of them would wait for the stream."""

    def __init__(self):
        super().__init__()
        self.reads, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.reads.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def _optimizer_step(model, amp="off", scaler=None, accum=1):
    from engine.step import wrap_for_training
    optimizer, scheduler = build_optimizer(model, OptimConfig(lr=1e-3, lower_lr=1e-4), total_steps=100)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    return OptimizerStep(wrap_for_training(model, DistEnv()), model, optimizer, scheduler, scaler, DistEnv(),
                         amp=amp, accum=accum)


def test_training_step_reads_nothing_from_the_device(reference, monkeypatch):
    """Two full steps (all losses, accumulation 2, clipping, fused AdamW, the logit_scale clamp) read no tensor
    value on the host; only the previous step's two flags arrive, by a non-blocking copy."""
    from modules.modeling import CLIP
    model = make_model(reference["clip_state_dict"]).train()
    ds = RandomPairs(4)
    batches = [torch.utils.data.default_collate([ds[i], ds[i + 1]]) for i in (0, 2)]
    step = _optimizer_step(model, accum=2)
    mode = HostReads()
    real_encode_text = CLIP.encode_text

    def encode_text_unwatched(self, ids):        # its token-range check runs on CPU tensors only (free there)
        mode.paused = True
        try:
            return real_encode_text(self, ids)
        finally:
            mode.paused = False
    monkeypatch.setattr(CLIP, "encode_text", encode_text_unwatched)
    with mode:
        recs = [step(iter(batches), step=s, epoch=0, micro=2 * s) for s in (1, 2)]
    assert mode.reads == []
    assert [r.settled for r in recs] == [True, False]             # each step settles the previous one
    assert not step.settle().skipped and step.scheduler.last_epoch == 2
    assert all(torch.isfinite(r.terms["total"]) for r in recs)


class Toy(nn.Module):
    """A linear model with the ``clip.logit_scale`` the step clamps."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.clip = nn.Module()
        self.clip.logit_scale = nn.Parameter(torch.tensor(1.0))

    def compute_losses(self, input_ids, images, superpixels=None):
        loss = (self.lin(images) ** 2).mean() * self.clip.logit_scale + input_ids.float().mean()
        return {"total": loss}


def _toy_batch(bias: float):
    return [{"input_ids": torch.full((2, 1), bias), "image": torch.ones(2, 4)}]


@pytest.mark.parametrize("use_scaler", [False, True])
def test_nonfinite_loss_with_finite_gradients_is_skipped(use_scaler):
    """A loss that is inf while every gradient is finite: no update, no schedule step; with a gradient scaler
    (fp16) the scale backs off and the growth tracker restarts, as GradScaler does for inf gradients."""
    model = Toy()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=100, enabled=use_scaler)
    step = _optimizer_step(model, scaler=scaler)
    for s in (1, 2, 3):
        step(iter(_toy_batch(0.0)), step=s, epoch=0, micro=s)
    step.settle()
    if use_scaler:
        assert scaler.state_dict()["_growth_tracker"] == 3 and scaler.get_scale() == 2.0 ** 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr_before = [g["lr"] for g in step.optimizer.param_groups]
    rec = step(iter(_toy_batch(math.inf)), step=4, epoch=0, micro=4)
    step.settle()
    assert rec.skipped and step.scheduler.last_epoch == 3
    assert [g["lr"] for g in step.optimizer.param_groups] == lr_before
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    if use_scaler:
        assert scaler.get_scale() == 2.0 ** 9 and scaler.state_dict()["_growth_tracker"] == 0
    rec = step(iter(_toy_batch(0.0)), step=5, epoch=0, micro=5)
    assert not rec.settle().skipped and not torch.equal(model.lin.weight, before["lin.weight"])


# ---------------------------------------------------------------------------------------------- fp32 islands
def test_center_assignment_is_fp32_under_autocast(tiny_model):
    """Under bf16 autocast the logits q.k^T, the Gumbel noise, the softmax and the argmax are fp32: equal to an
    fp32 computation from the same q and k (bf16 logits of this model differ by ~1e-2 and flip assignments)."""
    block = tiny_model.clip.visual.transformer.semantic_layer2
    seen = {}
    block.cross_ln.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    block.k_ln.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    tiny_model.train()
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    G, L = block.semantic_center.shape[0], (112 // 16) ** 2
    noise = -torch.log(-torch.log(torch.rand(2, G, L, generator=torch.Generator().manual_seed(1))))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model.encode_image(images, gumbel_noise=noise)
    assert seen["q"].dtype == torch.bfloat16                   # the towers did run in bf16
    logits = seen["q"].float() @ seen["k"].float().transpose(1, 2)
    assert out.soft_attn.dtype == out.hard_attn.dtype == torch.float32
    torch.testing.assert_close(out.soft_attn, logits.softmax(dim=1), atol=1e-6, rtol=1e-5)
    from modules.centers import GUMBEL_TAU
    assert torch.equal(out.hard_attn.argmax(dim=1), ((logits + noise) / GUMBEL_TAU).argmax(dim=1))


def test_losses_ignore_autocast():
    """Each loss function gives the same value inside bf16 autocast as outside (fp32 inputs)."""
    from modules.losses import contrastive_loss, mae_loss, superpixel_kl_loss
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    scale = torch.tensor(100.0)
    B, G, side = 2, 8, 20                                       # 400 patches: bf16 counts would be inexact
    hard = torch.nn.functional.one_hot(torch.randint(0, G, (B, side * side), generator=g), G).transpose(1, 2)
    sp = torch.randint(0, 30, (B, side, side), generator=g)
    pred, images = torch.randn(2, 49, 16 * 16 * 3, generator=g), torch.randn(2, 3, 112, 112, generator=g)
    mask = (torch.rand(2, 49, generator=g) > 0.25).float()
    calls = [lambda: contrastive_loss(img, txt, scale), lambda: superpixel_kl_loss(hard.float(), sp),
             lambda: mae_loss(pred, images, mask, 16)]
    for fn in calls:
        plain = fn()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = fn()
        assert auto.dtype == torch.float32 and torch.equal(auto, plain)


# ---------------------------------------------------------------------------------------------- devices
def test_precision_is_checked_at_start(monkeypatch):
    with pytest.raises(PrecisionError, match="--amp must be one of"):
        check_precision("fp8", torch.device("cpu"))
    with pytest.raises(PrecisionError, match="--amp fp16 needs CUDA"):
        check_precision("fp16", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(PrecisionError, match="V100.*no bf16 support; use --amp fp16"):
        check_precision("bf16", torch.device("cuda", 0))
    check_precision("fp16", torch.device("cuda", 0))
    assert allow_tf32("off", torch.device("cuda", 0)) is None  # no TF32 before Ampere


def test_tf32_with_amp_off_on_ampere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert allow_tf32("bf16", torch.device("cuda", 0)) is None
        assert torch.get_float32_matmul_precision() == "highest"
        assert "TF32" in allow_tf32("off", torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "high"
        assert "full fp32" in allow_tf32("off", torch.device("cuda", 0), enabled=False)
        assert torch.get_float32_matmul_precision() == "highest"
        assert allow_tf32("off", torch.device("cpu")) is None
    finally:
        torch.set_float32_matmul_precision(before)


def test_one_visible_gpu_per_process(monkeypatch):
    """Per-task CUDA_VISIBLE_DEVICES (SLURM): local rank 3 sees one GPU, index 0."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert select_device(None, 3) == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert select_device("cuda", 6) == torch.device("cuda", 2)
    assert select_device("cpu", 3) == torch.device("cpu")


def test_slurm_task_layout():
    task = dict(SLURM_PROCID="3", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_STEP_ID="0", SLURM_JOB_ID="123456",
                SLURM_STEP_NODELIST="gpu[003-004],big7")
    assert slurm_layout(task) == (3, 8, 1, {"MASTER_ADDR": "gpu003", "MASTER_PORT": "23456"})
    assert slurm_layout(dict(task, MASTER_ADDR="10.0.0.1", MASTER_PORT="4000", SLURM_STEP_NUM_TASKS="4")) == (
        3, 4, 1, {})
    assert slurm_layout(dict(task, RANK="0", WORLD_SIZE="2")) is None       # torchrun inside srun decides
    batch_script = {k: v for k, v in task.items() if k != "SLURM_STEP_ID"}
    assert slurm_layout(batch_script) is None                               # the sbatch script, not an srun task
    assert slurm_layout({}) is None
    assert first_slurm_host("node17") == "node17" and first_slurm_host("a-b[09,11-12]") == "a-b09"


# ---------------------------------------------------------------------------------------------- seeding
def test_per_sample_seeding_touches_only_the_cpu_generator(monkeypatch):
    """num_workers=0 on CUDA: the item's seed must not reseed the CUDA generators (the GPU noise of the batch
    would then depend on its last sample); the CPU stream of the caller is restored."""
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", cuda_seeds.append)
    ds = SeededDataset(RandomPairs(4), seed=5)
    torch.manual_seed(0)
    cuda_seeds.clear()
    state = torch.get_rng_state()
    a, b = ds[2]["image"], ds[2]["image"]
    assert torch.equal(a, b) and not torch.equal(a, ds[3]["image"])
    assert cuda_seeds == [] and torch.equal(torch.get_rng_state(), state)
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["image"], a)
