"""Training on a GPU (skipped where CUDA is absent; benchmarks/gpu_check.sh runs this module).

- a full training run with ``--amp bf16`` and with ``--amp fp16`` (GradScaler): finite, and close to fp32;
- a training step makes no CPU-GPU synchronisation (``torch.cuda.set_sync_debug_mode("error")``);
- ``torchrun --nproc_per_node 1`` trains with an NCCL process group, pinned-memory loader, bf16;
- the training loader pins its batches.
Inference on the GPU is in tests/test_cuda.py.
"""
import os
import subprocess
import sys

import pytest
import torch

from engine.distributed import DistEnv
from tests.test_train_loop import RandomPairs, cfg_for, make_model, tiny_clip_file, tiny_store  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def full_fp32():
    """The fp32 reference must be true fp32 (train() would otherwise allow TF32 with --amp off)."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def _run(reference, amp, steps=2):
    from engine.training import train
    model = make_model(reference["clip_state_dict"])
    res = train(model, RandomPairs(2 * steps), cfg_for(batch_size=2, epochs=1, amp=amp, tf32=False, n_display=1),
                DistEnv(device=CUDA))
    return model, res


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_with_amp_is_finite_and_close_to_fp32(reference, amp):
    ref_model, ref = _run(reference, "off")
    model, res = _run(reference, amp)
    assert res.global_step == ref.global_step == 2
    if amp == "fp16":
        assert res.skipped_steps <= 1          # GradScaler may back off once from its initial scale
    else:
        assert res.skipped_steps == 0
    first, first_ref = res.history[0], ref.history[0]    # same weights, data and noise: only the precision differs
    for k in ("contrastive", "kl", "mae", "total"):
        assert first[k] == pytest.approx(first_ref[k], rel=3e-2, abs=3e-3), k
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.isfinite(p).all(), n
        if res.skipped_steps == 0:
            torch.testing.assert_close(p, q, atol=5e-3, rtol=5e-2, msg=n)


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_training_step_does_not_synchronize(reference, amp):
    """Steps between log lines never wait for the GPU: any synchronising call raises in this mode."""
    from engine.optimization import OptimConfig, build_optimizer
    from engine.step import OptimizerStep, wrap_for_training
    model = make_model(reference["clip_state_dict"]).to(CUDA).train()
    ds = RandomPairs(4)
    batches = [{k: v.pin_memory() for k, v in torch.utils.data.default_collate([ds[i], ds[i + 1]]).items()}
               for i in (0, 2)]
    optimizer, scheduler = build_optimizer(model, OptimConfig(lr=1e-3, lower_lr=1e-4), total_steps=100)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    env = DistEnv(device=CUDA)
    step = OptimizerStep(wrap_for_training(model, env), model, optimizer, scheduler, scaler, env, amp=amp, accum=2)
    step(iter(batches), step=1, epoch=0, micro=2)         # first step: lazy initialisations (optimizer state ...)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in (2, 3, 4):
            step(iter(batches), step=s, epoch=0, micro=2 * s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rec = step.settle()
    assert rec.step == 4 and torch.isfinite(rec.terms["total"]).item()


def test_training_loader_pins_batches(reference):
    from engine.loaders import build_train_data
    data = build_train_data(RandomPairs(4), 2, DistEnv(device=CUDA), seed=0, accum=1, num_workers=1,
                            pin_memory=True, global_batch=2)
    batch = next(data.epoch_batches(0))
    assert batch["image"].is_pinned() and batch["input_ids"].is_pinned()


def test_torchrun_one_process_trains_with_nccl(repo_root, tmp_path, tiny_clip_file, tiny_store):  # noqa: F811
    out = tmp_path / "run"
    env = dict(os.environ)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "main_task_align.py", "--do_pretrain", "--datatype", "cc", "--cc_store", str(tiny_store),
                        "--pretrained_clip_name", str(tiny_clip_file), "--batch_size", "4", "--epochs", "1",
                        "--max_words", "16", "--use_seglabel", "--use_vision_mae_recon", "--amp", "bf16",
                        "--use_pin_memory", "--num_thread_reader", "1", "--n_display", "1", "--device", "cuda",
                        "--output_dir", str(out), "--no_progress"], cwd=repo_root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "device cuda:0 (nccl process group)" in log and "amp bf16" in log
    from engine.metrics import METRICS_NAME, read_metrics
    steps = read_metrics(out / METRICS_NAME, "step")
    assert [r["step"] for r in steps] == [1, 2] and all(r["skipped_steps"] == 0 for r in steps)
    assert (out / "pytorch_model.bin.0").is_file()
