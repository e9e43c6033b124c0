"""End-to-end zero-shot evaluation: main_seg_zeroshot.py on tiny generated datasets in every real layout, one
process and torchrun, checked against an independent mIoU and mmseg's IoUMetric; bad input gives clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seg_segmentation.classes import DATASET_CLASSES
from seg_segmentation.datasets import LAYOUTS
from tests.helpers import eval_env, evaluate_in_process, run_cli, write_fake_dataset

SIZES = [(120, 90), (90, 130), (200, 100), (96, 96), (150, 70)]     # (w, h): 1-3 windows of 112 each
SMALL = ['--resolution', '112', '--crop_size', '112', '--stride', '112']   # the tiny model is a 112 model


def read_gt(dataset, path):
    gt = np.array(Image.open(path)).astype(np.int64)   # palette PNG -> the indices
    if LAYOUTS[dataset].reduce_zero_label:
        gt = gt - 1
        gt[gt == -1] = 255
        gt[gt == 254] = 255
    return gt


def independent_miou(pairs, num_classes):
    """Confusion matrix over the split; IoU per class; mean over classes present in prediction or ground truth."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, gt in pairs:
        keep = gt != 255
        conf += np.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(
            num_classes, num_classes)
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return np.nanmean(iou) * 100, iou * 100, inter.sum() / conf.sum() * 100


def mmseg_iou_metric(pairs, class_names):
    """mmseg's own IoUMetric (process + compute_metrics) on the same predictions."""
    import seg_segmentation.mmcv_compat  # noqa: F401
    from mmseg.evaluation import IoUMetric
    metric = IoUMetric(iou_metrics=['mIoU'])
    metric.dataset_meta = dict(classes=class_names)
    for pred, gt in pairs:
        metric.process({}, [dict(pred_sem_seg=dict(data=torch.from_numpy(pred)[None]),
                                 gt_sem_seg=dict(data=torch.from_numpy(gt)[None]))])
    return metric.compute_metrics(metric.results)


def saved_pairs(dataset, root, pred_dir):
    layout = LAYOUTS[dataset]
    pairs = []
    for gt_path in sorted(Path(root, layout.ann_dir).rglob('*' + layout.seg_map_suffix)):
        image_id = str(gt_path.relative_to(Path(root, layout.ann_dir)))[:-len(layout.seg_map_suffix)]   # sub-path kept
        pred = np.array(Image.open(Path(pred_dir) / (image_id + '.png'))).astype(np.int64)
        pairs.append((pred, read_gt(dataset, gt_path)))
    return pairs


