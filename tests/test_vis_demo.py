"""main_seg_vis.py end to end: run as a script on real photos with the tiny reference checkpoint."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import main_seg_vis
from common.errors import UsageError
from common import images
from seg_segmentation import drawing
from seg_segmentation import visualize as vis
from seg_segmentation.preprocessing import eval_image_tensor

# Prints the script's own peak memory after it ran (runpy keeps it a real `python main_seg_vis.py` process).
# Peak RSS of the script itself: VmHWM of this process's own address space. (ru_maxrss is not usable here: Linux
# carries the parent's high-water mark across fork/vfork + exec, so a big pytest process would be counted.)
PEAK_WRAPPER = ("import runpy, sys\n"
                "sys.argv = sys.argv[1:]\n"
                "try:\n"
                "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
                "finally:\n"
                "    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
                "    print('PEAK_RSS_KB', hwm[0] if hwm else 0, file=sys.stderr)\n")


def run_vis(repo_root, *args, timeout=300):
    env = dict(os.environ, SEGCLIP_OFFLINE="1")
    cmd = [sys.executable, "-c", PEAK_WRAPPER, str(repo_root / "main_seg_vis.py"), "--no_progress", *map(str, args)]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout)
    peak_kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    return proc, (peak_kb[0] if peak_kb else None)


def check_outputs(out_dir: Path, name: str, size, modes, vocabulary):
    """Every file of one image exists with the input's size; the PNG holds valid ids; the JSON agrees with it."""
    png = Image.open(out_dir / "labels" / f"{name}.png")
    assert png.mode == "P" and png.size == (size[1], size[0])
    labels = np.asarray(png)
    assert labels.max() < len(vocabulary)
    for mode in modes:
        if mode == "pred":  # the 2022 pred mode: a palette PNG of the label ids
            pred = Image.open(out_dir / "vis_imgs" / "pred" / f"pred_{name}.png")
            assert pred.mode == "P" and np.array_equal(np.asarray(pred), labels)
            continue
        jpg = out_dir / "vis_imgs" / mode / f"{mode}_{name}.jpg"
        img = cv2.imread(str(jpg))
        assert img is not None, jpg
        assert img.shape[:2] == size, (jpg, img.shape)
    summary = json.loads((out_dir / "labels" / f"{name}.json").read_text())
    assert summary["vocabulary"] == vocabulary
    assert (summary["height"], summary["width"]) == size
    counts = np.bincount(labels.ravel(), minlength=len(vocabulary))
    assert {c["name"]: c["pixels"] for c in summary["classes"]} == \
        {vocabulary[i]: int(n) for i, n in enumerate(counts) if n}
    assert abs(sum(c["share"] for c in summary["classes"]) - 1) < 1e-4
    return labels


def test_every_mode_with_own_classes(repo_root, tiny_checkpoint, tiny_model, tmp_path):
    examples = repo_root / "demo" / "examples"
    proc, _ = run_vis(repo_root, "--init_model", tiny_checkpoint, "--input", examples, "--output_dir", tmp_path,
                      "--vis", "all", "--classes", "cat, wall, floor")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4 image(s), skipped 0" in proc.stdout
    vocabulary = ["background", "cat", "wall", "floor"]
    for jpg in sorted(examples.glob("*.jpg")):
        size = cv2.imread(str(jpg)).shape[:2]
        labels = check_outputs(tmp_path, jpg.stem, size, drawing.VIS_MODES, vocabulary)
        if jpg.stem == "chelsea":
            chelsea = labels
    # The labels are the evaluation's prediction (design.md §7.3) at the photo's size.
    from seg_segmentation.inference import ZeroShotSegmentor
    bgr = images.read_image_bgr(examples / "chelsea.jpg")
    seg = ZeroShotSegmentor(tiny_model, class_names=vocabulary[1:], bg_thresh=0.8)
    expected = seg.predict([eval_image_tensor(bgr)], out_sizes=[bgr.shape[:2]])[0].numpy()
    assert np.array_equal(chelsea, expected)
    # 'input' is the photo itself
    photo = cv2.imread(str(tmp_path / "vis_imgs" / "input" / "input_chelsea.jpg")).astype(int)
    assert np.abs(photo - bgr).mean() < 3


