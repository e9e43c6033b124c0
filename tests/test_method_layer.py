"""The method layer of the training-free segmenters (design.md §13): the registry and presets of every method, the
shared windows (crop 0 = whole image, batching across images), knob flags, and the methods × datasets table of
main_seg_zeroshot.py (files, skipping on rerun, torchrun)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UsageError
from modules.clip import CLIP, round_weights_like_clip_load
from seg_segmentation.dense import TrainingFreeSegmentor
from seg_segmentation.inference import slide_windows
from seg_segmentation.methods import METHODS, PROTOCOL_KEYS, Knob, build_method
from seg_segmentation.methods.base import pad_or_cut
from tests.conftest import SCLIP_REFERENCE_PT
from tests.helpers import evaluate_in_process, run_cli, write_fake_dataset

DATASETS = ('voc', 'context', 'coco', 'voc20', 'context59', 'coco_stuff', 'cityscapes', 'ade20k', 'custom')
FAST = ['--resolution', '224', '--num_workers', '0', '--no_progress', '--device', 'cpu']


@pytest.fixture(scope='module')
def tiny_clip(reference):
    sd = {k: v for k, v in reference['clip_state_dict'].items() if not k.startswith('visual.')}
    sd.update(torch.load(SCLIP_REFERENCE_PT, map_location='cpu', weights_only=True)['visual_state_dict'])
    return round_weights_like_clip_load(CLIP.from_state_dict(sd)).eval()


@pytest.fixture(scope='module')
def sclip_input():
    return torch.load(SCLIP_REFERENCE_PT, map_location='cpu', weights_only=True)['pipeline']['input']


# ---------------------------------------------------------------------- registry and presets
def test_registry_lists_the_methods_in_order():
    assert {'clip', 'sclip'} <= set(METHODS)
    years = [cls.year for cls in METHODS.values()]
    assert years == sorted(years)
    for name, cls in METHODS.items():
        assert cls.name == name and cls.summary and cls.paper


@pytest.mark.parametrize('name', list(METHODS))
def test_every_method_has_every_setting_for_every_dataset(name):
    cls = METHODS[name]
    assert set(cls.presets) <= set(DATASETS) - {'custom'}, set(cls.presets)
    for dataset in DATASETS:
        s = cls.settings(dataset)
        assert set(PROTOCOL_KEYS) <= set(s) and set(s) - set(PROTOCOL_KEYS) == {k.name for k in cls.knobs}
        assert s['resolution'] > 0 and s['crop'] >= 0 and s['stride'] > 0 and s['logit_scale'] > 0
        assert 0 <= s['prob_thd'] <= 1 and (s['area_thd'] is None or 0 <= s['area_thd'] < 1)
        for knob in cls.knobs:
            assert knob.check(s[knob.name], name) == s[knob.name]
    assert cls.settings('custom') == cls.settings('voc20')     # your own split: the no-background preset


def test_sclip_presets_are_the_published_ones():
    s = METHODS['sclip'].settings
    assert (s('voc')['logit_scale'], s('voc')['prob_thd'], s('voc')['area_thd']) == (65.0, 0.1, 0.1)
    assert (s('coco_stuff')['resolution'], s('cityscapes')['resolution'], s('ade20k')['resolution']) == (448, 560, 336)
    assert (s('context')['crop'], s('context')['stride'], s('context')['templates']) == (224, 112, 'full')


def test_knob_check():
    k = Knob('sigma', float, 5.0, 'a width')
    assert k.check('2', 'm') == 2.0
    with pytest.raises(ValueError, match='m: sigma must be float'):
        k.check('wide', 'm')
    with pytest.raises(ValueError, match='nan'):
        k.check(float('nan'), 'm')
    c = Knob('mode', str, 'a', 'a mode', choices=('a', 'b'))
    with pytest.raises(ValueError, match='must be one of a, b'):
        c.check('z', 'm')
    with pytest.raises(ValueError, match='true or false'):
        Knob('flag', bool, True, 'on or off').check('yes', 'm')


def test_configure_refuses_unknown_settings(tiny_clip):
    method = build_method('sclip', tiny_clip)
    with pytest.raises(ValueError, match="sclip has no setting 'gaussian_std'"):
        method.configure(gaussian_std=3.0)


# ---------------------------------------------------------------------- shared windows
def test_crop_zero_is_one_window_over_the_whole_image():
    assert slide_windows(150, 211, 0, 112) == [(0, 150, 0, 211)]
    assert len(slide_windows(336, 448, 224, 112)) == 6


def test_pad_or_cut():
    crops = torch.randn(2, 3, 40, 50)
    cut, box = pad_or_cut(crops, 16)
    assert box is None and cut.shape[-2:] == (32, 48) and torch.equal(cut, crops[..., :32, :48])
    padded, box = pad_or_cut(crops, 16, pad_multiple=56)
    assert padded.shape[-2:] == (56, 56) and box == (8, 3)
    assert torch.equal(padded[..., 8:48, 3:53], crops) and padded[..., :8, :].abs().sum() == 0
    with pytest.raises(ValueError, match='smaller than one 16x16 patch'):
        pad_or_cut(crops[..., :8, :], 16)


@pytest.mark.parametrize('name', ['sclip', 'clip'])
def test_whole_image_mode_equals_one_window(tiny_clip, sclip_input, name):
    """crop 0: the window logits of the whole (non-square, not a multiple of 16 wide) image, resized to the
    original size - no seams, no averaging."""
    method = build_method(name, tiny_clip)
    seg = TrainingFreeSegmentor(method, name_lines=['sky, wall', 'cat', 'dog, puppy'], crop=0, stride=112)
    image = sclip_input[..., :300, :437]
    (whole,) = seg.slide_logits(image)
    direct = method.window_logits(image, seg.queries, [None])[0]
    assert whole.shape == (5, 300, 437)   # 5 names
    torch.testing.assert_close(whole, direct, atol=0, rtol=0)


@pytest.mark.parametrize('name', ['sclip', 'clip'])
def test_windows_batched_across_images_equal_one_at_a_time(tiny_clip, sclip_input, name):
    """Images of different sizes (two of them the same), their windows pooled in batches of 16 vs run one by one:
    the per-sample computation gives the same logits up to float noise of the batched matrix products."""
    seg = TrainingFreeSegmentor(build_method(name, tiny_clip), name_lines=['sky, wall', 'cat', 'dog, puppy'])
    x = sclip_input[0]
    images = [x[:, :250, :300], x[:, 40:290, 100:400], x[:, :224, :224], x[:, 10:260, 20:320]]
    batched = seg.slide_logits(images, batch_size=16)
    single = [seg.slide_logits([img], batch_size=1)[0] for img in images]
    for a, b in zip(batched, single):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    labels = seg.predict_labels(images, [(100, 120)] * 4, batch_size=16)
    assert [tuple(lb.shape) for lb in labels] == [(100, 120)] * 4


# ---------------------------------------------------------------------- the command line
@pytest.mark.parametrize('args, message', [
    (['--method', 'sclip,clip'], 'several methods or datasets make a table: give --output_dir DIR'),
    (['--method', 'sclip', '--dataset', 'voc,voc20'], 'give --output_dir DIR'),
    (['--method', 'sclip,naclip2'], '--method naclip2: unknown; choose from segclip, '),
    (['--method', 'sclip', '--dataset', 'voc,vocc', '--output_dir', 'x'], "--dataset 'vocc': choose from"),
    (['--method', 'sclip', '--output', 'a.json', '--output_dir', 'x'], 'with --output_dir every pair has its own'),
    (['--method', 'sclip', '--crop_size', '-1'], '--crop_size must be >= 0'),
    (['--method', 'sclip', '--stride', '300'], '--stride 300 larger than --crop_size 224'),
    (['--method', 'sclip', '--logit_scale', 'inf'], '--logit_scale must be a positive number'),
    (['--method', 'sclip', '--prob_thd', '1.5'], '--prob_thd must be in [0, 1]'),
    (['--method', 'sclip', '--data_root', 'voc=/nowhere,context'], 'give one folder, or DATASET=FOLDER pairs'),
])
def test_bad_table_and_method_flags(args, message, capsys):
    rc, _, err = evaluate_in_process(args, capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_knob_flags_belong_to_their_methods(capsys):
    from main_seg_zeroshot import build_parser
    text = build_parser().format_help()
    for name, cls in METHODS.items():
        assert name in text
        for knob in cls.knobs:
            assert f'--{knob.name}' in text
            others = [m for m, c in METHODS.items() if knob.name not in {k.name for k in c.knobs} and m != 'segclip']
            if others:   # a knob given to a method without it is refused, naming who has it
                value = knob.default if knob.default is not None else (knob.choices or [1])[0]
                rc, _, err = evaluate_in_process(['--method', others[0], f'--{knob.name}', str(value)], capsys)
                users = [m for m, c in METHODS.items() if knob.name in {k.name for k in c.knobs}]
                assert rc == 2 and f'--{knob.name} is a setting of {", ".join(users)}, not of' in err, err


@pytest.fixture(scope='module')
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_fake_dataset('voc', root / 'VOCdevkit' / 'VOC2012', num_images=2, sizes=[(230, 250), (250, 230)], seed=3)
    write_fake_dataset('ade20k', root / 'ade' / 'ADEChallengeData2016', num_images=2, sizes=[(240, 240), (200, 260)],
                       seed=4)
    return root


def _table_args(root, clip_file, out, *extra):
    return ['--method', 'sclip,clip', '--dataset', 'voc,ade20k', '--data_root', root, '--pretrained_clip_name',
            clip_file, '--output_dir', out] + FAST + list(extra)


def test_table_of_methods_and_datasets(two_datasets, clip_file, tmp_path, capsys):
    out = tmp_path / 'table'
    rc, stdout, err = evaluate_in_process(_table_args(two_datasets, clip_file, out, '--save_pred', tmp_path / 'pred'), capsys)
    assert rc == 0, err
    results = {}
    for method in ('sclip', 'clip'):
        for dataset in ('voc', 'ade20k'):
            r = json.loads((out / method / f'{dataset}.json').read_text())
            assert (r['settings']['method'], r['dataset'], r['images']) == (method, dataset, 2)
            assert r['request']['method'] == method and r['request']['resolution'] == 224
            results[method, dataset] = r['mIoU']
            assert len(list((tmp_path / 'pred' / method / dataset).glob('*.png'))) == 2
    assert '[1/4] sclip on voc' in stdout and '[4/4] clip on ade20k' in stdout
    rows = list(csv.reader((out / 'results.csv').read_text().splitlines()))
    assert rows[0] == ['method', 'voc', 'ade20k', 'mean']
    for row in rows[1:]:
        voc, ade, mean = (float(v) for v in row[1:])
        assert voc == pytest.approx(results[row[0], 'voc'], abs=1e-4)
        assert ade == pytest.approx(results[row[0], 'ade20k'], abs=1e-4)
        assert mean == pytest.approx((voc + ade) / 2, abs=1e-4)
    md = (out / 'results.md').read_text()
    assert '| method | voc | ade20k | mean |' in md and '(59.6)' in md and '(16.5)' in md   # SCLIP's papers' numbers
    assert md.count('\n| ') == 3 + 0 and f'{results["clip", "voc"]:.2f}' in md

    # a rerun skips every pair; a changed flag evaluates them again
    stamp = (out / 'sclip' / 'voc.json').stat().st_mtime_ns
    rc, stdout, err = evaluate_in_process(_table_args(two_datasets, clip_file, out), capsys)
    assert rc == 0 and stdout.count('done before') == 4 and 'skipped' in stdout, err
    assert (out / 'sclip' / 'voc.json').stat().st_mtime_ns == stamp
    rc, stdout, err = evaluate_in_process(_table_args(two_datasets, clip_file, out, '--prob_thd', '0.3'), capsys)
    assert rc == 0 and 'done before' not in stdout, err
    assert json.loads((out / 'sclip' / 'voc.json').read_text())['settings']['prob_thd'] == 0.3


@pytest.mark.slow
def test_table_under_torchrun_equals_one_process(two_datasets, clip_file, tmp_path, repo_root):
    r1 = run_cli(repo_root, _table_args(two_datasets, clip_file, tmp_path / 'one'))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli(repo_root, _table_args(two_datasets, clip_file, tmp_path / 'two'), nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    for method in ('sclip', 'clip'):
        for dataset in ('voc', 'ade20k'):
            one, two = (json.loads((tmp_path / d / method / f'{dataset}.json').read_text()) for d in ('one', 'two'))
            assert (one['world_size'], two['world_size']) == (1, 2)
            assert one['areas'] == two['areas'] and one['mIoU'] == two['mIoU']
    assert (tmp_path / 'one' / 'results.csv').read_text() == (tmp_path / 'two' / 'results.csv').read_text()


def test_demo_crop_zero_whole_image(clip_file, tmp_path, capsys):
    """--crop_size 0 (whole image) reaches the demo too."""
    from main_seg_vis import main
    img = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(img)
    rc = main(['--method', 'sclip', '--pretrained_clip_name', str(clip_file), '--input', str(img), '--classes',
               'cat, dog', '--output_dir', str(tmp_path / 'out'), '--device', 'cpu', '--no_progress',
               '--crop_size', '0', '--resolution', '200'])
    assert rc == 0, capsys.readouterr().err
    labels = np.array(Image.open(tmp_path / 'out' / 'labels' / 'photo.png'))
    assert labels.shape == (90, 130)


def test_a_second_vision_model_is_part_of_the_request_of_its_methods_only():
    """Adding --vfm for the VFM methods of a table does not make a rerun evaluate the other methods again."""
    from main_seg_zeroshot import parse_args, vfm_of
    args = parse_args(['--method', 'sclip,proxyclip', '--dataset', 'voc', '--output_dir', 'x', '--vfm', 'dino_vitb16'])
    assert (vfm_of(args, 'sclip'), vfm_of(args, 'proxyclip'), vfm_of(args, 'segclip')) == (None, 'dino_vitb16', None)
    assert vfm_of(parse_args(['--method', 'cass']), 'cass') == 'dino_vitb8'


def test_evalconfig_preset_carries_knobs_and_flags():
    from seg_segmentation.evaluate import EvalConfig
    cfg = EvalConfig.preset('sclip', 'voc', prob_thd=0.3, knobs={})
    assert (cfg.resolution, cfg.crop, cfg.stride, cfg.logit_scale, cfg.prob_thd, cfg.area_thd) == \
        (336, 224, 112, 65.0, 0.3, 0.1)
    with pytest.raises(UsageError, match='unknown training-free method'):
        EvalConfig.preset('nope', 'voc')
