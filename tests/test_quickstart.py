"""The synthetic shapes world (preprocess/synthetic.py) and the offline quickstart (demo/quickstart.py)."""
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from preprocess import synthetic


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.main(["--output_dir", str(out), "--num_train", "30", "--num_val", "6", "--size", "96",
                    "--shard_size", "20", "--seed", "3", "--clip", "clip.pt", "--clip_resolution", "64",
                    "--clip_embed_dim", "32"])
    return out


def _read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_train_shards_are_img2dataset_webdataset(world):
    shards = sorted((world / "train").glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar"]
    members = {}
    for p in shards:
        members.update(_read_tar(p))
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == 30 and all(len(k) == 9 and k.isdigit() for k in keys)
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        assert meta["key"] == key and meta["caption"] == members[f"{key}.txt"].decode()
        img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert img.format == "JPEG" and img.size == (96, 96) and img.mode == "RGB"
        # every caption names 1-3 shapes and exactly one background, and only known classes
        shapes = [c[0] for c in synthetic.CLASSES if c[0] in meta["caption"]]
        grounds = [b[0] for b in synthetic.BACKGROUNDS if meta["caption"].rstrip(".").endswith(" on " + b[0])]
        assert 1 <= len(shapes) <= 3 and len(grounds) == 1, meta["caption"]


def test_val_split_is_voc_layout_with_consistent_labels(world):
    val = world / "val"
    names = (val / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(names) == 6
    classes = [c for c in (val / "classes.txt").read_text().split("\n") if c]
    # shapes then named backgrounds, no leading 'background': zero-shot evaluation runs without a threshold
    assert classes == synthetic.CLASS_NAMES and "background" not in classes and len(classes) == 9
    seen = set()
    for name in names:
        img = Image.open(val / "JPEGImages" / f"{name}.jpg")
        gt = Image.open(val / "SegmentationClass" / f"{name}.png")
        assert gt.mode == "P" and gt.size == img.size
        assert gt.getpalette()[3:6] == [128, 0, 0]  # VOC colour map: label 1 is dark red
        labels = np.asarray(gt)
        assert labels.max() < len(synthetic.CLASS_NAMES)
        grounds = np.unique(labels[labels >= synthetic.NUM_SHAPES])
        assert len(grounds) == 1 and (labels == grounds[0]).mean() > 0.3  # one background, most of the picture
        # a shape pixel is saturated; the background is muted and has its type's colour (nearest base colour)
        rgb = np.asarray(img.convert("RGB")).astype(float)
        sat = rgb.max(-1) - rgb.min(-1)
        is_shape = labels < synthetic.NUM_SHAPES
        assert np.median(sat[is_shape]) > 100 > np.median(sat[~is_shape])
        mean = rgb[~is_shape].mean(0)
        nearest = np.argmin([np.abs(mean - np.array(b[1])).sum() for b in synthetic.BACKGROUNDS])
        assert synthetic.NUM_SHAPES + nearest == grounds[0]
        seen |= set(np.unique(labels).tolist())
    assert len(seen) >= 3


def test_generator_is_deterministic():
    a = synthetic.make_sample(np.random.default_rng(5), 64)
    b = synthetic.make_sample(np.random.default_rng(5), 64)
    c = synthetic.make_sample(np.random.default_rng(6), 64)
    assert a.caption == b.caption and np.array_equal(a.label, b.label)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    # the caption names exactly the visible shapes and the background
    for seed in range(20):
        s = synthetic.make_sample(np.random.default_rng(seed), 96)
        assert sorted(s.classes) == sorted(set(np.unique(s.label).tolist()) - {s.background})
        assert s.background >= synthetic.NUM_SHAPES and all(k < synthetic.NUM_SHAPES for k in s.classes)
        for k in s.classes + [s.background]:
            assert synthetic.CLASS_NAMES[k] in s.caption


def test_random_clip_has_openai_layout(world, reference):
    sd = torch.load(world / "clip.pt", weights_only=True)
    ref = reference["clip_state_dict"]
    # same key families as a real CLIP (fewer blocks), same per-block shapes at width 64
    strip = lambda k: k.split(".resblocks.")[0] + (".resblocks.*." + k.split(".resblocks.")[1].split(".", 1)[1]
                                                   if ".resblocks." in k else "")
    assert {strip(k) for k in sd} == {strip(k) for k in ref}
    for k, v in sd.items():
        if k in ref and k != "visual.positional_embedding":
            assert v.shape == ref[k].shape, k
    assert sd["visual.positional_embedding"].shape == (1 + 4 * 4, 64)
    assert len([k for k in sd if k.startswith("visual.transformer.resblocks.") and k.endswith("ln_1.weight")]) == 4
    assert torch.isclose(sd["logit_scale"], torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    assert 0.01 < sd["visual.transformer.resblocks.0.attn.in_proj_weight"].std() < 0.2


def test_cli_help_and_bad_args(repo_root):
    r = subprocess.run([sys.executable, "-m", "preprocess.synthetic", "--help"], cwd=repo_root,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--num_val" in r.stdout and "--clip_resolution" in r.stdout
    # run as a file from another folder too, like every other script (the package is installed)
    r = subprocess.run([sys.executable, str(repo_root / "preprocess" / "synthetic.py"), "--help"], cwd=repo_root.parent,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--shape_radius" in r.stdout
    r = subprocess.run([sys.executable, "-m", "preprocess.synthetic", "--output_dir", "x", "--num_train", "0"],
                       cwd=repo_root, capture_output=True, text=True)
    assert r.returncode != 0 and "error" in r.stderr and "Traceback" not in r.stderr


# Issue 14's bar is shapes-only mIoU >= 25 and all-class mIoU >= 40; the default quickstart does not reach it yet
# (docs/quickstart.md, "Measured numbers": per seed, the spread, and why). The floors sit below the lowest of the
# measured seeds (CPU training is seeded but not bit-reproducible, and the outcome depends strongly on the random
# initialisation of the center block), so they catch a pipeline that stopped learning, not the bar.
MIOU_FLOOR = 25.0
SHAPES_MIOU_FLOOR = 1.0


@pytest.mark.slow
def test_quickstart_trains_both_stages_end_to_end(repo_root, tmp_path):
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, str(repo_root / "demo" / "quickstart.py"), "--output_dir", str(out),
                        "--seed", "42", "--num_vis", "2"], cwd=repo_root,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    miou, shapes = summary["mIoU"], summary["shapes_mIoU"]
    assert all(0 <= v <= 100 for v in miou.values()), miou
    assert miou["trained"] >= MIOU_FLOOR and shapes["trained"] >= SHAPES_MIOU_FLOOR, (miou, shapes)
    # the SegCLIP stage is what names the regions: well above its starting point (the CLIP stage with fresh
    # centers) and at least twice the untrained model
    assert miou["trained"] >= miou["clip_stage"] + 10 and miou["trained"] >= 2 * miou["untrained"], miou
    # loss curves of both stages from metrics.jsonl: the CLIP stage has only the contrastive term, the SegCLIP
    # stage all three; the contrastive loss fell in the CLIP stage
    curve = summary["loss_curve"]
    clip = [c for c in curve if c["stage"] == "clip"]
    seg = [c for c in curve if c["stage"] == "segclip"]
    assert len(clip) >= 5 and len(seg) >= 5 and all("kl" not in c and "mae" not in c for c in clip)
    assert all({"contrastive", "kl", "mae"} <= set(c) for c in seg)
    assert clip[-1]["contrastive"] < clip[0]["contrastive"] - 1.0
    assert [c["step"] for c in curve] == sorted(c["step"] for c in curve)
    # mIoU per SegCLIP epoch (0 = its start); the last is the trained model; each is main_seg_zeroshot.py's result
    per_epoch = summary["mIoU_per_epoch"]
    assert [m["epoch"] for m in per_epoch] == list(range(summary["trained"]["epochs"] + 1))
    assert per_epoch[-1]["mIoU"] == miou["trained"] and per_epoch[0]["mIoU"] == miou["clip_stage"]
    for name, key in (("untrained", "untrained"), (f"epoch{len(per_epoch) - 1}", "trained"), ("epoch0", "clip_stage")):
        res = json.loads((out / "zeroshot" / f"{name}.json").read_text())
        assert res["mIoU"] == miou[key] and list(res["per_class"]) == synthetic.CLASS_NAMES and res["num_classes"] == 9
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    # the real scripts wrote their outputs: both stages' checkpoints, store, superpixels, pictures at start and end
    assert (out / "train_clip" / "pytorch_model.bin.0").is_file() and (out / "train" / "pytorch_model.bin.0").is_file()
    assert any((out / "store").glob("superpixels_*.lmdb"))
    for when in ("start", "end"):
        for mode in ("input_pred_label", "all_groups"):
            assert len(list((out / "vis" / when / "vis_imgs" / mode).glob("*.jpg"))) == 2, (when, mode)
    assert "shapes only" in r.stdout


@pytest.mark.slow
def test_quickstart_summary_records_the_losses_it_trained_with(repo_root, tmp_path):
    """summary.json's model config says how the model was trained: MAE on and the superpixel loss off here (it
    said use_vision_mae_recon false next to the 'mae' loss, and use_seglabel true without it). A small world."""
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, str(repo_root / "demo" / "quickstart.py"), "--output_dir", str(out),
                        "--num_train", "64", "--num_val", "4", "--clip_epochs", "0", "--epochs", "1", "--num_vis", "0",
                        "--no_seglabel", "--workers", "1"], cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trained = json.loads((out / "summary.json").read_text())["trained"]
    assert trained["losses"] == ["contrastive", "mae"]
    assert trained["config"]["use_vision_mae_recon"] is True and trained["config"]["use_seglabel"] is False
    assert "3.84M parameters" in r.stdout        # the model as trained: with its MAE decoder


def _quickstart_module(repo_root):
    import importlib.util
    spec = importlib.util.spec_from_file_location("quickstart", repo_root / "demo" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_bad_flags(repo_root, capsys):
    qs = _quickstart_module(repo_root)
    assert qs.get_args(["--clip_epochs", "0"]).clip_epochs == 0             # SegCLIP from the random CLIP
    for bad in (["--train_size", "100"], ["--num_train", "8"], ["--clip_epochs", "-1"], ["--epochs", "0"]):
        assert qs.main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (bad, err)


class _StepStarted(Exception):
    """Raised by the stand-in for the first pipeline step: the tests below are about what happens before it."""


def _stop_at_first_step(qs, monkeypatch):
    steps = []

    def first_step(name, cmd, log_dir, threads=0):
        steps.append(name)
        raise _StepStarted(name)
    monkeypatch.setattr(qs, "run_step", first_step)
    return steps


@pytest.mark.parametrize("users", ["data", "store", "train"])
def test_a_users_folder_in_output_dir_is_never_replaced(users, repo_root, tmp_path, capsys, monkeypatch):
    """Issue 21, bad 3. Before: after a first run had marked --output_dir as its own, a second run deleted the
    user's own data/ and store/ there. Now a folder without the quickstart's marker inside is refused with one
    line and exit 2, before any step, and every file stays."""
    qs = _quickstart_module(repo_root)
    steps = _stop_at_first_step(qs, monkeypatch)
    out = tmp_path / "qs"
    (out / users).mkdir(parents=True)
    (out / users / "my_thesis.txt").write_text("three years of work")
    (out / ".segclip_quickstart").write_text("left by an earlier quickstart run in this folder\n")
    for name in {"data", "store", "train_clip", "train"} - {users}:     # the quickstart's own, from that run
        (out / name).mkdir()
        (out / name / ".segclip_quickstart").write_text("made by demo/quickstart.py\n")
    assert qs.main(["--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {out / users} was not made by demo/quickstart.py (it has no .segclip_quickstart marker "
                   "inside; quickstart runs before this version left none) and the quickstart would write into "
                   "it: move it away, or choose another --output_dir\n")
    assert steps == [] and (out / users / "my_thesis.txt").read_text() == "three years of work"
    assert sorted(p.name for p in (out / users).iterdir()) == ["my_thesis.txt"]


def test_own_folders_are_replaced_and_marked(repo_root, tmp_path, monkeypatch):
    """A new world replaces the quickstart's own data/ and store/ (stale shards of an earlier world would be trained
    on next to the new ones); folders it creates carry its marker; files of the user's next to them stay."""
    qs = _quickstart_module(repo_root)
    steps = _stop_at_first_step(qs, monkeypatch)
    out = tmp_path / "qs"
    for name in ("data", "store"):
        (out / name).mkdir(parents=True)
        (out / name / ".segclip_quickstart").write_text("made by demo/quickstart.py\n")
        (out / name / "stale_00000.tar").write_bytes(b"an earlier world")
    (out / "train").mkdir()                                                   # empty: nothing to lose
    (out / "notes.txt").write_text("mine")
    with pytest.raises(_StepStarted):
        qs.main(["--output_dir", str(out)])
    assert steps == ["generate"]
    for name in ("data", "store", "train_clip", "train"):
        assert sorted(p.name for p in (out / name).iterdir()) == [".segclip_quickstart"], name
    assert (out / "notes.txt").read_text() == "mine"