@pytest.mark.slow
@pytest.mark.parametrize('dataset', ['voc', 'context', 'coco', 'ade20k', 'cityscapes'])
def test_cli_miou_equals_independent_and_mmseg_metric(dataset, tmp_path, repo_root, tiny_checkpoint):
    root = write_fake_dataset(dataset, tmp_path / 'data', num_images=3, sizes=SIZES[:3], seed=1)
    out, preds = tmp_path / 'res.json', tmp_path / 'pred'
    r = run_cli(repo_root, ['--dataset', dataset, '--data_root', root, '--init_model', tiny_checkpoint,
                            '--output', out, '--save_pred', preds, '--num_workers', '1', '--batch_size', '4'] + SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    names = DATASET_CLASSES[dataset]
    assert res['images'] == 3 and res['num_classes'] == len(names) and list(res['per_class']) == names
    assert 'mIoU' in r.stdout and names[-1] in r.stdout            # the per-class table went to stdout
    pairs = saved_pairs(dataset, root, preds)
    assert len(pairs) == 3 and all(p.shape == g.shape for p, g in pairs)   # predictions at the original size
    miou, iou, aacc = independent_miou(pairs, len(names))
    assert res['mIoU'] == pytest.approx(miou, abs=1e-9) and res['aAcc'] == pytest.approx(aacc, abs=1e-9)
    got = np.array([np.nan if v is None else v for v in res['per_class'].values()])
    np.testing.assert_allclose(got, iou, atol=1e-9, equal_nan=True)
    mm = mmseg_iou_metric(pairs, names)
    assert round(res['mIoU'], 2) == pytest.approx(mm['mIoU'], abs=1e-9)
    # settings of the SegCLIP protocol were applied
    s = res['settings']
    assert (s['with_bg'], s['bg_thresh']) == ((True, {'voc': 0.8, 'context': 0.25, 'coco': 0.65}[dataset])
                                              if dataset in ('voc', 'context', 'coco') else (False, None))


@pytest.mark.parametrize('dataset', ['voc20', 'context59', 'coco_stuff'])
def test_no_background_variants_in_process(dataset, tmp_path, tiny_model):
    from seg_segmentation.evaluate import run_zero_shot_eval
    root = write_fake_dataset(dataset, tmp_path / 'data', num_images=2, sizes=SIZES[:2], seed=2)
    preds = {}
    tiny_model.train()
    res = run_zero_shot_eval(tiny_model, dataset=dataset, data_root=root, resolution=112, crop=112, stride=112,
                             num_workers=0,
                             progress=False, on_prediction=lambda p, pred: preds.__setitem__(Path(p).name, pred))
    layout = LAYOUTS[dataset]
    pairs = [(preds[Path(p).name[:-len(layout.seg_map_suffix)] + layout.img_suffix].numpy(), read_gt(dataset, p))
             for p in sorted(Path(root, layout.ann_dir).rglob('*' + layout.seg_map_suffix))]
    assert all(pred.max() < len(DATASET_CLASSES[dataset]) for pred, _ in pairs)
    assert res['mIoU'] == pytest.approx(independent_miou(pairs, len(DATASET_CLASSES[dataset]))[0], abs=1e-9)
    assert res['settings']['with_bg'] is False
    assert tiny_model.training                   # the caller's (training) mode is restored


def test_perfect_predictions_give_100():
    from seg_segmentation.evaluate import areas_to_metrics, intersect_and_union
    gt = torch.tensor([[0, 1, 1, 255], [2, 2, 0, 255]])
    pred = gt.clone()
    pred[gt == 255] = 1                 # whatever is predicted on ignored pixels does not count
    res = areas_to_metrics(intersect_and_union(pred, gt, 4), ['a', 'b', 'c', 'd'])
    assert res['mIoU'] == 100 and res['aAcc'] == 100
    assert res['per_class']['d'] is None           # absent from both: left out of the mean


@pytest.mark.slow
@pytest.mark.parametrize('dataset, n', [('voc', 5), ('ade20k', 3)])
def test_torchrun_two_processes_equal_one_process_odd_count(dataset, n, tmp_path, repo_root, tiny_checkpoint):
    root = write_fake_dataset(dataset, tmp_path / 'data', num_images=n, sizes=SIZES[:n], seed=3)
    common = ['--dataset', dataset, '--data_root', root, '--init_model', tiny_checkpoint, '--num_workers', '0',
              '--batch_size', '3', '--no_progress'] + SMALL
    r1 = run_cli(repo_root, common + ['--output', tmp_path / 'one.json', '--save_pred', tmp_path / 'p1'])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli(repo_root, common + ['--output', tmp_path / 'two.json', '--save_pred', tmp_path / 'p2'], nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    one, two = json.loads((tmp_path / 'one.json').read_text()), json.loads((tmp_path / 'two.json').read_text())
    assert two['world_size'] == 2 and one['world_size'] == 1
    assert one['images'] == two['images'] == n                  # every image once, no padded duplicate
    assert one['areas'] == two['areas'] and one['per_class'] == two['per_class'] and one['mIoU'] == two['mIoU']
    layout = LAYOUTS[dataset]
    assert sum(one['areas']['label']) == sum(int((read_gt(dataset, p) != 255).sum())
                                             for p in Path(root, layout.ann_dir).glob('*' + layout.seg_map_suffix))
    p1, p2 = sorted((tmp_path / 'p1').iterdir()), sorted((tmp_path / 'p2').iterdir())
    assert [p.name for p in p1] == [p.name for p in p2] and len(p1) == n
    assert all(np.array_equal(np.array(Image.open(a)), np.array(Image.open(b))) for a, b in zip(p1, p2))
    assert two['mIoU'] == pytest.approx(
        independent_miou(saved_pairs(dataset, root, tmp_path / 'p2'), len(DATASET_CLASSES[dataset]))[0], abs=1e-9)


# ---------------------------------------------------------------------- bad input (in process: fast)
@pytest.fixture()
def voc_root(tmp_path):
    return Path(write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=3, sizes=SIZES[:3], seed=4))


def test_missing_or_wrong_data_root_lists_layout(tmp_path, tiny_checkpoint, capsys):
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', tmp_path / 'nope', '--init_model', tiny_checkpoint], capsys)
    assert rc == 2 and 'does not exist' in err and 'JPEGImages/' in err and 'ImageSets/Segmentation/val.txt' in err
    (tmp_path / 'flat' / 'JPEGImages').mkdir(parents=True)
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', tmp_path / 'flat', '--init_model', tiny_checkpoint],
                       capsys)
    assert rc == 2 and 'missing: SegmentationClass, ImageSets/Segmentation/val.txt' in err
    assert 'Expected layout' in err and 'Traceback' not in err


