"""Bad inputs and faults against the demo and the evaluation: decompression bombs, colour label maps, repeated
split lines, full disks, killed runs' temporaries, out-of-memory, and a failing rank (issue 11 / 15 cases)."""
import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_seg_vis
import main_seg_zeroshot
from common import images
from common.fileio import OutputError
from tests.helpers import write_fake_dataset

SMALL = ['--resolution', '112', '--crop_size', '112', '--stride', '112', '--num_workers', '0', '--no_progress']


@pytest.fixture(autouse=True)
def pillow_limit(monkeypatch):
    """A read without limit lifts Pillow's process-wide limit; keep that inside each test."""
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A real PNG of side x side 1-bit pixels (all black): ~60 KB on disk, 400 M pixels (1.2 GB as BGR) decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data) & 0xffffffff)
    row = b'\x00' * (1 + side // 8)
    comp = zlib.compressobj(9)
    body = b''.join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack('>IIBBBBB', side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', body) + chunk(b'IEND', b''))
    return path


@pytest.fixture(scope='module')
def bomb(tmp_path_factory):
    return bomb_png(tmp_path_factory.mktemp('bomb') / 'bomb.png')


def _no_decoding(m):
    import cv2

    def refuse(*a, **k):
        raise AssertionError('the image was decoded')
    m.setattr(cv2, 'imdecode', refuse)
    m.setattr(Image.Image, 'load', refuse)


# ---------------------------------------------------------------------------------------------- pixel limit
def test_bomb_is_refused_from_its_header(bomb, monkeypatch, tmp_path):
    assert bomb.stat().st_size < 200_000
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', images.DEFAULT_MAX_IMAGE_PIXELS)   # Pillow's as shipped
    small = tmp_path / 'small.png'
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(small)
    with monkeypatch.context() as m:
        _no_decoding(m)
        with pytest.raises(images.ImageTooLargeError, match=r'more than 178,956,970 pixels is above the limit of '
                                                            r'89,478,485 .*--max_image_pixels'):
            images.read_image_bgr(bomb)                                # Pillow's own guard trips first (> 2x)
        assert images.check_image_size(bomb, None)[0] == (20000, 20000)     # no limit: header only, the size
        with pytest.raises(images.ImageTooLargeError, match=r'20000 x 20000 = 400,000,000 pixels is above'):
            images.read_image_bgr(bomb)                                # Pillow's limit lifted: the true size
        with pytest.raises(images.ImageTooLargeError,
                           match=r'400 x 300 = 120,000 pixels is above the limit of 100,000'):
            images.read_image_bgr(small, max_pixels=100_000)
    assert images.read_image_bgr(small, max_pixels=0).shape == (300, 400, 3)       # 0 = no limit
    assert images.read_image_bgr(small, max_pixels=120_000).shape == (300, 400, 3)


def test_a_limit_above_pillows_reads_the_true_size(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)           # as if Pillow's own limit were tiny
    p = tmp_path / 'a.png'
    Image.fromarray(np.zeros((60, 50), np.uint8)).save(p)          # 3000 px: > 2x Pillow's limit
    assert images.check_image_size(p, 5000)[0] == (50, 60)
    with pytest.raises(images.ImageTooLargeError, match='50 x 60 = 3,000 pixels'):
        images.check_image_size(p, 2999)


def test_demo_skips_a_bomb_with_one_line(bomb, repo_root, tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / 'in'
    folder.mkdir()
    (folder / 'bomb.png').write_bytes(bomb.read_bytes())
    (folder / 'coffee.jpg').write_bytes((repo_root / 'demo' / 'examples' / 'coffee.jpg').read_bytes())
    rc = main_seg_vis.main(['--input', str(folder), '--init_model', str(tiny_checkpoint), '--output_dir',
                            str(tmp_path / 'o'), '--no_progress', '--classes', 'cup, table', '--vis', 'pred'])
    err = capsys.readouterr().err
    assert rc == 0
    assert 'bomb.png' in err and '--max_image_pixels' in err and 'Traceback' not in err
    assert (tmp_path / 'o' / 'labels' / 'coffee.png').is_file() and not (tmp_path / 'o' / 'labels' / 'bomb.png').exists()


@pytest.fixture()
def voc_root(tmp_path):
    return Path(write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=3, size=(120, 90), seed=4))


def _zeroshot(args, capsys):
    rc = main_seg_zeroshot.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_evaluation_refuses_a_bomb_image_before_decoding(voc_root, bomb, tiny_checkpoint, capsys):
    victim = sorted((voc_root / 'JPEGImages').iterdir())[1]
    victim.write_bytes(bomb.read_bytes())
    rc, _, err = _zeroshot(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint] + SMALL,
                           capsys)
    assert rc == 2 and str(victim) in err and '--max_image_pixels' in err and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- label maps, split
def test_rgb_label_map_is_one_line(voc_root, tiny_checkpoint, capsys):
    victim = sorted((voc_root / 'SegmentationClass').iterdir())[0]
    Image.open(victim).convert('RGB').save(victim)                    # colours instead of class ids
    rc, _, err = _zeroshot(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint] + SMALL,
                           capsys)
    assert rc == 2 and str(victim) in err and 'RGB image' in err and 'single-channel' in err
    assert 'Traceback' not in err and 'IndexError' not in err and len(err.strip().splitlines()) == 1


