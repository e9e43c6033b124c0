"""The shipped class-name files with synonyms (seg_segmentation/names/): one line per label, aligned with the
benchmark's own names, no name standing for two classes."""
import pytest

from seg_segmentation.classes import DATASET_CLASSES
from seg_segmentation.synonyms import DATASET_NAME_FILES, dataset_name_file, read_name_file


@pytest.mark.parametrize("dataset", sorted(DATASET_NAME_FILES))
def test_name_file_matches_dataset(dataset):
    classes = read_name_file(dataset_name_file(dataset))       # refuses duplicates and empty names
    names = DATASET_CLASSES[dataset]
    assert len(classes) == len(names)
    for i, (lines, name) in enumerate(zip(classes, names)):
        if i == 0 and name == "background":
            continue                                            # stuff words standing for background
        assert lines[0] == name, (i, lines, name)
    assert sum(len(c) for c in classes) > len(classes)          # synonyms, not just the names


def test_every_benchmark_has_a_file():
    assert set(DATASET_NAME_FILES) == set(DATASET_CLASSES)


# ---------------------------------------------------------------------------------------------- byte-order mark
BOM = "\ufeff"      # written first by Notepad and other Windows editors ("UTF-8 with BOM")


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    """Issue 21, bad 7. Before: read as utf-8, the mark stayed in front of the first line, so a leading '# comment'
    became class 0 (every label shifted by one) and '\\ufeffbackground' turned background-by-threshold off."""
    from seg_segmentation.classes import read_class_file
    path = tmp_path / "classes.txt"
    path.write_bytes((BOM + "# my classes\ncat\ndog\n").encode("utf-8"))
    assert read_class_file(path) == ["cat", "dog"]
    assert read_name_file(path) == [["cat"], ["dog"]]
    path.write_bytes((BOM + "background, sky\ncat, kitten\n").encode("utf-8"))
    assert read_name_file(path) == [["background", "sky"], ["cat", "kitten"]]


def test_evaluation_reads_a_class_file_with_a_byte_order_mark(tmp_path, tiny_checkpoint, capsys):
    """The CLI path: --dataset custom with a BOM file whose first line is a comment and whose first class is
    'background' -> 21 classes (not 22), background by threshold on."""
    import json
    import main_seg_zeroshot
    from tests.helpers import write_fake_dataset
    root = write_fake_dataset("voc", tmp_path / "VOC2012", num_images=1, size=(64, 48))
    names = DATASET_CLASSES["voc"]
    classes = tmp_path / "classes.txt"
    classes.write_bytes((BOM + "# the VOC classes\n" + "\n".join(names) + "\n").encode("utf-8"))
    out = tmp_path / "r.json"
    rc = main_seg_zeroshot.main(["--dataset", "custom", "--data_root", root, "--class_names", str(classes),
                                 "--init_model", str(tiny_checkpoint), "--output", str(out), "--resolution", "112",
                                 "--crop_size", "112", "--stride", "112", "--num_workers", "0", "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert list(res["per_class"]) == names and res["settings"]["with_bg"] is True


def test_web_page_and_its_examples_drop_a_byte_order_mark(repo_root, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("web_app", repo_root / "demo" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    seg = app.WebSegmenter(None, None, released=False, device="cpu", work_dir=tmp_path / "work")
    assert seg.vocabulary(BOM + "# mine\ncat, kitten\ndog", background=True) == (["cat", "dog"],
                                                                                  [["cat", "kitten"], ["dog"]])
    assert seg.vocabulary(BOM + "cat, dog", background=False) == (["cat", "dog"], None)
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "x.txt").write_bytes((BOM + "# a comment\nmug\ntable\n").encode("utf-8"))
    assert app.example_class_names(examples / "x.txt") == "mug, table"
