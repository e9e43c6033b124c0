"""The demo's parts: palettes and drawing, label resizing, image reading, class lists, files (in-process, fast)."""
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from seg_segmentation import classes
from common import images
from seg_segmentation import drawing, inputs, outputs
from seg_segmentation import visualize as vis
from seg_segmentation.inference import upsample_labels


def test_voc_palette_is_the_standard_one():
    pal = drawing.voc_palette()
    assert pal.shape == (256, 3) and len({tuple(c) for c in pal}) == 256
    # background, aeroplane, person, monitor of the PASCAL colour map
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128] and pal[20].tolist() == [0, 64, 128]
    assert drawing.class_palette(3, with_bg=False).tolist() == pal[1:4].tolist()
    big = drawing.class_palette(300, with_bg=True)
    assert big.shape == (300, 3)


@pytest.mark.parametrize("size", [(37, 53), (300, 451)])
def test_upsample_labels_banded_equals_interpolate(size):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 14, 19, generator=g)
    direct = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    small = upsample_labels(scores, size).numpy()
    assert np.array_equal(small, direct)
    banded = upsample_labels(scores, size, max_elements=6 * size[1] * 3).numpy()  # 3 rows per band
    assert banded.dtype == np.int64 and banded.shape == size
    assert (banded != direct).mean() < 1e-3  # identical up to float rounding at exact ties


def _write(path, array, **kw):
    Image.fromarray(array, **kw).save(path)
    return path


