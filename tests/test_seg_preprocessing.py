"""The evaluation's image transform, written once (seg_segmentation/preprocessing.py), against mmseg/mmcv's."""
import numpy as np
import pytest

import seg_segmentation.mmcv_compat  # noqa: F401  (before mmseg)
from seg_segmentation.preprocessing import PIXEL_MEAN, PIXEL_STD, eval_image_tensor, rescaled_size


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (224, 224), (7, 9), (24, 2600), (3000, 4200), (111, 333)])
@pytest.mark.parametrize("scale", [(2048, 224), (2048, 112), (448, 448)])
def test_transform_equals_mmseg_resize_and_mmcv_normalize(hw, scale):
    import mmcv
    from mmseg.datasets.transforms import Resize
    max_long, resolution = scale
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    bgr = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    want = Resize(scale=(max_long, resolution), keep_ratio=True)(dict(img=bgr.copy()))["img"]
    want = mmcv.imnormalize(want, np.array(PIXEL_MEAN), np.array(PIXEL_STD), to_rgb=True)
    got = eval_image_tensor(bgr, resolution, max_long).numpy().transpose(1, 2, 0)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)
    assert rescaled_size(*hw, resolution, max_long) == want.shape[:2]
