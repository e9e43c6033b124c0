"""SC-CLIP in the harness: main_seg_zeroshot.py / main_seg_vis.py --method scclip on a tiny generated VOC tree (its
VOC21 preset, flag overrides, the layer rule on a 4-block CLIP, one-line errors, one process vs torchrun).

CLIPs: the SC-CLIP fixture's (12 blocks: ``tests/fixtures/scclip_reference.pt``'s ``visual_state_dict`` with the
SegCLIP fixture's text tower) and conftest's ``clip_file`` (4 blocks)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FIXTURES
from tests.helpers import evaluate_in_process, one_and_two_processes, write_fake_dataset

FAST = ['--num_workers', '0', '--no_progress', '--device', 'cpu']


@pytest.fixture(scope='module')
def voc_tree(tmp_path_factory):
    return Path(write_fake_dataset('voc', tmp_path_factory.mktemp('voc') / 'VOC2012', num_images=3,
                                   sizes=[(250, 230), (230, 300), (240, 240)], seed=7))


def clip_with_blocks(reference, path, blocks=None):
    """The SC-CLIP fixture's CLIP (its first ``blocks`` visual blocks) saved as an OpenAI-layout state dict."""
    visual = torch.load(FIXTURES / 'scclip_reference.pt', weights_only=True)['visual_state_dict']
    sd = {k: v for k, v in reference['clip_state_dict'].items() if not k.startswith('visual.')}
    sd.update({k: v.float() for k, v in visual.items() if blocks is None or not k.startswith(
        'visual.transformer.resblocks.') or int(k.split('.')[3]) < blocks})
    torch.save(sd, path)
    return path


@pytest.fixture(scope='module')
def clip12(reference, tmp_path_factory):
    return clip_with_blocks(reference, tmp_path_factory.mktemp('clip12') / 'scclip_tiny.pt')


@pytest.fixture(scope='module')
def plain_names(tmp_path_factory):
    """VOC21's class names one per line (no synonyms: fewer prompts to encode where the names do not matter)."""
    from seg_segmentation.classes import DATASET_CLASSES
    path = tmp_path_factory.mktemp('names') / 'voc21_plain.txt'
    path.write_text('\n'.join(['background'] + list(DATASET_CLASSES['voc'][1:])) + '\n')
    return path


def test_voc_preset_and_saved_predictions(voc_tree, clip12, tmp_path, capsys):
    rc, _, err = evaluate_in_process(['--method', 'scclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip12, '--output', tmp_path / 'r.json', '--save_pred', tmp_path / 'pred'] + FAST, capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / 'r.json').read_text())
    s = res['settings']
    # SC-CLIP's VOC21 config, the ViT-B/16 layer indices (12 blocks), the project's synonym file
    assert (s['method'], s['resolution'], s['crop'], s['stride'], s['templates']) == ('scclip', 336, 224, 112, 'full')
    assert (s['logit_scale'], s['prob_thd'], s['area_thd'], s['pamr_steps'], s['synonyms']) == \
        (50.0, 0.15, 0.1, 0, True)
    assert (s['pre_adjust_idx'], s['post_adjust_idx'], s['multi_start_idx'], s['multi_end_idx'], s['res_cls']) == \
        (8, 3, 3, 10, 0.3)
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


def test_flags_override_and_the_layer_rule_on_four_blocks(voc_tree, clip_file, plain_names, tmp_path, capsys):
    rc, _, err = evaluate_in_process(['--method', 'scclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip_file, '--class_names', plain_names, '--prob_thd', '0.3', '--logit_scale', '45',
                        '--multi_start_idx', '0', '--resolution', '224', '--max_images', '1',
                        '--output', tmp_path / 'r.json'] + FAST, capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / 'r.json').read_text())['settings']
    assert (s['logit_scale'], s['prob_thd'], s['area_thd'], s['resolution']) == (45.0, 0.3, 0.1, 224)
    # 4 blocks: 8, 3, 10 x 4/12 rounded down; multi_start_idx as given
    assert (s['pre_adjust_idx'], s['post_adjust_idx'], s['multi_start_idx'], s['multi_end_idx'], s['res_cls']) == \
        (2, 1, 0, 3, 0.3)


@pytest.mark.parametrize('blocks, flags, msg', [
    (None, ['--pre_adjust_idx', '11'], 'scclip: pre_adjust_idx 11 is not a block output of this 12-block CLIP'),
    (3, [], 'scclip: this CLIP has 3 blocks, too few for the layer rule (at least 4)'),
])
def test_layer_errors_are_one_line(blocks, flags, msg, voc_tree, reference, plain_names, tmp_path, capsys):
    clip = clip_with_blocks(reference, tmp_path / 'clip.pt', blocks)
    rc, _, err = evaluate_in_process(['--method', 'scclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name',
                        clip, '--class_names', plain_names, '--resolution', '224', '--max_images', '1'] + flags + FAST,
                       capsys)
    assert rc == 2 and msg in err and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1


def test_demo(clip12, tmp_path, capsys):
    from main_seg_vis import main
    img = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(img)
    names = tmp_path / 'names.txt'
    names.write_text('cat, kitten\ndog\nwall, brick wall\n')
    rc = main(['--method', 'scclip', '--pretrained_clip_name', str(clip12), '--input', str(img), '--classes_file',
               str(names), '--output_dir', str(tmp_path / 'out'), '--vis', 'pred', '--device', 'cpu',
               '--no_progress', '--resolution', '224'])
    assert rc == 0, capsys.readouterr().err
    labels = np.array(Image.open(tmp_path / 'out' / 'labels' / 'photo.png'))
    assert labels.shape == (120, 160) and labels.max() <= 3


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(voc_tree, clip12, tmp_path, repo_root):
    common = ['--method', 'scclip', '--dataset', 'voc', '--data_root', voc_tree, '--pretrained_clip_name', clip12,
              '--batch_size', '3'] + FAST
    one_and_two_processes(repo_root, common, tmp_path, images=3)