def test_repeated_split_lines_are_counted_once(voc_root, tiny_checkpoint, tmp_path, capsys, caplog):
    split = voc_root / 'ImageSets' / 'Segmentation' / 'val.txt'
    names = split.read_text().split()
    split.write_text('\n'.join(names + [names[0], names[2]]) + '\n')
    out = tmp_path / 'r.json'
    rc, _, err = _zeroshot(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                            '--output', out] + SMALL, capsys)
    assert rc == 0, err
    assert json.loads(out.read_text())['images'] == 3
    assert 'lists 2 image(s) more than once' in caplog.text


# ---------------------------------------------------------------------------------------------- atomic outputs
def _disk_full(monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full)


def killed_runs_temporary(path: Path) -> Path:
    """The temporary a killed writer of ``path`` left: the project's name with a pid no process has."""
    from common.fileio import temporary_name
    name = temporary_name(path).name.split('-')
    name[3] = '999999999'
    return path.with_name('-'.join(name))


def test_demo_outputs_are_atomic_and_stale_temporaries_go(repo_root, tiny_model, tmp_path, monkeypatch):
    from seg_segmentation.visualize import SegmentationDemo, run_visualization
    photo = repo_root / 'demo' / 'examples' / 'coffee.jpg'
    demo = SegmentationDemo(tiny_model, ['cup', 'table'], crop=112, stride=112, resolution=112)
    out = tmp_path / 'o'
    (out / 'labels').mkdir(parents=True)
    stale = killed_runs_temporary(out / 'labels' / 'coffee.png')
    stale.write_bytes(b'half a png')
    _disk_full(monkeypatch)
    with pytest.raises(OutputError, match='no space left'):
        run_visualization(demo, [photo], out, modes=['input_pred_label', 'pred'], progress=False)
    assert not stale.exists()
    left = [p for p in out.rglob('*') if p.is_file()]
    assert left == [], left                                             # no 0-byte or partial file
    monkeypatch.undo()
    report = run_visualization(demo, [photo], out, modes=['input_pred_label', 'pred'], progress=False)
    assert report['written'] == ['coffee'] and not [p for p in out.rglob('.*') if p.is_file()]
    assert json.loads((out / 'labels' / 'coffee.json').read_text())['vocabulary'] == ['background', 'cup', 'table']


def test_evaluation_json_and_predictions_are_atomic(voc_root, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    out, preds = tmp_path / 'res' / 'r.json', tmp_path / 'pred'
    preds.mkdir()
    stale = killed_runs_temporary(preds / '2007_000001.png')
    stale.write_bytes(b'')
    _disk_full(monkeypatch)
    rc, _, err = _zeroshot(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                            '--output', out, '--save_pred', preds] + SMALL, capsys)
    assert rc == 2 and 'no space left' in err and 'Traceback' not in err
    assert not out.exists() and list(preds.iterdir()) == []
    monkeypatch.undo()
    rc, _, err = _zeroshot(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                            '--output', out, '--save_pred', preds] + SMALL, capsys)
    assert rc == 0, err
    assert json.loads(out.read_text())['images'] == 3 and len(list(preds.iterdir())) == 3


# ---------------------------------------------------------------------------------------------- GPU-path faults
def test_out_of_memory_names_the_batch_size(voc_root, tiny_model):
    from seg_segmentation.datasets import ZeroShotSegDataset
    from seg_segmentation.evaluate import EvalConfig, EvalError, predict_shard
    from seg_segmentation.inference import ZeroShotSegmentor

    class Exhausted(ZeroShotSegmentor):
        def predict(self, *a, **k):
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    seg = Exhausted(tiny_model, class_names=['cat', 'dog'])
    cfg = EvalConfig(dataset='voc', data_root=str(voc_root), resolution=112, crop=112, stride=112, batch_size=12,
                     num_workers=0)
    result = predict_shard(seg, ZeroShotSegDataset('voc', str(voc_root), 112), cfg, 21)
    assert isinstance(result.error, EvalError)
    assert '--batch_size 12' in str(result.error) and 'lower --batch_size' in str(result.error)


RANK_FAILS = '''
import sys, torch, torch.distributed as dist
from modules.modeling import SegCLIP
from seg_segmentation.evaluate import run_zero_shot_eval
dist.init_process_group('gloo')
ref = torch.load(sys.argv[1], weights_only=True)
model = SegCLIP.from_state_dict(ref['segclip_state_dict']).eval()

def boom(path, pred):
    if dist.get_rank() == 1:
        raise RuntimeError('a bug on rank 1')
try:
    run_zero_shot_eval(model, dataset='voc', data_root=sys.argv[2], resolution=112, crop=112, stride=112,
                       num_workers=0, progress=False, on_prediction=boom)
    print(f'rank {dist.get_rank()}: finished', flush=True)
except Exception as e:
    print(f'rank {dist.get_rank()}: {type(e).__name__}: {e}', flush=True)
dist.destroy_process_group()
'''


def test_any_exception_on_one_rank_stops_the_others(voc_root, tmp_path, repo_root):
    """Not only DatasetError: a bug on rank 1 must not leave rank 0 waiting in the reduction (with NCCL: until the
    timeout). Both ranks end at once, rank 1 with its own error, rank 0 saying another process failed."""
    from tests.conftest import REFERENCE_PT
    script = tmp_path / 'rank_fails.py'
    script.write_text(RANK_FAILS)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('WORLD_SIZE', None)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(script), str(REFERENCE_PT), str(voc_root)], cwd=repo_root, env=env, capture_output=True,
                       text=True, timeout=240)
    assert 'rank 1: RuntimeError: a bug on rank 1' in r.stdout, r.stdout + r.stderr[-2000:]
    assert 'rank 0: EvalError: 1 other process(es) failed' in r.stdout, r.stdout + r.stderr[-2000:]
