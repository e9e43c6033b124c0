"""Superpixel pooling of a crop onto the patch grid (design.md §6), against the 2022 fixture."""
import json
import zlib

import numpy as np
import pytest

from dataloaders import superpixels as sp


def test_patch_labels_match_2022_fixture(reference):
    ref = reference["felzenszwalb_patch_labels"]
    pic = ref["pic"].numpy()
    for box, expected in zip(ref["coords"].tolist(), ref["out"].numpy()):
        got = sp.patch_labels(pic, box, img_size=ref["img_size"], patch_size=ref["patch_size"])
        assert got.dtype == np.int64 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_crop_box_rules():
    labels = np.arange(10 * 20).reshape(10, 20)
    # floor at the start, ceil at the end
    np.testing.assert_array_equal(sp.crop_label_map(labels, (0.12, 0.25, 0.51, 0.61)), labels[2:7, 2:11])
    # x1 < x0: same cut, mirrored horizontally; y1 < y0: mirrored vertically
    np.testing.assert_array_equal(sp.crop_label_map(labels, (0.51, 0.25, 0.12, 0.61)), labels[2:7, 2:11][:, ::-1])
    np.testing.assert_array_equal(sp.crop_label_map(labels, (0.12, 0.61, 0.51, 0.25)), labels[2:7, 2:11][::-1])
    # under 2 px on a side: whole map
    np.testing.assert_array_equal(sp.crop_label_map(labels, (0.5, 0.0, 0.52, 1.0)), labels)


def test_mean_vs_majority():
    # one patch: 3/4 of pixels label 0, 1/4 label 8 -> mean 2 (a label that is not even present), majority 0
    labels = np.zeros((16, 16), dtype=np.int64)
    labels[:, 12:] = 8
    box = (0.0, 0.0, 1.0, 1.0)
    assert sp.patch_labels(labels, box, img_size=16, patch_size=16).item() == 2
    assert sp.patch_labels(labels, box, img_size=16, patch_size=16, reduce="majority").item() == 0
    with pytest.raises(ValueError, match="majority"):
        sp.patch_labels(labels, box, img_size=16, patch_size=16, reduce="median")


def test_label_map_codec_reads_ours_and_2022():
    labels = np.random.default_rng(0).integers(0, 300, size=(7, 9))
    np.testing.assert_array_equal(sp.decode_label_map(sp.encode_label_map(labels)), labels)
    legacy = zlib.compress(json.dumps([7, 9] + labels.reshape(-1).tolist()).encode())
    np.testing.assert_array_equal(sp.decode_label_map(legacy), labels)
    with pytest.raises(ValueError, match="malformed"):
        sp.decode_label_map(zlib.compress(json.dumps([7, 9, 1, 2]).encode()))


def test_felzenszwalb_uses_2022_parameters():
    from skimage.segmentation import felzenszwalb
    img = np.zeros((64, 80, 3), dtype=np.uint8)
    img[:, 40:] = (200, 30, 30)
    img[20:50, 10:30] = (20, 200, 40)
    got = sp.felzenszwalb(img)
    np.testing.assert_array_equal(got, felzenszwalb(img, scale=224, sigma=0.9, min_size=224))
    assert got.shape == (64, 80) and len(np.unique(got)) >= 2
    assert sp.superpixel_store_name("cc3m_train_lmdb_total_seg") == \
        "cc3m_train_lmdb_total_seg_scale224_sigma9.0_min_size224.lmdb"