def _awkward_inputs(folder: Path, repo_root: Path) -> dict:
    """Formats people feed a demo. Returns name -> (height, width) of the good ones."""
    astronaut = np.asarray(Image.open(repo_root / "demo" / "examples" / "astronaut.jpg"))
    Image.fromarray(astronaut[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([astronaut, np.full(astronaut.shape[:2], 90, np.uint8)])).save(folder / "rgba.png")
    cv2.imwrite(str(folder / "deep.png"), cv2.resize(astronaut, (200, 150)).astype(np.uint16) * 257)  # 16-bit
    Image.fromarray(astronaut).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(cv2.resize(astronaut, (9, 7))).save(folder / "tiny.png")            # smaller than a patch
    Image.fromarray(cv2.resize(astronaut, (2600, 24))).save(folder / "strip.png")       # < one window after resize
    cv2.imwrite(str(folder / "large.jpg"), cv2.resize(astronaut, (4200, 3000)), [cv2.IMWRITE_JPEG_QUALITY, 80])
    (folder / "notes.jpg").write_text("this is not an image")
    return {"gray": (512, 512), "rgba": (512, 512), "deep": (150, 200), "cmyk": (512, 512), "tiny": (7, 9),
            "strip": (24, 2600), "large": (3000, 4200)}


def test_awkward_inputs_and_a_large_photo(repo_root, tiny_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = _awkward_inputs(folder, repo_root)
    out = tmp_path / "out"
    modes = ["input_pred_label", "all_groups"]
    # default vocabulary: VOC's 21 labels, so full-size float scores would be 21 x 12.6 MP = 1.06 GB per copy
    proc, peak_kb = run_vis(repo_root, "--init_model", tiny_checkpoint, "--input", folder, "--output_dir", out,
                            "--vis", *modes)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1" in proc.stdout and "notes.jpg" in proc.stderr and "not a readable image" in proc.stderr
    assert "Traceback" not in proc.stderr
    from seg_segmentation.classes import VOC_CLASSES
    for name, size in good.items():
        check_outputs(out, name, size, modes, VOC_CLASSES)
    assert peak_kb is not None and peak_kb < 1_500_000, f"peak memory {peak_kb / 1e6:.2f} GB"


def test_input_name_too_long_for_its_outputs_is_skipped_and_counted(repo_root, tiny_checkpoint, tmp_path, capsys):
    """A legal 240-character file name makes an output name (input_pred_label_<name>.jpg, and the temporary it is
    written through) longer than the file system allows: that photo is skipped and named, the others are written
    (it was an OSError traceback that stopped the folder)."""
    folder = tmp_path / "in"
    folder.mkdir()
    long_name = "p" * 236 + ".jpg"                                        # 240 characters: a legal name
    chelsea = (repo_root / "demo" / "examples" / "chelsea.jpg").read_bytes()
    (folder / long_name).write_bytes(chelsea)
    (folder / "short.jpg").write_bytes(chelsea)
    rc = main_seg_vis.main(["--input", str(folder), "--init_model", str(tiny_checkpoint), "--classes", "cat, wall",
                            "--output_dir", str(tmp_path / "out"), "--no_progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0 and "wrote 1 image(s), skipped 1" in out, err
    assert f"{folder / long_name}: its output file name input_pred_label_ppp" in err
    assert "bytes, more than the" in err and "rename the file" in err and "Traceback" not in err
    assert (tmp_path / "out" / "labels" / "short.png").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == ["short.json", "short.png"]


@pytest.mark.parametrize("argv, message", [
    (["--input", "{tmp}/nope.jpg"], "input not found"),
    (["--classes", "cat, , dog"], "empty name"),
    (["--classes", "cat, dog, cat"], "duplicate class name 'cat'"),
    (["--classes", "  "], "empty name"),
    (["--classes", "background, cat"], "added automatically"),
    (["--classes_file", "{tmp}/synonyms.txt"], "added automatically"),     # a synonym 'background' too
    (["--classes_file", "{tmp}/none.txt"], "cannot read"),
    (["--init_model", "{tmp}/missing.bin"], "checkpoint not found"),
    (["--init_model", "{tmp}/junk.bin"], "not a weights-only"),
    (["--init_model", "{tmp}/clip_like.bin"], "not a SegCLIP"),
    (["--input", "{tmp}/text.jpg"], "not a readable image"),
    (["--device", "tpu9"], "not a device"),
])
def test_bad_input_gives_clear_error(argv, message, tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "junk.bin").write_bytes(b"\x00garbage")
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "clip_like.bin")
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "synonyms.txt").write_text("cat, kitten\nwall, background\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    base = ["--input", str(tmp_path / "text.jpg"), "--init_model", str(tiny_checkpoint),
            "--output_dir", str(tmp_path / "o"), "--no_progress"]
    rc = main_seg_vis.main(base + argv)
    err = capsys.readouterr().err
    assert message in err, err
    if message == "not a readable image":   # an unreadable photo is skipped and counted; nothing written: status 1
        assert rc == 1
    else:
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err     # one line


def test_cli_validation(capsys):
    for argv in (["--classes", "a", "--classes_file", "f"], ["--bg_thresh", "1.5"], ["--vis", "bogus"],
                 ["--stride", "300"], ["--crop_size", "-1"], ["--crop_size", "112", "--stride", "224"]):
        with pytest.raises(UsageError):
            main_seg_vis.get_args(argv)
        assert main_seg_vis.main(argv) == 2
    assert main_seg_vis.get_args(["--vis", "all"]).vis == list(drawing.VIS_MODES)


def test_default_checkpoint_from_cache(repo_root, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """No --init_model: <cache>/segclip.bin is used; when missing and offline, the error says what to fetch."""
    image = repo_root / "demo" / "examples" / "coffee.jpg"
    monkeypatch.setenv("SEGCLIP_OFFLINE", "1")
    monkeypatch.setenv("SEGCLIP_CACHE", str(tmp_path / "cache"))
    args = ["--input", str(image), "--output_dir", str(tmp_path / "o"), "--vis", "pred", "--no_progress",
            "--classes_file", str(repo_root / "demo" / "examples" / "coffee.txt"), "--no_bg"]
    assert main_seg_vis.main(args) == 2
    err = capsys.readouterr().err
    assert "segclip.bin" in err and "https://github.com/ArrowLuo/SegCLIP/releases" in err and "curl" in err
    assert not (tmp_path / "cache" / "segclip.bin").exists()
    (tmp_path / "cache").mkdir(exist_ok=True)
    shutil.copy(tiny_checkpoint, tmp_path / "cache" / "segclip.bin")
    assert main_seg_vis.main(args) == 0
    summary = json.loads((tmp_path / "o" / "labels" / "coffee.json").read_text())
    assert summary["vocabulary"] == ["cup", "saucer", "spoon", "table"] and summary["background"] is False
    assert (tmp_path / "o" / "vis_imgs" / "pred" / "pred_coffee.png").is_file()


@pytest.mark.parametrize("method, flag", [("segclip", "--init_model"), ("sclip", "--pretrained_clip_name")])
def test_offline_errors_point_to_what_works_offline(method, flag, repo_root, tmp_path, monkeypatch, capsys):
    """Offline, a missing released checkpoint (SegCLIP) or CLIP (the training-free methods) names the file to
    fetch and what runs without it: the quickstart's checkpoint, or the CLIP inside it - in the demo, the web page
    and the evaluation alike."""
    import main_seg_zeroshot
    from demo import app
    from tests.helpers import write_fake_dataset
    monkeypatch.setenv("SEGCLIP_OFFLINE", "1")
    monkeypatch.setenv("SEGCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    voc = write_fake_dataset("voc", tmp_path / "VOC2012", num_images=1, sizes=[(64, 64)], seed=0)
    hint = f"{flag} output/quickstart/train/pytorch_model.bin.1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for main, argv in ((main_seg_vis.main, ["--input", str(repo_root / "demo" / "examples" / "chelsea.jpg"),
                                            "--classes", "cat", "--output_dir", str(tmp_path / "o")]),
                       (main_seg_zeroshot.main, ["--dataset", "voc", "--data_root", str(voc), "--num_workers", "0"]),
                       (app.main, ["--port", str(port)])):
        assert main(argv + ["--method", method, "--device", "cpu", "--no_progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "downloads are disabled" in err and "curl -L" in err and hint in err, err
        assert "python demo/quickstart.py" in err


def _split_of(photos, root: Path) -> Path:
    """photos (name -> RGB array) as a VOC-layout split of our own (labels all 0): what the evaluation reads."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, rgb in photos.items():
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        Image.fromarray(np.zeros(rgb.shape[:2], np.uint8), mode="L").save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(photos) + "\n")
    return root


def test_demo_labels_equal_the_evaluation_prediction(repo_root, tiny_model, tmp_path):
    """One prediction path: a photo gets the same label map from the demo as from the evaluation (same settings),
    also for photos thinner than one window after the resize (the demo used to pad those) and thinner than one
    patch (the evaluation used to refuse those)."""
    examples = repo_root / "demo" / "examples"
    photos = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted(examples.glob("*.jpg"))}
    astronaut = photos["astronaut"]
    photos["strip"] = cv2.resize(astronaut, (2600, 24))        # 19 rows after the resize: < one 112 window
    photos["thread"] = cv2.resize(astronaut, (2600, 10))       # 8 rows: < one 16-pixel patch
    root = _split_of(photos, tmp_path / "split")
    from seg_segmentation.evaluate import run_zero_shot_eval
    vocabulary = ["cat", "wall", "floor"]
    preds = {}
    res = run_zero_shot_eval(tiny_model, dataset="custom", data_root=str(root), class_names=["background"] + vocabulary,
                             resolution=112, crop=112, stride=112, batch_size=4, num_workers=0, progress=False,
                             on_prediction=lambda path, pred: preds.__setitem__(Path(path).stem, pred.numpy()))
    assert res["images"] == len(photos) == len(preds)
    demo = vis.SegmentationDemo(tiny_model, vocabulary, bg_thresh=0.8, crop=112, stride=112, resolution=112)
    for name in photos:
        pred = demo.predict(images.read_image_bgr(root / "JPEGImages" / f"{name}.jpg"))
        assert pred.labels.shape == preds[name].shape, name
        assert np.array_equal(pred.labels, preds[name]), f"{name}: {(pred.labels != preds[name]).sum()} pixels differ"
        assert pred.classes == vis.label_summary(preds[name], demo.label_names, demo.palette)


def test_demo_imports_neither_mmseg_nor_training(repo_root, tiny_checkpoint, tmp_path):
    code = ("import sys, main_seg_vis\n"
            f"rc = main_seg_vis.main(['--init_model', {str(tiny_checkpoint)!r}, '--input', "
            f"{str(repo_root / 'demo' / 'examples' / 'coffee.jpg')!r}, '--output_dir', {str(tmp_path)!r}, "
            "'--no_progress', '--classes', 'cup, table'])\n"
            "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'mmseg', 'mmcv', 'mmengine', 'engine', "
            "'dataloaders', 'torchvision'}))\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, SEGCLIP_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


def test_prediction_api_from_a_checkpoint_and_a_new_vocabulary(repo_root, tiny_checkpoint):
    """The entry point the web demo uses: load once, predict, change the vocabulary without reloading."""
    demo = vis.SegmentationDemo.from_checkpoint(tiny_checkpoint, ["cup", "table"], crop=112, stride=112,
                                                resolution=112)
    bgr = images.read_image_bgr(repo_root / "demo" / "examples" / "coffee.jpg")
    pred = demo.predict(bgr, with_groups=True)
    assert pred.labels.shape == pred.groups.shape == bgr.shape[:2] and pred.labels.dtype == np.uint8
    assert {c["name"] for c in pred.classes} <= {"background", "cup", "table"}
    assert abs(sum(c["share"] for c in pred.classes) - 1) < 1e-4 and int(pred.groups.max()) < 8
    model = demo.model
    demo.set_vocabulary(["saucer", "spoon", "cup"], with_bg=False)
    assert demo.model is model and demo.label_names == ["saucer", "spoon", "cup"]
    again = demo.predict(bgr)
    assert again.groups is None and int(again.labels.max()) < 3
