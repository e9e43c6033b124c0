"""The training-free methods in the harness: main_seg_zeroshot.py / main_seg_vis.py --method sclip|clip on tiny
generated datasets (presets, overrides, saved predictions, one process vs torchrun), and SegCLIP with synonyms and
PAMR (its default results unchanged)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import evaluate_in_process, one_and_two_processes, write_fake_dataset

NAMES = Path(__file__).resolve().parents[1] / 'seg_segmentation' / 'names'
FAST = ['--resolution', '224', '--crop_size', '224', '--stride', '112', '--num_workers', '0', '--no_progress',
        '--device', 'cpu']


@pytest.fixture(scope='module')
def voc_tree(tmp_path_factory):
    return Path(write_fake_dataset('voc', tmp_path_factory.mktemp('voc') / 'VOC2012', num_images=3,
                                   sizes=[(250, 230), (230, 300), (240, 240)], seed=5))


def test_sclip_presets_synonyms_and_saved_predictions(voc_tree, clip_file, tmp_path, capsys):
    rc, out, err = evaluate_in_process(['--method', 'sclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                          clip_file, '--num_workers', '0', '--no_progress', '--device', 'cpu',
                          '--output', tmp_path / 'r.json', '--save_pred', tmp_path / 'pred'], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / 'r.json').read_text())
    s = res['settings']
    # SCLIP's published VOC21 settings, and the project's synonym file
    assert (s['method'], s['resolution'], s['crop'], s['stride'], s['templates']) == ('sclip', 336, 224, 112, 'full')
    assert (s['logit_scale'], s['prob_thd'], s['area_thd'], s['synonyms']) == (65.0, 0.1, 0.1, True)
    assert s['clip_weights'] == str(clip_file) and res['images'] == 3 and res['num_classes'] == 21
    # one label PNG per image, named by its id, at the original size, equal to the metric's input
    ids = sorted(p.name for p in (voc_tree / 'JPEGImages').iterdir())
    saved = sorted((tmp_path / 'pred').iterdir())
    assert [p.stem for p in saved] == [Path(i).stem for i in ids]
    for p, i in zip(saved, ids):
        assert Image.open(p).size == Image.open(voc_tree / 'JPEGImages' / i).size
    counts = np.zeros(21, np.int64)
    for p in saved:
        pred, gt = np.array(Image.open(p)), np.array(Image.open(voc_tree / 'SegmentationClass' / p.name))
        counts += np.bincount(pred[gt != 255].ravel(), minlength=21)
    assert counts.tolist() == res['areas']['pred']


def test_flags_override_presets(voc_tree, clip_file, tmp_path, capsys):
    rc, _, err = evaluate_in_process(['--method', 'clip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip_file, '--logit_scale', '30', '--prob_thd', '0', '--area_thd', 'none', '--pamr_steps', '2',
                        '--pamr_dilations', '4', '--classes_file', NAMES / 'voc21.txt',
                        '--output', tmp_path / 'r.json', '--max_images', '1'] + FAST, capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / 'r.json').read_text())['settings']
    assert (s['method'], s['resolution'], s['stride'], s['logit_scale'], s['prob_thd'], s['area_thd']) == \
        ('clip', 224, 112, 30.0, 0.0, None)
    assert (s['pamr_steps'], s['pamr_dilations'], s['synonyms']) == (2, [4], True)


@pytest.mark.parametrize('args, msg', [
    (['--method', 'sclip', '--init_model', 'x.bin'], '--init_model is a SegCLIP checkpoint'),
    (['--logit_scale', '40'], '--logit_scale apply to the training-free methods only'),
    (['--method', 'sclip', '--area_thd', 'lots'], "expected a number in [0, 1) or 'none'"),
    (['--method', 'sclip', '--pretrained_clip_name', 'nope.pt'], 'neither a file or folder nor one of the known'),
    (['--pamr_steps', '-1'], '--pamr_steps must be >= 0'),
])
def test_bad_method_flags(args, msg, voc_tree, capsys):
    rc, _, err = evaluate_in_process(['--dataset', 'voc', '--data_root', voc_tree] + args, capsys)
    assert rc == 2 and msg in err and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1


def test_pamr_distance_beyond_the_image_is_the_image_size():
    """A PAMR distance past the image's edge only sees replicated edge pixels: huge --pamr_dilations give the
    result of max(H, W) (they asked for hundreds of GB, or overflowed)."""
    from seg_segmentation.pamr import pamr
    g = torch.Generator().manual_seed(0)
    image, mask = torch.randn(1, 3, 20, 30, generator=g), torch.randn(1, 4, 20, 30, generator=g)
    edge = pamr(image, mask, steps=3, dilations=[2, 30])
    for far in (31, 100_000, 10 ** 12):
        assert torch.equal(pamr(image, mask, steps=3, dilations=[2, far]), edge)
    assert not torch.equal(pamr(image, mask, steps=3, dilations=[2, 15]), edge)


def _vis(clip_file, tmp_path, photo, *extra):
    from main_seg_vis import main
    return main(['--method', 'sclip', '--pretrained_clip_name', str(clip_file), '--input', str(photo), '--classes',
                 'cat, wall', '--output_dir', str(tmp_path / 'out'), '--device', 'cpu', '--no_progress', *extra])


@pytest.mark.parametrize('size, extra', [
    ((120, 160), ['--resolution', '8']),                          # the resized image: 8 x 10, below one patch
    ((10, 3000), ['--resolution', '224']),                        # a thin strip: 224 tall, then capped to 2048 long
    ((120, 160), ['--resolution', '224', '--pamr_steps', '1', '--pamr_dilations', '1000000000000']),
])
def test_demo_sclip_small_or_thin_images_and_far_pamr(size, extra, clip_file, tmp_path, capsys):
    """What SegCLIP segments, the training-free methods segment too: an image side below one patch is padded to
    one patch (as SegCLIP does) - it was a ValueError traceback; labels come out at the photo's size."""
    photo = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(photo)
    assert _vis(clip_file, tmp_path, photo, *extra) == 0, capsys.readouterr().err
    assert np.array(Image.open(tmp_path / 'out' / 'labels' / 'photo.png')).shape == size


