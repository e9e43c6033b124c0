"""ClearCLIP in the harness: main_seg_zeroshot.py / main_seg_vis.py --method clearclip on a tiny generated VOC tree
(its VOC21 preset, flags and knobs over it, saved predictions, one process vs torchrun), with the SCLIP fixture's
tiny CLIP (``clip_file``)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import evaluate_in_process, one_and_two_processes, write_fake_dataset

VOC_NAMES = Path(__file__).resolve().parents[1] / 'seg_segmentation' / 'names' / 'voc21.txt'
QUICK = ['--num_workers', '0', '--no_progress', '--device', 'cpu']


@pytest.fixture(scope='module')
def voc_tree(tmp_path_factory):
    return Path(write_fake_dataset('voc', tmp_path_factory.mktemp('voc') / 'VOC2012', num_images=2,
                                   sizes=[(64, 48), (40, 56)], seed=7))


@pytest.fixture(scope='module')
def names(tmp_path_factory):
    """VOC21's classes, the first name of each line of the project's file, and two synonyms: 23 names (the full
    file's 80 names x 80 prompts would dominate the run time)."""
    lines = [line.split(', ')[0] for line in VOC_NAMES.read_text().splitlines()]
    lines[0], lines[2] = 'background, sky', 'bicycle, bike'
    path = tmp_path_factory.mktemp('names') / 'voc21_small.txt'
    path.write_text('\n'.join(lines) + '\n')
    return path


def _check_saved(voc_tree, pred_dir, res):
    """One PNG per image named by its id, at the original size, whose pixel counts are the JSON's areas."""
    ids = sorted(Path(p).stem for p in (voc_tree / 'JPEGImages').iterdir())
    saved = sorted(Path(pred_dir).iterdir())
    assert [p.stem for p in saved] == ids
    counts = np.zeros(21, np.int64)
    for p in saved:
        pred = np.array(Image.open(p))
        assert pred.shape[::-1] == Image.open(voc_tree / 'JPEGImages' / f'{p.stem}.jpg').size
        gt = np.array(Image.open(voc_tree / 'SegmentationClass' / p.name))
        counts += np.bincount(pred[gt != 255].ravel(), minlength=21)
    assert counts.tolist() == res['areas']['pred']


def test_voc_preset_and_saved_predictions(voc_tree, clip_file, names, tmp_path, capsys):
    """The issue's command line: with no flags, ClearCLIP's VOC21 preset and the paper's model."""
    rc, _, err = evaluate_in_process(['--method', 'clearclip', '--dataset', 'voc', '--data_root', voc_tree,
                        '--pretrained_clip_name', clip_file, '--class_names', names,
                        '--save_pred', tmp_path / 'pred', '--output', tmp_path / 'r.json'] + QUICK, capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / 'r.json').read_text())
    s = res['settings']
    assert (s['method'], s['resolution'], s['crop'], s['stride'], s['templates']) == ('clearclip', 448, 448, 224, 'full')
    assert (s['logit_scale'], s['prob_thd'], s['area_thd'], s['pamr_steps']) == (50.0, 0.5, None, 0)
    assert (s['model_type'], s['ignore_residual'], s['synonyms']) == ('clearclip', True, True)
    assert res['images'] == 2 and res['num_classes'] == 21
    _check_saved(voc_tree, tmp_path / 'pred', res)


def test_flags_and_knobs_override_the_preset(voc_tree, clip_file, names, tmp_path, capsys):
    rc, _, err = evaluate_in_process(['--method', 'clearclip', '--dataset', 'voc', '--data_root', voc_tree,
                        '--pretrained_clip_name', clip_file, '--class_names', names, '--prob_thd', '0.2',
                        '--logit_scale', '30', '--resolution', '224', '--crop_size', '0', '--model_type', 'vanilla',
                        '--ignore_residual', 'false', '--max_images', '1', '--save_pred', tmp_path / 'pred',
                        '--output', tmp_path / 'r.json'] + QUICK, capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / 'r.json').read_text())['settings']
    assert (s['resolution'], s['crop'], s['stride'], s['logit_scale'], s['prob_thd']) == (224, 0, 224, 30.0, 0.2)
    assert (s['model_type'], s['ignore_residual']) == ('vanilla', False)
    assert len(list((tmp_path / 'pred').iterdir())) == 1


def test_help_lists_the_knobs():
    from main_seg_zeroshot import build_parser
    text = ' '.join(build_parser().format_help().split())
    assert 'clearclip: query-query attention in the last block' in text
    assert "--model_type {clearclip,vanilla}" in text and "clearclip: attention of the last block" in text
    assert '--ignore_residual' in text and "clearclip: drop the last block's residual" in text


@pytest.mark.parametrize('args, msg', [
    (['--method', 'clearclip', '--ignore_residual', 'maybe'], "expected true or false, got 'maybe'"),
    (['--method', 'clearclip', '--model_type', 'ClearCLIP'], "invalid choice: 'ClearCLIP'"),
    (['--method', 'sclip', '--model_type', 'vanilla'], '--model_type is a setting of clearclip, not of --method sclip'),
])
def test_bad_knobs(args, msg, voc_tree, capsys):
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_tree] + args, capsys)
    assert rc == 2 and msg in err and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(voc_tree, clip_file, names, tmp_path, repo_root):
    common = ['--method', 'clearclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
              clip_file, '--class_names', names, '--batch_size', '1', '--resolution', '224'] + QUICK
    one_and_two_processes(repo_root, common, tmp_path, images=2)


def test_demo(clip_file, tmp_path, capsys):
    from main_seg_vis import main
    img = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(img)
    vocab = tmp_path / 'names.txt'
    vocab.write_text('cat, kitten\ndog\nwall, brick wall\n')
    rc = main(['--method', 'clearclip', '--pretrained_clip_name', str(clip_file), '--input', str(img),
               '--classes_file', str(vocab), '--output_dir', str(tmp_path / 'out'), '--vis', 'input_pred',
               '--device', 'cpu', '--no_progress', '--resolution', '224'])
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = json.loads((tmp_path / 'out' / 'labels' / 'photo.json').read_text())
    assert summary['vocabulary'] == ['background', 'cat', 'dog', 'wall']
    labels = np.array(Image.open(tmp_path / 'out' / 'labels' / 'photo.png'))
    assert labels.shape == (60, 80) and labels.max() <= 3
    assert (tmp_path / 'out' / 'vis_imgs' / 'input_pred' / 'input_pred_photo.jpg').exists()
