"""Clean-up of temporaries left by killed runs (issue 21, bad case 1): only files this project wrote are removed.

The project's temporaries are named ``.segclip-tmp-<host tag>-<pid>-<random>.<file name>`` (common/fileio.py); the
clean-up removes those of dead processes on this host, in every folder a user names (--output's folder,
--save_pred, --output_dir of the evaluation table and of training, the download cache, the demo's outputs), and
nothing else. Before: every dot-file ending ``.part`` and every ``.NAME.tmp-SUFFIX`` whose suffix was not a live
pid was deleted, e.g. a user's ``.thesis.part`` or ``.bashrc.tmp-backup``.
"""
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import main_seg_zeroshot
from tests.helpers import write_fake_dataset
from tests.test_faults_cli import slow_server  # noqa: F401  (fixture)

DEAD_PID = 999_999_999          # above any Linux pid_max (at most 4194304): never a live process
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
SMALL = ['--resolution', '112', '--crop_size', '112', '--stride', '112', '--num_workers', '0', '--no_progress']


def ours(folder: Path, name: str, pid: int = DEAD_PID, host: str = HOST_TAG) -> Path:
    """The documented shape of the project's temporary for ``folder/name``."""
    return folder / f".segclip-tmp-{host}-{pid}-0123456789ab.{name}"


@pytest.fixture(scope='module')
def live_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
    yield proc.pid
    proc.kill()
    proc.wait()


def plant(folder: Path, live_pid: int) -> dict:
    """A user's files that look like temporaries, other live or foreign temporaries, and one stale temporary of
    ours; -> {'keep': [paths], 'stale': path}."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = [folder / '.thesis.part', folder / '.bashrc.tmp-backup', folder / '.notes.txt.tmp-999999999',
            folder / '.photo.jpg.k3j2h1.part',
            ours(folder, 'result.json', pid=live_pid),                 # a running writer's
            ours(folder, 'result.json', host='00000000' if HOST_TAG != '00000000' else '11111111'),  # another host's
            folder / f'.segclip-tmp-{HOST_TAG}-{DEAD_PID}-short.x']    # not our shape (random part too short)
    for p in keep:
        p.write_bytes(b'a user\'s data')
    stale = ours(folder, 'result.json')
    stale.write_bytes(b'half a file of a killed run')
    return {'keep': keep, 'stale': stale}


def assert_cleaned(planted: dict) -> None:
    for p in planted['keep']:
        assert p.is_file() and p.read_bytes() == b'a user\'s data', f'{p.name} was touched'
    assert not planted['stale'].exists(), 'the stale temporary of a killed run was left'


def test_only_stale_temporaries_of_ours_are_removed(tmp_path, live_pid):
    from common.fileio import remove_stale_temporaries
    planted = plant(tmp_path, live_pid)
    os.symlink(planted['keep'][0], ours(tmp_path, 'link'))            # a link in our shape: never followed/removed
    assert remove_stale_temporaries(tmp_path) == 1
    assert_cleaned(planted)
    assert ours(tmp_path, 'link').is_symlink()


def test_atomic_writes_use_the_project_name_and_fit_long_names(tmp_path, monkeypatch):
    """Every atomic write goes through a temporary of the documented shape; a destination name of 250 characters
    (legal) still gets a legal temporary name."""
    from common import fileio
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).name, Path(dst).name))
        return real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', spy)
    long_name = 'x' * 246 + '.txt'
    fileio.atomic_write_text(tmp_path / long_name, 'hello')
    fileio.atomic_write_bytes(tmp_path / 'b.bin', b'1')
    assert (tmp_path / long_name).read_text() == 'hello'
    assert [d for _, d in seen] == [long_name, 'b.bin']
    for src, _ in seen:
        assert src.startswith(f'.segclip-tmp-{HOST_TAG}-{os.getpid()}-') and len(src.encode()) <= 255, src
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([long_name, 'b.bin'])


def test_evaluation_output_and_save_pred_folders(tmp_path, tiny_checkpoint, live_pid, capsys):
    voc = write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=2, size=(96, 80))
    out_dir, preds = tmp_path / 'results', tmp_path / 'preds'
    planted = [plant(out_dir, live_pid), plant(preds, live_pid)]
    rc = main_seg_zeroshot.main(['--dataset', 'voc', '--data_root', voc, '--init_model', str(tiny_checkpoint),
                                 '--output', str(out_dir / 'r.json'), '--save_pred', str(preds)] + SMALL)
    assert rc == 0, capsys.readouterr().err
    for p in planted:
        assert_cleaned(p)
    assert (out_dir / 'r.json').is_file() and len(list(preds.glob('*.png'))) == 2


def test_evaluation_table_folder(tmp_path, tiny_checkpoint, live_pid, capsys):
    voc = write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=1, size=(96, 80))
    table = tmp_path / 'table'
    planted = plant(table, live_pid)
    rc = main_seg_zeroshot.main(['--dataset', 'voc', '--data_root', voc, '--init_model', str(tiny_checkpoint),
                                 '--output_dir', str(table)] + SMALL)
    assert rc == 0, capsys.readouterr().err
    assert_cleaned(planted)
    assert (table / 'results.md').is_file()


def test_training_output_dir(reference, tmp_path, live_pid):
    from engine.distributed import DistEnv
    from engine.training import train
    from tests.test_train_loop import RandomPairs, cfg_for, make_model
    planted = plant(tmp_path, live_pid)
    train(make_model(reference['clip_state_dict']), RandomPairs(2), cfg_for(tmp_path, batch_size=2, epochs=1),
          DistEnv())
    assert_cleaned(planted)
    assert (tmp_path / 'pytorch_model.bin.0').is_file()


def test_download_cache(slow_server, tmp_path, live_pid):  # noqa: F811
    from common import download
    url, _ = slow_server
    cache = tmp_path / 'cache'
    planted = plant(cache, live_pid)
    download.download_file(url, cache / 'segclip.bin', progress=False)
    assert_cleaned(planted)
    assert (cache / 'segclip.bin').is_file()


def test_demo_output_folders(repo_root, tiny_model, tmp_path, live_pid):
    from seg_segmentation.visualize import SegmentationDemo, run_visualization
    demo = SegmentationDemo(tiny_model, ['cup', 'table'], crop=112, stride=112, resolution=112)
    out = tmp_path / 'o'
    planted = [plant(out / 'labels', live_pid), plant(out / 'vis_imgs' / 'input_pred_label', live_pid)]
    report = run_visualization(demo, [repo_root / 'demo' / 'examples' / 'coffee.jpg'], out,
                               modes=['input_pred_label'], progress=False)
    assert report['written'] == ['coffee']
    for p in planted:
        assert_cleaned(p)
