"""The training loop on CPU: exact resume, checkpoint files, crash-safe writes, NaN skipping, bad input."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from engine.distributed import DistEnv
from engine.optimization import OptimConfig, apply_freezing, build_optimizer
from engine.train_state import (STATE_NAME, ResumeError, atomic_torch_save, find_resume_file, load_training_state,
                                 make_training_state)
from engine.loaders import GlobalBatchSampler
from engine.training import TrainConfig, check_batch_layout, train


# ---------------------------------------------------------------------------------------------- fixtures
def clip_224_from_fixture(reference):
    """The fixture's tiny CLIP (res 112) with its positional grid resized to 14x14, so it takes 224 crops."""
    sd = dict(reference["clip_state_dict"])
    pos = sd["visual.positional_embedding"]
    side = int(round((pos.shape[0] - 1) ** 0.5))
    grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    sd["visual.positional_embedding"] = torch.cat([pos[:1], grid.reshape(196, -1)])
    return sd


@pytest.fixture(scope="session")
def tiny_clip_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(clip_224_from_fixture(reference), path)
    return path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """8 synthetic caption-image pairs as a CC3M-style store with its superpixel LMDB."""
    from dataloaders.build_stores import build_cc3m_store, build_superpixel_store
    from preprocess.synthetic import write_train_shards
    root = tmp_path_factory.mktemp("data")
    shards = write_train_shards(str(root / "shards"), num=8, size=64, seed=0)
    build_cc3m_store(shards, root / "store", progress=False)
    build_superpixel_store(root / "store", progress=False)
    return root / "store"


class RandomPairs(torch.utils.data.Dataset):
    """Caption-image pairs whose image is drawn from the *global* torch RNG, like a random augmentation.
    112 px: the fixture CLIP's native resolution (4x fewer tokens than 224 keeps these tests fast)."""

    def __init__(self, n=16, max_words=16, size=112):
        from modules.tokenization_clip import tokenize_captions
        self.ids, self.mask = tokenize_captions([f"a photo of thing number {i}" for i in range(n)], max_words)
        self.size = size

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        g = self.size // 16
        return dict(input_ids=self.ids[i], attention_mask=self.mask[i], image=torch.randn(3, self.size, self.size),
                    superpixels=torch.randint(0, 4, (g, g)))


def make_model(clip_sd, seed=0):
    from modules.modeling import SegCLIP
    torch.manual_seed(seed)
    model = SegCLIP.from_clip(clip_sd, first_stage_layer=10)
    apply_freezing(model)
    return model


def cfg_for(tmp=None, **kw):
    base = dict(batch_size=4, epochs=3, num_workers=0, optim=OptimConfig(lr=1e-3, lower_lr=1e-4),
                n_display=100, progress=False, output_dir=str(tmp) if tmp else None)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------- tests
def test_resume_mid_epoch_equals_uninterrupted(reference, tmp_path):
    """6 steps in one run == 3 steps, stop, resume from the state file, 3 steps (mid-epoch, all losses on)."""
    clip = reference["clip_state_dict"]
    ds = RandomPairs(4)                                   # batch 2: 2 steps per epoch, 3 epochs = 6 steps
    full = make_model(clip)
    r_full = train(full, ds, cfg_for(batch_size=2), DistEnv())
    assert r_full.global_step == 6 and r_full.finished and r_full.skipped_steps == 0
    assert {"contrastive", "kl", "mae", "total"} <= set(r_full.history[0])

    first = make_model(clip)
    r1 = train(first, ds, cfg_for(tmp_path, batch_size=2, stop_after_steps=3), DistEnv())
    assert not r1.finished and r1.global_step == 3
    state = load_training_state(find_resume_file(tmp_path))
    assert (state["epoch"], state["micro_step"], state["global_step"]) == (1, 1, 3)

    second = make_model(clip, seed=123)                  # different init: everything must come from the state
    r2 = train(second, ds, cfg_for(tmp_path, batch_size=2), DistEnv(), resume_state=state)
    assert r2.finished and r2.global_step == 6
    assert [h["total"] for h in r1.history + r2.history] == pytest.approx([h["total"] for h in r_full.history],
                                                                          rel=1e-5)
    sd_full, sd_res = full.state_dict(), second.state_dict()
    for k in sd_full:
        torch.testing.assert_close(sd_res[k], sd_full[k], atol=1e-6, rtol=1e-5, msg=k)
    # per-epoch weights are plain state dicts that load as a SegCLIP
    from modules.checkpoint import load_segclip
    for e in range(3):
        assert (tmp_path / f"pytorch_model.bin.{e}").is_file()
    final = torch.load(tmp_path / "pytorch_model.bin.2", weights_only=True)
    torch.testing.assert_close(final["clip.visual.proj"], sd_full["clip.visual.proj"])
    assert load_segclip(tmp_path / "pytorch_model.bin.2").has_mae_decoder


