"""CASS in the harness: main_seg_zeroshot.py / main_seg_vis.py --method cass --vfm FILE on a tiny generated VOC tree
(its VOC21 preset - the whole image in one window -, flags and knobs over it, saved predictions, one process vs
torchrun), and a second model CASS cannot use: one line, exit code 2.

The VFM file is the tiny DINO of tests/fixtures/cass_dino.pt (``dino_state_dict``, the official
``dino_vitbase8_pretrain.pth`` layout, width 128 as the CLIP) saved as a plain state dict; the CLIP is conftest's
``clip_file``."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FIXTURES
from tests.helpers import evaluate_in_process, one_and_two_processes, tiny_dino_file, write_fake_dataset

NAMES = Path(__file__).resolve().parents[1] / 'seg_segmentation' / 'names'
FAST = ['--resolution', '224', '--crop_size', '224', '--stride', '112', '--num_workers', '0', '--no_progress',
        '--device', 'cpu']


@pytest.fixture(scope='module')
def voc_tree(tmp_path_factory):
    return Path(write_fake_dataset('voc', tmp_path_factory.mktemp('voc') / 'VOC2012', num_images=3,
                                   sizes=[(170, 230), (230, 200), (180, 180)], seed=11))


@pytest.fixture(scope='module')
def vfm_file(tmp_path_factory):
    return tiny_dino_file(FIXTURES / 'cass_dino.pt', tmp_path_factory.mktemp('vfm'))


def test_voc_preset_and_saved_predictions(voc_tree, clip_file, vfm_file, tmp_path, capsys):
    """The issue's command line, no flags: CASS's VOC21 preset (whole image, prob_thd 0.1, its β, α, threshold);
    one label PNG per image at the original size, equal to what the metric counted."""
    rc, _, err = evaluate_in_process(['--method', 'cass', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip_file, '--vfm', vfm_file, '--class_names', NAMES / 'voc21.txt', '--save_pred',
                        tmp_path / 'pred', '--output', tmp_path / 'r.json', '--num_workers', '0', '--no_progress',
                        '--device', 'cpu'], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / 'r.json').read_text())
    s = res['settings']
    assert (s['method'], s['resolution'], s['crop'], s['templates']) == ('cass', 336, 0, 'full')
    assert s['vfm'] == str(vfm_file)
    assert (s['logit_scale'], s['prob_thd'], s['area_thd'], s['pamr_steps']) == (40.0, 0.1, None, 0)
    assert (s['global_semantics_weight'], s['mean_vector_weight'], s['h_threshold']) == (0.1, 0.03, 0.1)
    assert (s['eigen_scaling'], s['global_from'], s['svd_seed'], s['gaussian_std']) == (True, 'image', 2105, 5.0)
    assert res['images'] == 3 and res['num_classes'] == 21
    saved = sorted((tmp_path / 'pred').iterdir())
    counts = np.zeros(21, np.int64)
    for p in saved:
        pred, gt = np.array(Image.open(p)), np.array(Image.open(voc_tree / 'SegmentationClass' / p.name))
        assert pred.shape == gt.shape
        counts += np.bincount(pred[gt != 255].ravel(), minlength=21)
    assert len(saved) == 3 and counts.tolist() == res['areas']['pred']


def test_flags_and_knobs_override_the_preset(voc_tree, clip_file, vfm_file, tmp_path, capsys):
    rc, _, err = evaluate_in_process(['--method', 'cass', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip_file, '--vfm', vfm_file, '--prob_thd', '0', '--global_semantics_weight', '0.3',
                        '--eigen_scaling', 'false', '--global_from', 'window', '--svd_seed', '7', '--output',
                        tmp_path / 'r.json', '--max_images', '1'] + FAST, capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / 'r.json').read_text())['settings']
    assert (s['resolution'], s['crop'], s['stride'], s['prob_thd'], s['global_semantics_weight']) == \
        (224, 224, 112, 0.0, 0.3)
    assert (s['eigen_scaling'], s['global_from'], s['svd_seed'], s['mean_vector_weight']) == (False, 'window', 7, 0.03)


def test_help_names_the_knobs(capsys):
    from main_seg_zeroshot import main
    with pytest.raises(SystemExit):
        main(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert 'cass dino_vitb8' in text
    for knob in ('--global_semantics_weight', '--mean_vector_weight', '--h_threshold', '--eigen_scaling',
                 '--global_from {image,window}', '--svd_seed', '--cass_rank', 'cass: σ of the neighbourhood Gaussian'):
        assert knob in text, knob


def test_vfm_of_another_width_is_one_line(voc_tree, clip_file, tmp_path, capsys):
    """CASS reads DINO's keys as CLIP's heads: a DINO ViT-S (width 384) with this width-128 CLIP is a user error."""
    from modules.vfm import VFMConfig, meta_state_dict
    sd = {k: torch.zeros(v.shape) for k, v in meta_state_dict(VFMConfig('dino', 384, 1, 8, 28, 1536)).items()}
    torch.save(sd, tmp_path / 'small_dino.pth')
    rc, _, err = evaluate_in_process(['--method', 'cass', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip_file, '--vfm', tmp_path / 'small_dino.pth', '--max_images', '1'] + FAST, capsys)
    assert rc == 2 and 'the second vision model is 384 wide but CLIP is 128' in err and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(voc_tree, clip_file, vfm_file, tmp_path, repo_root):
    """Slide windows (the Context preset's knobs on VOC): every image's SVD draws come from its own generator, so
    two processes give the labels one gives."""
    common = ['--method', 'cass', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name', clip_file,
              '--vfm', vfm_file, '--batch_size', '3', '--global_semantics_weight', '0.25'] + FAST
    one_and_two_processes(repo_root, common, tmp_path, images=3)


def test_demo(clip_file, vfm_file, tmp_path, capsys):
    from main_seg_vis import main
    img = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(img)
    rc = main(['--method', 'cass', '--pretrained_clip_name', str(clip_file), '--vfm', str(vfm_file), '--input',
               str(img), '--classes', 'cat,dog,wall', '--output_dir', str(tmp_path / 'out'), '--device', 'cpu',
               '--no_progress', '--resolution', '224'])
    out = capsys.readouterr()
    assert rc == 0, out.err
    labels = np.array(Image.open(tmp_path / 'out' / 'labels' / 'photo.png'))
    assert labels.shape == (120, 160) and labels.max() <= 3
    summary = json.loads((tmp_path / 'out' / 'labels' / 'photo.json').read_text())
    assert summary['vocabulary'] == ['background', 'cat', 'dog', 'wall']
