"""--save_pred of the evaluation (issue 21, bad cases 4 and 5): never into the dataset's own folders, and one file
per image id, the id's sub-path kept."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main_seg_zeroshot
from tests.helpers import random_image, random_label_map, write_fake_dataset

SMALL = ['--resolution', '112', '--crop_size', '112', '--stride', '112', '--num_workers', '0', '--no_progress']


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('flag, where', [
    ('--save_pred', 'SegmentationClass'),                  # the case: the next evaluation scores 100
    ('--save_pred', 'SegmentationClass/more'),
    ('--save_pred', 'JPEGImages'),
    ('--output', 'SegmentationClass/2007_000000.png'),      # a JSON over a label map
    ('--output_dir', 'JPEGImages/table'),
])
def test_outputs_inside_the_dataset_are_refused(flag, where, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import modules.checkpoint

    def no_model(*a, **k):
        raise AssertionError('a model was loaded')
    monkeypatch.setattr(modules.checkpoint, 'load_segclip', no_model)
    root = Path(write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=2, size=(64, 48)))
    before = _files(root)
    rc = main_seg_zeroshot.main(['--dataset', 'voc', '--data_root', str(root), '--init_model', str(tiny_checkpoint),
                                 flag, str(root / where)] + SMALL)
    err = capsys.readouterr().err
    folder = 'annotation' if where.startswith('Segmentation') else 'image'
    assert rc == 2 and err == (f'error: {flag} {root / where} is inside the {folder} folder of the voc dataset '
                               f'({root / where.split("/")[0]}); writing there could replace its files: choose a '
                               'folder outside the dataset\n'), err
    assert _files(root) == before


def _voc_with_sub_paths(root: Path) -> Path:
    """A VOC-layout split whose ids have sub-folders: a/img and b/img share a base name (sizes differ)."""
    rng = np.random.default_rng(0)
    ids = {'a/img': (96, 64), 'b/img': (64, 96), 'c/deep/er/img': (80, 80)}
    for name, (w, h) in ids.items():
        lab = random_label_map(rng, h, w, 21)
        for folder, image, suffix in (('JPEGImages', random_image(rng, (w, h), labels=lab), '.jpg'),
                                      ('SegmentationClass', Image.fromarray(lab), '.png')):
            (root / folder / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / folder / (name + suffix))
    (root / 'ImageSets' / 'Segmentation').mkdir(parents=True)
    (root / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('\n'.join(ids) + '\n')
    return root


def test_predictions_keep_the_image_ids_sub_path(tmp_path, tiny_checkpoint, capsys):
    """Before: files were named by the id's base name, so a/img and b/img left one img.png for two images."""
    root = _voc_with_sub_paths(tmp_path / 'VOC2012')
    preds = tmp_path / 'preds'
    rc = main_seg_zeroshot.main(['--dataset', 'voc', '--data_root', str(root), '--init_model', str(tiny_checkpoint),
                                 '--save_pred', str(preds)] + SMALL)
    assert rc == 0, capsys.readouterr().err
    assert sorted(str(p.relative_to(preds)) for p in preds.rglob('*') if p.is_file()) == [
        'a/img.png', 'b/img.png', 'c/deep/er/img.png']
    for name, size in (('a/img', (96, 64)), ('b/img', (64, 96)), ('c/deep/er/img', (80, 80))):
        with Image.open(preds / f'{name}.png') as im:     # each image's own prediction, at its own size
            assert im.size == size and im.mode == 'P'
