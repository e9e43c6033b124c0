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