def test_parent_folder_is_accepted(voc_root, tiny_checkpoint, tmp_path, capsys):
    parent = tmp_path / 'VOCdevkit'
    parent.mkdir()
    os.symlink(voc_root, parent / 'VOC2012')
    rc, out, err = evaluate_in_process(['--dataset', 'voc', '--data_root', parent, '--init_model', tiny_checkpoint,
                          '--max_images', '1', '--num_workers', '0', '--no_progress'] + SMALL, capsys)
    assert rc == 0, err
    assert '(1 images' in out


@pytest.mark.parametrize('content, msg', [('cat\n  \t\n# comment\ndog\ncat\n', "duplicate class name 'cat'"),
                                          ('cat\ndog\nCat\n', "duplicate class name 'Cat'"),
                                          ('# only a comment\n\n', 'no class names')])
def test_bad_class_name_file(content, msg, voc_root, tiny_checkpoint, tmp_path, capsys):
    f = tmp_path / 'names.txt'
    f.write_text(content)
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                        '--class_names', f], capsys)
    assert rc == 2 and msg in err and str(f) in err


def test_class_name_file_replaces_names(voc_root, tiny_checkpoint, tmp_path, capsys):
    f = tmp_path / 'names.txt'
    f.write_text('\n'.join(['background'] + [f'thing {i}' for i in range(20)]) + '\n')
    out = tmp_path / 'r.json'
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                        '--class_names', f, '--output', out, '--max_images', '1', '--num_workers', '0',
                        '--no_progress'] + SMALL, capsys)
    assert rc == 0, err
    assert list(json.loads(out.read_text())['per_class'])[1:3] == ['thing 0', 'thing 1']
    f.write_text('background\ncat\n')
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                        '--class_names', f], capsys)
    assert rc == 2 and 'voc has 21 label values, but 2 class names' in err and 'Traceback' not in err


