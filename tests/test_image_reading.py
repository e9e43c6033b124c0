"""Reading images and label maps from users (issue 21): only an allow-list of formats is ever decoded (PostScript
never reaches Ghostscript), headers that make Pillow raise anything are a readable error, 16-bit label maps are
read exactly."""
import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from common.images import ImageReadError, check_image_size, read_image_bgr
from tests.helpers import write_fake_dataset

# A minimal Encapsulated PostScript file, as Pillow's EPS reader accepts it (its header parses without Ghostscript;
# decoding it runs Ghostscript on the PostScript program).
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"0 0 1 setrgbcolor 0 0 16 16 rectfill\nshowpage\n%%EOF\n")


@pytest.fixture()
def ghostscript_spy(tmp_path, monkeypatch):
    """A fake ``gs`` first on PATH that records every call, and a record of every use of Pillow's EPS plugin:
    whatever the code under test does, nothing may reach either."""
    bin_dir, calls = tmp_path / "fake_bin", tmp_path / "gs_calls.txt"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
    gs.chmod(gs.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)          # look for gs again, as a fresh process does
    opened = []
    real_open = EpsImagePlugin.EpsImageFile._open

    def spy_open(self):
        opened.append(getattr(self, "filename", "?"))
        return real_open(self)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy_open)

    def check():
        assert opened == [], f"Pillow's EPS plugin parsed {opened}"
        assert not calls.exists(), f"Ghostscript was run: {calls.read_text()}"
    return check


def _eps_file(folder: Path, name: str = "photo.jpg") -> Path:
    path = folder / name            # the name says JPEG; Pillow goes by the content
    path.write_bytes(EPS)
    return path


def test_postscript_is_refused_by_the_image_reader(tmp_path, ghostscript_spy):
    """Issue 21, bad 9. Before: the reader fell back to Pillow, whose EPS plugin ran Ghostscript on the file."""
    for name in ("photo.jpg", "figure.eps"):
        path = _eps_file(tmp_path, name)
        with pytest.raises(ImageReadError, match="not a readable image"):
            check_image_size(path)
        with pytest.raises(ImageReadError, match="not a readable image"):
            read_image_bgr(path)
    ghostscript_spy()


def test_demo_folder_and_web_page_skip_postscript(repo_root, tiny_model, tmp_path, ghostscript_spy):
    from seg_segmentation.visualize import SegmentationDemo, run_visualization
    eps = _eps_file(tmp_path, "a_postscript.jpg")
    photo = repo_root / "demo" / "examples" / "coffee.jpg"
    demo = SegmentationDemo(tiny_model, ["cup", "table"], crop=112, stride=112, resolution=112)
    report = run_visualization(demo, [eps, photo], tmp_path / "out", modes=["input_pred_label"], progress=False)
    assert report["written"] == ["coffee"] and [p for p, _ in report["skipped"]] == [str(eps)]
    import importlib.util
    spec = importlib.util.spec_from_file_location("web_app", repo_root / "demo" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    seg = app.WebSegmenter(tiny_model, None, released=False, device="cpu", work_dir=tmp_path / "work",
                           crop=112, stride=112, resolution=112)
    with pytest.raises(app.PageInputError, match="a_postscript.jpg: not a readable image"):
        seg.segment(str(eps), "cup, table")
    ghostscript_spy()


def test_training_data_skips_postscript(tmp_path, ghostscript_spy):
    """CC3M shards and COCO files go through dataloaders.imageio (store building, streaming, the datasets)."""
    from dataloaders.imageio import decode_rgb, encode_for_store
    for fn in (decode_rgb, encode_for_store):
        with pytest.raises(Exception) as err:
            fn(EPS)
        assert "cannot identify image file" in str(err.value), err.value
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good, format="PNG")
    assert decode_rgb(good.getvalue()).size == (8, 8)
    ghostscript_spy()


def test_evaluation_refuses_postscript_images_and_label_maps(tmp_path, ghostscript_spy):
    from seg_segmentation.datasets import DatasetError, ZeroShotSegDataset
    root = Path(write_fake_dataset("voc", tmp_path / "VOC2012", num_images=2, size=(64, 48)))
    image = sorted((root / "JPEGImages").glob("*.jpg"))[0]
    label = sorted((root / "SegmentationClass").glob("*.png"))[1]
    image.write_bytes(EPS)
    label.write_bytes(EPS)
    ds = ZeroShotSegDataset("voc", str(root), resolution=112)
    for i, path in ((0, image), (1, label)):
        with pytest.raises(DatasetError, match=f"cannot read {path}: not a readable image"):
            ds[i]
    ghostscript_spy()


def test_coco_object_conversion_skips_postscript(tmp_path, ghostscript_spy):
    from preprocess.convert_coco_object import convert_file
    src = _eps_file(tmp_path, "000000000139_labelTrainIds.png")
    dst = tmp_path / "000000000139_instanceTrainIds.png"
    name, status = convert_file(str(src), str(dst))
    assert name == str(src) and "cannot identify image file" in status and not dst.exists()
    ghostscript_spy()


# ---------------------------------------------------------------------------------------------- 16-bit label maps
def _sixteen_bit_label(path: Path, labels: np.ndarray) -> None:
    Image.fromarray(labels.astype(np.uint16)).save(path)          # a 16-bit grey PNG
    with Image.open(path) as im:
        assert im.mode.startswith("I;16") and np.array_equal(np.asarray(im), labels)   # written as meant


