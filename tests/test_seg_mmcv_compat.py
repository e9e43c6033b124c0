"""seg_segmentation.mmcv_compat: mmseg imports on mmcv-lite; a real compiled mmcv is left alone."""
import subprocess
import sys
import types

import pytest

from seg_segmentation import mmcv_compat


def test_mmseg_datasets_and_metric_import_and_ops_fail_clearly(repo_root):
    code = (
        "import seg_segmentation.mmcv_compat as c, sys\n"
        "import mmseg.datasets, mmseg.evaluation\n"
        "from mmseg.datasets import PascalVOCDataset, ADE20KDataset\n"
        "from mmseg.evaluation import IoUMetric\n"
        "ext = sys.modules['mmcv._ext']\n"
        "print('standin', getattr(ext, 'is_segclip_standin', False), c.has_real_ops())\n"
        "from mmcv.ops import nms\n"
        "import torch\n"
        "nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n")
    r = subprocess.run([sys.executable, '-c', code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    if 'standin False' in r.stdout:
        pytest.skip('a compiled mmcv is installed: the stand-in is (correctly) not used')
    assert 'standin True False' in r.stdout, r.stdout + r.stderr
    assert r.returncode != 0
    assert "mmcv op 'nms' needs mmcv's compiled extension" in r.stderr


def test_install_is_a_noop_when_real_ops_exist(monkeypatch):
    real = types.ModuleType('mmcv._ext')     # what a compiled mmcv registers
    real.nms = lambda *a: 'real nms'
    monkeypatch.setitem(sys.modules, 'mmcv._ext', real)
    assert mmcv_compat.has_real_ops()
    assert mmcv_compat.install() is False
    assert sys.modules['mmcv._ext'] is real and sys.modules['mmcv._ext'].nms() == 'real nms'


def test_install_only_when_missing(monkeypatch):
    monkeypatch.delitem(sys.modules, 'mmcv._ext', raising=False)
    monkeypatch.setattr(mmcv_compat.importlib.util, 'find_spec', lambda name: None)
    assert mmcv_compat.install() is True
    ext = sys.modules['mmcv._ext']
    assert ext.is_segclip_standin and not mmcv_compat.has_real_ops()
    with pytest.raises(RuntimeError, match="mmcv op 'roi_align_forward'"):
        ext.roi_align_forward(1, 2)
    assert mmcv_compat.install() is False    # second call: already there