def test_custom_voc_layout_with_its_own_class_count(voc_root, tiny_checkpoint, tmp_path, capsys):
    """--dataset custom takes a class list of any length when the label ids fit (the quickstart's synthetic split):
    the scores are those of the same predictions re-scored with 3 classes. --dataset voc keeps VOC's 21."""
    seg_dir = voc_root / 'SegmentationClass'
    for png in sorted(seg_dir.glob('*.png')):   # squeeze the labels to 0..2, keep 255 (palette PNG kept)
        im = Image.open(png)
        lab = np.asarray(im).copy()
        lab[lab != 255] %= 3
        new = Image.fromarray(lab.astype(np.uint8), mode='P')
        new.putpalette(im.getpalette())
        new.save(png)
    f = tmp_path / 'names.txt'
    f.write_text('background\ncat\ndog\n')
    out, pred_dir = tmp_path / 'r.json', tmp_path / 'pred'
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                        '--class_names', f, '--output', out, '--num_workers', '0', '--no_progress'] + SMALL, capsys)
    assert rc == 2 and 'voc has 21 label values, but 3 class names' in err and "use dataset 'custom'" in err
    rc, _, err = evaluate_in_process(['--dataset', 'custom', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                        '--output', out, '--num_workers', '0', '--no_progress'] + SMALL, capsys)
    assert rc == 2 and "'custom' needs its class names" in err
    rc, _, err = evaluate_in_process(['--dataset', 'custom', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                        '--class_names', f, '--output', out, '--save_pred', pred_dir, '--num_workers', '0',
                        '--no_progress'] + SMALL, capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert list(res['per_class']) == ['background', 'cat', 'dog'] and res['num_classes'] == 3
    assert res['settings']['bg_thresh'] == 0.8
    pairs = saved_pairs('custom', voc_root, pred_dir)
    assert all(int(p.max()) <= 2 for p, _ in pairs)
    assert res['mIoU'] == pytest.approx(independent_miou(pairs, 3)[0], abs=1e-6)
    wrong = tmp_path / 'wrong.txt'      # 2 names for labels 0..2: label 2 cannot be scored
    wrong.write_text('background\ncat\n')
    rc, _, err = evaluate_in_process(['--dataset', 'custom', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                        '--class_names', wrong, '--num_workers', '0', '--no_progress'] + SMALL, capsys)
    assert rc == 2 and 'label 2 but only 2 class names' in err and 'Traceback' not in err
    context_root = tmp_path / 'VOC2010'            # the data root is checked first: give context a valid layout
    for d in ('JPEGImages', 'SegmentationClassContext', 'ImageSets/SegmentationContext'):
        (context_root / d).mkdir(parents=True)
    (context_root / 'ImageSets/SegmentationContext/val.txt').write_text('')
    rc, _, err = evaluate_in_process(['--dataset', 'context', '--data_root', context_root, '--init_model', tiny_checkpoint,
                        '--class_names', f], capsys)   # benchmarks with remapped ids keep the exact count
    assert rc == 2 and 'context has 60 label values, but 3 class names' in err


def test_image_without_label_file(voc_root, tiny_checkpoint, capsys):
    victim = sorted((voc_root / 'SegmentationClass').iterdir())[1]
    victim.unlink()
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint], capsys)
    assert rc == 2 and '1 of 3 label files are missing' in err and victim.name in err


@pytest.mark.parametrize('workers', [0, 1])
def test_unreadable_image_is_named(workers, voc_root, tiny_checkpoint, capsys):
    victim = sorted((voc_root / 'JPEGImages').iterdir())[2]
    victim.write_bytes(b'this is not a jpeg')
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint,
                        '--num_workers', workers, '--no_progress'] + SMALL, capsys)
    assert rc == 2 and f'cannot read {victim}' in err and 'Traceback' not in err


def test_checkpoint_that_does_not_fit(voc_root, reference, tmp_path, capsys):
    sd = dict(reference['segclip_state_dict'])
    sd.pop('clip.visual.transformer.semantic_layer2.semantic_center')
    bad = tmp_path / 'bad.bin'
    torch.save(sd, bad)
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_root, '--init_model', bad], capsys)
    assert rc == 2 and 'semantic_center' in err and 'Traceback' not in err
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tmp_path / 'none.bin'], capsys)
    assert rc == 2 and 'none.bin' in err


