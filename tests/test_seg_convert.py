"""preprocess/convert_coco_object.py: COCO-Stuff labels -> COCO-Object *_instanceTrainIds.png (design.md §7.4)."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from preprocess.convert_coco_object import convert, object_lut
from seg_segmentation.classes import COCO_OBJECT_CLASSES


def _write_stuff(root, name, values, split='val'):
    d = root / 'annotations' / f'{split}2017'
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint8)).save(d / f'{name}.png')


def test_lut_maps_things_contiguously_and_stuff_to_background():
    lut = object_lut()
    assert lut[0] == 1 and lut[10] == 11 and lut[12] == 12 and lut[89] == 80     # person .. toothbrush
    things = [int(v) for v in lut[:90] if v != 255]
    assert things == list(range(1, 81)) and len(COCO_OBJECT_CLASSES) == 81
    assert (lut[91:255] == 0).all() and lut[255] == 0                            # stuff, unlabelled -> background
    assert lut[11] == 255 and lut[82] == 255                                     # ids COCO never uses -> ignore


def test_convert_val_and_train_idempotent_multiprocess(tmp_path):
    vals = np.array([[0, 1, 11, 12], [89, 91, 181, 255]])
    _write_stuff(tmp_path, '000000000139', vals)
    _write_stuff(tmp_path, '000000000285', vals[::-1])
    _write_stuff(tmp_path, '000000000009', vals, split='train')
    (tmp_path / 'annotations' / 'val2017' / '000000000139_labelTrainIds.png').write_bytes(b'not ours')
    counts, failures = convert(str(tmp_path), splits=('val', 'train'), nproc=2, progress=False)
    assert counts == {'done': 3, 'kept': 0, 'failed': 0} and not failures
    out = np.array(Image.open(tmp_path / 'annotations' / 'val2017' / '000000000139_instanceTrainIds.png'))
    assert out.tolist() == [[1, 2, 255, 12], [80, 0, 0, 0]]
    assert (tmp_path / 'annotations' / 'train2017' / '000000000009_instanceTrainIds.png').is_file()
    mtime = os.path.getmtime(tmp_path / 'annotations' / 'val2017' / '000000000139_instanceTrainIds.png')
    counts, _ = convert(str(tmp_path), splits=('val',), nproc=1, progress=False)    # second run: nothing to do
    assert counts == {'done': 0, 'kept': 2, 'failed': 0}
    assert os.path.getmtime(tmp_path / 'annotations' / 'val2017' / '000000000139_instanceTrainIds.png') == mtime


def test_cli_counts_corrupt_files_and_reports_missing_folder(tmp_path, repo_root):
    _write_stuff(tmp_path, '000000000139', [[0, 200]])
    (tmp_path / 'annotations' / 'val2017' / '000000000777.png').write_bytes(b'\x89PNG broken')
    script = str(repo_root / 'preprocess' / 'convert_coco_object.py')
    r = subprocess.run([sys.executable, script, str(tmp_path), '--nproc', '1', '--no_progress'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'converted 1' in r.stdout and 'failed 1' in r.stdout
    assert '000000000777.png' in r.stderr and 'Traceback' not in r.stderr
    r = subprocess.run([sys.executable, script, str(tmp_path / 'nope'), '--no_progress'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'annotations/val2017' in r.stderr and 'Traceback' not in r.stderr
