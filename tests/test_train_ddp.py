"""Distributed training on CPU with gloo: the global contrastive gradient, and an end-to-end torchrun run."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.test_train_loop import tiny_clip_file, tiny_store  # noqa: F401  (fixtures)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# the deprecated launcher passes --local-rank=N to the script instead of only setting LOCAL_RANK
LAUNCH = [sys.executable, "-m", "torch.distributed.launch", "--standalone", "--nproc_per_node", "2"]


def _env(repo_root):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    return env


GRAD_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from modules.modeling import SegCLIP
    from engine.distributed import init_distributed, cleanup
    env = init_distributed()
    ref, out = sys.argv[1], sys.argv[2]
    r = torch.load(ref, weights_only=True)
    model = SegCLIP.from_state_dict(r["segclip_state_dict"], use_vision_mae_recon=False)
    model.train()

    class Contrastive(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
        def forward(self, ids, images, noise):
            return self.m.compute_losses(ids, images, gumbel_noise=(noise, None))["contrastive"]

    ddp = torch.nn.parallel.DistributedDataParallel(Contrastive(model), find_unused_parameters=True)
    inp = torch.load(out + ".inputs.pt", weights_only=True)
    B = inp["ids"].shape[0] // env.world_size
    sl = slice(env.rank * B, (env.rank + 1) * B)
    loss = ddp(inp["ids"][sl], inp["images"][sl], inp["noise"][sl])
    loss.backward()
    if env.rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    cleanup(env)
""")


def _grad_inputs(reference, B2):
    g = torch.Generator().manual_seed(0)
    imgs = reference["images"]
    images = torch.cat([imgs, imgs.flip(-1)] * (B2 // 4 + 1))[:B2] + 0.1 * torch.randn(B2, *imgs.shape[1:], generator=g)
    ids = reference["train_text"]["input_ids"]
    ids = ids.repeat(B2 // 2 + 1, 1)[:B2].clone()
    ids[:, 1] = torch.arange(400, 400 + B2)            # distinct captions
    G, L = 8, (images.shape[-1] // 16) ** 2
    noise = -torch.log(-torch.log(torch.rand(B2, G, L, generator=g)))   # Gumbel(0, 1)
    return {"ids": ids, "images": images, "noise": noise}


def test_ddp_global_contrastive_gradient_equals_single_process(reference, repo_root, tmp_path):
    """2 ranks x B with the differentiable all-gather + DDP averaging == one process on the 2B batch."""
    from modules.modeling import SegCLIP
    B2 = 6
    inputs = _grad_inputs(reference, B2)
    out = tmp_path / "grads.pt"
    torch.save(inputs, str(out) + ".inputs.pt")
    ref_path = tmp_path / "ref.pt"
    torch.save({"segclip_state_dict": reference["segclip_state_dict"]}, ref_path)
    script = tmp_path / "grad_worker.py"
    script.write_text(GRAD_WORKER)
    proc = subprocess.run(TORCHRUN + [str(script), str(ref_path), str(out)], cwd=repo_root, env=_env(repo_root),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp_grads = torch.load(out, weights_only=True)

    model = SegCLIP.from_state_dict(reference["segclip_state_dict"], use_vision_mae_recon=False).train()
    loss = model.compute_losses(inputs["ids"], inputs["images"], gumbel_noise=(inputs["noise"], None))
    loss["contrastive"].backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(single) == set(ddp_grads)
    # the gradient reaches the visual and text towers and the centers, through the all-gather
    for name in ("clip.visual.transformer.semantic_layer2.semantic_center", "clip.visual.proj",
                 "clip.text_projection", "clip.logit_scale", "clip.visual.transformer.layers0.0.attn.in_proj_weight"):
        assert single[name].abs().sum() > 0, name
    for name, g in single.items():
        torch.testing.assert_close(ddp_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_torchrun_two_processes_end_to_end(repo_root, tmp_path, tiny_clip_file, tiny_store):  # noqa: F811
    """torchrun x2 (gloo) trains with all three losses, writes per-epoch weights + a resumable state, logs on rank 0;
    torch.distributed.launch x2 resumes mid-epoch, evaluates zero-shot after the epoch (sharded over the ranks) and
    finishes; the weights load in the evaluation loader."""
    out = tmp_path / "run"
    args = ["main_task_align.py", "--do_pretrain", "--datatype", "cc", "--cc_store", str(tiny_store),
            "--pretrained_clip_name", str(tiny_clip_file), "--batch_size", "4", "--epochs", "2", "--max_words", "16",
            "--lr", "1e-3", "--lower_lr", "1e-4", "--use_seglabel", "--use_vision_mae_recon",
            "--num_thread_reader", "1", "--n_display", "1", "--output_dir", str(out), "--no_progress"]
    proc = subprocess.run(TORCHRUN + args + ["--stop_after_steps", "3"], cwd=repo_root, env=_env(repo_root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "pytorch_model.bin.0").is_file() and (out / "training_state.pt").is_file()
    assert not (out / "pytorch_model.bin.1").exists()
    log = (out / "log.txt").read_text()
    assert "global batch 4 = 2 process(es) x 2" in log
    assert "contrastive" in log and " kl " in log and " mae " in log and "samples/s" in log
    from engine.train_state import load_training_state
    state = load_training_state(out / "training_state.pt")
    assert state["global_step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2

    from tests.helpers import write_fake_dataset
    voc = write_fake_dataset("voc", tmp_path / "VOC2012", num_images=3, size=(64, 48))
    proc = subprocess.run(LAUNCH + args + ["--resume", "auto", "--eval_data_root", voc], cwd=repo_root,
                          env=_env(repo_root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = (out / "log.txt").read_text()
    assert "resuming at epoch 2, micro-batch 1/2, optimizer step 3/4" in log
    assert "epoch 2/2 evaluation: {" in log and "'mIoU': " in log and "'images': 3.0" in log  # over 2 ranks
    assert load_training_state(out / "training_state.pt")["global_step"] == 4   # 8 samples / 4 = 2 steps x 2 epochs

    from modules.checkpoint import load_segclip
    model = load_segclip(out / "pytorch_model.bin.1")
    sd = torch.load(out / "pytorch_model.bin.1", weights_only=True)
    assert any(k.startswith("vis_mae_decoder.") for k in sd)
    with torch.no_grad():
        o = model.encode_image(torch.randn(1, 3, 224, 224))
    assert o.group_embeds.shape == (1, 8, 32) and torch.isfinite(o.image_embed).all()
    # ... and in the demo
    img = next((tmp_path / "VOC2012" / "JPEGImages").glob("*.jpg"))
    proc = subprocess.run([sys.executable, "main_seg_vis.py", "--input", str(img), "--init_model",
                           str(out / "pytorch_model.bin.1"), "--vis", "input_pred", "--output_dir", str(tmp_path / "vis"),
                           "--device", "cpu", "--no_progress"], cwd=repo_root, env=_env(repo_root),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((tmp_path / "vis").rglob("input_pred_*.jpg"))