def test_cfg_and_opts(voc_root, tiny_checkpoint, tmp_path, capsys):
    cfg = tmp_path / 'seg.yml'
    cfg.write_text('evaluate:\n  seg:\n    template: subset\n    opts: []\nbatch_size: 2\n')
    out = tmp_path / 'r.json'
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_root, '--init_model', tiny_checkpoint, '--cfg', cfg,
                        '--opts', 'bg_thresh', '0.5', 'stride=56', '--output', out, '--max_images', '1',
                        '--num_workers', '0', '--no_progress', '--resolution', '112', '--crop_size', '112'], capsys)
    assert rc == 0, err
    s = json.loads(out.read_text())['settings']
    assert (s['templates'], s['bg_thresh'], s['stride'], s['batch_size']) == ('subset', 0.5, 56, 2)
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--opts', 'no_such_key', '1'], capsys)
    assert rc == 2 and "unknown setting 'no_such_key'" in err


def test_help_explains_every_flag(repo_root):
    r = subprocess.run([sys.executable, str(repo_root / 'main_seg_zeroshot.py'), '--help'], cwd=repo_root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for flag in ['--dataset', '--data_root', '--init_model', '--templates', '--bg_thresh', '--resolution',
                 '--crop_size', '--stride', '--batch_size', '--num_workers', '--output', '--device', '--cfg',
                 '--opts', '--local_rank', '--precision', '--class_names', '--save_pred', '--method',
                 '--output_dir']:
        assert flag in r.stdout


@pytest.mark.slow
def test_torchrun_unreadable_image_on_one_rank_fails_cleanly(tmp_path, repo_root, tiny_checkpoint):
    root = Path(write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=3, sizes=SIZES[:3], seed=5))
    victim = sorted((root / 'JPEGImages').iterdir())[1]          # rank 1's image: ranks take every 2nd
    victim.write_bytes(b'not a jpeg')
    r = run_cli(repo_root, ['--dataset', 'voc', '--data_root', root, '--init_model', tiny_checkpoint,
                            '--num_workers', '0', '--no_progress'] + SMALL, nproc=2, timeout=180)
    assert r.returncode != 0                                     # and it did not hang in a collective
    assert f'cannot read {victim}' in r.stderr and 'other process(es) failed' in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and f'rank 1: cannot read {victim}' in errors[0], r.stderr[-3000:]   # rank 0 speaks


def test_missing_released_checkpoint_offline_is_a_clear_error(voc_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('SEGCLIP_OFFLINE', '1')
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_root, '--cache_dir', tmp_path / 'cache'], capsys)
    assert rc == 2 and 'segclip.bin' in err and 'Traceback' not in err


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_equal_one_process(tmp_path, repo_root, tiny_checkpoint):
    """Two torchrun "nodes" (--nnodes 2 --nproc_per_node 1, gloo, rendezvous on 127.0.0.1) evaluate what one
    process evaluates: the same areas, mIoU and saved predictions."""
    root = write_fake_dataset('voc', tmp_path / 'data', num_images=5, sizes=SIZES, seed=11)
    common = ['--dataset', 'voc', '--data_root', root, '--init_model', tiny_checkpoint, '--num_workers', '0',
              '--batch_size', '3', '--no_progress'] + SMALL
    r1 = run_cli(repo_root, common + ['--output', tmp_path / 'one.json', '--save_pred', tmp_path / 'p1'])
    assert r1.returncode == 0, r1.stderr[-3000:]
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1', '--node_rank',
         str(rank), '--master_addr', '127.0.0.1', '--master_port', str(port), str(repo_root / 'main_seg_zeroshot.py')]
        + [str(a) for a in common + ['--output', tmp_path / 'two.json', '--save_pred', tmp_path / 'p2']],
        cwd=repo_root, env=eval_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    one, two = json.loads((tmp_path / 'one.json').read_text()), json.loads((tmp_path / 'two.json').read_text())
    assert two['world_size'] == 2 and two['images'] == one['images'] == 5
    assert two['areas'] == one['areas'] and two['mIoU'] == one['mIoU'] and two['per_class'] == one['per_class']
    p1, p2 = sorted((tmp_path / 'p1').iterdir()), sorted((tmp_path / 'p2').iterdir())
    assert [p.name for p in p1] == [p.name for p in p2] and len(p1) == 5
    assert all(np.array_equal(np.array(Image.open(a)), np.array(Image.open(b))) for a, b in zip(p1, p2))