def test_demo_sclip_crop_below_one_patch(clip_file, tmp_path, capsys):
    photo = tmp_path / 'photo.png'
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(photo)
    assert _vis(clip_file, tmp_path, photo, '--resolution', '64', '--crop_size', '8', '--stride', '8') == 2
    err = capsys.readouterr().err
    assert err == ('error: crop size 8 is smaller than one 16x16 patch of this CLIP; give a --crop_size of at '
                   'least 16 (or 0: the whole image)\n')


@pytest.mark.slow
def test_sclip_torchrun_two_processes_equal_one(voc_tree, clip_file, tmp_path, repo_root):
    common = ['--method', 'sclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name', clip_file,
              '--batch_size', '3'] + FAST
    one_and_two_processes(repo_root, common, tmp_path, images=3)


# ---------------------------------------------------------------------- SegCLIP with synonyms and PAMR
def test_segclip_defaults_unchanged():
    from seg_segmentation.evaluate import EvalConfig
    for dataset in ('voc', 'ade20k', 'custom'):
        assert EvalConfig.preset('segclip', dataset) == EvalConfig(dataset=dataset)


def test_segclip_one_name_per_class_is_the_plain_path(tiny_model, reference):
    from seg_segmentation.inference import ZeroShotSegmentor
    names = reference['config']['class_names']
    plain = ZeroShotSegmentor(tiny_model, class_names=['background'] + names, bg_thresh=0.8)
    lists = ZeroShotSegmentor(tiny_model, classes=[['background']] + [[n] for n in names], bg_thresh=0.8)
    assert lists.query_class is None
    img = reference['seg']['slide_input']
    assert torch.equal(plain.slide_logits(img, 112, 112)[0], lists.slide_logits(img, 112, 112)[0])


def test_segclip_synonyms_and_pamr(tiny_model, reference):
    from seg_segmentation.inference import ZeroShotSegmentor
    names = reference['config']['class_names']
    img = reference['seg']['slide_input']
    plain = ZeroShotSegmentor(tiny_model, class_names=['background'] + names, bg_thresh=0.8)
    classes = [['background', 'sky', 'wall']] + [[n] for n in names]
    classes[8] = ['cat', 'kitten', 'tabby']                         # class 8 = cat (with background first)
    syn = ZeroShotSegmentor(tiny_model, classes=classes, bg_thresh=0.8)
    assert syn.num_classes == plain.num_classes == 21 and syn.text_embedding.shape[0] == 20 + 2 + 2
    a, b = plain.slide_logits(img, 112, 112)[0], syn.slide_logits(img, 112, 112)[0]
    assert a.shape == b.shape and not torch.equal(a, b)
    # a class scores the best of its names: the cat channel is at least what 'cat' alone gives in the same head
    crops = img[..., :112, :112]
    lg = syn.crop_logits(crops)
    assert lg.shape == (1, 21, 112, 112)
    # PAMR refines at the output size: labels change, shape kept
    pamr = ZeroShotSegmentor(tiny_model, class_names=['background'] + names, bg_thresh=0.8, pamr_steps=10)
    size = (150, 200)
    p0 = plain.predict_labels([img[0]], [size], crop=112, stride=112)[0]
    p1 = pamr.predict_labels([img[0]], [size], crop=112, stride=112)[0]
    assert p0.shape == p1.shape == size and not torch.equal(p0, p1)


# ---------------------------------------------------------------------- the demo
def test_demo_sclip(clip_file, tmp_path, capsys):
    from main_seg_vis import main
    img = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(img)
    names = tmp_path / 'names.txt'
    names.write_text('cat, kitten\ndog\nwall, brick wall\n')
    rc = main(['--method', 'sclip', '--pretrained_clip_name', str(clip_file), '--input', str(img), '--classes_file',
               str(names), '--output_dir', str(tmp_path / 'out'), '--vis', 'all', '--device', 'cpu',
               '--no_progress', '--resolution', '224'])
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = json.loads((tmp_path / 'out' / 'labels' / 'photo.json').read_text())
    assert summary['vocabulary'] == ['background', 'cat', 'dog', 'wall'] and summary['background'] is True
    modes = sorted(p.name for p in (tmp_path / 'out' / 'vis_imgs').iterdir())
    assert modes == ['input', 'input_pred', 'input_pred_label', 'pred']          # no center views for CLIP
    labels = np.array(Image.open(tmp_path / 'out' / 'labels' / 'photo.png'))
    assert labels.shape == (120, 160) and labels.max() <= 3
    rc = main(['--method', 'sclip', '--pretrained_clip_name', str(clip_file), '--input', str(img), '--vis',
               'first_group', '--output_dir', str(tmp_path / 'o2')])
    err = capsys.readouterr().err
    assert rc == 2 and 'center views exist only for SegCLIP' in err
