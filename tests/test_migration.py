"""The 2022 README's command lines run here unchanged (docs/migrating_from_2022.md): only the weights are tiny,
the GPU flag is the CPU and the data are a few generated files in the places the 2022 setup used."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.helpers import write_fake_dataset

TWENTY_TWO_DEMO = ["--input", "demo/examples/voc.jpg", "--vis", "input", "input_pred_label", "--dataset", "voc",
                   "--init_model", "checkpoints/segclip.bin"]
TWENTY_TWO_EVAL = ["--dataset", "voc", "--init_model", "checkpoints/segclip.bin"]
TWENTY_TWO_TRAIN = ["--do_pretrain", "--num_thread_reader=10", "--epochs=10", "--batch_size=768", "--n_display=50",
                    "--output_dir", "ckpts/ckpt_segclip", "--lr", "4e-3", "--max_words", "32", "--datatype", "cc,coco,",
                    "--lower_lr", "4e-6", "--use_pin_memory", "--use_seglabel", "--use_vision_mae_recon"]


def _run(repo_root, script, args, cwd, timeout=300, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", SEGCLIP_OFFLINE="1", **(env or {}))
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, str(repo_root / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def old_tree(tmp_path, tiny_checkpoint):
    """A working directory laid out as the 2022 README had it: checkpoints/segclip.bin, demo/examples/voc.jpg."""
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(tiny_checkpoint, tmp_path / "checkpoints" / "segclip.bin")
    (tmp_path / "demo" / "examples").mkdir(parents=True)
    return tmp_path


def test_2022_demo_command(repo_root, old_tree):
    shutil.copy(repo_root / "demo" / "examples" / "chelsea.jpg", old_tree / "demo" / "examples" / "voc.jpg")
    r = _run(repo_root, "main_seg_vis.py", TWENTY_TWO_DEMO + ["--device", "cpu"], cwd=old_tree)
    assert r.returncode == 0, r.stderr[-2000:]
    for mode in ("input", "input_pred_label"):
        out = old_tree / "output" / "vis" / "vis_imgs" / mode / f"{mode}_voc.jpg"
        assert Image.open(out).size == (451, 300), out


def test_2022_eval_command_with_default_data_root(repo_root, old_tree):
    """The 2022 command (as torch.distributed.launch passes it) finds the data where mmseg keeps it, instead of a
    data_root edited into a config file."""
    r = _run(repo_root, "main_seg_zeroshot.py", ["--local-rank=0", *TWENTY_TWO_EVAL], cwd=old_tree)
    assert r.returncode == 2 and "data/VOCdevkit/VOC2012" in r.stderr, r.stderr[-2000:]
    write_fake_dataset("voc", old_tree / "data" / "VOCdevkit" / "VOC2012", num_images=2)
    r = _run(repo_root, "main_seg_zeroshot.py", ["--local-rank=0", *TWENTY_TWO_EVAL, "--num_workers", "0"],
             cwd=old_tree)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mIoU" in r.stdout + r.stderr


def test_2022_train_command_only_needs_the_stores(repo_root, tmp_path, reference):
    """Every flag of the published command is accepted; what is missing is where the data live (the values that
    were edited into dataloaders/data_config.py). The CLIP it starts from is a tiny one, found under its name."""
    (tmp_path / "cache").mkdir()
    torch.save(reference["clip_state_dict"], tmp_path / "cache" / "ViT-B-16.pt")
    r = _run(repo_root, "main_task_align.py", ["--local-rank=0", *TWENTY_TWO_TRAIN], cwd=tmp_path,
             env={"SEGCLIP_CACHE": str(tmp_path / "cache")})
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-2000:]
    assert "unrecognized arguments" not in out
    assert "--cc_store" in out
