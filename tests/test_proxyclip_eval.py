"""ProxyCLIP in the harness: main_seg_zeroshot.py / main_seg_vis.py --method proxyclip --vfm FILE on a tiny generated
VOC tree (its VOC21 preset, flags and knobs over it, saved predictions, one process vs torchrun), and the --vfm
errors: one line, exit code 2, before any model is loaded.

The VFM file is the tiny DINO of tests/fixtures/proxyclip_reference.pt (``dino_state_dict``, the official
``dino_vitbase8_pretrain.pth`` layout) saved as a plain state dict; the CLIP is conftest's ``clip_file``."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FIXTURES
from tests.helpers import evaluate_in_process, one_and_two_processes, tiny_dino_file, write_fake_dataset

NAMES = Path(__file__).resolve().parents[1] / 'seg_segmentation' / 'names'
FAST = ['--resolution', '224', '--crop_size', '224', '--stride', '112', '--num_workers', '0', '--no_progress',
        '--device', 'cpu']


@pytest.fixture(scope='module')
def voc_tree(tmp_path_factory):
    return Path(write_fake_dataset('voc', tmp_path_factory.mktemp('voc') / 'VOC2012', num_images=3,
                                   sizes=[(170, 230), (230, 200), (180, 180)], seed=7))


@pytest.fixture(scope='module')
def vfm_file(tmp_path_factory):
    return tiny_dino_file(FIXTURES / 'proxyclip_reference.pt', tmp_path_factory.mktemp('vfm'))


def test_voc_preset_and_saved_predictions(voc_tree, clip_file, vfm_file, tmp_path, capsys):
    """The command line of the issue, no flags: ProxyCLIP's VOC21 preset; one label PNG per image, equal to what
    the metric counted."""
    rc, out, err = evaluate_in_process(['--method', 'proxyclip', '--dataset', 'voc', '--data_root', voc_tree,
                          '--pretrained_clip_name', clip_file, '--vfm', vfm_file, '--class_names', NAMES / 'voc21.txt',
                          '--save_pred', tmp_path / 'pred', '--output', tmp_path / 'r.json',
                          '--num_workers', '0', '--no_progress', '--device', 'cpu'], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / 'r.json').read_text())
    s = res['settings']
    assert (s['method'], s['resolution'], s['crop'], s['stride'], s['templates']) == \
        ('proxyclip', 336, 336, 112, 'full')
    assert (s['logit_scale'], s['prob_thd'], s['area_thd'], s['pamr_steps']) == (40.0, 0.2, None, 0)
    assert (s['proxy_beta'], s['proxy_gamma'], s['vfm']) == (1.2, 3.0, str(vfm_file))
    assert res['images'] == 3 and res['num_classes'] == 21
    saved = sorted((tmp_path / 'pred').iterdir())
    counts = np.zeros(21, np.int64)
    for p in saved:
        pred, gt = np.array(Image.open(p)), np.array(Image.open(voc_tree / 'SegmentationClass' / p.name))
        assert pred.shape == gt.shape
        counts += np.bincount(pred[gt != 255].ravel(), minlength=21)
    assert len(saved) == 3 and counts.tolist() == res['areas']['pred']


def test_flags_and_knobs_override_the_preset(voc_tree, clip_file, vfm_file, tmp_path, capsys):
    rc, _, err = evaluate_in_process(['--method', 'proxyclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip_file, '--vfm', vfm_file, '--prob_thd', '0', '--logit_scale', '30', '--proxy_beta', '1.0',
                        '--proxy_gamma', '2', '--output', tmp_path / 'r.json', '--max_images', '1'] + FAST, capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / 'r.json').read_text())['settings']
    assert (s['resolution'], s['crop'], s['prob_thd'], s['logit_scale']) == (224, 224, 0.0, 30.0)
    assert (s['proxy_beta'], s['proxy_gamma']) == (1.0, 2.0)


def test_help_names_the_vfm_and_the_knobs(capsys):
    from main_seg_zeroshot import main
    with pytest.raises(SystemExit):
        main(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert '--vfm NAME_OR_FILE' in text and 'dino_vitb8' in text and 'dinov2_vit{s,b,l,g}14' in text
    assert 'proxyclip dino_vitb8' in text and '--proxy_beta' in text and '--proxy_gamma' in text


@pytest.mark.parametrize('args, msg', [
    (['--vfm', 'missing_dino.pth'], '--vfm missing_dino.pth is neither a checkpoint file nor one of the known models'),
    (['--vfm', '.'], '--vfm . is a folder, not a checkpoint file'),
    (['--method', 'sclip', '--vfm', 'dino_vitb8'], '--vfm is the second vision model of proxyclip'),
    (['--method', 'sclip', '--proxy_beta', '1'], '--proxy_beta is a setting of proxyclip'),
    (['--proxy_gamma', 'x'], "--proxy_gamma: invalid float value: 'x'"),
])
def test_bad_flags_one_line(args, msg, voc_tree, clip_file, capsys, monkeypatch):
    import modules.checkpoint
    monkeypatch.setattr(modules.checkpoint, 'load_clip', None)   # must not be reached
    base = ['--method', 'proxyclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name', clip_file]
    rc, _, err = evaluate_in_process(base + args, capsys)
    assert rc == 2 and msg in err and 'Traceback' not in err, err
    assert len(err.strip().splitlines()) == 1


def test_bad_vfm_file_and_offline_one_line(voc_tree, clip_file, tmp_path, capsys, monkeypatch):
    """A file that is not a DINO checkpoint (here a CLIP), and a name with no file in the cache while offline."""
    base = ['--method', 'proxyclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name', clip_file,
            '--max_images', '1'] + FAST
    rc, _, err = evaluate_in_process(base + ['--vfm', clip_file], capsys)
    assert rc == 2 and 'not a DINO / DINOv2 state dict in the official layout' in err and str(clip_file) in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv('SEGCLIP_OFFLINE', '1')
    rc, _, err = evaluate_in_process(base + ['--vfm', 'dino_vitb8', '--cache_dir', tmp_path / 'cache'], capsys)
    assert rc == 2 and 'SEGCLIP_OFFLINE' in err and str(tmp_path / 'cache' / 'dino_vitbase8_pretrain.pth') in err
    assert 'https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth' in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(voc_tree, clip_file, vfm_file, tmp_path, repo_root):
    common = ['--method', 'proxyclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name', clip_file,
              '--vfm', vfm_file, '--batch_size', '3'] + FAST
    one_and_two_processes(repo_root, common, tmp_path, images=3)


def test_demo_and_web_page(clip_file, vfm_file, tmp_path, capsys):
    """main_seg_vis.py and the web page (demo/app.py) segment a photo with ProxyCLIP alike."""
    from demo import app
    from main_seg_vis import main
    img = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(img)
    flags = ['--method', 'proxyclip', '--pretrained_clip_name', str(clip_file), '--vfm', str(vfm_file), '--device',
             'cpu', '--resolution', '224', '--crop_size', '224']
    rc = main(flags + ['--input', str(img), '--classes', 'cat, dog, wall', '--output_dir', str(tmp_path / 'out'),
                       '--no_progress'])
    out = capsys.readouterr()
    assert rc == 0, out.err
    cli_png = tmp_path / 'out' / 'labels' / 'photo.png'
    labels = np.array(Image.open(cli_png))
    assert labels.shape == (120, 160) and labels.max() <= 3
    seg = app.load_segmenter(app.get_args(flags))
    try:
        assert '--method proxyclip' in app.model_line(seg)
        assert Path(seg.segment(str(img), 'cat, dog, wall')['label_png']).read_bytes() == cli_png.read_bytes()
    finally:
        seg.close()
    rc = main(['--method', 'proxyclip', '--pretrained_clip_name', str(clip_file), '--vfm', str(tmp_path / 'no.pth'),
               '--input', str(img), '--output_dir', str(tmp_path / 'o2')])
    err = capsys.readouterr().err
    assert rc == 2 and '--vfm' in err and 'is neither a checkpoint file' in err and len(err.strip().splitlines()) == 1
    rc = main(['--method', 'proxyclip', '--pretrained_clip_name', str(clip_file), '--vfm', str(tmp_path / 'no.pth'),
               '--input', str(img), '--output_dir', str(tmp_path / 'o2')])
    err = capsys.readouterr().err
    assert rc == 2 and '--vfm' in err and 'is neither a checkpoint file' in err and len(err.strip().splitlines()) == 1