def test_sampler_slices_global_batches_independent_of_world_size():
    one = list(GlobalBatchSampler(10, 4, 0, 1, seed=3))
    two = [list(GlobalBatchSampler(10, 2, r, 2, seed=3)) for r in range(2)]
    assert len(one) == 8                                   # 2 full global batches, the rest dropped
    assert one[:2] + one[4:6] == two[0] and one[2:4] + one[6:8] == two[1]
    s = GlobalBatchSampler(10, 4, 0, 1, seed=3)
    s.set_epoch(0, start_batch=1)
    assert list(s) == one[4:]
    s.set_epoch(1)
    assert list(s) != one and len(list(s)) == 8           # another epoch, another order


def test_frozen_tensors_do_not_move_and_logit_scale_is_clamped(reference):
    clip = reference["clip_state_dict"]
    model = make_model(clip)
    with torch.no_grad():
        model.clip.logit_scale.fill_(4.7)                 # > ln 100
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, RandomPairs(4), cfg_for(epochs=2), DistEnv())    # 2 steps: the 1st has lr > 0
    after = dict(model.named_parameters())
    for n in ("clip.token_embedding.weight", "clip.visual.conv1.weight", "clip.visual.ln_pre.weight"):
        assert torch.equal(after[n], before[n]), n
    assert not torch.equal(after["clip.visual.transformer.semantic_layer2.semantic_center"],
                           before["clip.visual.transformer.semantic_layer2.semantic_center"])
    assert model.clip.logit_scale.item() <= 4.605171 + 1e-6


def test_nan_loss_step_is_skipped(reference, caplog):
    clip = reference["clip_state_dict"]
    model = make_model(clip)

    class Poisoned(RandomPairs):          # the first batch (4 items fetched) carries a NaN pixel
        fetched = 0

        def __getitem__(self, i):
            item = super().__getitem__(i)
            Poisoned.fetched += 1
            if Poisoned.fetched <= 4:
                item["image"][0, 0, 0] = float("nan")
            return item
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train(model, Poisoned(4), cfg_for(epochs=2), DistEnv())
    assert res.skipped_steps == 1 and res.global_step == 2
    assert res.history[0]["stepped"] == 0.0 and res.history[1]["stepped"] == 1.0
    assert "update skipped" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before["clip.visual.proj"], model.clip.visual.proj)   # the finite step did update


def test_bf16_autocast_with_gradient_accumulation(reference):
    model = make_model(reference["clip_state_dict"])
    res = train(model, RandomPairs(4), cfg_for(epochs=1, amp="bf16", gradient_accumulation_steps=2), DistEnv())
    assert res.global_step == 1                  # 4 samples = 1 optimizer step of 2 micro-batches of 2
    assert res.skipped_steps == 0 and all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="--amp must be one of"):
        train(model, RandomPairs(4), cfg_for(amp="fp8"), DistEnv())


def test_batch_layout_errors():
    assert check_batch_layout(cfg_for(batch_size=768), 8) == 96
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        check_batch_layout(cfg_for(batch_size=6), 4)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        train(torch.nn.Linear(1, 1), RandomPairs(2), cfg_for(batch_size=4), DistEnv())


KILL_WRITER = textwrap.dedent("""
    import sys, time, torch
    import engine.train_state as ts
    path = sys.argv[1]
    ts.atomic_torch_save({"format": ts.STATE_FORMAT, "global_step": 1}, path)     # a good checkpoint
    real_save = torch.save

    def slow_save(obj, f):       # write half a file, then hang: the test kills us mid-write
        f.write(b"PK\\x03\\x04 partial checkpoint bytes" * 1000)
        f.flush()
        print("WRITING", flush=True)
        time.sleep(120)
    ts.torch.save = slow_save
    ts.atomic_torch_save({"format": ts.STATE_FORMAT, "global_step": 2}, path)
""")


def test_kill_during_checkpoint_write_keeps_latest_intact(repo_root, tmp_path):
    path = tmp_path / STATE_NAME
    script = tmp_path / "writer.py"
    script.write_text(KILL_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], cwd=repo_root, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    try:
        line = proc.stdout.readline()
        assert "WRITING" in line
        assert any(p.name.startswith(".segclip-tmp-") and p.name.endswith(f".{STATE_NAME}")
                   for p in tmp_path.iterdir())                                          # mid-write for real
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = load_training_state(path)                    # the previous complete file, untouched
    assert state["global_step"] == 1
    assert find_resume_file(tmp_path) == path
    atomic_torch_save({"format": "segclip-train-state/1", "global_step": 3}, path)   # later saves still work
    assert load_training_state(path)["global_step"] == 3


