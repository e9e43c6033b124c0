"""--save_pred of the evaluation (issue 21, bad cases 4 and 5): never into the dataset's own folders, and one file
per image id, the id's sub-path kept."""
from pathlib import Path

import pytest

import main_seg_zeroshot
from tests.helpers import write_fake_dataset

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