def test_read_image_formats(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    bgr = images.read_image_bgr(_write(tmp_path / "a.png", rgb))
    assert np.array_equal(bgr, rgb[..., ::-1])
    gray = images.read_image_bgr(_write(tmp_path / "g.png", rgb[..., 0]))
    assert gray.shape == (20, 30, 3) and np.array_equal(gray[..., 0], rgb[..., 0])
    rgba = np.dstack([rgb, np.full((20, 30), 7, np.uint8)])
    assert np.array_equal(images.read_image_bgr(_write(tmp_path / "rgba.png", rgba)), rgb[..., ::-1])
    g16 = (rgb[..., 0].astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    assert np.array_equal(images.read_image_bgr(tmp_path / "g16.png")[..., 1], rgb[..., 0])
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cmyk = images.read_image_bgr(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (20, 30, 3) and np.abs(cmyk.astype(int) - rgb[..., ::-1]).mean() < 20
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(images.ImageReadError, match="text.jpg"):
        images.read_image_bgr(tmp_path / "text.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(images.ImageReadError, match="empty.png"):
        images.read_image_bgr(tmp_path / "empty.png")


def test_class_lists(tmp_path):
    assert classes.parse_class_list(" cat, dog ,sky,") == ["cat", "dog", "sky"]
    assert classes.parse_class_list("traffic light\nstop sign") == ["traffic light", "stop sign"]
    for bad, msg in [("", "empty"), ("cat,,dog", "empty"), ("cat, dog, cat", "duplicate"), (" , ", "empty")]:
        with pytest.raises(ValueError, match=msg):
            classes.parse_class_list(bad)
    f = tmp_path / "c.txt"
    f.write_text("# my classes\ncat\n\n  dog \n")
    assert classes.read_class_file(f) == ["cat", "dog"]
    f.write_text("cat\ncat\n")
    with pytest.raises(ValueError, match="duplicate"):
        classes.read_class_file(f)
    f.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no class names"):
        classes.read_class_file(f)
    with pytest.raises(ValueError, match="cannot read"):
        classes.read_class_file(tmp_path / "missing.txt")


def test_collect_inputs_and_names(tmp_path):
    for p in ["b.jpg", "a.png", "notes.txt", "sub/a.jpg"]:
        (tmp_path / p).parent.mkdir(exist_ok=True)
        (tmp_path / p).write_bytes(b"x")
    assert [p.name for p in inputs.collect_inputs(str(tmp_path))] == ["a.png", "b.jpg"]
    found = inputs.collect_inputs(str(tmp_path / "**" / "a.*"))
    assert sorted(str(p.relative_to(tmp_path)) for p in found) == ["a.png", "sub/a.jpg"]
    assert inputs.unique_names(found) == ["a", "a_2"]
    with pytest.raises(FileNotFoundError, match="input not found"):
        inputs.collect_inputs(str(tmp_path / "nope.jpg"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        inputs.collect_inputs(str(tmp_path / "*.gif"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        inputs.collect_inputs(str(tmp_path / "emptydir"))


def test_render_modes_and_label_files(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    labels = np.zeros((120, 160), np.uint8)
    labels[10:60, 10:80] = 1
    yy, xx = np.ogrid[:120, :160]
    ring = ((yy - 70) ** 2 + (xx - 110) ** 2 < 40 ** 2) & ((yy - 70) ** 2 + (xx - 110) ** 2 > 25 ** 2)
    labels[ring] = 2
    groups = (xx // 40 + 0 * yy).astype(np.uint8)
    names = ["background", "cat", "ring"]
    pal = drawing.class_palette(3, with_bg=True)
    for mode in drawing.VIS_MODES:
        out = drawing.render(mode, image, labels, groups, names, pal, with_bg=True)
        assert out.shape == image.shape and out.dtype == np.uint8, mode
    # input_pred leaves background pixels as the photo, colours the rest
    out = drawing.render("input_pred", image, labels, None, names, pal, with_bg=True)
    assert np.array_equal(out[labels == 0], image[labels == 0]) and not np.array_equal(out[labels == 1],
                                                                                        image[labels == 1])
    # the ring's name goes inside the ring, not in its hole
    x, y = drawing.label_anchor(labels == 2)
    assert labels[y, x] == 2
    # names and legend actually change pixels
    plain = drawing.blend(image, drawing.colorize(labels, pal), drawing.LABEL_OPACITY)
    drawn = drawing.render("input_pred_label", image, labels, None, names, pal, with_bg=True)
    assert (np.abs(drawn.astype(int) - plain).sum(-1) > 60).sum() > 100
    with pytest.raises(ValueError, match="unknown visualisation mode"):
        drawing.render("nope", image, labels, None, names, pal, True)

    png = tmp_path / "l.png"
    outputs.save_label_png(png, labels, pal)
    back = Image.open(png)
    assert back.mode == "P" and np.array_equal(np.asarray(back), labels)
    assert back.getpalette()[:9] == pal[:3].ravel().tolist()
    rows = vis.label_summary(labels, names, pal)
    assert [r["name"] for r in rows] == ["background", "cat", "ring"]
    assert sum(r["pixels"] for r in rows) == labels.size
    outputs.write_json(tmp_path / "s.json", {"classes": rows})
    assert json.loads((tmp_path / "s.json").read_text())["classes"][1]["pixels"] == int((labels == 1).sum())
    # more than 256 labels: a 16-bit PNG
    many = np.arange(300 * 4, dtype=np.int32).reshape(30, 40) % 300
    outputs.save_label_png(tmp_path / "m.png", many, drawing.class_palette(300, with_bg=False))
    assert np.array_equal(cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED), many)


def test_tiny_images_and_legend_overflow():
    tiny = np.full((6, 9, 3), 128, np.uint8)
    labels = np.ones((6, 9), np.uint8)
    pal = drawing.class_palette(2, True)
    assert drawing.render("input_pred_label", tiny, labels, None, ["background", "cat"], pal, True).shape == tiny.shape
    img = np.zeros((80, 300, 3), np.uint8)
    entries = [(f"class {i}", pal[1]) for i in range(40)]
    out = drawing.draw_legend(img, entries)  # more rows than fit: '+k more' instead of running off the image
    assert out.shape == img.shape and out.any()


def test_legend_moves_away_from_names():
    img = np.full((200, 300, 3), 200, np.uint8)
    entries = [("cat", (128, 0, 0)), ("dog", (0, 128, 0))]
    plain = drawing.draw_legend(img, entries)
    assert (plain[:3, :3] < 200).all() and (plain[:3, -3:] == 200).all()       # top-left by default
    moved = drawing.draw_legend(img, entries, avoid=[(5, 5), (150, 100)])
    assert (moved[:3, :3] == 200).all() and (moved[:3, -3:] < 200).all()      # a name sits there: top-right
