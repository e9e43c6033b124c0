"""NACLIP in the scripts (design.md §13.2): main_seg_zeroshot.py --method naclip on a tiny generated VOC tree (its
VOC21 preset, flags and knobs over it, saved predictions, a refused knob combination, one process vs torchrun) and
main_seg_vis.py --method naclip. The CLIP is the SCLIP fixture's (``clip_file``): what is tested here is the wiring;
the numbers are tested against NACLIP's own in test_naclip_parity.py."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import evaluate_in_process, one_and_two_processes, write_fake_dataset

NAMES = Path(__file__).resolve().parents[1] / 'seg_segmentation' / 'names'
QUIET = ['--num_workers', '0', '--no_progress', '--device', 'cpu']


@pytest.fixture(scope='module')
def voc_tree(tmp_path_factory):
    # small images: the preset resizes them to short side 336 and runs each whole (a 21×28 or 28×21 grid)
    return Path(write_fake_dataset('voc', tmp_path_factory.mktemp('voc') / 'VOC2012', num_images=3,
                                   sizes=[(120, 90), (90, 120), (120, 90)], seed=7))


def test_voc_preset_and_saved_predictions(voc_tree, clip_file, tmp_path, capsys):
    """The issue's command line with no flags: NACLIP's VOC21 preset (whole image, threshold 0.1, no PAMR) and
    one label PNG per image, equal to what the metric counted."""
    rc, _, err = evaluate_in_process(['--method', 'naclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip_file, '--class_names', NAMES / 'voc21.txt', '--save_pred', tmp_path / 'pred',
                        '--output', tmp_path / 'r.json'] + QUIET, capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / 'r.json').read_text())
    s = res['settings']
    assert (s['method'], s['resolution'], s['crop'], s['templates']) == ('naclip', 336, 0, 'full')
    assert (s['logit_scale'], s['prob_thd'], s['area_thd'], s['pamr_steps']) == (40.0, 0.1, None, 0)
    assert (s['arch'], s['attn_strategy'], s['gaussian_std'], s['synonyms']) == ('reduced', 'naclip', 5.0, True)
    assert res['images'] == 3 and res['num_classes'] == 21
    ids = sorted(p.stem for p in (voc_tree / 'JPEGImages').iterdir())
    saved = sorted((tmp_path / 'pred').iterdir())
    assert [p.stem for p in saved] == ids
    counts = np.zeros(21, np.int64)
    for p in saved:
        pred, gt = np.array(Image.open(p)), np.array(Image.open(voc_tree / 'SegmentationClass' / p.name))
        assert pred.shape == gt.shape
        counts += np.bincount(pred[gt != 255].ravel(), minlength=21)
    assert counts.tolist() == res['areas']['pred']


def test_flags_and_knobs_override_the_preset(voc_tree, clip_file, tmp_path, capsys):
    rc, _, err = evaluate_in_process(['--method', 'naclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip_file, '--resolution', '224', '--crop_size', '224', '--stride', '112', '--prob_thd', '0.3',
                        '--logit_scale', '50', '--pamr_steps', '10', '--attn_strategy', 'nonly', '--gaussian_std', '3',
                        '--max_images', '1', '--output', tmp_path / 'r.json'] + QUIET, capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / 'r.json').read_text())['settings']
    assert (s['resolution'], s['crop'], s['stride'], s['prob_thd'], s['logit_scale']) == (224, 224, 112, 0.3, 50.0)
    assert (s['pamr_steps'], s['pamr_dilations']) == (10, [8, 16])
    assert (s['arch'], s['attn_strategy'], s['gaussian_std']) == ('reduced', 'nonly', 3.0)


@pytest.mark.parametrize('args, msg', [
    (['--attn_strategy', 'csa'], 'naclip: attn_strategy csa (SCLIP\'s attention) runs with arch vanilla only'),
    (['--gaussian_std', '-1'], 'naclip: gaussian_std must be a positive number, got -1.0'),
    (['--arch', 'full'], "invalid choice: 'full'"),
])
def test_refused_knobs(args, msg, voc_tree, clip_file, tmp_path, capsys):
    rc, _, err = evaluate_in_process(['--method', 'naclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip_file, '--output', tmp_path / 'r.json'] + args + QUIET, capsys)
    assert rc == 2 and msg in err and 'Traceback' not in err, err
    assert not (tmp_path / 'r.json').exists()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(voc_tree, clip_file, tmp_path, repo_root):
    common = ['--method', 'naclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name', clip_file,
              '--class_names', NAMES / 'voc21.txt', '--batch_size', '2'] + QUIET
    one, two = one_and_two_processes(repo_root, common, tmp_path, images=3)
    assert one['settings']['crop'] == two['settings']['crop'] == 0


def test_demo(clip_file, tmp_path, capsys):
    from main_seg_vis import main
    img = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(img)
    names = tmp_path / 'names.txt'
    names.write_text('cat, kitten\ndog\nwall, brick wall\n')
    rc = main(['--method', 'naclip', '--pretrained_clip_name', str(clip_file), '--input', str(img), '--classes_file',
               str(names), '--output_dir', str(tmp_path / 'out'), '--device', 'cpu', '--no_progress',
               '--resolution', '224', '--gaussian_std', '3'])
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = json.loads((tmp_path / 'out' / 'labels' / 'photo.json').read_text())
    assert summary['vocabulary'] == ['background', 'cat', 'dog', 'wall']
    labels = np.array(Image.open(tmp_path / 'out' / 'labels' / 'photo.png'))
    assert labels.shape == (90, 130) and labels.max() <= 3