def test_resume_file_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(ResumeError, match="not found"):
        load_training_state(tmp_path / "nope.pt")
    with pytest.raises(ResumeError, match="model state dict, not a training state"):
        load_training_state(tiny_checkpoint)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ResumeError, match="not a readable training state"):
        load_training_state(bad)


def _run_main(repo_root, args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "main_task_align.py"] + args, cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_main_bad_inputs_give_clear_errors(repo_root, tmp_path, reference, tiny_clip_file, tiny_store,
                                           tiny_checkpoint):
    base = ["--do_pretrain", "--pretrained_clip_name", str(tiny_clip_file), "--batch_size", "4", "--epochs", "1",
            "--max_words", "16", "--num_thread_reader", "0", "--no_progress"]
    # no data configured
    p = _run_main(repo_root, base + ["--datatype", "cc", "--output_dir", str(tmp_path / "a")])
    assert p.returncode == 2 and "--cc_store is not set" in p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    # a training state written for another architecture (the reference model: first_stage_layer 10, res 112)
    model = make_model(reference["clip_state_dict"])
    optim, sched = build_optimizer(model, OptimConfig(), 10)
    state = make_training_state(model_sd=model.state_dict(), optimizer=optim, scheduler=sched, scaler=None, epoch=0,
                                micro_step=1, global_step=1, rng_states=[])
    atomic_torch_save(state, tmp_path / STATE_NAME)
    p = _run_main(repo_root, base + ["--datatype", "cc", "--cc_store", str(tiny_store), "--first_stage_layer", "9",
                                     "--resume_model", str(tmp_path / STATE_NAME), "--output_dir", str(tmp_path / "c")])
    assert p.returncode == 2 and "different model architecture" in p.stdout + p.stderr, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    # a plain weights file given as --resume_model
    p = _run_main(repo_root, base + ["--datatype", "cc", "--cc_store", str(tiny_store), "--resume_model",
                                     str(tiny_checkpoint), "--output_dir", str(tmp_path / "d")])
    assert p.returncode == 2 and "--init_model" in p.stdout + p.stderr
    # --help documents the flags
    p = _run_main(repo_root, ["--help"])
    assert p.returncode == 0 and "--save_every_steps" in p.stdout and "--local_rank" in p.stdout


def test_batch_not_divisible_by_processes_under_torchrun(repo_root, tmp_path, tiny_clip_file, tiny_store):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "main_task_align.py", "--do_pretrain", "--datatype", "cc", "--cc_store", str(tiny_store),
                        "--pretrained_clip_name", str(tiny_clip_file), "--batch_size", "3",
                        "--output_dir", str(tmp_path / "o"), "--no_progress"],
                       cwd=repo_root, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode != 0
    assert "--batch_size 3 (global) must be a positive multiple of the number of processes (2)" in p.stdout + p.stderr


def test_local_rank_spellings(monkeypatch):
    from common.cli import add_runtime_args, make_parser
    from engine.distributed import init_distributed, resolve_local_rank
    p = make_parser(config=False)
    add_runtime_args(p)
    assert p.parse_args(["--local-rank=1"]).local_rank == 1          # torch.distributed.launch (torch >= 2)
    assert p.parse_args(["--local_rank", "3"]).local_rank == 3       # the 2022 spelling
    monkeypatch.setenv("LOCAL_RANK", "2")                             # torchrun
    assert resolve_local_rank(p.parse_args([]).local_rank) == 2
    assert resolve_local_rank(5) == 5
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = init_distributed(None, device="cpu")                        # plain python: one process, no group
    assert (env.world_size, env.rank, env.is_distributed, env.device.type) == (1, 0, False, "cpu")


def test_init_model_loads_on_top_of_clip(reference, tmp_path, tiny_checkpoint):
    """--init_model: SegCLIP weights replace the CLIP initialisation (all of them, MAE decoder included)."""
    import argparse
    from main_task_align import build_model
    from modules.checkpoint import CheckpointError
    clip_file = tmp_path / "clip112.pt"
    torch.save(reference["clip_state_dict"], clip_file)
    args = argparse.Namespace(pretrained_clip_name=str(clip_file), cache_dir=None, first_stage_layer=10,
                              use_vision_mae_recon=True, use_seglabel=True, mae_vis_mask_ratio=0.75,
                              init_model=str(tiny_checkpoint), freeze_layer_num=0, freeze_text_layer_num=0,
                              plain_clip=False)
    model = build_model(args)
    sd = model.state_dict()
    for k, v in reference["segclip_state_dict"].items():
        assert torch.equal(sd[k], v), k
    assert not model.clip.visual.conv1.weight.requires_grad
    args.first_stage_layer = 9                                # another architecture: a clear error
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model(args)