@pytest.mark.parametrize("dataset", ["custom", "ade20k"])      # label i = class i; and with reduce_zero_label
def test_sixteen_bit_label_maps_are_read_exactly(dataset, tmp_path):
    """Issue 21, bad 8. Before: mmseg cast every label map to 8 bits, so 260 was read as class 4."""
    from seg_segmentation.datasets import LAYOUTS, ZeroShotSegDataset
    layout = LAYOUTS[dataset]
    root = Path(write_fake_dataset("voc" if dataset == "custom" else dataset, tmp_path / "data", num_images=1,
                                   size=(40, 30)))
    label = next((root / layout.ann_dir).rglob("*" + layout.seg_map_suffix))
    labels = np.full((30, 40), 3, dtype=np.int64)
    labels[:10], labels[10:20, :5], labels[20:, :7] = 260, 255, 0
    _sixteen_bit_label(label, labels)
    gt = ZeroShotSegDataset(dataset, str(root), resolution=32)[0]["gt"].numpy()
    if layout.reduce_zero_label:           # 0 -> ignore (255), every other id one lower, 255 stays ignore
        expected = np.where(labels == 0, 255, np.where(labels == 255, 255, labels - 1))
    else:
        expected = labels
    assert np.array_equal(gt, expected), np.unique(gt)


def test_evaluation_names_a_label_beyond_the_class_list(tmp_path, tiny_checkpoint, capsys):
    """A 16-bit label 260 with VOC's 21 classes: one line naming the file and the label, exit 2 (before: counted as
    class 4 with exit 0)."""
    import main_seg_zeroshot
    root = Path(write_fake_dataset("voc", tmp_path / "VOC2012", num_images=1, size=(64, 48)))
    label = next((root / "SegmentationClass").glob("*.png"))
    labels = np.asarray(Image.open(label)).astype(np.int64)
    labels[20:30, 20:30] = 260
    _sixteen_bit_label(label, labels)
    rc = main_seg_zeroshot.main(["--dataset", "voc", "--data_root", str(root), "--init_model", str(tiny_checkpoint),
                                 "--resolution", "112", "--crop_size", "112", "--stride", "112", "--num_workers", "0",
                                 "--no_progress"])
    err = capsys.readouterr().err
    image = root / "JPEGImages" / (label.stem + ".jpg")
    assert rc == 2 and err == f"error: {image}: label 260 but only 21 class names\n", err


# ---------------------------------------------------------------------------------------------- other header errors
def _corrupt_jpeg2000(path: Path) -> Path:
    """A JPEG 2000 file whose SIZ marker says length 0: Pillow raises ValueError (not OSError) from the header."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="JPEG2000")
    data = bytearray(buf.getvalue())
    siz = data.index(b"\xff\x51")
    data[siz + 2:siz + 4] = b"\x00\x00"
    path.write_bytes(bytes(data))
    with pytest.raises(Exception) as err:
        Image.open(path)
    assert not isinstance(err.value, OSError), err.value        # the case this is about
    return path


def test_header_errors_of_any_type_are_an_unreadable_image(repo_root, tiny_model, tmp_path):
    """Poor case of issue 21. Before: the ValueError escaped the reader: the demo lost the rest of its folder and
    the page showed an unexplained error."""
    from seg_segmentation.visualize import SegmentationDemo, run_visualization
    bad = _corrupt_jpeg2000(tmp_path / "scan.jp2")
    why = f"{bad}: not a readable image (ValueError: Marker length too small)"
    with pytest.raises(ImageReadError) as err:
        check_image_size(bad)
    assert str(err.value) == why
    demo = SegmentationDemo(tiny_model, ["cup", "table"], crop=112, stride=112, resolution=112)
    photo = repo_root / "demo" / "examples" / "coffee.jpg"
    report = run_visualization(demo, [bad, photo], tmp_path / "out", modes=["input_pred_label"], progress=False)
    assert report["written"] == ["coffee"] and report["skipped"] == [(str(bad), why)]
    import importlib.util
    spec = importlib.util.spec_from_file_location("web_app", repo_root / "demo" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    seg = app.WebSegmenter(tiny_model, None, released=False, device="cpu", work_dir=tmp_path / "work",
                           crop=112, stride=112, resolution=112)
    with pytest.raises(app.PageInputError) as err:
        seg.segment(str(bad), "cup, table")
    assert str(err.value) == "scan.jp2: not a readable image (ValueError: Marker length too small)"


def test_evaluation_names_an_image_whose_header_breaks_pillow(tmp_path, tiny_checkpoint, capsys):
    import main_seg_zeroshot
    root = Path(write_fake_dataset("voc", tmp_path / "VOC2012", num_images=2, size=(64, 48)))
    bad = _corrupt_jpeg2000(sorted((root / "JPEGImages").glob("*.jpg"))[1])
    rc = main_seg_zeroshot.main(["--dataset", "voc", "--data_root", str(root), "--init_model", str(tiny_checkpoint),
                                 "--resolution", "112", "--crop_size", "112", "--stride", "112", "--num_workers", "0",
                                 "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: cannot read {bad}: not a readable image (ValueError: Marker length too small)\n"
